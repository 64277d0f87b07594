"""The node's local records: one SQLite file, `node.db`, in the node's home folder.

This module opens the database, sets it up for durability, and owns the versioned schema.
The tables are read and written through `overlay.mail.inbox`, `overlay.mail.outbox`,
`overlay.mail.prefs` and `overlay.mail.contacts`.

Durability (state survives kill -9 at any point): WAL journal,
`synchronous=FULL` (every commit is fsynced, so it also survives a power cut), foreign keys
on, and every change in one explicit transaction. The calls are small and synchronous; one
connection is shared behind a lock, so the node may call from the loop thread or from
`asyncio.to_thread` workers alike.

Schema versions live in `PRAGMA user_version`. `_MIGRATIONS[n]` takes a database from
version n to n + 1 inside the same transaction that bumps the version, so a crash during an
upgrade leaves the old version intact.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crypto.location import MESSAGE_ID_LEN

DB_FILE_NAME = "node.db"
MAX_STORED_MESSAGE = 64 * 1024  # a location message fits a 64 KiB envelope
# The most entries `inbox` and `status` list (the newest): `fetch`, `rm`, `cancel` and
# `status ID` look an id up in all of them (`with_id_prefix`).
LIST_LIMIT = 1000
_HEX_DIGITS = frozenset("0123456789abcdef")


class RecordsError(Exception):
    """The database can't be used: newer schema than this code knows, or a bad file."""


def damaged_text(path: Path, problem: str) -> str:
    """What to do about a node.db that SQLite finds damaged (a disk error, a bad copy)."""
    from rendezvous.admin import damaged_text as sqlite_damaged  # 45 ms, rarely needed

    return sqlite_damaged(path, problem, kept=(
        "your identity, received files and what you sent stay, but the inbox list, "
        "contacts' pinned keys, preferences and the status of sent mail start over"))


class RecordLimitError(RecordsError):
    """A bounded table is full (too many messages, contacts, keys or patterns)."""


_SCHEMA_V1 = """
CREATE TABLE inbox (
    id              BLOB PRIMARY KEY CHECK (length(id) = 16),
    sender          TEXT NOT NULL,
    sender_peer_id  BLOB NOT NULL,
    title           TEXT NOT NULL,
    note            TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    file_name       TEXT NOT NULL,
    media_type      TEXT NOT NULL,
    content_id      BLOB NOT NULL,
    state           TEXT NOT NULL
                    CHECK (state IN ('offered', 'downloading', 'retrying', 'complete', 'failed')),
    junk            INTEGER NOT NULL CHECK (junk IN (0, 1)),
    priority        INTEGER NOT NULL CHECK (priority IN (0, 1)),
    received_at     REAL NOT NULL,
    next_attempt    REAL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error           TEXT,
    path            TEXT,
    chunks_held     INTEGER NOT NULL DEFAULT 0,
    chunk_count     INTEGER NOT NULL CHECK (chunk_count >= 0),
    message         BLOB NOT NULL,
    CHECK (chunks_held BETWEEN 0 AND chunk_count),
    CHECK (junk = 0 OR state = 'offered'),
    CHECK (state <> 'complete' OR (path IS NOT NULL AND chunks_held = chunk_count)),
    CHECK (state <> 'retrying' OR next_attempt IS NOT NULL),
    CHECK (state <> 'failed' OR error IS NOT NULL)
);
CREATE INDEX inbox_by_received ON inbox (received_at);
CREATE INDEX inbox_by_work ON inbox (state, junk, priority DESC, received_at);

CREATE TABLE outbox (
    id              BLOB PRIMARY KEY CHECK (length(id) = 16),
    path            TEXT NOT NULL,
    title           TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    content_id      BLOB NOT NULL,
    created_at      REAL NOT NULL,
    message         BLOB NOT NULL,
    retention_done  INTEGER NOT NULL DEFAULT 0 CHECK (retention_done IN (0, 1)),
    retention_action TEXT CHECK (retention_action IN ('keep', 'delete', 'archive')),
    CHECK (retention_done = (retention_action IS NOT NULL))
);
CREATE INDEX outbox_by_created ON outbox (created_at);

CREATE TABLE outbox_recipient (
    message_id      BLOB NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    address         TEXT NOT NULL,
    state           TEXT NOT NULL
                    CHECK (state IN ('queued', 'sent', 'downloading', 'downloaded', 'failed')),
    reason          TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (message_id, address),
    CHECK (state <> 'failed' OR reason IS NOT NULL)
) WITHOUT ROWID;

CREATE TABLE pref (
    name            TEXT PRIMARY KEY,
    value           BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE sender_rule (
    pattern         TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('priority', 'junk'))
) WITHOUT ROWID;

CREATE TABLE contact (
    address         TEXT PRIMARY KEY,
    first_seen      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    changed         INTEGER NOT NULL DEFAULT 0 CHECK (changed IN (0, 1))
) WITHOUT ROWID;

CREATE TABLE contact_key (
    address         TEXT NOT NULL REFERENCES contact (address) ON DELETE CASCADE,
    verify_key      BLOB NOT NULL CHECK (length(verify_key) = 32),
    status          TEXT NOT NULL CHECK (status IN ('pinned', 'pending')),
    first_seen      REAL NOT NULL,
    PRIMARY KEY (address, verify_key)
) WITHOUT ROWID;
"""


