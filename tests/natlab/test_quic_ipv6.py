"""The QUIC rung over IPv6 with real processes: `peerpost-rendezvous serve` listening on
::1 and two `peerpost node`s, all in one network namespace whose loopback has ::1 and no
IPv4 address at all, driven through the `peerpost` CLI.

nftables there resets every TCP connection except to the server's listen port and its STUN
over TCP (a firewall that lets UDP out and TCP only to the server): direct TCP and the TCP
punch (tried first, from its STUN over TCP) fail, so the file comes over QUIC, whose STUN
query, probes and connection are all IPv6. (The IPv4 NATs: test_quic_nat.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

import pytest

from overlay.app.lab import LISTENING, NodeHandle, _script, listening
from tests.natlab.lab import NatLab
from tests.natlab.nodes import LabNetwork
from tests.natlab.test_nodes import _complete, _digest, _file, _paths, _send, _server_stats

pytestmark = pytest.mark.netns

SIZE = 4_000_000
HOST = "v6"


class Ipv6Host(NatLab):
    """One namespace, `v6`, whose loopback has ::1 and no 127.0.0.1: nothing in it can
    fall back to IPv4."""

    def __init__(self, *, log_dir: Path | None = None) -> None:
        super().__init__(log_dir=log_dir)
        self.hosts = (HOST,)

    def up(self) -> Self:
        try:
            self._cmd(["ip", "netns", "add", self.ns(HOST)])
            self._made.append(HOST)
            self._ip("link", "set", "lo", "up", ns=HOST)
            self._ip("addr", "del", "127.0.0.1/8", "dev", "lo", ns=HOST)
        except BaseException:
            self.down()
            raise
        return self

    def tcp_only_to(self, *ports: int) -> None:
        """Reset every TCP connection made in the namespace except to `ports`."""
        self._reset_tcp("!=", ports)

    def tcp_refused_by(self, *ports: int) -> None:
        """Reset every TCP connection made in the namespace to `ports` (a node's listen
        port that a firewall keeps closed, while the punch's ports stay open)."""
        self._reset_tcp("", ports)

    def _reset_tcp(self, op: str, ports: tuple[int, ...]) -> None:
        listed = ", ".join(str(p) for p in ports)
        self._cmd(["ip", "netns", "exec", self.ns(HOST), "nft", "-f", "-"], stdin=(
            "table inet firewall {\n chain out {\n"
            "  type filter hook output priority 0; policy accept;\n"
            f"  tcp flags & (syn | ack) == syn tcp dport {op} {{ {listed} }} "
            "reject with tcp reset\n }\n}\n"))

    def add_routable(self, address: str) -> None:
        """`address` (/64) on a veth in the namespace: the address beyond loopback that a
        real IPv6-only host has, and that ICE gathers (aioice takes no loopback address)."""
        self._ip("link", "add", "v6a", "type", "veth", "peer", "name", "v6b", ns=HOST)
        for link in ("v6a", "v6b"):
            self._ip("link", "set", link, "up", ns=HOST)
        self._ip("addr", "add", f"{address}/64", "dev", "v6a", "nodad", ns=HOST)


class Ipv6Network(LabNetwork):
    """The server and the nodes as processes in an `Ipv6Host`, on ::1."""

    def __init__(self, lab: Ipv6Host, root: Path) -> None:
        super().__init__(lab, root)
        self.hosts = {"server": HOST}
        self.services: dict[str, tuple[str, int]] = {}

    def start_server(self, timeout: float = 30.0) -> tuple[str, int]:
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain,
                "--listen", "[::1]:0", "--data", str(self.data_dir), "--open-registration"]
        self.server = self._spawn("server", argv)
        while len(self.services) < 4:  # the mailbox, stun, dht, stun_tcp
            name, addr = listening(
                self.server.lines.wait_for(LISTENING, timeout, "peerpost-rendezvous serve"))
            self.services[name] = addr
        self.server_addr = self.services[""]
        return self.server_addr

    def add_node(self, name: str, host: str = HOST, *, extra: list[str] | None = None,
                 listen: str = "[::1]:0", resolver: str | None = None) -> NodeHandle:
        """`peerpost init` as in the NAT lab, on ::1 (the web inbox too)."""
        return super().add_node(name, host, extra=["--web", "[::1]:0", *(extra or [])],
                                listen=listen, resolver=resolver)


def test_a_file_comes_over_quic_on_an_ipv6_only_host(
        natlab_available: None, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with Ipv6Host(log_dir=tmp_path / "lab") as lab:
        net = Ipv6Network(lab, tmp_path / "net")
        with net:
            _deliver_over_quic(lab, net, tmp_path, request)


def _deliver_over_quic(lab: Ipv6Host, net: Ipv6Network, tmp_path: Path,
                       request: pytest.FixtureRequest) -> None:
    request.node.natlab_logs = [("ipv6", net.logs)]
    net.start_server()
    assert {name: host for name, (host, _) in net.services.items()} == {
        "": "::1", "stun": "::1", "dht": "::1", "stun_tcp": "::1"}
    lab.tcp_only_to(net.services[""][1], net.services["stun_tcp"][1])
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    clip = _file(tmp_path, "clip.bin", SIZE)

    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(mid) == 1
    paths = _paths(entry)
    assert set(paths) == {"quic"} and paths["quic"] >= SIZE, entry["sources"]
    assert _server_stats(net)["relayed_bytes"] == 0
    # The TCP rungs were tried and refused by the firewall, not skipped.
    net.wait_log("TCP punch from bob@example.net failed")
