"""A receiver whose disk fills up mid-download, with real processes and a real full
filesystem (a 16 MiB tmpfs holding bob's home): the download waits as `retrying` with the
reason, mail that arrives meanwhile stays at the server, nothing crashes, and once space is
freed both finish with the sender's bytes, each once."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlay.app.lab import LabError, LocalNetwork

pytestmark = pytest.mark.slow
MiB = 1 << 20


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the full-disk test, but: {reason}")
    pytest.skip(reason)


@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """An empty tmpfs of `size` at `where` (mounting needs root)."""
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        _unavailable("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                          str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        _unavailable(f"mount -t tmpfs failed: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """bob's home on a 16 MiB tmpfs."""
    with _tmpfs(tmp_path / "lab" / "bob", "16m") as where:
        yield where


def fill(path: Path) -> None:
    with path.open("wb") as f:
        block = bytes(MiB)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_pauses_the_download_and_loses_nothing(small_disk: Path,
                                                            tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        alice = net.add_node("alice", extra=["--max-upload-rate", str(MiB)])
        # Its home is the small disk. Retries come at most 2 s apart (5 s, then 10 s, by
        # default): what is tested is that they come and succeed once there is room.
        bob = net.add_node("bob", extra=["--retry-base", "0.5", "--retry-max", "2"])
        assert bob.home == small_disk
        net.start_node(alice)
        net.start_node(bob)
        clip = tmp_path / "clip.bin"
        clip.write_bytes(os.urandom(8 * MiB))
        mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["progress"] > 0.2,
                       60, "a partial download", interval=0.1)

        filler = small_disk / "filler"
        fill(filler)
        waiting = net.wait_until(
            lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "retrying" and e,
            30, "bob's download retrying", interval=0.2)
        assert "the disk is full" in waiting["error"], waiting
        assert "resumes by itself once there is room" in waiting["error"]
        # The cap was there to catch the download midway; the rest comes at full speed.
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")

        note = tmp_path / "note.bin"
        note.write_bytes(os.urandom(100_000))
        later = net.cli(alice, "send", str(note), "--to", bob.address).stdout.strip()
        assert bob.proc is not None
        bob.proc.lines.wait_for(re.compile(f"message {later} from alice@example.net not "
                                           "stored"), 30, "bob's log")
        assert bob.proc.alive()

        filler.unlink()
        for m, src in ((mid, clip), (later, note)):
            got = net.wait_complete(bob, m, 90)
            assert Path(got["path"]).read_bytes() == src.read_bytes()
        inbox = [e["id"] for e in net.cli_json(bob, "inbox", "--all")]
        assert sorted(inbox) == sorted([mid, later])  # each once
        assert "banned" not in (bob.home / "node.log").read_text()  # alice was not blamed
        assert bob.proc.alive()

        # No room for a new file at all: it waits too, and starts once there is room.
        for m in (mid, later):
            net.cli(bob, "rm", m, "--delete-file")
        small = small_disk / "small"
        small.write_bytes(bytes(9 * MiB))  # 16 MiB, less 9: no room for 8
        third = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        waiting = net.wait_until(
            lambda: (e := net.inbox_entry(bob, third)) and e["state"] == "retrying" and e,
            30, "bob's third download retrying", interval=0.2)
        assert "not enough free space" in waiting["error"], waiting
        assert "it starts by itself once there is room" in waiting["error"]
        small.unlink()
        got = net.wait_complete(bob, third, 90)
        assert Path(got["path"]).read_bytes() == clip.read_bytes()


