"""`peerpost-rendezvous serve` on IPv4 and IPv6 at once, a real process: `--listen` given
twice, at one port, puts the mailbox, STUN over UDP and TCP and the DHT bootstrap node on
both addresses at the same ports (CHALLENGE announces one port per service), and a client
of either family registers, is answered by STUN with its own family's address and joins the
DHT. On the wildcard pair 0.0.0.0 and [::] it could not start before (the IPv6 UDP socket
took IPv4 too, so STUN's port was in use)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from crypto.address import parse_hostport
from overlay.dht import DhtNode
from rendezvous.client import RendezvousClient
from rendezvous.services import bind_udp
from rendezvous.stun import query_mapping

from .conftest import ident
from .test_operator import run, serve

pytestmark = pytest.mark.slow
SERVICES = ("", "stun", "dht", "stun_tcp")


def _listening(lines: list[str]) -> dict[tuple[str, str], int]:
    """(service, host) -> port, from `serve`'s lines (`stun listening [::]:P`, ...)."""
    out: dict[tuple[str, str], int] = {}
    for line in lines:
        name, _, where = line.rpartition("listening ")
        host, port = parse_hostport(where)
        out[(name.strip(), host)] = port
    return out


async def test_listen_twice_serves_ipv4_and_ipv6_at_the_same_ports(tmp_path: Path) -> None:
    async with serve(tmp_path / "d", "--open-registration", "--listen", "[::]:0",
                     listen="0.0.0.0:0", expect=8) as srv:
        found = _listening(srv.lines)
        assert set(found) == {(name, host) for name in SERVICES for host in ("0.0.0.0", "::")}
        ports = {name: found[(name, "0.0.0.0")] for name in SERVICES}
        assert {name: found[(name, "::")] for name in SERVICES} == ports
        for n, host in enumerate(("127.0.0.1", "::1")):
            address = f"user{n}@example.net"
            async with RendezvousClient(host, ports[""], ident(70 + n), address, tls=True,
                                        register=True, request_timeout=10.0) as client:
                assert client.server_info == {k: v for k, v in ports.items() if k}
            # STUN sees each client in its own family (an IPv4 one not as ::ffff:...).
            mapped = await query_mapping([(host, ports["stun"])], local_addr=(host, 0))
            assert mapped[0][0] == host
            _, writer = await asyncio.open_connection(host, ports["stun_tcp"])
            writer.close()
            async with DhtNode(ident(80 + n), client_only=True) as dht:
                await dht.listen(host, 0)
                assert await dht.bootstrap([(host, ports["dht"])]) >= 1
    assert not any("Traceback" in line for line in srv.log)


async def test_listen_mistakes_are_one_line(tmp_path: Path) -> None:
    base = ("serve", "--domain", "example.net", "--data", str(tmp_path / "d"))
    code, _, err = await run(*base, "--listen", "127.0.0.1:4500", "--listen", "[::1]:4501")
    assert (code, err) == (2, "peerpost-rendezvous: the second --listen takes the first's "
                              "port: 4500, not 4501 (e.g. --listen 0.0.0.0:4500 --listen "
                              "[::]:4500)\n")
    code, _, err = await run(*base, *(f for h in ("127.0.0.1", "[::1]", "[::2]")
                                      for f in ("--listen", f"{h}:0")))
    assert (code, err) == (2, "peerpost-rendezvous: --listen at most twice (an IPv4 and an "
                              "IPv6 address)\n")
    assert not (tmp_path / "d").exists()
    # The second address's port taken: the line names that address, not the first. The
    # port is free on ::1 only for this test; on 127.0.0.1 another process on the machine
    # may hold the same number (then the first address is named, rightly): another port.
    for _ in range(5):
        with socket.socket(socket.AF_INET6) as busy:
            busy.bind(("::1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            # No STUN or DHT: their ports (the next one by default) may be another process's.
            code, _, err = await run(*base, "--listen", f"127.0.0.1:{port}", "--listen",
                                     f"[::1]:{port}", "--stun-port", "off", "--dht-port", "0")
        if f"127.0.0.1:{port}" not in err:
            break
    assert (code, err) == (1, f"peerpost-rendezvous: cannot listen on [::1]:{port} (TCP): "
                              "Address already in use\n")


async def test_an_ipv6_service_socket_takes_ipv6_alone() -> None:
    """What lets [::]:P and 0.0.0.0:P be bound side by side."""
    six = await bind_udp("::", 0)
    assert six is not None
    try:
        assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        # IPv4 is left to the loop (None), as the simulator's loop needs; it binds beside.
        assert await bind_udp("0.0.0.0", six.getsockname()[1]) is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four:
            four.bind(("0.0.0.0", six.getsockname()[1]))
    finally:
        six.close()
