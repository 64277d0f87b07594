"""The outbox: what this node sent, and how far each recipient got (`peerpost status`).

Each recipient moves through its own small machine:

    queued ──> sent ──> downloading ──> downloaded
       │         │           │              ▲
       ├─────────┼───────────┼──> declined ─┘ (the recipient will never download it)
       └─────────┴───────────┴──> failed ──> queued (the user sends again)

`sent` is the server's acknowledgement of SEND; `downloading`, `downloaded` and `declined`
come from the recipient's receipts (a declined one carries the recipient's reason). Those
arrive over the network, late, twice or out of order, so a move that goes backwards or
skips is not an error: a later state is taken (queued -> downloaded when the ack was
lost), and an earlier or repeated one is ignored and reported as False. Only
`failed -> queued` (resending) goes "back", and `downloaded` is final. `declined` is final
too but for a later `downloaded`, which wins: the recipient fetched it after all (it tried
again after a failure). A recipient failed with NOT_SENT (the server never
acknowledged the SEND) still takes `downloading`, `downloaded` and `declined`: a SEND the
server committed while its acknowledgement was lost is delivered. A recipient the sender
withdrew from (`cancel`) takes no receipt.

Each device a message was sealed to is recorded too (`outbox_device`), and settled by a
`downloaded` or `declined` receipt its key signed; retention also waits for those (see
`pending_retention`), while `status` shows each address as its devices' furthest state.

Once every recipient has the file or declined it (`settled`), the node applies the
sender's retention preference (keep, delete or archive its plaintext copy) if at least one
recipient downloaded it, and only releases what it holds for serving if none did (the
user's file is then the only copy); `mark_retention_done` records it.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from crypto.address import normalize_address
from crypto.location import MAX_RECIPIENTS
from overlay.mail.db import (
    LIST_LIMIT,
    NodeDB,
    check_message_row,
    is_new_message,
    with_id_prefix,
)

MAX_REASON_TEXT = 500
DEFAULT_MAX_ENTRIES = 10_000
ALL_SENT = 1_000_000  # a `list` limit above any max_entries: every entry
_IDS_PER_QUERY = 500  # stays far below SQLite's limit on bound parameters
RETENTION_ACTIONS = frozenset({"keep", "delete", "archive"})


class RecipientStatus(Enum):
    QUEUED = "queued"
    SENT = "sent"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    DECLINED = "declined"
    FAILED = "failed"


# The states that end a recipient's want of the file: it has it, or will never fetch it.
SETTLED = frozenset({RecipientStatus.DOWNLOADED, RecipientStatus.DECLINED})


# How far along the happy path each state is; receipts only ever move a recipient forward.
_RANK = {
    RecipientStatus.QUEUED: 0,
    RecipientStatus.SENT: 1,
    RecipientStatus.DOWNLOADING: 2,
    RecipientStatus.DOWNLOADED: 3,
}


_WITH_REASON = frozenset({RecipientStatus.FAILED, RecipientStatus.DECLINED})


# The reason of a recipient whose SEND the server never acknowledged (it went away, or
# refused it): the sender's node deposited nothing it knows of, so nothing will reach them.
NOT_SENT = "not sent"
# The reason of a recipient of a message the sender withdrew (`peerpost cancel`).
WITHDRAWN_REASON = "cancelled by the sender"


def _accepts(old: RecipientStatus, new: RecipientStatus, reason: str | None = None) -> bool:
    """Whether a report of `new` changes a recipient now in `old` (see module docstring)."""
    if old is RecipientStatus.FAILED:
        if reason is not None and reason.startswith(NOT_SENT):
            return new in (RecipientStatus.QUEUED, RecipientStatus.DOWNLOADING,
                           RecipientStatus.DOWNLOADED, RecipientStatus.DECLINED)
        return new is RecipientStatus.QUEUED
    if old is RecipientStatus.DECLINED:
        return new is RecipientStatus.DOWNLOADED
    if new in (RecipientStatus.FAILED, RecipientStatus.DECLINED):
        return old is not RecipientStatus.DOWNLOADED
    return _RANK[new] > _RANK[old]


# One of the names of a file for `file_keys`: ("path", the path as recorded),
# ("file", device, inode), ("entry", its folder's device and inode, its name).
FileKey = tuple[str | int, ...]
# The file the node serves each of some contents from (a message's copy, what retention
# deletes or moves): its path as the store resolved it at the send; none if it holds none.
Served = Callable[[builtins.list[bytes]], dict[bytes, str]]


def file_keys(path: str, *, files: Container[tuple[int, int]] | None = None
              ) -> frozenset[FileKey]:
    """What deleting (or moving) the file at `path` takes away, as keys: two paths that
    share one name the same file, and deleting it by one takes it from the other.
    Blocking: a stat, and for a file with several names a realpath and one more.

    Always the path as recorded: the same path is the same file, even one replaced there
    since by a new file. For a file that exists, the file itself (device, inode) if it
    has one name, however the path reaches it (a symlink, `..`, a symlinked folder, a bind
    mount); if it has several (hard links), the directory entry the path resolves to (its
    folder's device and inode, and its name): deleting one hard link leaves the file to
    the others. The CLI records the path as given (absolute, not resolved), and an outbox
    written before this records nothing more, so the file is looked at now.
    `files`: only for these (device, inode) more than the path (the caller's own files:
    another file cannot share a key with them)."""
    keys: set[FileKey] = {("path", path)}
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # gone (nothing to delete), or not a path at all
        return frozenset(keys)
    file = (st.st_dev, st.st_ino)
    if files is not None and file not in files:
        return frozenset(keys)
    if st.st_nlink <= 1:
        keys.add(("file", *file))
        return frozenset(keys)
    folder, name = os.path.split(os.path.realpath(path))
    try:
        fst = os.stat(folder)
    except OSError:
        keys.add(("path", os.path.join(folder, name)))
    else:
        keys.add(("entry", fst.st_dev, fst.st_ino, name))
    return frozenset(keys)


@dataclass(frozen=True, slots=True)
class RecipientState:
    address: str
    state: RecipientStatus
    updated_at: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One sent message: the sender's plaintext copy and every recipient's progress."""

    id: bytes
    path: str
    title: str
    size: int
    content_id: bytes
    created_at: float
    recipients: tuple[RecipientState, ...]
    retention_done: bool
    retention_action: str | None
    message: bytes

    @property
    def all_downloaded(self) -> bool:
        return all(r.state is RecipientStatus.DOWNLOADED for r in self.recipients)

    @property
    def settled(self) -> bool:
        """Every recipient has it or declined it: nobody will fetch it any more."""
        return all(r.state in SETTLED for r in self.recipients)

    @property
    def anyone_downloaded(self) -> bool:
        return any(r.state is RecipientStatus.DOWNLOADED for r in self.recipients)


@dataclass(frozen=True, slots=True)
class Undone:
    """Of the messages whose retention is still to apply, how many need each content and
    each file (`file_keys`), as a retention pass read them (`Outbox.not_done`); the
    pass counts off each message it settles."""

    contents: Counter[bytes]
    files: Counter[FileKey]
    keys: dict[bytes, frozenset[FileKey]]  # each message's file, by message id

    def _keys(self, entry: OutboxEntry) -> frozenset[FileKey]:
        return self.keys.get(entry.id, frozenset({("path", entry.path)}))

    def needed_by_another(self, entry: OutboxEntry) -> bool:
        """Whether a message besides `entry` needs its copy (its content or its file)."""
        return self.contents[entry.content_id] > 1 or any(
            self.files[k] > 1 for k in self._keys(entry))

    def settled(self, entry: OutboxEntry) -> None:
        """`entry`'s retention is applied: it needs its copy no more."""
        self.contents[entry.content_id] -= 1
        for k in self._keys(entry):
            self.files[k] -= 1


def copy_paths(path: str, there: str | None) -> tuple[str, ...]:
    """The names of a message's copy: its path as recorded and, if the node serves its
    content from another, `there` (`Served`: the path resolved at the send, when a
    symlink it was sent by was removed or pointed elsewhere since): the file that serving
    reads and deleting removes."""
    return (path,) if there is None or there == path else (path, there)


def copy_keys(paths: tuple[str, ...], *, files: Container[tuple[int, int]] | None = None
              ) -> frozenset[FileKey]:
    """`file_keys` of each of `paths` (`copy_paths`), together."""
    if len(paths) == 1:  # most: sent by the path the store resolved
        return file_keys(paths[0], files=files)
    return frozenset(k for p in paths for k in file_keys(p, files=files))


def _size_and_file(path: str) -> tuple[int, set[tuple[int, int]]]:
    """The size of the file at `path` now and its (device, inode); -1 (no file has that
    size) and none if there is no file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return -1, set()
    return st.st_size, {(st.st_dev, st.st_ino)}


def forwarding_text(state: str, home_domain: str, recipient: str, since: float | None,
                    error: str | None) -> str:
    """How `peerpost status` shows a foreign recipient the sender's server still holds
    or has handed on (its TRACK state): `queued at a.test (b.test unreachable since
    2025-01-02 10:00 UTC)`, `delivered to b.test`, `bounced: reason`."""
    remote = recipient.rpartition("@")[2]
    if state == "delivered":
        return f"delivered to {remote}"
    if state == "bounced":
        return f"bounced: {error or 'no reason given'}"
    if since is None:
        return f"queued at {home_domain}"
    when = datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"queued at {home_domain} ({remote} unreachable since {when})"


def devices_to_fetch_text(n: int) -> str:
    """How `peerpost status` says that `n` more devices of a recipient who downloaded the
    message may still fetch it from here (`Outbox.devices_owed`)."""
    return f"{n} more device{'s' if n > 1 else ''} to fetch"


# The devices of message `o` that may still fetch it from here: sealed to, no settling
# receipt from them yet, and their key still pinned for the address (a retired key is a
# device revoked or removed at its server).
def _devices_owed(message: str, columns: str = "d.address") -> str:
    """The SELECT of `columns` of those devices, of the messages whose id `message` picks:
    a condition on `d.message_id` (`= o.id`, `IN (?, ?)`)."""
    return (f"SELECT {columns} FROM outbox_device d JOIN contact_key k"
            " ON k.address = d.address AND k.verify_key = d.verify_key AND k.status = 'pinned'"
            f" WHERE d.message_id {message} AND d.settled = 0")


class Outbox:
    """Typed access to the `outbox` and `outbox_recipient` tables."""

    __slots__ = ("_db", "_files", "_max_entries", "_sending", "_sends_seen")

    def __init__(self, db: NodeDB, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._db = db
        self._max_entries = max_entries
        # The files a send is reading or recording now (their paths as the outbox records
        # them), how many times a send started or ended, and the guard retention holds
        # while it decides on a copy and deletes or moves it (`sending`, `file_unneeded`).
        self._files = threading.Lock()
        self._sending: Counter[str] = Counter()
        self._sends_seen = 0

    @contextlib.contextmanager
    def sending(self, path: str) -> Iterator[None]:
        """Held by a send of the file at `path` from before it reads the file until its
        message is recorded (or nothing was): retention does not delete or move that file,
        by that path or another (`file_keys`), meanwhile (`file_unneeded`). A pass that had
        read the outbox before the new message was recorded deleted the file the new
        message was to serve."""
        with self._files:
            self._sending[path] += 1
            self._sends_seen += 1
        try:
            yield
        finally:
            with self._files:
                self._sending[path] -= 1
                if not self._sending[path]:
                    del self._sending[path]
                self._sends_seen += 1

    @property
    def sends_seen(self) -> int:
        """Changes whenever a send starts or ends (`sending`): read before the outbox, and
        the same later, no message was recorded since that read (`copy_unneeded`)."""
        return self._sends_seen

    @contextlib.contextmanager
    def file_unneeded(self, path: str, *, seen: int | None, needed: Callable[[], bool],
                      also: Iterable[str] = ()) -> Iterator[bool]:
        """Whether the file at `path` (and `also`: other names of it, `copy_paths`) may
        go: no send of that file (`file_keys`: by that path or another) runs, and
        `needed()`, which reads the outbox again, is False if a send started or ended
        since `seen`. Held while the caller deletes or moves the file: a send of it
        starting meanwhile waits, then finds it gone (`sending`).

        `seen`: `sends_seen` from before the caller read the outbox and found no message
        that needs the file. If no send started or ended since, that read still holds and
        node.db is not read again (a scan of the outbox each, 3 ms with 10,000 sent, which
        made a pass settling 1,000 take 3 s instead of 0.14)."""
        with self._files:
            mine = copy_keys((path, *also))
            if any(mine & file_keys(other) for other in self._sending):
                yield False
                return
            yield seen == self._sends_seen or not needed()

    @contextlib.contextmanager
    def copy_unneeded(self, entry: OutboxEntry, *, seen: int | None = None,
                      served: Served | None = None) -> Iterator[bool]:
        """Whether no message but `entry` needs its copy: none of its content or of its
        file (the same file sent again is a new content; by the same path or another,
        `file_keys`, or the one its content is `served` from) has its retention still to
        apply, and no send of that file runs (`file_unneeded`, with `seen`). Held while
        the caller deletes or moves the copy."""
        there = {} if served is None else served([entry.content_id])
        paths = copy_paths(entry.path, there.get(entry.content_id))
        with self.file_unneeded(
                entry.path, seen=seen, also=paths[1:],
                needed=lambda: self._needed_by_another(entry, paths, served)) as unneeded:
            yield unneeded

    def _needed_by_another(self, entry: OutboxEntry, paths: tuple[str, ...],
                           served: Served | None) -> bool:
        """Whether a message besides `entry` (its copy's `paths`) whose retention is still
        to apply has its content or its file (`copy_keys`; only a file of its size can be
        it, and one of another size since it was sent cannot be served)."""
        sizes: set[int] = set()
        files: set[tuple[int, int]] = set()
        for p in paths:
            size, file = _size_and_file(p)
            sizes.add(size)
            files.update(file)
        mine = copy_keys(paths)
        by_size = sorted(sizes)
        rows = [(bytes(r["content_id"]), r["path"]) for r in self._db.query(
                "SELECT content_id, path FROM outbox WHERE retention_done = 0 AND id != ?"
                " AND (content_id = ? OR path IN (?, ?) OR size IN (?, ?))",
                (entry.id, entry.content_id, paths[0], paths[-1], by_size[0], by_size[-1]))]
        if any(cid == entry.content_id for cid, _ in rows):
            return True
        there = {} if served is None else served([cid for cid, _ in rows])
        return any(mine & copy_keys(copy_paths(path, there.get(cid)), files=files)
                   for cid, path in rows)

    def add(
        self,
        *,
        id: bytes,
        path: str,
        title: str,
        size: int,
        content_id: bytes,
        created_at: float,
        recipients: Iterable[str],
        message: bytes = b"",
        devices: Iterable[tuple[str, bytes]] = (),
    ) -> bool:
        """Record a message being sent, every recipient `queued`; False if the id is known.

        `message` is the signed location message body, kept opaque so the node can serve
        and resend after a restart. `devices`: (address, verify key) of each device it is
        sealed to, each of which retention waits for (`settle_device`).
        """
        check_message_row(id, message)
        if size < 0:
            raise ValueError("size can't be negative")
        addresses = sorted({normalize_address(a) for a in recipients})
        if not 1 <= len(addresses) <= MAX_RECIPIENTS:
            raise ValueError(f"need 1..{MAX_RECIPIENTS} recipients, got {len(addresses)}")
        with self._db.transaction() as conn:
            if not is_new_message(conn, "outbox", id, self._max_entries):
                return False
            conn.execute(
                "INSERT INTO outbox (id, path, title, size, content_id, created_at, message)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (id, path, title, size, content_id, created_at, message),
            )
            conn.executemany(
                "INSERT INTO outbox_recipient (message_id, address, state, updated_at)"
                " VALUES (?, ?, ?, ?)",
                [(id, a, RecipientStatus.QUEUED.value, created_at) for a in addresses],
            )
            if rows := [(id, normalize_address(a), key) for a, key in devices]:
                conn.executemany(
                    "INSERT OR IGNORE INTO outbox_device (message_id, address, verify_key)"
                    " VALUES (?, ?, ?)", rows)
        return True

    def settle_device(self, id: bytes, address: str, verify_key: bytes) -> bool:
        """The device of `address` with `verify_key` has the message or declined it (its
        receipt said so); True if that was news. A device it was not sealed to (a message
        sent before devices were recorded, or a key added since) changes nothing."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "UPDATE outbox_device SET settled = 1 WHERE message_id = ? AND address = ?"
                " AND verify_key = ? AND settled = 0",
                (id, normalize_address(address), verify_key))
        return cur.rowcount > 0

    def get(self, id: bytes) -> OutboxEntry | None:
        """The entry with this message id, or None."""
        row = self._db.query_one("SELECT * FROM outbox WHERE id = ?", (id,))
        if row is None:
            return None
        return self._entries([row])[0]

    def newest_of(self, content_id: bytes) -> OutboxEntry | None:
        """The newest message sent of this content, however many were sent since; None
        if none was."""
        row = self._db.query_one("SELECT * FROM outbox WHERE content_id = ? "
                                 "ORDER BY created_at DESC, id LIMIT 1", (content_id,))
        return None if row is None else self._entries([row])[0]

    def list(self, *, limit: int = LIST_LIMIT) -> builtins.list[OutboxEntry]:
        """The newest `limit` entries, newest first. To find a message use
        `with_id_prefix`, which looks among them all."""
        rows = self._db.query(
            "SELECT * FROM outbox ORDER BY created_at DESC, id LIMIT ?", (limit,)
        )
        return self._entries(rows)

    def with_id_prefix(self, prefix: str, *, limit: int = 2
                       ) -> tuple[builtins.list[OutboxEntry], int]:
        """Of every entry whose id's hex starts with `prefix`, the newest `limit`, newest
        first, and how many there are."""
        rows, found = with_id_prefix(self._db, "outbox", prefix,
                                     order="created_at DESC, id", limit=limit)
        return self._entries(rows), found

    def awaited(self, *, after: tuple[float, bytes] | None = None, limit: int = 100
                ) -> builtins.list[OutboxEntry]:
        """Messages a recipient may still fetch from this node (one of them `sent` or
        `downloading`, or a device `devices_owed` counts), in `list`'s order (newest
        first), `limit` at a time; older than the whole outbox's newest 1,000 too.
        `after`: (created at, id) of the last one of the previous page, or of `list`'s
        last to read only older ones."""
        at, mid = after if after is not None else (float("inf"), b"")
        rows = self._db.query(
            "SELECT * FROM outbox o WHERE (created_at < ? OR (created_at = ? AND id > ?))"
            " AND (EXISTS (SELECT 1 FROM outbox_recipient r WHERE r.message_id = o.id"
            f" AND r.state IN (?, ?)) OR EXISTS ({_devices_owed('= o.id')}))"
            " ORDER BY created_at DESC, id LIMIT ?",
            (at, at, mid, RecipientStatus.SENT.value, RecipientStatus.DOWNLOADING.value,
             limit))
        return self._entries(rows)

    def devices_owed(self, ids: Iterable[bytes]) -> dict[bytes, dict[str, int]]:
        """Of the messages `ids`, each one's addresses with a device that may still fetch
        it from here (`pending_retention` waits for it), and how many such devices each
        has: another device of the address may have it. A message with none is left out.
        One query per 500 ids, not one per message."""
        want = builtins.list(dict.fromkeys(ids))
        out: dict[bytes, dict[str, int]] = {}
        for start in range(0, len(want), _IDS_PER_QUERY):
            batch = want[start : start + _IDS_PER_QUERY]
            for r in self._db.query(
                    _devices_owed(f"IN ({','.join('?' * len(batch))})",
                                  "d.message_id, d.address, count(*)")
                    + " GROUP BY d.message_id, d.address", batch):
                out.setdefault(bytes(r[0]), {})[str(r[1])] = int(r[2])
        return out

    def count(self) -> int:
        """Messages in the outbox."""
        row = self._db.query_one("SELECT count(*) FROM outbox")
        return int(row[0]) if row is not None else 0

    def withdrawn_contents(self) -> set[bytes]:
        """The contents of every message the sender cancelled (`cancel`: a recipient
        failed with WITHDRAWN_REASON), which the node must not serve again."""
        rows = self._db.query(
            "SELECT DISTINCT o.content_id FROM outbox o JOIN outbox_recipient r"
            " ON r.message_id = o.id WHERE r.state = ? AND r.reason = ?",
            (RecipientStatus.FAILED.value, WITHDRAWN_REASON))
        return {bytes(r["content_id"]) for r in rows}

    def set_recipient_state(
        self,
        id: bytes,
        address: str,
        state: RecipientStatus,
        now: float,
        *,
        reason: str | None = None,
    ) -> bool:
        """Apply a report about one recipient; True if it changed anything.

        Raises KeyError for an unknown message or recipient, ValueError for `failed` or
        `declined` without a reason. Stale and repeated reports return False (module
        docstring).
        """
        addr = normalize_address(address)
        if state in _WITH_REASON and not reason:
            raise ValueError(f"a {state.value} recipient needs a reason the sender will see")
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT state, reason FROM outbox_recipient WHERE message_id = ? AND address = ?",
                (id, addr),
            ).fetchone()
            if row is None:
                raise KeyError(f"outbox message {id.hex()} has no recipient {addr}")
            if not _accepts(RecipientStatus(row["state"]), state, row["reason"]):
                return False
            conn.execute(
                "UPDATE outbox_recipient SET state = ?, reason = ?, updated_at = ?"
                " WHERE message_id = ? AND address = ?",
                (
                    state.value,
                    reason[:MAX_REASON_TEXT] if state in _WITH_REASON and reason else None,
                    now, id, addr,
                ),
            )
        return True

    def fail_unacknowledged(self, reason: str, now: float) -> int:
        """Every recipient still `queued` (its SEND never acknowledged) -> failed with
        `reason`; for a node's start, when no send is running. Returns how many."""
        with self._db.transaction() as conn:
            cur = conn.execute(
                "UPDATE outbox_recipient SET state = ?, reason = ?, updated_at = ?"
                " WHERE state = ?",
                (RecipientStatus.FAILED.value, reason[:MAX_REASON_TEXT], now,
                 RecipientStatus.QUEUED.value),
            )
        return int(cur.rowcount)

    def all_downloaded(self, id: bytes) -> bool:
        """True when every recipient reported the file downloaded."""
        row = self._db.query_one(
            "SELECT count(*) AS n, sum(state = 'downloaded') AS done"
            " FROM outbox_recipient WHERE message_id = ?",
            (id,),
        )
        if row is None or row["n"] == 0:
            raise KeyError(f"no outbox message {id.hex()}")
        return bool(row["n"] == row["done"])

    def pending_retention(self) -> builtins.list[OutboxEntry]:
        """Entries every recipient has downloaded or declined (`settled`) whose retention
        is not applied yet, oldest first.

        The node calls this at start-up too, so a crash between the last receipt and the
        delete/archive step is finished later.

        Nor while a device the message was sealed to has sent no settling receipt and its
        key is still pinned for its address: one device of an address having it leaves
        the others to fetch it from this copy. A key no longer pinned (retired: the
        recipient's server stopped listing it, revoked or removed) is not waited for.
        """
        rows = self._db.query(
            "SELECT * FROM outbox o WHERE retention_done = 0 AND NOT EXISTS ("
            " SELECT 1 FROM outbox_recipient r WHERE r.message_id = o.id"
            " AND r.state NOT IN ('downloaded', 'declined')) AND NOT EXISTS ("
            f"{_devices_owed('= o.id')}) ORDER BY created_at"
        )
        return self._entries(rows)

    def not_done(self, entries: Iterable[OutboxEntry], served: Served | None = None
                 ) -> Undone:
        """How many messages of each content and of each file (`copy_keys`: by its path
        as recorded, or the one its content is `served` from) of `entries` have their
        retention still to apply: a copy stays while more than the one being settled
        need it (the same file sent again is a new content, perhaps by another path).
        Blocking: a stat of each file read. Only the messages that may share one are
        read: the same content or path, or a file of the size one of `entries` has now
        (a message whose file changed size since it was sent cannot serve it)."""
        entries = builtins.list(entries)
        there = {} if served is None else served([e.content_id for e in entries])
        files: set[tuple[int, int]] = set()
        sizes: set[int] = set()
        for e in entries:
            for p in copy_paths(e.path, there.get(e.content_id)):
                size, file = _size_and_file(p)
                if file:
                    sizes.add(size)
                    files.update(file)
        rows: dict[bytes, tuple[bytes, str]] = {}  # by id: a row two queries match once
        where = "SELECT id, content_id, path FROM outbox WHERE retention_done = 0 AND "
        step = _IDS_PER_QUERY // 2  # two parameters each
        for start in range(0, len(entries), step):
            batch = entries[start : start + step]
            marks = ",".join("?" * len(batch))
            for r in self._db.query(
                    where + f"(content_id IN ({marks}) OR path IN ({marks}))",
                    [e.content_id for e in batch] + [e.path for e in batch]):
                rows[bytes(r["id"])] = (bytes(r["content_id"]), r["path"])
        by_size = sorted(sizes)
        for start in range(0, len(by_size), _IDS_PER_QUERY):
            some = by_size[start : start + _IDS_PER_QUERY]
            for r in self._db.query(where + f"size IN ({','.join('?' * len(some))})", some):
                rows[bytes(r["id"])] = (bytes(r["content_id"]), r["path"])
        if served is not None:
            there.update(served([cid for cid, _ in rows.values() if cid not in there]))
        keys = {mid: copy_keys(copy_paths(path, there.get(cid)), files=files)
                for mid, (cid, path) in rows.items()}
        return Undone(Counter(cid for cid, _ in rows.values()),
                      Counter(k for ks in keys.values() for k in ks), keys)

    def ending_with(self, suffixes: tuple[str, ...]) -> builtins.list[OutboxEntry]:
        """Entries whose path ends with one of `suffixes` (a folder map's or archive's,
        which the caller checks for itself: a user's file may end so too)."""
        if not suffixes:
            return []
        rows = self._db.query(
            "SELECT * FROM outbox WHERE " + " OR ".join("path LIKE ?" for _ in suffixes),
            [f"%{x}" for x in suffixes])
        return self._entries(rows)

    def set_path(self, id: bytes, path: str) -> None:
        """Where the sent file is now (retention moved it into the archive folder)."""
        with self._db.transaction() as conn:
            if not conn.execute("UPDATE outbox SET path = ? WHERE id = ?", (path, id)).rowcount:
                raise KeyError(f"no outbox message {id.hex()}")

    def mark_retention_done(self, id: bytes, action: str) -> None:
        """Record that the plaintext copy was kept, deleted or archived."""
        if action not in RETENTION_ACTIONS:
            raise ValueError(f"retention action is one of {sorted(RETENTION_ACTIONS)}")
        with self._db.transaction() as conn:
            changed = conn.execute(
                "UPDATE outbox SET retention_done = 1, retention_action = ? WHERE id = ?",
                (action, id),
            ).rowcount
            if not changed:
                raise KeyError(f"no outbox message {id.hex()}")

    def remove(self, id: bytes) -> bool:
        """Forget the entry and its recipients; False if it wasn't there."""
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM outbox WHERE id = ?", (id,)).rowcount > 0

    def _entries(self, rows: builtins.list[sqlite3.Row]) -> builtins.list[OutboxEntry]:
        if not rows:
            return []
        ids = [bytes(r["id"]) for r in rows]
        by_id: dict[bytes, builtins.list[RecipientState]] = {i: [] for i in ids}
        recipient_rows: builtins.list[sqlite3.Row] = []
        for start in range(0, len(ids), _IDS_PER_QUERY):
            batch = ids[start : start + _IDS_PER_QUERY]
            recipient_rows += self._db.query(
                "SELECT * FROM outbox_recipient WHERE message_id IN"
                f" ({','.join('?' * len(batch))}) ORDER BY address",
                batch,
            )
        for r in recipient_rows:
            by_id[bytes(r["message_id"])].append(
                RecipientState(
                    address=r["address"],
                    state=RecipientStatus(r["state"]),
                    updated_at=float(r["updated_at"]),
                    reason=r["reason"],
                )
            )
        return [
            OutboxEntry(
                id=bytes(r["id"]),
                path=r["path"],
                title=r["title"],
                size=int(r["size"]),
                content_id=bytes(r["content_id"]),
                created_at=float(r["created_at"]),
                recipients=tuple(by_id[bytes(r["id"])]),
                retention_done=bool(r["retention_done"]),
                retention_action=r["retention_action"],
                message=bytes(r["message"]),
            )
            for r in rows
        ]