def _to_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


def _to_v2(conn: sqlite3.Connection) -> None:
    # When a download first started, wrote its first chunk, and finished (wall clock):
    # what `inbox` shows and the demo and benchmarks measure.
    for col in ("started_at", "first_byte_at", "completed_at"):
        conn.execute(f"ALTER TABLE inbox ADD COLUMN {col} REAL")


def _to_v3(conn: sqlite3.Connection) -> None:
    # When the "downloaded" receipt for a complete entry reached our server. NULL on a
    # complete entry means it is still owed (the server was unreachable): sent again at
    # the next start and while the node runs. Entries completed before this version get
    # one more receipt, which the sender takes as a repeat.
    conn.execute("ALTER TABLE inbox ADD COLUMN receipt_sent_at REAL")


_INBOX_V4 = """
CREATE TABLE inbox_v4 (
    id              BLOB PRIMARY KEY CHECK (length(id) = 16),
    sender          TEXT NOT NULL,
    sender_peer_id  BLOB NOT NULL,
    title           TEXT NOT NULL,
    note            TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    file_name       TEXT NOT NULL,
    media_type      TEXT NOT NULL,
    content_id      BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('unverified', 'offered', 'downloading',
                                                   'retrying', 'complete', 'failed')),
    junk            INTEGER NOT NULL CHECK (junk IN (0, 1)),
    priority        INTEGER NOT NULL CHECK (priority IN (0, 1)),
    received_at     REAL NOT NULL,
    next_attempt    REAL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error           TEXT,
    path            TEXT,
    chunks_held     INTEGER NOT NULL DEFAULT 0,
    chunk_count     INTEGER NOT NULL CHECK (chunk_count >= 0),
    message         BLOB NOT NULL,
    started_at      REAL,
    first_byte_at   REAL,
    completed_at    REAL,
    receipt_sent_at REAL,
    CHECK (chunks_held BETWEEN 0 AND chunk_count),
    CHECK (junk = 0 OR state IN ('offered', 'unverified')),
    CHECK (state <> 'complete' OR (path IS NOT NULL AND chunks_held = chunk_count)),
    CHECK (state <> 'retrying' OR next_attempt IS NOT NULL),
    CHECK (state <> 'failed' OR error IS NOT NULL)
);
CREATE TABLE contact_key_v4 (
    address         TEXT NOT NULL REFERENCES contact (address) ON DELETE CASCADE,
    verify_key      BLOB NOT NULL CHECK (length(verify_key) = 32),
    status          TEXT NOT NULL CHECK (status IN ('pinned', 'pending', 'unvouched')),
    first_seen      REAL NOT NULL,
    PRIMARY KEY (address, verify_key)
) WITHOUT ROWID
"""
_INBOX_COLUMNS = (
    "id, sender, sender_peer_id, title, note, size, file_name, media_type, content_id,"
    " state, junk, priority, received_at, next_attempt, attempts, error, path, chunks_held,"
    " chunk_count, message, started_at, first_byte_at, completed_at, receipt_sent_at")


