"""`peerpost info` says how the node meets its peers: whether a NAT stands in front of it
(from the server's STUN), the address the server sees, and the rungs it dials peers over.
Real server and node processes on loopback; the NAT lab checks a node behind a NAT
(tests/natlab/test_punch_nat.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle

pytestmark = pytest.mark.slow


def _info(net: LocalNetwork, node: NodeHandle) -> tuple[dict[str, object], str]:
    """`info --json`'s reach, and the lines of the table `info` prints."""
    reach = net.cli_json(node, "info")["reach"]
    text = net.cli(node, "info").stdout
    return reach, " ".join(text.replace("│", " ").split())


def test_info_shows_the_network_and_which_paths_quic_off_leaves(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        alice = net.add_node("alice")
        bob = net.add_node("bob", extra=["--no-quic"])
        net.start_node(alice)
        net.start_node(bob)
        reach, table = _info(net, alice)
        assert reach["nat"] is False, reach
        assert str(reach["seen_as"]).startswith("127.0.0.1:"), reach
        assert reach["paths"] == ["tcp", "tcp-punch", "quic", "webrtc", "relay"]
        assert f"directly reachable: the server sees this node as {reach['seen_as']}" in table
        assert "paths to peers tcp, tcp-punch, quic, webrtc, relay" in table
        reach, table = _info(net, bob)
        assert reach["paths"] == ["tcp", "tcp-punch", "webrtc", "relay"]
        assert "paths to peers tcp, tcp-punch, webrtc, relay" in table


def test_info_says_it_cannot_tell_when_the_server_runs_no_stun(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab", server_args=["--stun-port", "off"]) as net:
        net.start_server()
        alice = net.add_node("alice")
        net.start_node(alice)
        reach, table = _info(net, alice)
        assert reach == {"nat": None, "seen_as": None, "paths": ["tcp", "webrtc", "relay"]}
        assert "unknown: the server runs no STUN, or it did not answer" in table
        assert json.loads(net.cli(alice, "info", "--json").stdout)["connected"] is True
