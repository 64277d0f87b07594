"""The NAT lab: real `peerpost-rendezvous serve` and `peerpost node` processes
inside the namespaces, driven through the `peerpost` CLI, deliver a file byte for byte.

Each test builds a fresh lab, starts the server on the public side, first checks what each
home's NAT does as the server's STUN sees it (tests/natlab/nodes.py, `assert_nat`), then
sends a small file and checks what the receiver's `inbox --json` says about how it came:
the path of each source (tcp, tcp-punch, quic, webrtc or relay) and the bytes each
delivered. A failed test shows every process's log (conftest.py). The TCP punch between two
cone NATs has its own tests (test_punch_nat.py), and so has QUIC, which joins a full-cone
and a symmetric NAT (test_quic_nat.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import NodeHandle, _script, dir_size
from rendezvous.stats import read_live_stats
from tests.natlab.lab import NatLab, NatMode
from tests.natlab.nodes import LabNetwork

pytestmark = pytest.mark.netns

SIZE = 3_000_000  # WebRTC moves a few MB/s in the lab: seconds, not minutes
DELIVERY_TIMEOUT = 60.0

MakeNet = Callable[[NatMode, NatMode], LabNetwork]


@pytest.fixture
def nat_net(nat_lab: Callable[[NatMode, NatMode], NatLab], tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[MakeNet]:
    """`nat_net(mode_h1, mode_h2)`: a fresh lab with the server running and every host's
    NAT checked as STUN sees it; the processes stop before the lab is torn down."""
    nets: list[LabNetwork] = []

    def make(h1: NatMode, h2: NatMode) -> LabNetwork:
        lab = nat_lab(h1, h2)
        net = LabNetwork(lab, tmp_path / f"net{len(nets)}")
        nets.append(net)
        request.node.natlab_logs = [(f"net{i}", n.logs) for i, n in enumerate(nets)]
        net.start_server()
        net.assert_nat("h1", h1)
        net.assert_nat("h2", h2)
        net.assert_nat("pub", None)
        return net

    try:
        yield make
    finally:
        for net in nets:
            net.close()


def _file(tmp: Path, name: str, size: int = SIZE) -> Path:
    path = tmp / name
    path.write_bytes(random.Random(name).randbytes(size))
    return path


def _digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _send(net: LabNetwork, node: NodeHandle, path: Path, *to: NodeHandle) -> str:
    out = net.cli(node, "send", str(path), "--to", ",".join(n.address for n in to)).stdout
    m = re.search(r"\b[0-9a-f]{32}\b", out)
    assert m, f"`peerpost send` printed no message id: {out!r}"
    return m.group(0)


def _entry(net: LabNetwork, node: NodeHandle, mid: str) -> dict[str, Any]:
    entry = net.inbox_entry(node, mid)
    return entry or {"state": "not arrived", "attempts": 0}


def _complete(net: LabNetwork, node: NodeHandle, mid: str,
              timeout: float = DELIVERY_TIMEOUT) -> dict[str, Any]:
    """Poll the receiver's inbox (the CLI is its only view) until the download is done."""

    def done() -> dict[str, Any] | None:
        e = _entry(net, node, mid)
        assert e["state"] != "failed", f"{node.name} gave up: {e}"
        return e if e["state"] == "complete" else None

    result: dict[str, Any] = net.wait_until(done, timeout, f"{node.name} to complete {mid}",
                                            interval=0.5)
    return result


def _paths(entry: dict[str, Any]) -> dict[str, int]:
    """path -> bytes delivered over it, from the receiver's view of its sources."""
    out: dict[str, int] = {}
    for s in entry["sources"]:
        out[s["path"]] = out.get(s["path"], 0) + int(s["bytes"])
    return out


def _server_stats(net: LabNetwork) -> dict[str, Any]:
    r = subprocess.run([_script("peerpost-rendezvous"), "stats", "--data", str(net.data_dir),
                        "--json"], capture_output=True, text=True, timeout=30, check=True)
    stats: dict[str, Any] = json.loads(r.stdout)
    return stats


def _peer_label(net: LabNetwork, node: NodeHandle) -> str:
    """How a receiver's `sources` names this node (the first 16 hex digits of its id)."""
    return str(net.cli_json(node, "info")["peer_id"])[:16]


def _two_homes(net: LabNetwork) -> tuple[NodeHandle, NodeHandle]:
    alice, bob = net.add_node("alice", "h1"), net.add_node("bob", "h2")
    net.start_node(alice)
    net.start_node(bob)
    return alice, bob


# --- hole punching fails: the relay, and the server keeps no copy --------------------------

