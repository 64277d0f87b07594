"""The TCP punch and WebRTC with real processes on an IPv6-only host: the namespace of
test_quic_ipv6.py (loopback with ::1 and no 127.0.0.1), `peerpost-rendezvous serve` on
[::1]:0 and two `peerpost node`s on [::1]:0, driven through the `peerpost` CLI.

- The punch: nftables resets TCP to the two nodes' listen ports only (a firewall that keeps
  them closed), so direct TCP fails and the punch, between ports STUN over TCP saw on ::1,
  carries the file.
- WebRTC: the namespace also has fd00:99::1 on a veth, as a real IPv6-only host has an
  address beyond loopback (aioice gathers no loopback address, so on ::1 alone ICE has no
  candidate at all); TCP is reset but to the server and QUIC is off, so the file comes over
  WebRTC on its host candidates. The server's STUN, on ::1, can't be given to aiortc (its URI
  pattern takes no IPv6 literal): that made every offer fail with 'malformed uri' and the
  file came through the relay.

Neither logs an error: each node's announce to the DHT had failed, its direct address
written ::1:P, which provider records refuse.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from overlay.app.lab import NodeHandle
from tests.natlab.test_nodes import _complete, _digest, _file, _paths, _send, _server_stats
from tests.natlab.test_quic_ipv6 import Ipv6Host, Ipv6Network

pytestmark = pytest.mark.netns

SIZE = 2_000_000


def _listen_port(node: NodeHandle) -> int:
    """The TCP port `node` listens on for direct connections, from its ready line."""
    assert node.proc is not None
    m = re.search(r"^ready address=\S+ listen=\S*:(\d+) ", node.proc.log(), re.M)
    assert m, node.proc.log()
    return int(m.group(1))


def _deliver(net: Ipv6Network, tmp_path: Path, alice: NodeHandle, bob: NodeHandle
             ) -> dict[str, int]:
    """Alice sends Bob a file; its bytes, once in his inbox, are hers. The paths it took."""
    clip = _file(tmp_path, "clip.bin", SIZE)
    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)
    assert _digest(entry["path"]) == _digest(clip)
    assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(mid) == 1
    assert _server_stats(net)["relayed_bytes"] == 0
    # Nothing failed on the way (each announce to the DHT failed on an unbracketed ::1:P).
    assert "level=error" not in (logs := net.logs()), logs
    return _paths(entry)


def test_a_file_comes_over_the_tcp_punch_on_an_ipv6_only_host(
        natlab_available: None, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with Ipv6Host(log_dir=tmp_path / "lab") as lab:
        net = Ipv6Network(lab, tmp_path / "net")
        with net:
            request.node.natlab_logs = [("ipv6", net.logs)]
            net.start_server()
            alice, bob = net.add_node("alice"), net.add_node("bob")
            net.start_node(alice)
            net.start_node(bob)
            lab.tcp_refused_by(_listen_port(alice), _listen_port(bob))
            paths = _deliver(net, tmp_path, alice, bob)
            assert set(paths) == {"tcp-punch"} and paths["tcp-punch"] >= SIZE, paths


def test_a_file_comes_over_webrtc_on_an_ipv6_only_host(
        natlab_available: None, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with Ipv6Host(log_dir=tmp_path / "lab") as lab:
        lab.add_routable("fd00:99::1")
        net = Ipv6Network(lab, tmp_path / "net")
        with net:
            request.node.natlab_logs = [("ipv6", net.logs)]
            net.start_server()
            lab.tcp_only_to(net.services[""][1], net.services["stun_tcp"][1])
            alice = net.add_node("alice", extra=["--no-quic"])
            bob = net.add_node("bob", extra=["--no-quic"])
            net.start_node(alice)
            net.start_node(bob)
            paths = _deliver(net, tmp_path, alice, bob)
            assert set(paths) == {"webrtc"} and paths["webrtc"] >= SIZE, paths
