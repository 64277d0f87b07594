"""End to end: a node stops offering in the DHT a content it no longer holds, and a
co-recipient that still finds its old record (other DHT nodes keep it until its 48 h TTL
ends) asks it once, is refused, and fetches from the others. Real server and node
processes on loopback, driven through the CLI; what each node did is read from its log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.transfer.holder import HOLDER_GONE_TEXT
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes
from tests.overlay.test_e2e_folders import tree

pytestmark = pytest.mark.slow


def _log(node: NodeHandle) -> str:
    assert node.proc is not None
    return node.proc.log()


def _content(net: LocalNetwork, sender: NodeHandle, mid: str) -> str:
    """The first 16 digits of a sent message's content id, as the node's log names it."""
    sent = net.cli_json(sender, "status")
    cid: str = next(m["content_id"] for m in sent if m["id"] == mid)
    return cid[:16]


def _refusals(node: NodeHandle, text: str) -> int:
    """Connections `node` refused with `text` (each is one log line)."""
    return sum(1 for line in _log(node).splitlines()
               if "transfer: refused" in line and text in line)


def _slow_sender_and_two(net: LocalNetwork, tmp_path: Path
                         ) -> tuple[NodeHandle, NodeHandle, Path, str, str]:
    """alice (her upload capped, so r2's download lasts some seconds) sends 8 MiB to r1
    and r2; r2 looks the providers up every 0.5 s and is not started; r1 has it. Returns
    r1, r2, the file sent, the message id and the content's 16 digits."""
    alice = net.add_node("alice", extra=["--max-upload-rate", str(2 * MiB)])
    r1 = net.add_node("r1")
    r2 = net.add_node("r2", extra=["--provider-refresh", "0.5"])
    net.start_node(alice)
    net.start_node(r1)
    src = make_file(tmp_path / "clip.bin", 8 * MiB, seed=41)
    mid = net.cli(alice, "send", str(src), "--to", f"{r1.address},{r2.address}").stdout.strip()
    net.wait_complete(r1, mid, 60, "r1's download")
    cid = _content(net, alice, mid)
    net.wait_until(lambda: f"announced {cid}" in _log(r1), 30, "r1's announcement")
    return r1, r2, src, mid, cid


def _fetched_without(net: LocalNetwork, r2: NodeHandle, dropped: NodeHandle, src: Path,
                     mid: str) -> None:
    """r2 fetches every byte, none of them from `dropped`."""
    got = net.wait_complete(r2, mid, 90, "r2's download")
    assert same_bytes(src, Path(got["path"]))
    dropped_id = net.cli_json(dropped, "info")["peer_id"][:16]
    assert not [s for s in got["sources"] if s["peer"] == dropped_id and s["bytes"]]


def test_a_co_recipient_that_removed_the_file_withdraws_it_and_is_asked_once(
        net: LocalNetwork, tmp_path: Path) -> None:
    """`rm --delete-file` withdraws the announcement. Its record stays at the other DHT
    nodes, so r2 finds r1, asks, and is refused "404 no such content here"; before, r2 asked r1
    again at every provider lookup (every 0.5 s here, 10 s by default) for the whole
    download: 8 connections refused in a 4 s download."""
    r1, r2, src, mid, cid = _slow_sender_and_two(net, tmp_path)
    net.cli(r1, "rm", mid, "--delete-file")
    net.wait_until(lambda: f"withdrew {cid} from the DHT" in _log(r1), 30,
                   "r1's withdrawal after rm")

    net.start_node(r2)
    _fetched_without(net, r2, r1, src, mid)
    assert _refusals(r1, f"content {cid}: no such content here") == 1, _log(r2)[-4000:]


def test_a_received_file_deleted_from_disk_is_not_offered_after_a_restart(
        net: LocalNetwork, tmp_path: Path) -> None:
    """The user deleted r1's received file; r1 restarts. Before, it announced the content
    again at start (and would have every 22 h), and r2 asked it at every provider lookup,
    each answered "410 source changed", the sender's words. Now it is not announced, and
    r2 asks r1 once, answered that this holder no longer has the file (its
    record from before the restart is still at the other DHT nodes)."""
    r1, r2, src, mid, cid = _slow_sender_and_two(net, tmp_path)
    got = net.inbox_entry(r1, mid)
    assert got is not None
    Path(got["path"]).unlink()
    net.stop_node(r1)
    net.start_node(r1)
    net.wait_until(lambda: f"not announcing {cid}" in _log(r1)
                   or _log(r1).count(f"announced {cid}") > 1, 30, "r1's announcements")
    assert _log(r1).count(f"announced {cid}") == 1

    net.start_node(r2)
    _fetched_without(net, r2, r1, src, mid)
    assert _refusals(r1, f"content {cid}: {HOLDER_GONE_TEXT}") == 1, _log(r2)[-4000:]


def test_a_received_file_deleted_while_the_node_runs_is_withdrawn_at_the_first_refusal(
        net: LocalNetwork, tmp_path: Path) -> None:
    """The user deletes r1's received file while r1 runs. r2 finds r1 in the DHT and asks
    it; r1 refuses it and withdraws its announcement at once (before, it stayed announced
    and republished until the next 22 h round or a restart). The file put back, as it
    was, is served and announced again after a restart."""
    r1, r2, src, mid, cid = _slow_sender_and_two(net, tmp_path)
    got = net.inbox_entry(r1, mid)
    assert got is not None
    path = Path(got["path"])
    kept, mtime = path.read_bytes(), path.stat().st_mtime_ns
    path.unlink()

    net.start_node(r2)
    net.wait_until(lambda: f"withdrew {cid} from the DHT" in _log(r1), 30,
                   "r1's withdrawal at the refusal")
    _fetched_without(net, r2, r1, src, mid)
    assert _refusals(r1, f"content {cid}: {HOLDER_GONE_TEXT}") == 1, _log(r2)[-4000:]

    path.write_bytes(kept)
    os.utime(path, ns=(mtime, mtime))
    net.stop_node(r1)
    net.start_node(r1)
    net.wait_until(lambda: _log(r1).count(f"announced {cid}") > 1
                   or f"not announcing {cid}" in _log(r1), 30, "r1's announcements")
    assert f"not announcing {cid}" not in _log(r1)


def test_a_cancelled_message_is_not_offered_after_a_restart(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    """`cancel` withdrew the announcement; before, a restart announced the content again:
    the node announced every content in its store before it marked the cancelled ones."""
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    src = make_file(tmp_path / "clip.bin", MiB, seed=42)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    cid = _content(net, alice, mid)
    net.wait_until(lambda: f"announced {cid}" in _log(alice), 30, "alice's announcement")
    net.cli(alice, "cancel", mid)
    net.stop_node(alice)
    net.start_node(alice)
    net.wait_until(lambda: f"not announcing {cid}" in _log(alice)
                   or _log(alice).count(f"announced {cid}") > 1, 30, "alice's announcements")
    assert _log(alice).count(f"announced {cid}") == 1


def test_a_folder_sent_to_oneself_is_withdrawn_when_rm_releases_its_map(
        net: LocalNetwork, tmp_path: Path) -> None:
    """Mailed to one's own address, a folder is served from its map while the inbox holds
    the message; `rm` releases the map, and now withdraws the announcement too (before,
    the node went on announcing a content it refused with "no such content here")."""
    alice = net.add_node("alice")
    net.start_node(alice)
    src = tmp_path / "sunday"
    (src / "beach").mkdir(parents=True)
    make_file(src / "IMG_0001.jpg", MiB + 300_000, seed=43)
    make_file(src / "beach" / "IMG_0002.jpg", 2 * MiB, seed=44)
    before = tree(src)
    mid = net.cli(alice, "send", str(src), "--to", alice.address).stdout.strip()
    net.wait_complete(alice, mid, 60, "the folder in alice's inbox")
    cid = _content(net, alice, mid)
    net.wait_until(lambda: f"announced {cid}" in _log(alice), 30, "alice's announcement")
    net.cli(alice, "rm", mid)
    net.wait_until(lambda: f"withdrew {cid} from the DHT" in _log(alice), 30,
                   "alice's withdrawal after rm")
    assert tree(src) == before  # the user's folder stays
