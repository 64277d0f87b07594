"""The NAT lab: the QUIC rung, with real `peerpost-rendezvous serve` and `peerpost node`
processes in two NATed homes, driven through the `peerpost` CLI.

A symmetric NAT on one side gives the TCP punch another port than STUN saw, so the punch
fails; QUIC's UDP probes name that port to the other side (the address the first probe came
from), and the file comes over `quic` in the receiver's `inbox --json` sources, in both
orders. A node with QUIC turned off declines the offer at once and the pair still falls
back to WebRTC in time (test_punch_nat.py). Cone NATs keep the TCP punch
(test_punch_nat.py), two symmetric NATs the relay (test_nodes.py).
"""

from __future__ import annotations

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

SIZE = 8_000_000  # QUIC moves it in well under a second in the lab


@pytest.mark.parametrize(("h1", "h2"), [
    pytest.param(NatMode.FULL_CONE, NatMode.SYMMETRIC, id="fullcone-sender-symmetric-receiver"),
    pytest.param(NatMode.SYMMETRIC, NatMode.FULL_CONE, id="symmetric-sender-fullcone-receiver"),
])
def test_a_pair_the_tcp_punch_cannot_join_delivers_over_quic(
        nat_net: MakeNet, tmp_path, h1: NatMode, h2: NatMode) -> None:  # noqa: F811
    net = nat_net(h1, h2)
    alice, bob = _two_homes(net)
    clip = _file(tmp_path, "clip.bin", SIZE)

    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    paths = _paths(entry)
    assert set(paths) == {"quic"} and paths["quic"] >= SIZE, entry["sources"]
    assert entry["attempts"] == 1, entry
    assert _server_stats(net)["relayed_bytes"] == 0
    # The punch was tried first, and failed at alice's end (she answered bob's offer; the
    # SYNs never met); QUIC did not wait for that: it had its start after the punch's head
    # start.
    logs = net.wait_log("TCP punch from bob@example.net failed", timeout=PUNCH_BUDGET + 5)
    assert "QUIC from bob@example.net failed" not in logs


LOSS = 3  # % of the UDP packets r1 forwards, each way
LOSSY_SIZE = 6_000_000


def test_quic_delivers_through_three_percent_udp_loss_each_way(
        nat_net: MakeNet, tmp_path) -> None:  # noqa: F811
    """r1 drops 3% of the UDP packets it forwards, out and in, from before the send: STUN,
    the probes, the handshake and the data all cross it. QUIC's retransmissions carry the
    file: bytes equal, each chunk once, one attempt, nothing relayed."""
    net = nat_net(NatMode.FULL_CONE, NatMode.SYMMETRIC)
    alice, bob = _two_homes(net)
    clip = _file(tmp_path, "clip.bin", LOSSY_SIZE)
    net.lab.lose_udp("r1", LOSS)

    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    paths = _paths(entry)
    assert set(paths) == {"quic"}, entry["sources"]
    assert LOSSY_SIZE <= paths["quic"] < LOSSY_SIZE + (1 << 20), entry["sources"]
    assert entry["attempts"] == 1, entry
    assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(mid) == 1
    assert _server_stats(net)["relayed_bytes"] == 0
    # The loss was real: r1 dropped about 3% of the file's datagrams (~5,000 of ~1,200 B),
    # one at a time (lose_udp has GSO bursts cut up before r1).
    lost = net.lab.udp_lost("r1")
    print(f"r1 dropped {lost} UDP datagrams")
    assert lost >= LOSS * LOSSY_SIZE // 1200 // 100 // 2