def _to_v4(conn: sqlite3.Connection) -> None:
    # Trust: an inbox message signed by a device key not (yet) trusted for its sender is
    # held as 'unverified'; a contact's key that showed up next to pinned ones without a
    # vouch from one of them is 'unvouched' until the user accepts it. SQLite can't
    # change a CHECK in place, so both tables are copied into new ones.
    for statement in _INBOX_V4.split(";"):
        conn.execute(statement)
    conn.execute(f"INSERT INTO inbox_v4 ({_INBOX_COLUMNS}) SELECT {_INBOX_COLUMNS} FROM inbox")
    conn.execute("DROP TABLE inbox")
    conn.execute("ALTER TABLE inbox_v4 RENAME TO inbox")
    conn.execute("CREATE INDEX inbox_by_received ON inbox (received_at)")
    conn.execute("CREATE INDEX inbox_by_work ON inbox (state, junk, priority DESC, received_at)")
    conn.execute("INSERT INTO contact_key_v4 SELECT address, verify_key, status, first_seen"
                 " FROM contact_key")
    conn.execute("DROP TABLE contact_key")
    conn.execute("ALTER TABLE contact_key_v4 RENAME TO contact_key")


_V5 = """
CREATE TABLE outbox_recipient_v5 (
    message_id      BLOB NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    address         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'downloading',
                                                   'downloaded', 'declined', 'failed')),
    reason          TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (message_id, address),
    CHECK (state NOT IN ('failed', 'declined') OR reason IS NOT NULL)
) WITHOUT ROWID;
CREATE TABLE declined_receipt (
    message_id      BLOB PRIMARY KEY CHECK (length(message_id) = 16),
    reason          TEXT NOT NULL,
    declined_at     REAL NOT NULL,
    message         BLOB NOT NULL,
    sent_at         REAL
)
"""


def _to_v5(conn: sqlite3.Connection) -> None:
    # Declined receipts. A sent message's recipient may be 'declined' (with the reason it
    # gave): the recipients' table is copied into one whose CHECK allows it. And a
    # recipient's own declines wait in declined_receipt until the server took them: a row
    # outlives the inbox entry `rm` removed, and stays once sent so that none goes twice.
    for statement in _V5.split(";"):
        conn.execute(statement)
    conn.execute("INSERT INTO outbox_recipient_v5 SELECT message_id, address, state, reason,"
                 " updated_at FROM outbox_recipient")
    conn.execute("DROP TABLE outbox_recipient")
    conn.execute("ALTER TABLE outbox_recipient_v5 RENAME TO outbox_recipient")


def _to_v6(conn: sqlite3.Connection) -> None:
    # Retired keys: a contact's pinned key its server no longer lists is unpinned and
    # remembered here, never trusted again but by the user's accept (overlay.mail.contacts).
    # A table of its own, not a contact_key status, so that a retired key the server lists
    # again can show as unvouched or pending there and still be known as retired.
    conn.execute("""CREATE TABLE retired_key (
        address     TEXT NOT NULL REFERENCES contact (address) ON DELETE CASCADE,
        verify_key  BLOB NOT NULL CHECK (length(verify_key) = 32),
        retired_at  REAL NOT NULL,
        PRIMARY KEY (address, verify_key)
    ) WITHOUT ROWID""")


def _to_v7(conn: sqlite3.Connection) -> None:
    # When a FINGER last confirmed a contact's keys (overlay.mail.contacts, KEYS_FRESH):
    # a key pinned long ago is looked up again before what it signs is believed. NULL, as
    # for every contact before this version, is "not known", so taken as stale: one
    # lookup per contact at its next message or receipt.
    conn.execute("ALTER TABLE contact ADD COLUMN keys_confirmed_at REAL")


