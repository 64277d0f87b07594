"""An IPv4-only node and an IPv6-only node of one domain, through a dual-stack server, with
real processes driven through the `peerpost` CLI.

    a (10.9.0.2; fd00:a::2 on its LAN) --- server (10.9.0.1, fd00:6::1) --- b (fd00:6::2,
                                                                             no 127.0.0.1)

`peerpost-rendezvous serve --listen 10.9.0.1:0 --listen [fd00:6::1]:0` answers on both
addresses at the same ports (the mailbox, STUN over UDP and TCP, the DHT), and the server
forwards nothing between its links: as between a user on an IPv4-only line and one on an
IPv6-only mobile carrier, nothing the nodes send can reach each other directly. Each node
registers through the server's address of its own family. A file goes each way, and only
the server's relay can carry it: every rung before it has to give up, and should do so at
once (a peer's addresses and candidates tell its family) rather than wait out its budget.

`a`'s LAN has an IPv6 ULA and no IPv6 beyond it, as a home router without IPv6 upstream
gives: aioice offers that address, so both ends held IPv6 candidates and WebRTC checked
pairs that had no route until its connect timeout, 10.4 s each way before the relay; the
answering end now declines an offer none of whose candidates it has a route to (0.3 s).
"""

from __future__ import annotations

import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Self

import pytest

from overlay.app.lab import LISTENING, NodeHandle, _script, listening
from tests.natlab.lab import NatLab
from tests.natlab.nodes import LabNetwork
from tests.natlab.test_nodes import _complete, _digest, _file, _paths, _send

pytestmark = pytest.mark.netns

SIZE = 1_000_000
V4 = ("10.9.0.1", "10.9.0.2")
V6 = ("fd00:6::1", "fd00:6::2")
ULA = "fd00:a::2"
LADDER_LIMIT = 3.0  # s from the message to the relay: under every rung's own budget


class DualStackLab(NatLab):
    """`server` with an IPv4 link to `a` and an IPv6 link to `b`, forwarding nothing."""

    def __init__(self, *, log_dir: Path | None = None) -> None:
        super().__init__(log_dir=log_dir)
        self.hosts = ("server", "a", "b")

    def up(self) -> Self:
        try:
            for host in self.hosts:
                self._cmd(["ip", "netns", "add", self.ns(host)])
                self._made.append(host)
                self._ip("link", "set", "lo", "up", ns=host)
            # The LAN's ULA, on a link of its own: an IPv6 address and no route beyond it.
            self._ip("link", "add", "ua", "type", "veth", "peer", "name", "ub", ns="a")
            for link in ("ua", "ub"):
                self._ip("link", "set", link, "up", ns="a")
            self._ip("addr", "add", f"{ULA}/64", "dev", "ua", "nodad", ns="a")
            self._ip("addr", "del", "127.0.0.1/8", "dev", "lo", ns="b")
            for host, link, (here, there), plen in (("a", "va", V4, "24"),
                                                    ("b", "vb", V6, "64")):
                self._ip("link", "add", link, "type", "veth", "peer", "name", "eth0",
                         "netns", self.ns(host), ns="server")
                self._ip("addr", "add", f"{here}/{plen}", "dev", link,
                         *(["nodad"] if ":" in here else []), ns="server")
                self._ip("addr", "add", f"{there}/{plen}", "dev", "eth0",
                         *(["nodad"] if ":" in there else []), ns=host)
                self._ip("link", "set", link, "up", ns="server")
                self._ip("link", "set", "eth0", "up", ns=host)
        except BaseException:
            self.down()
            raise
        return self


class DualStackNetwork(LabNetwork):
    """The server in `server` on both addresses; each node set up with the server's address
    of its own family."""

    def __init__(self, lab: DualStackLab, root: Path) -> None:
        super().__init__(lab, root)
        self.listening: list[tuple[str, str, int]] = []  # (service, host, port)
        self.by_host: dict[str, tuple[str, int]] = {}

    def start_server(self, timeout: float = 30.0) -> tuple[str, int]:
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain,
                "--listen", f"{V4[0]}:0", "--listen", f"[{V6[0]}]:0",
                "--data", str(self.data_dir), "--open-registration"]
        self.server = self._spawn("server", argv)
        while len(self.listening) < 8:  # the mailbox, stun, dht and stun_tcp, twice
            m = self.server.lines.wait_for(LISTENING, timeout, "peerpost-rendezvous serve")
            name, (host, port) = listening(m)
            self.listening.append((name, host, port))
        mailbox = [(h, p) for name, h, p in self.listening if not name]
        self.by_host = {"a": mailbox[0], "b": mailbox[1]}
        self.server_addr = mailbox[0]
        return self.server_addr

    def add_node(self, name: str, host: str = "a", *, extra: list[str] | None = None,
                 listen: str = "", resolver: str | None = None) -> NodeHandle:
        """`peerpost init` in `host` with the server's address of that host's family (and
        listening on any address of it: `listen` is not read)."""
        self.server_addr = self.by_host[host]
        try:
            if host == "a":
                return super().add_node(name, host, extra=extra, listen="0.0.0.0:0",
                                        resolver=resolver)
            return super().add_node(name, host, extra=["--web", "[::1]:0", *(extra or [])],
                                    listen="[::]:0", resolver=resolver)
        finally:
            self.server_addr = self.by_host["a"]