def test_a_server_whose_disk_is_full_says_so_and_recovers(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    with _tmpfs(lab / "server-data", "8m") as data, LocalNetwork(lab) as net:
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        note = tmp_path / "note.bin"
        note.write_bytes(os.urandom(100_000))
        fill(data / "filler")
        res = net.cli(alice, "send", str(note), "--to", bob.address, check=False)
        # Once (under a fresh clone's full suite, load 3.4) alice said the server was
        # unreachable instead: the logs of both ends go with a failure, to tell why.
        why = (f"{res.stderr}\nserver alive: {net.server is not None and net.server.alive()}"
               f"\n--- server log ---\n{net.server.log()[-3000:] if net.server else ''}"
               f"\n--- alice's log ---\n{(alice.home / 'node.log').read_text()[-3000:]}")
        assert res.returncode == 1, why
        assert ("the server did not take it (503 the server's storage is full: try again "
                "later)") in " ".join(res.stderr.split()), why
        assert net.server is not None and net.server.alive()
        # Logged before the 503 went out, but written to the log file by a thread of this
        # process, which a loaded machine may run after the CLI has exited.
        net.server.lines.wait_for(re.compile("event=storage.full"), 10, "the server's log")
        assert "event=storage.full" in net.server.log() and "Traceback" not in net.server.log()
        (data / "filler").unlink()
        mid = net.cli(alice, "send", str(note), "--to", bob.address).stdout.strip()
        got = net.wait_complete(bob, mid, 60)
        assert Path(got["path"]).read_bytes() == note.read_bytes()
        assert len(net.cli_json(bob, "inbox", "--all")) == 1  # the refused one never came


def test_send_from_a_full_disk_says_so_and_sends_nothing(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    with _tmpfs(lab / "alice", "8m") as home, LocalNetwork(lab) as net:
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        clip = tmp_path / "clip.bin"  # on another disk: only alice's home is full
        clip.write_bytes(os.urandom(3 * MiB))
        fill(home / "filler")
        res = net.cli(alice, "send", str(clip), "--to", bob.address, check=False)
        assert res.returncode == 1
        assert ("this node's disk is full (database or disk is full): free some space and "
                "try again") in " ".join(res.stderr.split()), res.stderr
        assert alice.proc is not None and alice.proc.alive()
        assert net.cli_json(alice, "status") == [] and net.cli_json(bob, "inbox") == []
        assert "Traceback" not in alice.proc.log()
        (home / "filler").unlink()
        mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        got = net.wait_complete(bob, mid, 60)
        assert Path(got["path"]).read_bytes() == clip.read_bytes()


def test_nodes_log_in_to_a_server_whose_disk_is_full(tmp_path: Path) -> None:
    """A login records when the device was last seen and the addresses it advertises: soft
    state. With the server's disk full, a node that logs in (restarted, woken, moved) still
    gets in, mail already queued for it still arrives, and a new device is told why it
    can't register."""
    lab = tmp_path / "lab"
    with _tmpfs(lab / "server-data", "8m") as data, LocalNetwork(lab) as net:
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        clip = tmp_path / "clip.bin"
        clip.write_bytes(os.urandom(200_000))
        net.stop_node(bob)
        mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        fill(data / "filler")
        net.stop_node(alice)
        net.start_node(alice, 60)  # a login while the disk is full
        net.start_node(bob, 60)
        got = net.wait_complete(bob, mid, 60)  # queued before: pushed at bob's login
        assert Path(got["path"]).read_bytes() == clip.read_bytes()
        res = net.cli(alice, "send", str(clip), "--to", bob.address, check=False)
        assert ("the server did not take it (503 the server's storage is full: try again "
                "later)") in " ".join(res.stderr.split()), res.stderr
        with pytest.raises(LabError, match="the server's storage is full: try again later"):
            net.add_node("carol")  # `peerpost init` registers carol's device
        # Every 2 s the server rewrites stats.json, which the full disk refuses too: that
        # stopped the server once, and a node was told it was unreachable.
        server = net.server
        assert server is not None
        net.wait_until(lambda: "event=storage.full file=" in server.log(), 10,
                       "the server to log stats.json unwritable")
        assert server.alive() and "Traceback" not in server.log()
        (data / "filler").unlink()
        net.wait_until(lambda: "event=stats.written_again" in server.log(), 10,
                       "stats.json written again")
        again = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        assert Path(net.wait_complete(bob, again, 60)["path"]).read_bytes() == clip.read_bytes()
        net.add_node("carol")