def _to_v8(conn: sqlite3.Connection) -> None:
    # How far `node --on-message`'s `arrived` got (overlay.mail.delivery): `pending` while
    # the lookup of its sender that settles its state has not ended (the envelope is not
    # acknowledged yet, so the server pushes it again after a stop), `due` once settled
    # and its command not finished, `told` once it ran (or no command was set). Messages
    # filed before this version were told as they were filed.
    conn.execute("ALTER TABLE inbox ADD COLUMN arrival TEXT NOT NULL DEFAULT 'told'"
                 " CHECK (arrival IN ('pending', 'due', 'told'))")
    conn.execute("CREATE INDEX inbox_by_arrival ON inbox (arrival) WHERE arrival <> 'told'")


def _to_v9(conn: sqlite3.Connection) -> None:
    # How far `node --on-message`'s `complete` got (overlay.app.notify): NULL until the
    # download completes, `due` from the commit that makes it complete until its command
    # ran to its end (a stop killed it, it had not started, or it waited for a free
    # slot), then `told`. Messages complete before this version were told then.
    conn.execute("ALTER TABLE inbox ADD COLUMN completion TEXT"
                 " CHECK (completion IN ('due', 'told'))")
    conn.execute("UPDATE inbox SET completion = 'told' WHERE state = 'complete'")
    conn.execute("CREATE INDEX inbox_by_completion ON inbox (completion)"
                 " WHERE completion = 'due'")


def _to_v10(conn: sqlite3.Connection) -> None:
    # The devices each sent message was sealed to (overlay.mail.outbox): the sender's
    # retention waits for a settling receipt signed by each of them, not only the first of
    # an address's devices. Messages sent before this version have no rows: their
    # retention waits for each address, as it did.
    conn.execute("""CREATE TABLE outbox_device (
        message_id  BLOB NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
        address     TEXT NOT NULL,
        verify_key  BLOB NOT NULL CHECK (length(verify_key) = 32),
        settled     INTEGER NOT NULL DEFAULT 0 CHECK (settled IN (0, 1)),
        PRIMARY KEY (message_id, address, verify_key)
    ) WITHOUT ROWID""")


# version n -> the step that makes it n + 1. Append only; never edit a shipped step.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _to_v1, 1: _to_v2, 2: _to_v3, 3: _to_v4, 4: _to_v5, 5: _to_v6, 6: _to_v7, 7: _to_v8,
    8: _to_v9, 9: _to_v10}
SCHEMA_VERSION = len(_MIGRATIONS)


