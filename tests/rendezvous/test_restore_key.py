"""`restore` into a folder whose domain key is not the backup's (`dns-records` made one
there, and DNS may publish it already) refuses without --force, and says what changed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from rendezvous.domainkey import load_or_create
from rendezvous.sqlite_store import DB_NAME


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=60)


def test_restore_over_another_domain_key_needs_force(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir(mode=0o700)
    sqlite3.connect(backup / DB_NAME).execute("CREATE TABLE t (x)").connection.commit()
    theirs = load_or_create(backup).fingerprint
    data = tmp_path / "data"
    done = run("dns-records", "--data", str(data), "--domain", "example.net", "--host",
               "rv.example.net", "--port", "4500")
    assert done.returncode == 0, done.stderr
    ours = load_or_create(data).fingerprint
    assert ours != theirs

    done = run("restore", str(backup), "--data", str(data))
    assert done.returncode == 1
    assert f"domain key {ours} is not the backup's {theirs}; --force replaces it" in done.stderr
    assert load_or_create(data).fingerprint == ours  # nothing replaced

    done = run("restore", str(backup), "--data", str(data), "--force")
    assert done.returncode == 0, done.stderr
    assert f"the domain key is now the backup's {theirs} (it was {ours})" in done.stdout
    assert load_or_create(data).fingerprint == theirs
