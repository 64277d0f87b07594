"""A `restore` that fails midway (a bad file in the backup, a full disk) changes nothing:
no half-made data folder that a rerun refuses ("already holds a server database") or that
`serve` would start on, and an existing folder keeps its database, WAL and keys (real
processes, real files; the full disk is tests/diskfull.py's)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rendezvous.cli import main as rendezvous_main
from rendezvous.datalock import DataLock
from rendezvous.domainkey import load_or_create
from rendezvous.sqlite_store import DB_NAME
from tests import diskfull
from tests.diskfull import rows


def run(*args: str, max_file: int | None = None) -> subprocess.CompletedProcess[str]:
    return diskfull.run([sys.executable, "-m", "rendezvous", *args], max_file=max_file)


def make_backup(tmp_path: Path, rows: int = 300) -> tuple[Path, str]:
    """A backup made by `backup` of a folder with a domain key and a 300 KB database."""
    data = tmp_path / "served"
    data.mkdir()
    key = load_or_create(data).fingerprint
    conn = sqlite3.connect(data / DB_NAME)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(bytes(1000),)] * rows)
    conn.commit()
    conn.close()
    dest = tmp_path / "backup"
    done = run("backup", str(dest), "--data", str(data))
    assert done.returncode == 0, done.stderr
    return dest, key


def killed_with_wal(db: Path) -> None:
    """A server killed with 7 rows committed only in its WAL (the database file alone
    lacks them)."""
    script = ("import os, sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1])\n"
              "c.execute('PRAGMA journal_mode=WAL')\n"
              "c.execute('CREATE TABLE t (x)')\n"
              "c.executemany('INSERT INTO t VALUES (?)', [(b'ours',)] * 7)\n"
              "c.commit()\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(db)], check=True)
    assert Path(f"{db}-wal").stat().st_size > 0


def restores(backup: Path, data: Path, key: str, *force: str) -> None:
    """A rerun restores the backup: its 300 rows and its domain key."""
    done = run("restore", str(backup), "--data", str(data), *force)
    assert done.returncode == 0, done.stderr
    assert rows(data / DB_NAME) == 300 and load_or_create(data).fingerprint == key


def test_a_restore_that_fails_midway_leaves_no_folder_and_a_rerun_works(
        tmp_path: Path) -> None:
    backup, key = make_backup(tmp_path)
    # A bad backup: its TLS key is not a file (met after the domain key is copied).
    (backup / "tls_key.pem").mkdir()
    data = tmp_path / "data"
    done = run("restore", str(backup), "--data", str(data))
    assert done.returncode == 1
    assert f"restoring {backup} into {data} failed, nothing there was changed" in done.stderr
    assert "tls_key.pem" in done.stderr and "Is a directory" in done.stderr
    assert not data.exists()  # no database, keys or serve.lock left behind

    (backup / "tls_key.pem").rmdir()
    restores(backup, data, key)


def test_a_full_disk_leaves_an_empty_folder_empty(tmp_path: Path) -> None:
    backup, key = make_backup(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    assert (backup / DB_NAME).stat().st_size > 200_000
    done = run("restore", str(backup), "--data", str(data), max_file=200_000)
    assert done.returncode == 1
    assert "nothing there was changed" in done.stderr and "File too large" in done.stderr
    assert list(data.iterdir()) == []  # no half database, no staging folder, no lock
    restores(backup, data, key)


def test_a_failed_forced_restore_keeps_the_folder_and_its_wal(tmp_path: Path) -> None:
    backup, theirs = make_backup(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    ours = load_or_create(data).fingerprint
    killed_with_wal(data / DB_NAME)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}

    done = run("restore", str(backup), "--data", str(data), "--force", max_file=200_000)
    assert done.returncode == 1 and "nothing there was changed" in done.stderr
    after = {p.name: p.read_bytes() for p in data.iterdir()
             if p.is_file() and p.name != "serve.lock"}
    assert after == {k: v for k, v in before.items() if k != "serve.lock"}
    assert [p for p in data.iterdir() if p.is_dir()] == []  # no staging folder
    assert rows(data / DB_NAME) == 7 and load_or_create(data).fingerprint == ours
    restores(backup, data, theirs, "--force")


def test_a_backup_whose_database_is_empty_is_refused(tmp_path: Path) -> None:
    # A copy cut to nothing (a disk full as it was copied, a sync that stopped) opens as
    # an empty database and passes the integrity check: put in place with --force, it
    # left the server with no account, device or queue.
    backup, _ = make_backup(tmp_path)
    (backup / DB_NAME).write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    load_or_create(data)
    killed_with_wal(data / DB_NAME)
    done = run("restore", str(backup), "--data", str(data), "--force")
    assert done.returncode == 1
    assert f"{backup / DB_NAME} is damaged: it holds no tables" in done.stderr
    assert rows(data / DB_NAME) == 7


def test_two_restores_at_once_the_second_is_refused_under_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Two operators restore two domains' backups into one new folder at once. The other
    # restore (a real process) finishes between this one's look at the folder and its
    # taking the lock: this one must be refused then, not put its domain key in.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_key = make_backup(tmp_path / "a")
    second, _ = make_backup(tmp_path / "b")
    data = tmp_path / "data"
    take = DataLock.acquire

    def other_restore_first(folder: Path) -> DataLock:
        restores(first, data, first_key)
        return take(folder)

    monkeypatch.setattr(DataLock, "acquire", other_restore_first)
    assert rendezvous_main(["restore", str(second), "--data", str(data)]) == 1
    assert "already holds a server database; --force replaces it" in capsys.readouterr().err
    assert rows(data / DB_NAME) == 300 and load_or_create(data).fingerprint == first_key
    assert {p.name for p in data.iterdir()} - {"serve.lock"} == {p.name for p in first.iterdir()}
