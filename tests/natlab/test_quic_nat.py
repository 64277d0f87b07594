"""The NAT lab: the QUIC rung, with real `peerpost-rendezvous serve` and `peerpost node`
processes in two NATed homes, driven through the `peerpost` CLI.

A symmetric NAT on one side gives the TCP punch another port than STUN saw, so the punch
fails; QUIC's UDP probes name that port to the other side (the address the first probe came
from), and the file comes over `quic` in the receiver's `inbox --json` sources, in both
orders. A node with QUIC turned off declines the offer at once and the pair still falls
back to WebRTC in time (test_punch_nat.py). Cone NATs keep the TCP punch
(test_punch_nat.py), two symmetric NATs the relay (test_nodes.py).

The same pair also delivers with 3% of the UDP datagrams dropped each way, and a download
over quic whose sender is SIGKILLed and started again goes on from the chunks it held.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from overlay.transports.punch import PUNCH_BUDGET
from overlay.transports.quic_stream import IDLE_TIMEOUT
from tests.natlab.lab import NatMode
from tests.natlab.test_nodes import (  # noqa: F401 (nat_net is a fixture)
    MakeNet,
    _complete,
    _digest,
    _entry,
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
        nat_net: MakeNet, tmp_path: Path, h1: NatMode, h2: NatMode) -> None:  # noqa: F811
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
        nat_net: MakeNet, tmp_path: Path) -> None:  # noqa: F811
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


KILLED_SIZE = 8 * (1 << 20)  # eight 1 MiB chunks
KILLED_RATE = 3_000_000  # alice's upload cap, bytes/s: about 3 s for the whole file
_SOURCE_FAILED = re.compile(r"^ts=(\S+Z) .*fetch clip\.bin: source (\w+) failed: (.*?)\"$",
                            re.MULTILINE)


def test_a_sender_killed_mid_transfer_over_quic_is_resumed_once_it_is_back(
        nat_net: MakeNet, tmp_path: Path) -> None:  # noqa: F811
    """alice is SIGKILLed while bob fetches from her over quic (no CONNECTION_CLOSE: her
    socket just goes) and started again. bob's log says why her source failed, in words and
    well within QUIC's idle timeout; his download goes on from the chunks he held, over quic
    again, and ends with the same bytes, once."""
    net = nat_net(NatMode.FULL_CONE, NatMode.SYMMETRIC)
    alice = net.add_node("alice", "h1", extra=["--max-upload-rate", str(KILLED_RATE)])
    bob = net.add_node("bob", "h2", extra=["--retry-base", "1"])  # the test's time, not 5 s
    net.start_node(alice)
    net.start_node(bob)
    clip = _file(tmp_path, "clip.bin", KILLED_SIZE)
    mid = _send(net, alice, clip, bob)
    net.wait_until(lambda: float(_entry(net, bob, mid).get("progress") or 0) >= 0.2, 60,
                   "a fifth of bob's download", interval=0.2)

    net.kill_node(alice)
    killed_at = time.time()
    held = float(_entry(net, bob, mid)["progress"])
    assert held < 0.9, "the kill came too late to cut the transfer"
    net.start_node(alice)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(mid) == 1
    paths = _paths(entry)
    assert set(paths) == {"quic"}, entry["sources"]
    # Over both attempts each chunk came once (28 bytes of framing per chunk): the chunks
    # bob held before the kill were not fetched again.
    assert KILLED_SIZE <= paths["quic"] < KILLED_SIZE + (1 << 20), entry["sources"]
    assert entry["attempts"] == 2, entry  # the one cut by the kill, and the one after it
    bob_log = bob.proc.log() if bob.proc else ""
    assert "Traceback" not in bob_log, bob_log
    failures = _SOURCE_FAILED.findall(bob_log)
    assert failures, f"bob's log does not say why alice's source failed:\n{bob_log}"
    when, _, why = failures[0]
    noticed = datetime.fromisoformat(when).timestamp() - killed_at
    print(f"bob: alice's source failed {noticed:.1f} s after the kill: {why}")
    assert why.startswith(("stalled: nothing for", "QUIC connection closed")), why
    assert noticed < IDLE_TIMEOUT, f"noticed {noticed:.1f} s after the kill: {why}"
