"""node.db itself: durability settings, schema versions and migrations, surviving kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from overlay.mail.db import DB_FILE_NAME, SCHEMA_VERSION, NodeDB, RecordsError
from overlay.mail.inbox import Inbox
from overlay.mail.inbox_state import InboxState
from tests.present import present

REPO = Path(__file__).resolve().parents[2]


def _offer(inbox: Inbox, n: int) -> bytes:
    mid = n.to_bytes(16, "big")
    inbox.add(
        id=mid, sender="alice@example.net", sender_peer_id=b"p" * 20, title=f"clip {n}",
        note="", size=10, file_name="a.ts", media_type="video/mp2t", content_id=b"c" * 32,
        chunk_count=1, message=b"raw", received_at=float(n),
    )
    return mid


def test_open_sets_durable_pragmas_and_schema(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:  # a folder means folder/node.db
        assert db.path == tmp_path / DB_FILE_NAME
        assert db.schema_version == SCHEMA_VERSION
        assert present(db.query_one("PRAGMA journal_mode"))[0] == "wal"
        assert present(db.query_one("PRAGMA synchronous"))[0] == 2  # FULL
        assert present(db.query_one("PRAGMA foreign_keys"))[0] == 1
    assert (tmp_path / DB_FILE_NAME).exists()


def test_reopen_keeps_data_and_version(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        _offer(Inbox(db), 1)
    with NodeDB.open(tmp_path) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert [e.title for e in Inbox(db).list()] == ["clip 1"]


def test_unclosed_writer_is_visible_to_a_new_connection(tmp_path: Path) -> None:
    # A process that dies without closing: its committed transactions are in the WAL.
    writer = NodeDB.open(tmp_path)
    mid = _offer(Inbox(writer), 7)
    Inbox(writer).transition(mid, InboxState.DOWNLOADING)
    reader = NodeDB.open(tmp_path)
    entry = Inbox(reader).get(mid)
    assert entry is not None and entry.state is InboxState.DOWNLOADING and entry.attempts == 1
    reader.close()
    writer.close()


def test_survives_kill_9(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from overlay.mail.inbox import Inbox
        from overlay.mail.inbox_state import InboxState
        from overlay.mail.db import NodeDB
        db = NodeDB.open(Path({str(tmp_path)!r}))
        inbox = Inbox(db)
        for n in range(20):
            mid = n.to_bytes(16, "big")
            inbox.add(id=mid, sender="a@example.net", sender_peer_id=b"p" * 20, title=str(n),
                      note="", size=1, file_name="f", media_type="x/y", content_id=b"c" * 32,
                      chunk_count=4, message=b"m", received_at=float(n))
            inbox.transition(mid, InboxState.DOWNLOADING)
            inbox.set_progress(mid, 3)
        print("written", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with NodeDB.open(tmp_path) as db:
        entries = Inbox(db).list()
    assert len(entries) == 20
    assert all(e.state is InboxState.DOWNLOADING and e.chunks_held == 3 for e in entries)


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE_NAME
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(RecordsError, match="newer version"):
        NodeDB.open(path)


def test_migration_hook_upgrades_in_steps(tmp_path: Path) -> None:
    from overlay.mail.db import _MIGRATIONS

    with NodeDB.open(tmp_path) as db:
        _offer(Inbox(db), 1)

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE inbox ADD COLUMN label TEXT NOT NULL DEFAULT 'none'")

    steps = {**_MIGRATIONS, SCHEMA_VERSION: add_column}
    with NodeDB.open(tmp_path, migrations=steps) as db:
        assert db.schema_version == SCHEMA_VERSION + 1
        assert db.query("SELECT label FROM inbox")[0]["label"] == "none"
        assert [e.title for e in Inbox(db).list()] == ["clip 1"]


def test_failed_migration_leaves_the_old_version(tmp_path: Path) -> None:
    from overlay.mail.db import _MIGRATIONS

    NodeDB.open(tmp_path).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        NodeDB.open(tmp_path, migrations={**_MIGRATIONS, SCHEMA_VERSION: broken})
    with NodeDB.open(tmp_path) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert not db.query("SELECT name FROM sqlite_master WHERE name = 'half_done'")


def test_garbage_file_is_a_records_error(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE_NAME
    path.write_bytes(os.urandom(8192))
    with pytest.raises(RecordsError, match=r"is damaged \(file is not a database\); the "
                       "node does not start with it"):
        NodeDB.open(path)


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        with pytest.raises(RuntimeError), db.transaction() as conn:
            conn.execute("INSERT INTO pref (name, value) VALUES ('x', x'00')")
            raise RuntimeError("stop")
        assert db.query("SELECT * FROM pref") == []


def test_a_transaction_inside_another_commits_with_it(tmp_path: Path) -> None:
    """A nested block is a savepoint: its error undoes it alone, and what stays commits
    once, with the outer block (a first contact's contact row and message, one fsync)."""
    commits: list[str] = []
    with NodeDB.open(tmp_path) as db:
        db._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        with db.transaction() as conn:
            conn.execute("INSERT INTO pref (name, value) VALUES ('a', x'00')")
            with pytest.raises(RuntimeError), db.transaction() as inner:
                inner.execute("INSERT INTO pref (name, value) VALUES ('b', x'00')")
                raise RuntimeError("stop")
            with db.transaction() as inner:
                inner.execute("INSERT INTO pref (name, value) VALUES ('c', x'00')")
        assert commits == ["COMMIT"]
        with pytest.raises(RuntimeError), db.transaction() as conn:
            with db.transaction() as inner:
                inner.execute("INSERT INTO pref (name, value) VALUES ('d', x'00')")
            raise RuntimeError("the outer one fails: the inner one's rows go too")
        db._conn.set_trace_callback(None)
        assert [r["name"] for r in db.query("SELECT name FROM pref ORDER BY name")] == ["a", "c"]


def test_calls_from_worker_threads_are_serialised(tmp_path: Path) -> None:
    # The node may call from asyncio.to_thread workers: one shared connection, one lock.
    from concurrent.futures import ThreadPoolExecutor

    with NodeDB.open(tmp_path) as db:
        inbox = Inbox(db)
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda n: _offer(inbox, n % 25), range(100)))
        assert sorted(e.title for e in inbox.list()) == sorted(f"clip {n}" for n in range(25))
