"""End to end: co-recipients found through the DHT serve each other, with real
server and node processes on loopback driven through the CLI. A received folder serves
from its unpacked files (its archive deleted), across a restart, and never serves bytes
its owner edited."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes
from tests.overlay.test_e2e_folders import tree

pytestmark = pytest.mark.slow


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

    def two_sources_busy() -> dict[str, Any] | None:
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


def test_a_small_clip_to_recipients_online_together_is_not_held_back(
        net: LocalNetwork, tmp_path: Path) -> None:
    """A 4 MiB clip (four chunks) to three recipients online at once: the first to open
    asks for every chunk in its first window, so the sender's super-seeding has nothing
    left to show the other two. The sender's first copy goes out in a fraction of a second
    (16 MiB/s here), so it hides nothing from them: each is done well before the 5 s the
    downloader waits, shown no chunk, before it asks the sender anyway (5.1-5.2 s for the
    other two before)."""
    alice = net.add_node("alice", extra=["--max-upload-rate", str(16 * MiB)])
    rs = [net.add_node(f"r{i}") for i in range(3)]
    for n in (alice, *rs):
        net.start_node(n)
    src = make_file(tmp_path / "clip.bin", 4 * MiB, seed=24)
    mid = net.cli(alice, "send", str(src), "--to",
                  ",".join(r.address for r in rs)).stdout.strip()
    for r in rs:
        got = net.wait_complete(r, mid, 60, f"{r.name}'s download")
        assert same_bytes(src, Path(got["path"]))
        took = got["completed_at"] - got["started_at"]
        assert took < 3.0, f"{r.name} took {took:.1f} s: {got['sources']}"


def test_a_recipient_shown_nothing_fetches_from_the_co_recipients_once_they_hold_chunks(
        net: LocalNetwork, tmp_path: Path) -> None:
    """A 2 MiB clip (two chunks) to three recipients online at once, from a sender whose
    uplink is capped at 512 KiB/s: the first to open asks for both chunks, and the sender's
    super-seeding shows the other two nothing. Stuck, they look the co-recipients up every
    two seconds and take both chunks from the first once it holds them: all three done
    after 3.9 s. Before, the two looked again only after 10 s: one took a chunk from the
    sender after the downloader's 5 s probe, and was done after 10.0 s."""
    alice = net.add_node("alice", extra=["--max-upload-rate", str(MiB // 2)])
    rs = [net.add_node(f"r{i}") for i in range(3)]
    for n in (alice, *rs):
        net.start_node(n)
    sender = net.cli_json(alice, "info")["peer_id"][:16]
    src = make_file(tmp_path / "clip.bin", 2 * MiB, seed=25)
    mid = net.cli(alice, "send", str(src), "--to",
                  ",".join(r.address for r in rs)).stdout.strip()
    got = [net.wait_complete(r, mid, 60, f"{r.name}'s download") for r in rs]
    for r, entry in zip(rs, got, strict=True):
        assert same_bytes(src, Path(entry["path"]))
        took = entry["completed_at"] - entry["started_at"]
        assert took < 7.5, f"{r.name} took {took:.1f} s: {entry['sources']}"
    from_peers = [sum(s["bytes"] for s in e["sources"] if s["peer"] != sender) for e in got]
    assert sum(1 for n in from_peers if n) >= 2, [e["sources"] for e in got]


def _folder(root: Path) -> Path:
    """Three chunks and more of files, nested, one of them small and one empty."""
    src = root / "sunday"
    (src / "beach").mkdir(parents=True)
    make_file(src / "IMG_0001.jpg", MiB + 300_000, seed=31)
    make_file(src / "beach" / "IMG_0002.jpg", 2 * MiB + 5, seed=32)
    (src / "beach" / "notes.txt").write_text("sand\n")
    (src / "empty").write_bytes(b"")
    return src


def _folder_to_two(net: LocalNetwork, tmp_path: Path
                   ) -> tuple[NodeHandle, NodeHandle, NodeHandle, Path, str, Path]:
    """alice sends a folder to r1 and r2 (r2 not started); r1 has it: the nodes, the
    folder sent, the message id and r1's folder."""
    alice, r1, r2 = net.add_node("alice"), net.add_node("r1"), net.add_node("r2")
    net.start_node(alice)
    net.start_node(r1)
    src = _folder(tmp_path)
    mid = net.cli(alice, "send", str(src), "--to", f"{r1.address},{r2.address}").stdout.strip()
    first = Path(net.wait_complete(r1, mid, 60, "r1's folder")["path"])
    return alice, r1, r2, src, mid, first


def _received_files(node: NodeHandle) -> list[str]:
    received = node.home / "received"
    return sorted(p for p in os.listdir(received) if p != ".peerpost-partial")


def test_a_folder_is_fetched_from_a_co_recipient_after_its_restart_and_the_sender_left(
        net: LocalNetwork, tmp_path: Path) -> None:
    alice, r1, r2, src, mid, first = _folder_to_two(net, tmp_path)
    assert tree(first) == tree(src) and _received_files(r1) == ["sunday"]  # no .tar kept
    net.stop_node(r1)  # the view is in r1's store: it serves again after a restart
    net.start_node(r1)
    net.stop_node(alice)  # the sender is gone for good

    net.start_node(r2)
    got = net.wait_complete(r2, mid, 90, "r2's folder from r1")
    assert tree(Path(got["path"])) == tree(src)
    delivered = {s["peer"]: s["bytes"] for s in got["sources"] if s["bytes"]}
    r1_id = net.cli_json(r1, "info")["peer_id"][:16]
    assert list(delivered) == [r1_id], f"every byte came from r1: {got['sources']}"
    assert delivered[r1_id] >= 3 * MiB

    # `rm --delete-file` deletes r1's folder (and forgets the view).
    res = net.cli_json(r1, "rm", mid, "--delete-file")
    assert res["removed"][0]["deleted_file"] == str(first) and not first.exists()
    assert not list((r1.home / "store" / "views").iterdir())


def test_an_edited_file_in_a_received_folder_is_not_served(net: LocalNetwork,
                                                           tmp_path: Path) -> None:
    alice, r1, r2, src, mid, first = _folder_to_two(net, tmp_path)
    # Edited in place, its size and mtime put back: only the chunk's hash tells.
    edited = first / "beach" / "IMG_0002.jpg"
    st = edited.stat()
    with open(edited, "r+b") as f:
        f.seek(MiB)
        f.write(b"edited by r1's owner")
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    net.stop_node(alice)

    net.start_node(r2)
    waiting = net.wait_until(lambda: (e := net.inbox_entry(r2, mid)) and
                             e["state"] == "retrying" and e, 60, "r2 retrying without the sender")
    # r1 refused the edited chunk (its leaf check) rather than serve it and be banned.
    assert not any(s["banned"] for s in waiting["sources"]), waiting["sources"]
    assert r1.proc is not None
    net.wait_until(lambda: "sunday/beach/IMG_0002.jpg changed since it was received"
                   in r1.proc.log(), 10, "r1's log line")
    assert "no chunk of the folder is served any more" in r1.proc.log()

    net.start_node(alice)
    net.cli(r2, "fetch", mid)  # now, not after the backoff
    got = net.wait_complete(r2, mid, 90, "r2's folder once the sender is back")
    assert tree(Path(got["path"])) == tree(src)  # nothing of the edit reached it