def test_symmetric_nats_on_both_sides_deliver_through_the_relay(nat_net: MakeNet,
                                                               tmp_path: Path) -> None:
    net = nat_net(NatMode.SYMMETRIC, NatMode.SYMMETRIC)
    alice, bob = _two_homes(net)
    clip = _file(tmp_path, "clip.bin")
    before = dir_size(net.data_dir)

    mid = _send(net, alice, clip, bob)
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    paths = _paths(entry)
    assert set(paths) == {"relay"} and paths["relay"] >= SIZE, entry["sources"]
    # The server's counters reach `stats` through a file it rewrites every 2 s.
    net.wait_until(lambda: _server_stats(net)["relayed_bytes"] >= SIZE, 10,
                   "the server to count the relayed bytes", interval=0.5)
    grown = dir_size(net.data_dir) - before
    assert grown < SIZE // 4, f"the server's data folder grew by {grown} bytes"


# --- the sender was away: the held offer starts the transfer -------------------------------

SENDER_AWAY = 10.0


def test_offline_nated_sender_answers_the_held_offer_when_it_comes_back(
        nat_net: MakeNet, tmp_path: Path) -> None:
    net = nat_net(NatMode.EIM, NatMode.EIM)
    alice, bob = net.add_node("alice", "h1"), net.add_node("bob", "h2")
    clip = _file(tmp_path, "clip.bin")
    net.start_node(alice)
    mid = _send(net, alice, clip, bob)
    net.stop_node(alice)

    net.start_node(bob)  # the message is waiting at login; bob asks at once
    asked = time.monotonic()
    seen: list[dict[str, Any]] = []

    def offer_held() -> bool:
        seen.append(_entry(net, bob, mid))
        live = read_live_stats(net.data_dir) or {}  # the server writes it every 2 s
        return bool(live.get("pipes_held")) and seen[-1]["state"] == "downloading"

    net.wait_until(offer_held, SENDER_AWAY, "bob's WebRTC offer to be held at the server")
    time.sleep(max(0.0, SENDER_AWAY - (time.monotonic() - asked)))  # the sender is away 10 s

    net.start_node(alice)
    back = time.monotonic()

    def done() -> dict[str, Any] | None:
        e = _entry(net, bob, mid)
        seen.append(e)
        return e if e["state"] == "complete" else None

    entry = net.wait_until(done, 30, "bob's download after alice came back", interval=0.5)
    took = time.monotonic() - back

    assert _digest(entry["path"]) == _digest(clip)
    # The held offer carried the start; a download that WebRTC moves slowly (CPU-bound:
    # 2 MB in 4.5 s at load ~7) may then move to the punch (the downloader's upgrade), so
    # the rest may come over tcp-punch, never by another attempt.
    paths = _paths(entry)
    assert paths.get("webrtc", 0) > 0 and set(paths) <= {"webrtc", "tcp-punch"}, (
        entry["sources"])
    states = [e["state"] for e in seen]
    assert "retrying" not in states and entry["attempts"] == 1, (
        f"bob retried instead of waiting for the held offer: {states}, "
        f"attempts {entry['attempts']}")
    assert took < 15, f"the transfer took {took:.1f} s after alice came back"


# --- a NATed source and a direct one together -----------------------------------------------

# Both uploads are capped so that each alone would take seconds (uncapped, TCP here, direct
# or punched, moves the file in ~0.1 s): alice's punched stream at 3 MB/s and carol's at
# 1 MB/s each take chunks. With six chunks a faster alice once took all of them,
# duplicating carol's first in the endgame before it had arrived at 1 MB/s; twelve leave
# carol time for hers.
TOGETHER_SIZE = 12 * (1 << 20)  # twelve 1 MiB chunks
CAROL_RATE = 1_000_000  # bytes/s
ALICE_RATE = 3_000_000  # bytes/s


def test_nated_and_direct_sources_serve_one_receiver_together(nat_net: MakeNet,
                                                             tmp_path: Path) -> None:
    net = nat_net(NatMode.EIM, NatMode.EIM)
    alice = net.add_node("alice", "h1", extra=["--max-upload-rate", str(ALICE_RATE)])
    bob = net.add_node("bob", "h2")
    carol = net.add_node("carol", "pub", extra=["--max-upload-rate", str(CAROL_RATE)])
    net.start_node(alice)
    net.start_node(carol)
    clip = _file(tmp_path, "clip.bin", TOGETHER_SIZE)

    mid = _send(net, alice, clip, bob, carol)
    first = _complete(net, carol, mid)  # carol, public, fetched it from NATed alice
    assert _digest(first["path"]) == _digest(clip)
    assert set(_paths(first)) == {"tcp-punch"}, first["sources"]

    net.start_node(bob)  # now alice (TCP punch) and carol (direct TCP, from the DHT) hold it
    entry = _complete(net, bob, mid)

    assert _digest(entry["path"]) == _digest(clip)
    by_peer = {s["peer"]: s for s in entry["sources"]}
    a, c = by_peer.get(_peer_label(net, alice)), by_peer.get(_peer_label(net, carol))
    assert a is not None and c is not None, entry["sources"]
    assert a["path"] == "tcp-punch" and a["bytes"] > 0, entry["sources"]
    assert c["path"] == "tcp" and c["bytes"] > 0, entry["sources"]