def _reachable(lab: DualStackLab, host: str, address: str) -> bool:
    """Whether a TCP connection from `host` to `address` gets anywhere (refused is an
    answer; unreachable or no route is not)."""
    code = ("import socket, sys\n"
            f"s = socket.socket(socket.AF_INET6 if ':' in {address!r} else socket.AF_INET)\n"
            "s.settimeout(2)\n"
            f"try: s.connect(({address!r}, 9))\n"
            "except ConnectionRefusedError: sys.exit(0)\n"
            "except OSError: sys.exit(1)\n")
    return lab.exec(host, [sys.executable, "-c", code], timeout=10).returncode == 0


def _at(line: str) -> datetime:
    m = re.search(r"\bts=(\S+)Z ", line)
    assert m, line
    return datetime.fromisoformat(m.group(1))


def _deliver(net: DualStackNetwork, tmp_path: Path, sender: NodeHandle,
             receiver: NodeHandle) -> tuple[dict[str, int], float]:
    """`sender` sends `receiver` a file; it arrives equal, once. Its paths, and the seconds
    the ladder took: from the receiver's log of the message to the server's splice of
    the relay session the receiver asked for (the receiver dials its sources)."""
    clip = _file(tmp_path, f"from-{sender.name}.bin", SIZE)
    mid = _send(net, sender, clip, receiver)
    entry = _complete(net, receiver, mid)
    assert _digest(entry["path"]) == _digest(clip)
    assert [e["id"] for e in net.cli_json(receiver, "inbox", "--all")].count(mid) == 1
    assert receiver.proc is not None
    arrived = next(line for line in receiver.proc.log().splitlines()
                   if f"message {mid} from" in line)
    spliced = _spliced(net, receiver, sender)
    return _paths(entry), (_at(spliced) - _at(arrived)).total_seconds()


def _spliced(net: DualStackNetwork, caller: NodeHandle, callee: NodeHandle) -> str:
    """The server's log line of the relay session `caller` opened to `callee`."""
    assert net.server is not None
    pair = f"caller={caller.address} callee={callee.address}"
    lines = [line for line in net.server.log().splitlines()
             if "event=relay.spliced" in line and pair in line]
    assert lines, net.server.log()
    return lines[0]


def test_ipv4_only_and_ipv6_only_nodes_meet_through_the_relay(
        natlab_available: None, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with DualStackLab(log_dir=tmp_path / "lab") as lab:
        net = DualStackNetwork(lab, tmp_path / "net")
        with net:
            request.node.natlab_logs = [("dual-stack", net.logs)]
            net.start_server()
            assert {(name, host) for name, host, _ in net.listening} == {
                (name, host) for name in ("", "stun", "dht", "stun_tcp") for host in
                (V4[0], V6[0])}
            for name in ("", "stun", "dht", "stun_tcp"):  # one port per service
                assert len({p for n, _, p in net.listening if n == name}) == 1, net.listening
            # Each node reaches the server and nothing of the other family.
            assert _reachable(lab, "a", V4[0]) and _reachable(lab, "b", V6[0])
            assert not _reachable(lab, "a", V6[1]) and not _reachable(lab, "b", V4[1])
            assert not _reachable(lab, "b", ULA)
            alice, bob = net.add_node("alice", "a"), net.add_node("bob", "b")
            net.start_node(alice)
            net.start_node(bob)

            there, ladder_there = _deliver(net, tmp_path, alice, bob)
            back, ladder_back = _deliver(net, tmp_path, bob, alice)

            assert set(there) == {"relay"} and there["relay"] >= SIZE, there
            assert set(back) == {"relay"} and back["relay"] >= SIZE, back
            # Each rung gave up at once, WebRTC too, and said why.
            assert ladder_there < LADDER_LIMIT and ladder_back < LADDER_LIMIT, (
                ladder_there, ladder_back)
            logs = net.logs()
            assert f"WebRTC from {bob.address} failed: no route from this host to any of " \
                   f"the offer's candidates ({V6[1]})" in logs, logs
            assert f"WebRTC from {alice.address} failed: no route from this host to any of " \
                   f"the offer's candidates ({V4[1]}, {ULA})" in logs, logs
            # b, on [::], asks the server's STUN over IPv6 (it asked from 0.0.0.0 and failed).
            assert bob.proc is not None and f"the server sees [{V6[1]}]:" in bob.proc.log()
            assert "Traceback" not in logs and "did not answer" not in logs, logs
            assert re.search(r"level=error", logs) is None, logs
