"""`peerpost restore` that fails midway (a full disk, tests/diskfull.py) changes nothing:
a home that was not there is not left half made, and an existing home keeps its identity,
config, database and the commits still in its WAL (real processes, real files)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from crypto.identity import DeviceIdentity
from overlay.app.backup import backup
from overlay.app.config import NodeConfig
from overlay.app.home import HomeError, NodeHome
from tests import diskfull
from tests.diskfull import rows, run_killed_before_rename

LIMIT = 200_000


def restore(home: Path, src: Path, *, max_file: int | None = None) -> (
        subprocess.CompletedProcess[str]):
    code = "import sys; from overlay.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return diskfull.run([sys.executable, "-c", code, "--home", str(home), "restore",
                         str(src)], max_file=max_file)


def make_backup(tmp_path: Path) -> tuple[NodeHome, Path]:
    """A home whose node.db is bigger than LIMIT, and its backup."""
    home = NodeHome(tmp_path / "home")
    home.create(NodeConfig("bob@example.net", "127.0.0.1:4500"), DeviceIdentity.generate())
    conn = sqlite3.connect(home.db_path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(bytes(1000),)] * 300)
    conn.commit()
    conn.close()
    dest = tmp_path / "backup"
    backup(home, dest)
    assert (dest / "node.db").stat().st_size > LIMIT
    return home, dest


def test_a_restore_into_a_lost_home_that_fails_leaves_nothing(tmp_path: Path) -> None:
    _, src = make_backup(tmp_path)
    lost = tmp_path / "lost"
    done = restore(lost, src, max_file=LIMIT)
    assert done.returncode == 1
    assert f"restoring {src} into {lost} failed, nothing there was changed" in done.stderr
    assert "File too large" in done.stderr
    assert not lost.exists()  # no identity without its records, no lock, no store/

    done = restore(lost, src)
    assert done.returncode == 0, done.stderr
    assert rows(lost / "node.db") == 300
    assert (lost / "identity.json").read_bytes() == (src / "identity.json").read_bytes()


def test_a_failed_restore_keeps_the_home_and_its_wal(tmp_path: Path) -> None:
    home, src = make_backup(tmp_path)
    # The node was killed with commits still in its WAL: node.db alone lacks them.
    script = ("import os, sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1])\n"
              "c.execute('PRAGMA journal_mode=WAL')\n"
              "c.execute('DELETE FROM t WHERE rowid > 7')\n"
              "c.commit()\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(home.db_path)], check=True)
    assert Path(f"{home.db_path}-wal").stat().st_size > 0
    before = {p.relative_to(home.root): p.read_bytes() for p in home.root.rglob("*")
              if p.is_file() and p != home.lock_path}

    done = restore(home.root, src, max_file=LIMIT)
    assert done.returncode == 1 and "nothing there was changed" in done.stderr
    after = {p.relative_to(home.root): p.read_bytes() for p in home.root.rglob("*")
             if p.is_file() and p != home.lock_path}
    assert after == before
    assert [p.name for p in home.root.iterdir() if p.is_dir()] == []  # no staging folder
    assert rows(home.db_path) == 7

    done = restore(home.root, src)
    assert done.returncode == 0, done.stderr
    assert rows(home.db_path) == 300


@pytest.mark.parametrize("spoilt", ["node.db", "store/content.sqlite"])
def test_a_backup_with_an_empty_or_no_database_file_is_refused(tmp_path: Path,
                                                               spoilt: str) -> None:
    # An empty node.db (a copy cut to nothing) passed the integrity check and replaced the
    # home's inbox, outbox and contacts with nothing; a store/content.sqlite that is not a
    # file ended the command with a traceback.
    home, src = make_backup(tmp_path)
    if spoilt == "node.db":
        (src / spoilt).write_bytes(b"")
    else:
        (src / spoilt).unlink(missing_ok=True)
        (src / spoilt).mkdir(parents=True)
    why = "it holds no tables" if spoilt == "node.db" else "not a file"
    done = restore(home.root, src)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {src / spoilt} is damaged ({why}): not restored"
    assert rows(home.db_path) == 300


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 4])
def test_a_restore_killed_at_each_step_is_finished_or_undone_by_the_node(
        tmp_path: Path, stop: int) -> None:
    # Into a lost home: os.replace 0 puts the plan in place, 1 the mark (the point of no
    # return), then identity, config, node.db. Killed after the mark, the home holds an
    # identity without its records until the next holder of its lock (the node starting)
    # finishes the restore.
    _, src = make_backup(tmp_path)
    lost = NodeHome(tmp_path / "lost")
    done = run_killed_before_rename(stop, "overlay.app.cli",
                                    ["--home", str(lost.root), "restore", str(src)])
    assert done.returncode == 9, done.stderr
    assert not lost.db_path.exists()
    if stop in (2, 3):  # no config.json yet: `peerpost node` can't start, and says why
        with pytest.raises(HomeError) as refused:
            lost.load_config()
        assert str(refused.value) == (f"a restore into {lost.root} was stopped before it was "
                                      "done: run `peerpost restore` with the same backup "
                                      "again, which finishes it")
    with lost.daemon_lock():  # what `peerpost node` takes before it opens anything
        if stop <= 1:
            assert sorted(p.name for p in lost.root.iterdir()) == ["node.lock", "store"]
        else:
            assert rows(lost.db_path) == 300
            assert lost.identity_path.read_bytes() == (src / "identity.json").read_bytes()
            assert lost.config_path.read_bytes() == (src / "config.json").read_bytes()
        assert not list(lost.root.rglob(".restore-part-*"))


def test_a_rename_that_fails_past_the_point_of_no_return_is_said_and_finished_later(
        tmp_path: Path) -> None:
    # The identity went in, then renaming config.json failed (EIO): the home is changed,
    # so the restore must not say nothing was; the node's next start finishes it.
    _, src = make_backup(tmp_path)
    lost = NodeHome(tmp_path / "lost")
    done = run_killed_before_rename(3, "overlay.app.cli",
                                    ["--home", str(lost.root), "restore", str(src)], fail=True)
    assert done.returncode == 1
    assert "nothing there was changed" not in done.stderr
    assert (f"restoring {src} into {lost.root} stopped while its files went in ([Errno 5] "
            "Input/output error (injected)): the node's next start or a rerun finishes it "
            "once that is mended") in done.stderr
    assert lost.identity_path.read_bytes() == (src / "identity.json").read_bytes()
    with lost.daemon_lock():
        assert rows(lost.db_path) == 300
        assert lost.config_path.read_bytes() == (src / "config.json").read_bytes()
        assert not list(lost.root.rglob(".restore-part-*"))


def test_a_store_on_another_disk_is_restored_too(tmp_path: Path) -> None:
    # The home's store/ is a link to another file system (a bigger disk): its database's
    # copy is staged there, so it is renamed in like the others. It was staged beside
    # node.db: the rename failed (EXDEV) after node.db had gone in, and the restore said
    # nothing had changed.
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    home, src = make_backup(tmp_path)
    (src / "store").mkdir(exist_ok=True)
    (home.root / "store").mkdir(exist_ok=True)
    store = sqlite3.connect(src / "store" / "content.sqlite")
    store.execute("CREATE TABLE IF NOT EXISTS restored (x)")
    store.commit()
    store.close()
    far = Path(tempfile.mkdtemp(dir=other))
    try:
        shutil.move(home.root / "store", far / "store")
        (home.root / "store").symlink_to(far / "store")
        done = restore(home.root, src)
        assert done.returncode == 0, done.stderr
        assert rows(home.db_path) == 300
        assert ((far / "store" / "content.sqlite").read_bytes()
                == (src / "store" / "content.sqlite").read_bytes())
        assert not list(home.root.glob(".restore-part-*"))
        assert not list((far / "store").glob(".restore-part-*"))
    finally:
        shutil.rmtree(far)
