"""The inbox: incoming location messages and how far their download got, in `node.db`.

Rows follow the machine in `overlay.mail.inbox_state`; every change is one transaction that reads
the current state, checks the move and writes, so a crash leaves either the old or the new
row. Adding is idempotent by message id because the rendezvous server may deliver a message
again (after a lost REMOVE).

The node stores the raw location message (`message`, opaque here) next to the fields the
listing needs, and decides junk and priority from `overlay.mail.prefs` when it adds a message;
`set_flags` updates them when the user changes their mind.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from overlay.mail.db import (
    LIST_LIMIT,
    NodeDB,
    check_message_row,
    count_rows,
    is_new_message,
    with_id_prefix,
)
from overlay.mail.inbox_state import (
    ACTIVE_STATES,
    IllegalTransition,
    InboxState,
    check_transition,
)
from overlay.mail.receipts import reason_text

DEFAULT_MAX_ENTRIES = 10_000
MAX_ERROR_TEXT = 500
# Declined receipts kept once sent (so that none goes twice); the oldest sent go first.
MAX_DECLINED = 10_000


@dataclass(frozen=True, slots=True)
class Decline:
    """Tell the sender it will not be downloaded: why (a receipt's reason) and when."""

    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One incoming message as `peerpost inbox` shows it."""

    id: bytes
    sender: str
    sender_peer_id: bytes
    title: str
    note: str
    size: int
    file_name: str
    media_type: str
    content_id: bytes
    state: InboxState
    junk: bool
    priority: bool
    received_at: float
    next_attempt: float | None
    attempts: int
    error: str | None
    path: str | None
    chunks_held: int
    chunk_count: int
    message: bytes
    started_at: float | None = None
    first_byte_at: float | None = None
    completed_at: float | None = None

    @property
    def progress(self) -> float:
        """Fraction of chunks verified and written; 1.0 for an empty file."""
        if self.chunk_count == 0:
            return 1.0
        return self.chunks_held / self.chunk_count


_TIME_COLUMNS = {"started": "started_at", "first_byte": "first_byte_at",
                 "completed": "completed_at"}


def _time_column(event: str) -> str:
    column = _TIME_COLUMNS.get(event)
    if column is None:
        raise ValueError(f"unknown download event {event!r}")
    return column


def _mark(conn: sqlite3.Connection, id: bytes, column: str, when: float) -> None:
    """The first mark of each kind is kept (see `Inbox.mark_time`)."""
    conn.execute(f"UPDATE inbox SET {column} = coalesce({column}, ?) WHERE id = ?", (when, id))


class Inbox:
    """Typed access to the `inbox` table; see the module docstring for the rules."""

    __slots__ = ("_db", "_max_entries")

    def __init__(self, db: NodeDB, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._db = db
        self._max_entries = max_entries

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """node.db's transaction: the changes made inside it through this inbox and the
        records sharing its node.db (contacts) commit together, in one fsync."""
        return self._db.transaction()

    def add(
        self,
        *,
        id: bytes,
        sender: str,
        sender_peer_id: bytes,
        title: str,
        note: str,
        size: int,
        file_name: str,
        media_type: str,
        content_id: bytes,
        chunk_count: int,
        message: bytes,
        received_at: float,
        junk: bool = False,
        priority: bool = False,
        unverified: bool = False,
    ) -> bool:
        """Store a new message in `offered` (`unverified` when its signing key is not
        trusted for the sender); False (and no change) if the id is known.

        Raises RecordLimitError when the inbox holds `max_entries` messages: the caller
        should then leave the envelope on the server rather than acknowledge it.
        """
        check_message_row(id, message)
        if size < 0 or chunk_count < 0:
            raise ValueError("size and chunk_count can't be negative")
        with self._db.transaction() as conn:
            if not is_new_message(conn, "inbox", id, self._max_entries):
                return False
            conn.execute(
                "INSERT INTO inbox (id, sender, sender_peer_id, title, note, size, file_name,"
                " media_type, content_id, state, junk, priority, received_at, chunk_count,"
                " message, arrival) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    id, sender, sender_peer_id, title, note, size, file_name, media_type,
                    content_id,
                    (InboxState.UNVERIFIED if unverified else InboxState.OFFERED).value,
                    int(junk), int(priority),
                    received_at, chunk_count, message, "pending",
                ),
            )
        return True

    def settle_arrival(self, id: bytes) -> InboxEntry | None:
        """The message's state is the one it keeps now (the lookup of its sender ended):
        its arrival moves from `pending` to `due`. The entry, or None if it was not
        pending (told already, due already, or no such message): one caller tells it."""
        with self._db.transaction() as conn:
            moved = conn.execute("UPDATE inbox SET arrival = 'due' WHERE id = ? AND"
                                 " arrival = 'pending'", (id,)).rowcount
            return self._locked_get(conn, id) if moved else None

    def arrivals_due(self, limit: int | None = None) -> builtins.list[InboxEntry]:
        """Messages settled whose arrival was not told to the end (the node stopped while
        its command ran, or before it started, or it waits for a free slot), oldest first.
        All of them unless `limit`: one left out at start would not be told until a later
        start (at most max_entries)."""
        rows = self._db.query("SELECT * FROM inbox WHERE arrival = 'due'"
                              " ORDER BY received_at, id LIMIT ?",
                              (-1 if limit is None else limit,))
        return [_entry(r) for r in rows]

    def completions_due(self, limit: int | None = None) -> builtins.list[InboxEntry]:
        """Complete messages whose completion was not told to the end, oldest first; all
        of them unless `limit` (as `arrivals_due`)."""
        rows = self._db.query("SELECT * FROM inbox WHERE completion = 'due'"
                              " ORDER BY received_at, id LIMIT ?",
                              (-1 if limit is None else limit,))
        return [_entry(r) for r in rows]

    def completion_told(self, id: bytes) -> None:
        """The message's completion was told (its command ran): never told again."""
        with self._db.transaction() as conn:
            conn.execute("UPDATE inbox SET completion = 'told' WHERE id = ?", (id,))

    def pending_arrivals(self, sender: str | None = None) -> builtins.list[InboxEntry]:
        """Messages (of `sender`, or all) whose arrival is still pending, oldest first;
        all of them, as `arrivals_due`."""
        rows = self._db.query("SELECT * FROM inbox WHERE arrival = 'pending' AND"
                              " (? IS NULL OR sender = ?) ORDER BY received_at, id",
                              (sender, sender))
        return [_entry(r) for r in rows]

    def arrival_told(self, id: bytes) -> None:
        """The message's arrival was told (its command ran): never told again."""
        with self._db.transaction() as conn:
            conn.execute("UPDATE inbox SET arrival = 'told' WHERE id = ?", (id,))

    def get(self, id: bytes) -> InboxEntry | None:
        """The entry with this message id, or None."""
        row = self._db.query_one("SELECT * FROM inbox WHERE id = ?", (id,))
        return _entry(row) if row is not None else None

    def list(self, *, include_junk: bool = False,
             limit: int = LIST_LIMIT) -> builtins.list[InboxEntry]:
        """The newest `limit` entries, newest first; junk only with `include_junk`. To
        find a message use `with_id_prefix`, which looks among them all."""
        where = "" if include_junk else "WHERE junk = 0"
        rows = self._db.query(
            f"SELECT * FROM inbox {where} ORDER BY received_at DESC, id LIMIT ?", (limit,)
        )
        return [_entry(r) for r in rows]

    def with_id_prefix(self, prefix: str, *, limit: int = 2
                       ) -> tuple[builtins.list[InboxEntry], int]:
        """Of every entry (junk too) whose id's hex starts with `prefix`, the newest
        `limit`, newest first, and how many there are."""
        rows, found = with_id_prefix(self._db, "inbox", prefix,
                                     order="received_at DESC, id", limit=limit)
        return [_entry(r) for r in rows], found

    def junk_senders(self) -> builtins.list[str]:
        """Senders with a message marked junk."""
        rows = self._db.query("SELECT DISTINCT sender FROM inbox WHERE junk = 1 ORDER BY sender")
        return [str(r["sender"]) for r in rows]

    def clear_junk(self, senders: Iterable[str]) -> None:
        """Every message of `senders` is no longer junk (the user took them off the junk
        list): listed, and downloadable."""
        with self._db.transaction() as conn:
            conn.executemany("UPDATE inbox SET junk = 0 WHERE sender = ? AND junk = 1",
                             [(s,) for s in senders])

    def transition(
        self,
        id: bytes,
        new_state: InboxState,
        *,
        error: str | None = None,
        next_attempt: float | None = None,
        path: str | None = None,
        decline: Decline | None = None,
        mark: tuple[str, float] | None = None,
    ) -> InboxEntry:
        """Move the entry to `new_state` and return it as stored.

        Entering `downloading` counts an attempt and clears the error; `retrying` needs
        `next_attempt` (when to try again); `failed` needs `error` (shown to the user),
        and with `decline` (a failure for good) queues a declined receipt in the same
        transaction (`_queue_decline`); `complete` needs `path` and marks every chunk
        held. A junk message never leaves `offered` (it may reach it from `unverified`).
        IllegalTransition names the entry and the moves allowed from its state.
        `mark` (event, when): `mark_time` in the same transaction (one commit, each an
        fsync, where a download's start and end made two). Entering `complete` makes its
        completion due (`completions_due`) in that commit.
        """
        column = None if mark is None else _time_column(mark[0])
        with self._db.transaction() as conn:
            old = self._locked_get(conn, id)
            what = f"inbox message {id.hex()}"
            if old.junk and new_state is not InboxState.OFFERED:
                raise IllegalTransition(
                    f"{what} is from a junk sender and stays offered; mark it not junk first"
                )
            check_transition(what, old.state, new_state)
            new = _apply(old, new_state, error=error, next_attempt=next_attempt, path=path)
            conn.execute(
                "UPDATE inbox SET state = ?, attempts = ?, next_attempt = ?, error = ?,"
                " path = ?, chunks_held = ?, completion = ? WHERE id = ?",
                (
                    new.state.value, new.attempts, new.next_attempt, new.error, new.path,
                    new.chunks_held,
                    # Owed in the same commit: a stop after it still tells `complete`.
                    "due" if new_state is InboxState.COMPLETE else None, id,
                ),
            )
            if decline is not None and new_state is InboxState.FAILED:
                _queue_decline(conn, old, decline)
            if column is not None and mark is not None:
                _mark(conn, id, column, mark[1])
                new = self._locked_get(conn, id)
        return new

    def set_progress(self, id: bytes, chunks_held: int, *,
                     first_byte: float | None = None) -> None:
        """Record how many chunks are verified and written (while downloading or retrying);
        with `first_byte`, mark it as the `first_byte` time in the same commit."""
        with self._db.transaction() as conn:
            old = self._locked_get(conn, id)
            if old.state not in ACTIVE_STATES:
                raise IllegalTransition(
                    f"inbox message {id.hex()}: no progress to record in state {old.state.value}"
                )
            if not 0 <= chunks_held <= old.chunk_count:
                raise ValueError(f"chunks_held {chunks_held} outside 0..{old.chunk_count}")
            conn.execute("UPDATE inbox SET chunks_held = ? WHERE id = ?", (chunks_held, id))
            if first_byte is not None:
                _mark(conn, id, "first_byte_at", first_byte)

    def mark_time(self, id: bytes, event: str, when: float) -> None:
        """Record when a download `started`, got its `first_byte`, or `completed`.

        The first mark of each kind is kept: a resumed download still shows when it began.
        """
        column = _time_column(event)
        with self._db.transaction() as conn:
            _mark(conn, id, column, when)

    def mark_receipt_sent(self, id: bytes, when: float) -> None:
        """The receipt for this complete entry is in the server's hands (durably)."""
        with self._db.transaction() as conn:
            conn.execute("UPDATE inbox SET receipt_sent_at = ? WHERE id = ? AND state = ?",
                         (when, id, InboxState.COMPLETE.value))

    def receipts_owed(self, limit: int = 100, after: tuple[float, bytes] | None = None,
                      ) -> builtins.list[tuple[bytes, bytes, float]]:
        """(id, location message, received at) of complete entries whose receipt is not
        sent yet, oldest first. `after`: (received at, id) of the last of the previous
        page."""
        at, mid = after if after is not None else (float("-inf"), b"")
        rows = self._db.query(
            "SELECT id, message, received_at FROM inbox WHERE state = ?"
            " AND receipt_sent_at IS NULL AND (received_at, id) > (?, ?)"
            " ORDER BY received_at, id LIMIT ?", (InboxState.COMPLETE.value, at, mid, limit))
        return [(bytes(r["id"]), bytes(r["message"]), float(r["received_at"])) for r in rows]

    def set_flags(
        self, id: bytes, *, junk: bool | None = None, priority: bool | None = None
    ) -> None:
        """Change the junk or priority mark; only a message still `offered` (or
        `unverified`) can become junk."""
        with self._db.transaction() as conn:
            old = self._locked_get(conn, id)
            if junk and old.state not in (InboxState.OFFERED, InboxState.UNVERIFIED):
                raise IllegalTransition(
                    f"inbox message {id.hex()}: only an offered message can be marked junk,"
                    f" this one is {old.state.value}"
                )
            conn.execute(
                "UPDATE inbox SET junk = ?, priority = ? WHERE id = ?",
                (
                    int(old.junk if junk is None else junk),
                    int(old.priority if priority is None else priority),
                    id,
                ),
            )

    @property
    def max_entries(self) -> int:
        """How many messages the inbox holds before it refuses new ones."""
        return self._max_entries

    def count(self, *, junk_only: bool = False) -> int:
        """Messages in the inbox, junk included (only junk with `junk_only`)."""
        row = self._db.query_one("SELECT count(*) FROM inbox"
                                 + (" WHERE junk = 1" if junk_only else ""))
        return int(row[0]) if row is not None else 0

    def is_full(self) -> bool:
        return self.count() >= self._max_entries

    def holds(self, content_id: bytes) -> bool:
        """Whether a complete message of this content is in the inbox."""
        return self._db.query_one(
            "SELECT 1 FROM inbox WHERE content_id = ? AND state = ? LIMIT 1",
            (content_id, InboxState.COMPLETE.value)) is not None

    def sharing(self, entry: InboxEntry, limit: int = 10) -> builtins.list[InboxEntry]:
        """Other entries of the same content, or pointing at the same file or folder (a
        content received twice is kept once): what removing `entry`'s file would take."""
        rows = self._db.query(
            "SELECT * FROM inbox WHERE id != ? AND (content_id = ? OR path = ?) "
            "ORDER BY received_at LIMIT ?", (entry.id, entry.content_id, entry.path, limit))
        return [_entry(r) for r in rows]

    def prunable(self, *, before: float, junk: bool = False,
                 limit: int = 100_000) -> builtins.list[InboxEntry]:
        """Entries `peerpost inbox --prune` removes: complete or failed ones received before
        `before`, and with `junk` every junk sender's message whatever its age."""
        rows = self._db.query(
            "SELECT * FROM inbox WHERE (state IN ('complete', 'failed') AND received_at < ?)"
            " OR (? AND junk = 1) ORDER BY received_at LIMIT ?", (before, int(junk), limit))
        return [_entry(r) for r in rows]

    def release_unverified(self, sender: str,
                           trusted_peer_ids: frozenset[bytes]) -> builtins.list[bytes]:
        """Move `sender`'s `unverified` messages signed by a now trusted device (its peer id
        in `trusted_peer_ids`) to `offered`; returns their ids, oldest first."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, sender_peer_id FROM inbox WHERE sender = ? AND state = ?"
                " ORDER BY received_at, id", (sender, InboxState.UNVERIFIED.value)).fetchall()
            ids = [bytes(r["id"]) for r in rows if bytes(r["sender_peer_id"]) in trusted_peer_ids]
            conn.executemany("UPDATE inbox SET state = ? WHERE id = ?",
                             [(InboxState.OFFERED.value, i) for i in ids])
        return ids

    def unverified_senders(self) -> builtins.list[str]:
        """Senders with a message held `unverified`."""
        rows = self._db.query("SELECT DISTINCT sender FROM inbox WHERE state = ?"
                              " ORDER BY sender", (InboxState.UNVERIFIED.value,))
        return [str(r["sender"]) for r in rows]

    def remove(self, id: bytes, *, decline: Decline | None = None) -> bool:
        """Forget the entry (the caller deletes any file); False if it wasn't there. With
        `decline` (the user removed it), a declined receipt is queued in the same
        transaction if the entry is not complete (see `_queue_decline`)."""
        with self._db.transaction() as conn:
            if decline is not None:
                row = conn.execute("SELECT * FROM inbox WHERE id = ?", (id,)).fetchone()
                if row is not None:
                    _queue_decline(conn, _entry(row), decline)
            return conn.execute("DELETE FROM inbox WHERE id = ?", (id,)).rowcount > 0

    def declines_owed(self, limit: int = 100, after: tuple[float, bytes] | None = None,
                      ) -> builtins.list[tuple[bytes, bytes, str, float]]:
        """(id, location message, reason, declined at) of declined receipts not yet sent,
        oldest first; they outlive the inbox entry. `after`: (declined at, id) of the
        last one of the previous page."""
        at, mid = after if after is not None else (float("-inf"), b"")
        rows = self._db.query(
            "SELECT message_id, message, reason, declined_at FROM declined_receipt"
            " WHERE sent_at IS NULL AND (declined_at, message_id) > (?, ?)"
            " ORDER BY declined_at, message_id LIMIT ?", (at, mid, limit))
        return [(bytes(r["message_id"]), bytes(r["message"]), str(r["reason"]),
                 float(r["declined_at"])) for r in rows]

    def mark_decline_sent(self, id: bytes, when: float, *,
                          sent: tuple[Decline, bytes] | None = None) -> None:
        """The declined receipt for this message is in the server's hands (durably).
        `sent`: the decline that went and its location message, recorded again if the
        user took it back (`take_back_decline`) while it was on its way: the sender has it
        all the same, and a retry must know (`NoSourceNow`)."""
        with self._db.transaction() as conn:
            if sent is None:
                conn.execute("UPDATE declined_receipt SET sent_at = ? WHERE message_id = ?",
                             (when, id))
                return
            decline, message = sent
            conn.execute(
                "INSERT INTO declined_receipt (message_id, reason, declined_at, message,"
                " sent_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE"
                " SET sent_at = excluded.sent_at",
                (id, reason_text(decline.reason), decline.at, message, when))

    def take_back_decline(self, id: bytes) -> bool:
        """The user asked for this message again (`fetch`, Try again) before its declined
        receipt went: it does not go (a failure for good queues one again). True if one
        was queued; a decline already sent can't be taken back (a `downloaded` receipt
        wins over it at the sender)."""
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM declined_receipt WHERE message_id = ?"
                                " AND sent_at IS NULL", (id,)).rowcount > 0

    def declined(self, id: bytes) -> tuple[str, float | None] | None:
        """(reason, when sent or None) of this message's declined receipt, or None."""
        row = self._db.query_one("SELECT reason, sent_at FROM declined_receipt"
                                 " WHERE message_id = ?", (id,))
        return None if row is None else (str(row["reason"]), row["sent_at"])

    def fetch_order(
        self, now: float, *, include_offered: bool = False, offered_max_size: int | None = None,
        limit: int = 100,
    ) -> builtins.list[InboxEntry]:
        """What the downloader should work on at `now`, most urgent first.

        Non-junk entries in `downloading`, or in `retrying` whose next_attempt has come;
        with `include_offered` (pass the auto_download preference) also untouched `offered`
        ones of at most `offered_max_size` bytes (None: any size), which the caller moves to
        `downloading` before it starts. Priority senders
        come first, then oldest first, so nobody's message starves behind newer ones.
        """
        rows = self._db.query(
            "SELECT * FROM inbox WHERE junk = 0 AND ("
            " state = 'downloading'"
            " OR (state = 'retrying' AND next_attempt <= ?)"
            " OR (? AND state = 'offered' AND (? IS NULL OR size <= ?)))"
            " ORDER BY priority DESC, received_at, id LIMIT ?",
            (now, int(include_offered), offered_max_size, offered_max_size, limit),
        )
        return [_entry(r) for r in rows]

    def next_wakeup(self) -> float | None:
        """The earliest next_attempt of a waiting (retrying, non-junk) entry, or None."""
        row = self._db.query_one(
            "SELECT min(next_attempt) FROM inbox WHERE junk = 0 AND state = 'retrying'"
        )
        return float(row[0]) if row is not None and row[0] is not None else None

    def _locked_get(self, conn: sqlite3.Connection, id: bytes) -> InboxEntry:
        row = conn.execute("SELECT * FROM inbox WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(f"no inbox message {id.hex()}")
        return _entry(row)


def _queue_decline(conn: sqlite3.Connection, entry: InboxEntry, decline: Decline) -> None:
    """Queue a declined receipt for `entry`, once per message, unless it is complete (its
    "downloaded" receipt is the last word), from a junk sender (a junked sender learns
    nothing, as mail doesn't bounce spam) or unverified (signed by a key not trusted for
    its sender: the sender may be forged). Beyond MAX_DECLINED rows, the oldest sent
    ones go (and, were all unsent, the oldest: its sender is then never told)."""
    if entry.state in (InboxState.COMPLETE, InboxState.UNVERIFIED) or entry.junk:
        return
    conn.execute(
        "INSERT OR IGNORE INTO declined_receipt (message_id, reason, declined_at, message)"
        " VALUES (?, ?, ?, ?)", (entry.id, reason_text(decline.reason), decline.at,
                                 entry.message))
    over = count_rows(conn, "declined_receipt") - MAX_DECLINED
    if over > 0:
        conn.execute(
            "DELETE FROM declined_receipt WHERE message_id IN (SELECT message_id FROM"
            " declined_receipt ORDER BY sent_at IS NULL, sent_at, declined_at LIMIT ?)",
            (over,))


def _apply(
    old: InboxEntry,
    state: InboxState,
    *,
    error: str | None,
    next_attempt: float | None,
    path: str | None,
) -> InboxEntry:
    """The entry after a checked move to `state` (pure: the rules of each target state)."""
    what = f"inbox message {old.id.hex()} -> {state.value}"
    if error is not None:
        error = error[:MAX_ERROR_TEXT]
    if state is InboxState.OFFERED:
        return dataclasses.replace(old, state=state)
    if state is InboxState.DOWNLOADING:
        return dataclasses.replace(
            old, state=state, attempts=old.attempts + 1, next_attempt=None, error=None
        )
    if state is InboxState.RETRYING:
        if next_attempt is None:
            raise ValueError(f"{what}: say when to try again (next_attempt)")
        return dataclasses.replace(old, state=state, next_attempt=next_attempt, error=error)
    if state is InboxState.FAILED:
        if not error:
            raise ValueError(f"{what}: give the reason (error) the user will see")
        return dataclasses.replace(old, state=state, next_attempt=None, error=error)
    if state is InboxState.COMPLETE:
        if not path:
            raise ValueError(f"{what}: give the finished file's path")
        return dataclasses.replace(
            old, state=state, path=path, chunks_held=old.chunk_count, next_attempt=None,
            error=None,
        )
    raise IllegalTransition(f"{what}: no entering {state.value} again")


def _entry(row: sqlite3.Row) -> InboxEntry:
    return InboxEntry(
        id=bytes(row["id"]),
        sender=row["sender"],
        sender_peer_id=bytes(row["sender_peer_id"]),
        title=row["title"],
        note=row["note"],
        size=int(row["size"]),
        file_name=row["file_name"],
        media_type=row["media_type"],
        content_id=bytes(row["content_id"]),
        state=InboxState(row["state"]),
        junk=bool(row["junk"]),
        priority=bool(row["priority"]),
        received_at=float(row["received_at"]),
        next_attempt=None if row["next_attempt"] is None else float(row["next_attempt"]),
        attempts=int(row["attempts"]),
        error=row["error"],
        path=row["path"],
        chunks_held=int(row["chunks_held"]),
        chunk_count=int(row["chunk_count"]),
        message=bytes(row["message"]),
        started_at=row["started_at"],
        first_byte_at=row["first_byte_at"],
        completed_at=row["completed_at"],
    )
