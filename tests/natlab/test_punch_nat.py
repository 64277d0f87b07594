"""The NAT lab: the TCP hole punch rung, with real `peerpost-rendezvous serve` and
`peerpost node` processes in two NATed homes, driven through the `peerpost` CLI.

Homes whose NATs map endpoint-independently get the file over a punched TCP connection
(`tcp-punch` in the receiver's `inbox --json` sources). A symmetric NAT on one side gives
the punch another port than STUN saw, so the punch fails and QUIC carries the file
(test_quic_nat.py); where the peer has QUIC turned off, WebRTC does, started within the
punch's budget and QUIC's refusal. (Two symmetric NATs: the relay, in test_nodes.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from overlay.transports.punch import PUNCH_BUDGET
from tests.natlab.lab import NatMode
from tests.natlab.test_nodes import (  # noqa: F401 (nat_net is a fixture)
    MakeNet,
    _complete,
    _digest,
    _file,
    _paths,
    _send,
    _server_stats,
    _two_homes,
    nat_net,
)

pytestmark = pytest.mark.netns

SIZE = 8_000_000  # punched TCP moves it in well under a second


@pytest.mark.parametrize(("h1", "h2"), [
    pytest.param(NatMode.EIM, NatMode.EIM, id="cone-cone"),
    pytest.param(NatMode.FULL_CONE, NatMode.EIM, id="fullcone-sender-cone-receiver"),
])
def test_cone_nats_deliver_over_a_tcp_punch(nat_net: MakeNet,  # noqa: F811 (the fixture)
                                           tmp_path: Path, h1: NatMode, h2: NatMode) -> None:
    net = nat_net(h1, h2)
    alice, bob = _two_homes(net)
    clip = _file(tmp_path, "clip.bin", SIZE)
    # `info` tells the user what STUN saw: the home router's public address, so a NAT.
    reach = net.cli_json(alice, "info")["reach"]
    assert reach["nat"] is True, reach
    assert reach["seen_as"].startswith(net.lab.addr_of("r1") + ":"), reach
    assert reach["paths"] == ["tcp", "tcp-punch", "quic", "webrtc", "relay"]

    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    paths = _paths(entry)
    assert set(paths) == {"tcp-punch"} and paths["tcp-punch"] >= SIZE, entry["sources"]
    assert _server_stats(net)["relayed_bytes"] == 0


# The punch gives up after its budget; QUIC is declined at once (one PIPE round trip);
# then WebRTC needs an answer, ICE, DTLS and SCTP (1-3 s in the lab) and moves the 1 MB in
# well under a second even on a loaded machine.
FALLBACK_SIZE = 1_000_000
FALLBACK_WITHIN = PUNCH_BUDGET + 10.0


def test_a_pair_the_punch_cannot_join_falls_back_to_webrtc_in_time_without_quic(
        nat_net: MakeNet, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """The sender has QUIC turned off (`node --no-quic`): the receiver's QUIC offer is
    declined and WebRTC starts without waiting out QUIC's budget."""
    net = nat_net(NatMode.FULL_CONE, NatMode.SYMMETRIC)
    alice = net.add_node("alice", "h1", extra=["--no-quic"])
    bob = net.add_node("bob", "h2")
    net.start_node(alice)
    net.start_node(bob)
    clip = _file(tmp_path, "clip.bin", FALLBACK_SIZE)

    t0 = time.monotonic()
    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)
    took = time.monotonic() - t0

    assert _digest(entry["path"]) == _digest(clip)
    assert set(_paths(entry)) == {"webrtc"}, entry["sources"]
    assert took < FALLBACK_WITHIN, f"delivery over WebRTC took {took:.1f} s"
    # The punch was tried and failed (alice answered bob's offer; the SYNs never met), and
    # QUIC was declined.
    logs = net.wait_log("TCP punch from bob@example.net failed", timeout=PUNCH_BUDGET + 5)
    assert "QUIC offer from bob@example.net declined: QUIC is turned off" in logs
