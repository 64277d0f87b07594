"""End to end: co-recipients found through the DHT serve each other, with real
server and node processes on loopback driven through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def net(tmp_path: Path):
    with LocalNetwork(tmp_path / "lab") as n:
        n.start_server()
        yield n


def test_offline_co_recipient_fetches_from_the_other_after_the_sender_left(
        net: LocalNetwork, tmp_path: Path) -> None:
    alice, r1, r2 = net.add_node("alice"), net.add_node("r1"), net.add_node("r2")
    net.start_node(alice)
    net.start_node(r1)
    src = make_file(tmp_path / "clip.bin", 12 * MiB, seed=21)
    mid = net.cli(alice, "send", str(src), "--to", f"{r1.address},{r2.address}").stdout.strip()
    net.wait_complete(r1, mid, 60, "r1's download")
    net.stop_node(alice)  # the sender is gone for good

    net.start_node(r2)
    got = net.wait_complete(r2, mid, 90, "r2's download from r1")
    assert same_bytes(src, Path(got["path"]))
    delivered = {s["peer"]: s["bytes"] for s in got["sources"] if s["bytes"]}
    r1_id = net.cli_json(r1, "info")["peer_id"][:16]
    assert list(delivered) == [r1_id], f"every byte came from r1: {got['sources']}"


def test_a_holder_killed_mid_transfer_does_not_stop_the_download(
        net: LocalNetwork, tmp_path: Path) -> None:
    # Two holders, each capped so r2's transfer takes a few seconds; one is killed
    # midway. Alice's cap is set once r1 has the file (`prefs set` applies at once), and
    # lifted after the kill: r1's own download and the rest after the kill go at full speed.
    rate = str(3 * MiB)
    alice = net.add_node("alice")
    r1 = net.add_node("r1", extra=["--max-upload-rate", rate])
    r2 = net.add_node("r2")
    net.start_node(alice)
    net.start_node(r1)
    src = make_file(tmp_path / "clip.bin", 24 * MiB, seed=22)
    mid = net.cli(alice, "send", str(src), "--to", f"{r1.address},{r2.address}").stdout.strip()
    net.wait_complete(r1, mid, 60, "r1's download")
    net.cli(alice, "prefs", "set", "max-upload-rate", rate)

    net.start_node(r2)

    def two_sources_busy():
        e = net.inbox_entry(r2, mid)
        return e if e and e["progress"] > 0.2 and \
            sum(1 for s in e["sources"] if s["bytes"]) == 2 else None
    net.wait_until(two_sources_busy, 60, "r2 fetching from both holders", interval=0.1)
    net.kill_node(r1)
    net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    got = net.wait_complete(r2, mid, 90, "r2's download after the kill")
    assert same_bytes(src, Path(got["path"]))


def test_receivers_starting_together_trade_chunks(net: LocalNetwork, tmp_path: Path) -> None:
    # The sender's upload is slow; the receivers find each other in the DHT as soon as
    # they hold chunks (the repeated lookup) and fetch from each other.
    alice = net.add_node("alice", extra=["--max-upload-rate", str(2 * MiB)])
    r1 = net.add_node("r1", extra=["--provider-refresh", "0.5"])
    r2 = net.add_node("r2", extra=["--provider-refresh", "0.5"])
    for n in (alice, r1, r2):
        net.start_node(n)
    src = make_file(tmp_path / "clip.bin", 16 * MiB, seed=23)
    mid = net.cli(alice, "send", str(src), "--to", f"{r1.address},{r2.address}").stdout.strip()
    got = {n.name: net.wait_complete(n, mid, 90, f"{n.name}")
           for n in (r1, r2)}
    ids = {n.name: net.cli_json(n, "info")["peer_id"][:16] for n in (r1, r2)}
    for me, other in (("r1", "r2"), ("r2", "r1")):
        assert same_bytes(src, Path(got[me]["path"]))
        from_other = sum(s["bytes"] for s in got[me]["sources"] if s["peer"] == ids[other])
        assert from_other > 0, f"{me} got nothing from {other}: {got[me]['sources']}"