class NodeDB:
    """One open `node.db`: a connection behind a lock, with transactions and queries."""

    __slots__ = ("_conn", "_lock", "_nested", "path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._nested = 0  # savepoints open inside the current transaction
        self.path = path

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        migrations: dict[int, Callable[[sqlite3.Connection], None]] | None = None,
    ) -> NodeDB:
        """Open (creating if needed) and migrate the database at `path`.

        `path` may be a folder, meaning `path / "node.db"`. `migrations` replaces the
        built-in table, for tests of the upgrade path.
        """
        if path.is_dir():
            path = path / DB_FILE_NAME
        steps = _MIGRATIONS if migrations is None else migrations
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is
            # committed behind our back and a transaction is exactly one `with` block.
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except sqlite3.Error as exc:
            raise RecordsError(f"cannot open {path}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RecordsError(f"{path}: cannot switch to WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            _migrate(conn, path, steps)
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise RecordsError(damaged_text(path, problem))
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not isinstance(exc, sqlite3.OperationalError):  # not a database, malformed
                raise RecordsError(damaged_text(path, str(exc))) from None
            raise RecordsError(f"{path} is not a usable node database: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and a write transaction; commit on success, roll back on error.

        BEGIN IMMEDIATE takes the write lock up front, so a read-check-write inside the
        block can't be raced by another process sharing the file.

        Inside another transaction of this thread (the lock is reentrant) the block is a
        SAVEPOINT of it: an error rolls back the block alone, and its changes commit with
        the outer ones, in one fsync (a first contact's contact row and its message).
        """
        with self._lock:
            if self._conn.in_transaction:
                self._nested += 1
                name = f"nested_{self._nested}"
                self._conn.execute(f"SAVEPOINT {name}")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._nested -= 1
                self._conn.execute(f"RELEASE {name}")
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run one read-only statement and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """Run one read-only statement and return its first row, if any."""
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    @property
    def schema_version(self) -> int:
        row = self.query_one("PRAGMA user_version")
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite on the last close)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> NodeDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _migrate(
    conn: sqlite3.Connection,
    path: Path,
    steps: dict[int, Callable[[sqlite3.Connection], None]],
) -> None:
    target = len(steps)
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > target:
                raise RecordsError(
                    f"{path} has schema version {version}; this peerpost knows up to {target}"
                    " (was it opened by a newer version?)"
                )
            if version == target:
                conn.execute("COMMIT")
                return
            steps[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def count_rows(conn: sqlite3.Connection, table: str) -> int:
    """Rows in `table`, a name from our own code (never from outside), for the size bounds."""
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def check_message_row(id: bytes, message: bytes) -> None:
    """Refuse a message id of the wrong size or an oversized stored location message."""
    if len(id) != MESSAGE_ID_LEN:
        raise ValueError(f"a message id is {MESSAGE_ID_LEN} bytes, got {len(id)}")
    if len(message) > MAX_STORED_MESSAGE:
        raise ValueError(f"location message of {len(message)} bytes is over the limit")


def is_new_message(conn: sqlite3.Connection, table: str, id: bytes, limit: int) -> bool:
    """False if `table` (our own name) has this message id; RecordLimitError if it is full.

    Adding is idempotent because the rendezvous server may deliver a message again.
    """
    if conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (id,)).fetchone():
        return False
    if count_rows(conn, table) >= limit:
        raise RecordLimitError(f"{table} is full ({limit} messages); remove old ones first")
    return True


def id_prefix_range(prefix: str) -> tuple[bytes, bytes | None] | None:
    """The message ids whose hex starts with `prefix`, as a range of the BLOB key:
    `lo <= id`, and `id < hi` unless `hi` is None (the prefix is all f). None when
    `prefix` is no id's start: not hex, or longer than an id. An odd-length prefix
    covers the 16 values of its last half byte ("abc": ab c0 up to ab d0)."""
    digits = prefix.lower()
    if len(digits) > 2 * MESSAGE_ID_LEN or not _HEX_DIGITS.issuperset(digits):
        return None
    odd = len(digits) % 2
    lo = bytes.fromhex(digits + "0" * odd)
    top = bytes.fromhex(digits + "f" * odd).rstrip(b"\xff")
    # The first byte string past every one starting with the prefix.
    return lo, (top[:-1] + bytes([top[-1] + 1])) if top else None


def with_id_prefix(db: NodeDB, table: str, prefix: str, *, order: str, limit: int
                   ) -> tuple[list[sqlite3.Row], int]:
    """The first `limit` rows of `table` (our own name) by `order` whose id starts with
    the hex digits `prefix`, and how many rows do. A range on the primary key: SQLite
    searches its index (a row past the newest 1,000 is found as fast as a new one)
    rather than reading every row."""
    bounds = id_prefix_range(prefix)
    if bounds is None:
        return [], 0
    lo, hi = bounds
    where = "id >= ?" if hi is None else "id >= ? AND id < ?"
    params: tuple[bytes, ...] = (lo,) if hi is None else (lo, hi)
    rows = db.query(f"SELECT * FROM {table} WHERE {where} ORDER BY {order} LIMIT ?",
                    (*params, limit))
    if len(rows) < limit:
        return rows, len(rows)
    found = db.query_one(f"SELECT count(*) FROM {table} WHERE {where}", params)
    return rows, int(found[0]) if found is not None else len(rows)
