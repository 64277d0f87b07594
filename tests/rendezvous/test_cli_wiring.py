"""A real `peerpost-rendezvous serve --stun-port 0 --dht-port 0` process: it prints where
STUN and the DHT bootstrap node listen, both answer, clients learn the ports from the
CHALLENGE, and `stats --json` shows relay and service counters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from crypto.address import parse_hostport
from crypto.identity import DeviceIdentity
from overlay.app.lab import _script
from overlay.dht import DhtNode
from overlay.transports.relay import relay_accept, relay_dial
from rendezvous.client import RendezvousClient
from rendezvous.messages import RelayInvite
from rendezvous.stun import query_mapping, query_tcp_mapping

from .conftest import DOMAIN, ident

pytestmark = pytest.mark.slow
ALICE, BOB = ident(41), ident(42)
SCRIPT = _script("peerpost-rendezvous")


def _hostport(line: str, prefix: str) -> tuple[str, int]:
    if not line.startswith(prefix):
        raise AssertionError(f"expected {prefix!r}..., got {line!r}")
    return parse_hostport(line[len(prefix):].strip())


@asynccontextmanager
async def serve(data: Path, *extra: str) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                                 list[str]]]:
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "serve", "--domain", DOMAIN, "--listen", "127.0.0.1:0", "--data",
        str(data), "--open-registration", *extra, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        lines = []
        for _ in range(3):
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stats(data: Path) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "stats", "--data", str(data), "--json", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    doc = json.loads(out)
    if not isinstance(doc, dict):
        raise AssertionError(f"stats --json printed {out!r}")
    return doc


async def stats_when(data: Path, key: str, at_least: int) -> dict[str, object]:
    """`stats --json` once the server's periodic snapshot shows key >= at_least."""
    async with asyncio.timeout(20):
        while True:
            doc = await stats(data)
            value = doc.get(key, 0)
            if isinstance(value, int) and value >= at_least:
                return doc
            # The snapshot file is rewritten every --stats-interval; nothing to await.
            await asyncio.sleep(0.1)


async def relay_bytes(port: int, n: int) -> None:
    """Alice sends n bytes to Bob over the relay; Bob reads them all."""
    async with RendezvousClient("127.0.0.1", port, BOB, "bob@example.net",
                                register=True, tls=True) as bob, \
            RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net", register=True,
                             tls=True):
        dial = asyncio.create_task(relay_dial("127.0.0.1", port, ALICE, "alice@example.net",
                                              "bob@example.net", BOB.peer_id, timeout=20,
                                              tls=True))
        invite = None
        async for push in bob.pushes():
            if isinstance(push, RelayInvite):
                invite = push
                break
        assert invite is not None
        b = await relay_accept("127.0.0.1", port, BOB, "bob@example.net", invite, tls=True)
        a = await dial
        await a.send_all(b"x" * n)
        # TLS has no half-close in asyncio (write_eof is not supported), so read n bytes
        # rather than to the end.
        got = 0
        while got < n and (chunk := await b.receive_some()):
            got += len(chunk)
        assert got == n
        await a.aclose()
        await b.aclose()


async def test_serve_runs_stun_and_dht_and_reports_relay_counters(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data, "--stun-port", "0", "--dht-port", "0", "--stats-interval", "0.1",
                     "--relay-rate", "0") as (proc, lines):
        _, port = _hostport(lines[0], "listening ")
        stun_host, stun_port = _hostport(lines[1], "stun listening ")
        dht_host, dht_port = _hostport(lines[2], "dht listening ")
        assert stun_host == dht_host == "127.0.0.1" and stun_port > 0 and dht_port > 0

        # Nodes learn both ports from the CHALLENGE.
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, tls=True) as a:
            assert set(a.server_info) == {"stun", "dht", "stun_tcp"}
            assert a.server_info["stun"] == stun_port and a.server_info["dht"] == dht_port

        # STUN answers with the address it sees, over TCP too (hole punching asks there).
        tcp = await query_tcp_mapping(("127.0.0.1", a.server_info["stun_tcp"]))
        tcp.close()
        assert tcp.mapped == ("127.0.0.1", tcp.local[1])

        # STUN answers with the address it sees; the DHT node answers a bootstrap.
        (mapped,) = await query_mapping([("127.0.0.1", stun_port)],
                                        local_addr=("127.0.0.1", 0))
        assert mapped[0] == "127.0.0.1"
        async with DhtNode(DeviceIdentity.generate(), client_only=True) as node:
            await node.listen("127.0.0.1", 0)
            assert await node.bootstrap([("127.0.0.1", dht_port)]) >= 1

        # The DHT node's identity is kept, private to the server's user.
        ident_file = data / "server-identity.json"
        assert stat.S_IMODE(os.stat(ident_file).st_mode) == 0o600

        await relay_bytes(port, 3 << 20)
        doc = await stats_when(data, "relayed_bytes", 3 << 20)
        assert doc["relay_sessions"] == 1 and doc["relay_active"] == 0
        assert isinstance(doc["stun_answered"], int) and doc["stun_answered"] >= 1
        assert any(k.startswith("dht_") for k in doc)

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_serve_with_services_off_announces_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, "serve", "--domain", DOMAIN, "--listen", "127.0.0.1:0", "--data",
        str(data), "--open-registration", "--stun-port", "off", "--dht-port", "off",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        _, port = _hostport((await asyncio.wait_for(proc.stdout.readline(), 30)).decode(),
                            "listening ")
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, tls=True) as a:
            assert a.server_info == {}
        assert not (data / "server-identity.json").exists()
        doc = await stats(data)
        assert doc["relayed_bytes"] == 0 and doc["relay_sessions"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


def test_invite_tokens_never_look_like_a_command_line_option() -> None:
    from rendezvous.cli import new_invite_token

    tokens = {new_invite_token() for _ in range(2000)}  # a '-' first came once in 64
    assert len(tokens) == 2000
    assert all(len(t) == 32 and int(t, 16) >= 0 and not t.startswith("-") for t in tokens)
