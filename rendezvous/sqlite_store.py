"""`SqliteStore`: the default `Store`, one SQLite file in the server's data folder.

One writer thread owns the connection. Requests queue up while a transaction commits and
are then run together in the next one (group commit), then a single COMMIT, then every
caller's future is resolved in submission order. A request that raises must not spoil the
others: the batch is first run straight through (a SAVEPOINT per request would double the
statements of the common case), and if any request raises, the transaction is rolled back
and the whole batch run again with each request in its own SAVEPOINT. `journal_mode=WAL`
with `synchronous=FULL` makes a commit durable against process death and power loss;
results (and so SEND acks) are only handed back after the commit returned.

Per-account usage (queued count and bytes) is kept in memory by the writer thread for
quota checks, loaded at open and reloaded whenever a transaction is rolled back. So is a
bounded cache of device → address bindings (a binding is never changed or removed once
committed; the cache is dropped on every rollback, which may have undone one).

Schema versions: `meta.schema` names the version of a file. `connect` upgrades an older
file step by step (`_MIGRATIONS`, each in one transaction) and refuses a newer one.
Version 2 added the exchanged-mail pairs (backfilled from the envelopes still queued), the
PIPE hold and the relay's daily volumes; per-sender queue usage is counted from the
envelopes' `sender` column, which version 1 already had. Version 3 added the devices'
`vouch` (what a device joining an account presented; devices added before have none).
Version 4 added federation: the outbound queue (`outbound`: envelopes for other domains,
with their forwarding state, kept after delivery or bounce for TRACK) and `forwarded_in`
(every (device, message id) stored from a link, so a repeated forward is delivered once).

`create_invite` and `read_stats` open their own short connection, so the CLI can use them
next to a running server (WAL lets readers and a second writer in safely).

`SqliteStore(path, inline=True)` runs the same batches on the event loop's own thread, in a
callback at the end of the loop iteration that submitted them, and resolves the futures
there. The simulator uses it (with `path=":memory:"`): a writer thread runs in wall-clock
time, so under a virtual-time loop that never waits it would look idle (or deadlocked)
while a commit is in progress. Same SQL, same group commit, same results.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from crypto.codec import packb
from crypto.identity import peer_id_of
from rendezvous import pipe_hold
from rendezvous.errors import STORAGE_FULL
from rendezvous.messages import PipeMessage, Send
from rendezvous.records import Envelope, EnvelopeInfo
from rendezvous.status import Status
from rendezvous.store import (
    ENVELOPE_COLUMNS,
    AuthOutcome,
    DeviceRecord,
    EnqueueOutcome,
    FingerView,
    OutboundRow,
    OutboundState,
    PipeQuota,
    QueuedEnvelope,
    QueuedInfo,
    Quota,
    RecentMessages,
    RegistrationFacts,
    RegistrationPolicy,
    RegistrationVerdict,
    StoreStats,
    judge_registration,
    load_advertise,
    over_quota,
    per_recipient,
    queued_envelope,
    settle,
)

T = TypeVar("T")
DB_NAME = "rendezvous.sqlite3"
SCHEMA_VERSION = 4
FORWARD_MEMORY = 30 * 86400.0  # how long finished outbound rows and forwarded ids are kept
_MAX_BATCH = 1024
_DEVICE_CACHE = 65_536
_PAIR_CACHE = 65_536   # exchanged pairs known to be recorded (skips their INSERT)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (address TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    peer_id BLOB PRIMARY KEY,
    verify_key BLOB NOT NULL UNIQUE,
    address TEXT NOT NULL REFERENCES accounts(address),
    added REAL NOT NULL,
    last_seen REAL,
    advertise BLOB,
    vouch BLOB
);
CREATE INDEX IF NOT EXISTS devices_by_address ON devices(address);
CREATE TABLE IF NOT EXISTS envelopes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device BLOB NOT NULL,
    mid BLOB NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    prio INTEGER NOT NULL,
    blob BLOB NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    UNIQUE (device, mid)
);
CREATE INDEX IF NOT EXISTS envelopes_by_expiry ON envelopes(expires_at);
CREATE TABLE IF NOT EXISTS invites (
    token TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    created REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_by BLOB
);
CREATE TABLE IF NOT EXISTS exchanged (
    a TEXT NOT NULL,
    b TEXT NOT NULL,         -- a < b: one row per unordered pair of addresses
    at REAL NOT NULL,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pipe_held (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device BLOB NOT NULL,
    sender TEXT NOT NULL,
    sender_device BLOB NOT NULL,
    payload BLOB NOT NULL,
    cost INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pipe_held_by_device ON pipe_held(device, sender);
CREATE TABLE IF NOT EXISTS outbound (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    domain TEXT NOT NULL,
    mid BLOB NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    device BLOB NOT NULL,
    prio INTEGER NOT NULL,
    blob BLOB,                -- NULL once delivered or bounced
    queued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,      -- 'queued', 'delivered' or 'bounced'
    since REAL,               -- queued: first failed attempt of the current outage
    error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (device, mid)
);
CREATE INDEX IF NOT EXISTS outbound_waiting ON outbound(state, domain, id);
CREATE INDEX IF NOT EXISTS outbound_by_sender ON outbound(sender, mid);
-- The per-sender quota counts a sender's waiting rows at every SEND; without this index
-- it scanned every row the sender ever queued (delivered ones are kept 30 days): 86% of a
-- forwarding server's CPU, 992 against 3,166 forwarded msg/s with it.
CREATE INDEX IF NOT EXISTS outbound_sender_waiting ON outbound(sender, state);
CREATE TABLE IF NOT EXISTS forwarded_in (
    device BLOB NOT NULL,
    mid BLOB NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (device, mid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS relay_usage (
    account TEXT PRIMARY KEY,
    day INTEGER NOT NULL,
    used INTEGER NOT NULL
);
"""
# Version n -> n + 1. New tables come from `_SCHEMA` (CREATE ... IF NOT EXISTS); a step
# fills or changes what an older file already holds.
_MIGRATIONS: dict[int, str] = {
    1: """INSERT OR IGNORE INTO exchanged (a, b, at)
          SELECT min(sender, recipient), max(sender, recipient), MAX(received_at)
          FROM envelopes WHERE sender <> recipient GROUP BY 1, 2""",
    2: "ALTER TABLE devices ADD COLUMN vouch BLOB",
    3: "SELECT 1",  # the outbound queue and forwarded_in are new tables only
}


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database with the durability settings we rely on."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None:
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        return conn
    try:
        _migrate(conn, int(row[0]))
    except (RuntimeError, ValueError) as exc:
        conn.close()
        raise RuntimeError(f"{path}: schema version {row[0]}, this server knows "
                           f"{SCHEMA_VERSION} ({exc})") from None
    return conn


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Upgrade a file of schema `version` to `SCHEMA_VERSION`, one step per transaction."""
    if version > SCHEMA_VERSION:
        raise RuntimeError("written by a newer server")
    while version < SCHEMA_VERSION:
        step = _MIGRATIONS.get(version)
        if step is None:
            raise RuntimeError(f"no upgrade from version {version}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(step)
            version += 1
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def create_invite(path: Path, address: str, token: str, now: float, expires_at: float) -> None:
    """Record a single-use invite token for `address` (used by `peerpost-rendezvous invite`)."""
    conn = connect(path)
    try:
        conn.execute("INSERT INTO invites VALUES (?, ?, ?, ?, NULL)",
                     (token, address, now, expires_at))
    finally:
        conn.close()


def read_stats(path: Path) -> StoreStats:
    """Counts straight from the database file (used by `peerpost-rendezvous stats`)."""
    conn = connect(path)
    try:
        return _stats(conn, path)
    finally:
        conn.close()


def _stats(conn: sqlite3.Connection, path: Path) -> StoreStats:
    accounts = conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0]
    devices = conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
    count, size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(length(blob)), 0) FROM envelopes").fetchone()
    outbound = 0
    with contextlib.suppress(sqlite3.OperationalError):  # a file from before federation
        outbound = conn.execute(
            "SELECT COUNT(*) FROM outbound WHERE state='queued'").fetchone()[0]
    return StoreStats(accounts, devices, count, size, file_size(path), int(outbound))


_Op = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class SqliteStore:
    """SQLite-backed `Store` with a single writer thread and group commit."""

    def __init__(self, path: Path | str, *, inline: bool = False) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / DB_NAME
        self.path = path
        self.inline = inline
        self._conn: sqlite3.Connection | None = None  # inline mode only
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._outbox: list[_Op] = []  # ops of this loop iteration, handed over together
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Writer thread only: queued usage per recipient address and per (sender,
        # recipient) as [count, bytes]; device -> address; exchanged pairs already
        # stored; recent message ids -> (sender, recipients); bytes held for PIPE.
        self._usage: dict[str, list[int]] = {}
        self._sender_usage: dict[tuple[str, str], list[int]] = {}
        self._domain_usage: dict[str, list[int]] = {}  # sender domain -> [count, bytes]
        self._bound: dict[bytes, str] = {}
        self._pairs: set[tuple[str, str]] = set()
        self._recent = RecentMessages()
        self._pipe_total = 0
        self.commits = 0
        self.ops = 0

    # --- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Create the file if needed and start the writer thread."""
        if self._thread is not None or self._conn is not None:
            return
        self._loop = asyncio.get_running_loop()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.inline:
            self._conn = connect(self.path)
            self._reload_caches(self._conn)
            return
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name="rendezvous-sqlite", daemon=True)
        self._thread.start()
        await ready

    async def aclose(self) -> None:
        """Finish the queued work, commit, close the file, stop the thread."""
        if self._conn is not None:
            self._hand_over()
            conn, self._conn = self._conn, None
            conn.close()
            return
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._hand_over()
        self._queue.put(None)
        await asyncio.to_thread(thread.join)

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if (self._thread is None and self._conn is None) or self._loop is None:
            raise RuntimeError("store is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        if not self._outbox:
            self._loop.call_soon(self._hand_over)
        self._outbox.append((fn, fut))
        return fut

    def _hand_over(self) -> None:
        # One queue put (one writer wake-up) per loop iteration, not per request.
        ops, self._outbox = self._outbox, []
        if not ops:
            return
        if self._conn is not None:
            _settle_all(self._run_batch(self._conn, ops))
        else:
            self._queue.put(ops)

    # --- the writer thread ------------------------------------------------------------
    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            conn = connect(self.path)
            self._reload_caches(conn)
        except Exception as exc:  # report any open failure to the awaiting caller
            loop.call_soon_threadsafe(settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(settle, ready, None, None)
        stop = False
        try:
            while not stop:
                item = self._queue.get()
                ops: list[_Op] = []
                while True:
                    if item is None:
                        stop = True
                    else:
                        ops.extend(item)
                    if len(ops) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if ops:
                    loop.call_soon_threadsafe(_settle_all, self._run_batch(conn, ops))
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection,
                   ops: list[_Op]) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """One transaction for the batch; each op's outcome, in order (see module doc).

        A batch SQLite refuses as a whole (BEGIN finding the file locked by another
        process past busy_timeout, an I/O error) fails each of its ops, and the next batch
        runs: the error ended the writer thread, and every request to the store after it
        waited for ever."""
        try:
            return self._transact(conn, ops)
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                self._rollback(conn)
            return [(fut, None, exc) for _, fut in ops]

    def _transact(self, conn: sqlite3.Connection,
                  ops: list[_Op]) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [(fut, fn(conn), None) for fn, fut in ops]
        except Exception:
            self._rollback(conn)
            conn.execute("BEGIN IMMEDIATE")
            results = self._run_each_in_savepoint(conn, ops)
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            results = [(fut, None, exc) for fut, _, _ in results]
        self.commits += 1
        self.ops += len(ops)
        return results

    def _run_each_in_savepoint(
            self, conn: sqlite3.Connection,
            ops: list[_Op]) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for fn, fut in ops:
            conn.execute("SAVEPOINT op")
            try:
                value = fn(conn)
            except Exception as exc:  # one bad op must not spoil the batch
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((fut, None, exc))
            else:
                conn.execute("RELEASE op")
                results.append((fut, value, None))
        return results

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        # Ops that ran before the rollback may have changed the in-memory copies.
        self._reload_caches(conn)

    def _reload_caches(self, conn: sqlite3.Connection) -> None:
        self._bound = {}
        self._pairs = set()
        self._recent = RecentMessages()
        self._usage = {}
        self._sender_usage = {}
        self._domain_usage = {}
        for s, r, c, b in conn.execute("SELECT sender, recipient, COUNT(*), SUM(length(blob)) "
                                       "FROM envelopes GROUP BY sender, recipient"):
            self._sender_usage[s, r] = [c, b]
            u = self._usage.setdefault(r, [0, 0])
            u[0] += c
            u[1] += b
            u = self._domain_usage.setdefault(s.rpartition("@")[2], [0, 0])
            u[0] += c
            u[1] += b
        self._pipe_total = conn.execute(
            "SELECT COALESCE(SUM(cost), 0) FROM pipe_held").fetchone()[0]

    def _bound_to(self, conn: sqlite3.Connection, device: bytes) -> str | None:
        """The address `device` is bound to (None if unknown), through the cache."""
        address = self._bound.get(device)
        if address is None:
            row = conn.execute("SELECT address FROM devices WHERE peer_id=?",
                               (device,)).fetchone()
            if row is None:
                return None
            address = row[0]
            if len(self._bound) >= _DEVICE_CACHE:
                self._bound.clear()
            self._bound[device] = address
        return address

    def _used(self, sender: str, address: str, count: int, size: int) -> None:
        u = self._usage.setdefault(address, [0, 0])
        u[0] += count
        u[1] += size
        if u[0] <= 0:
            del self._usage[address]
        key = (sender, address)
        u = self._sender_usage.setdefault(key, [0, 0])
        u[0] += count
        u[1] += size
        if u[0] <= 0:
            del self._sender_usage[key]
        domain = sender.rpartition("@")[2]
        u = self._domain_usage.setdefault(domain, [0, 0])
        u[0] += count
        u[1] += size
        if u[0] <= 0:
            del self._domain_usage[domain]

    def _over_quota(self, sender: str, adding: dict[str, list[int]],
                    quota: Quota) -> str | None:
        """The refusal text if adding [count, bytes] per recipient passes a quota."""
        return over_quota(sender, adding, quota, domains=self._domain_usage,
                          usage=self._usage, pairs=self._sender_usage)

    def _record_exchange(self, conn: sqlite3.Connection, sender: str, message_id: bytes,
                         recipients: set[str], now: float) -> None:
        """Record the pairs that have now exchanged mail (`RecentMessages.exchanged`)."""
        for pair in self._recent.exchanged(sender, message_id, recipients) - self._pairs:
            conn.execute("INSERT INTO exchanged VALUES (?, ?, ?) "
                         "ON CONFLICT (a, b) DO UPDATE SET at=excluded.at", (*pair, now))
            if len(self._pairs) >= _PAIR_CACHE:
                self._pairs.clear()
            self._pairs.add(pair)

    # --- Store -------------------------------------------------------------------------
    async def authenticate(self, address: str, verify_key: bytes, *, register: bool,
                           invite: str | None, advertise: dict[str, Any] | None, now: float,
                           policy: RegistrationPolicy, page: int,
                           vouch: bytes | None = None, record: bool = True) -> AuthOutcome:
        peer_id = peer_id_of(verify_key)

        def op(conn: sqlite3.Connection) -> AuthOutcome:
            created = False
            row = conn.execute("SELECT address FROM devices WHERE peer_id=?",
                               (peer_id,)).fetchone()
            if row is not None and row[0] != address:
                return AuthOutcome(Status.FORBIDDEN,
                                   "this device key is bound to another address")
            if row is None:
                if not record:
                    # Binding it would write. The rules' refusal (an unknown or revoked
                    # device: 401) still stands; only a device they would let in waits.
                    _, verdict = _judge(conn, address, verify_key, register, invite, now,
                                        policy, vouch)
                    return verdict.refusal or AuthOutcome(Status.UNAVAILABLE, STORAGE_FULL)
                refusal = _register(conn, address, verify_key, peer_id, register, invite, now,
                                    policy, vouch)
                if refusal is not None:
                    return refusal
                created = True
            if record:
                adv = None if advertise is None else packb(advertise)
                conn.execute("UPDATE devices SET last_seen=?, advertise=COALESCE(?, advertise)"
                             " WHERE peer_id=?", (now, adv, peer_id))
            hi = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM envelopes").fetchone()[0]
            first = _pending(conn, peer_id, 0, hi, page, now)
            return AuthOutcome(Status.OK, "authenticated", created, tuple(first), hi)

        return await self._submit(op)

    def enqueue(self, sender: str, send: Send, now: float, expires_at: float,
                quota: Quota) -> Awaitable[EnqueueOutcome]:
        def op(conn: sqlite3.Connection) -> EnqueueOutcome:
            # The common case in one statement per item: every device known and bound to
            # its address, and the quota holds even if every item is new. INSERT OR IGNORE
            # skips an envelope already stored (a retried SEND) through UNIQUE(device, mid).
            adding: dict[str, list[int]] = {}
            for item in send.items:
                if self._bound_to(conn, item.device) != item.to:
                    return self._enqueue_checked(conn, sender, send, now, expires_at, quota)
                add = adding.setdefault(item.to, [0, 0])
                add[0] += 1
                add[1] += len(item.blob)
            if self._over_quota(sender, adding, quota) is not None:
                return self._enqueue_checked(conn, sender, send, now, expires_at, quota)
            stored = []
            for item in send.items:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO envelopes (device, mid, sender, recipient, prio, "
                    "blob, received_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.device, send.message_id, sender, item.to, send.priority, item.blob,
                     now, expires_at))
                if cur.rowcount != 1:
                    continue  # a retried SEND: already stored, ack again
                self._used(sender, item.to, 1, len(item.blob))
                stored.append(QueuedEnvelope(cur.lastrowid or 0, Envelope(
                    send.message_id, sender, item.to, item.device, send.priority, item.blob,
                    now)))
            self._record_exchange(conn, sender, send.message_id, set(adding), now)
            return EnqueueOutcome(Status.OK, "stored", tuple(stored))

        return self._submit(op)

    def _enqueue_checked(self, conn: sqlite3.Connection, sender: str, send: Send, now: float,
                         expires_at: float, quota: Quota) -> EnqueueOutcome:
        """`enqueue` item by item: which refusal comes first, quota for new items only."""
        fresh = []
        extra: dict[str, list[int]] = {}
        for item in send.items:
            if self._bound_to(conn, item.device) != item.to:
                known = conn.execute("SELECT 1 FROM accounts WHERE address=?",
                                     (item.to,)).fetchone()
                if known is None:
                    return EnqueueOutcome(Status.NOT_FOUND, f"no such address: {item.to}")
                return EnqueueOutcome(
                    Status.NOT_FOUND, f"device {item.device.hex()} is not bound to {item.to}")
            if conn.execute("SELECT 1 FROM envelopes WHERE device=? AND mid=?",
                            (item.device, send.message_id)).fetchone():
                continue  # a retried SEND: already stored, ack again
            add = extra.setdefault(item.to, [0, 0])
            add[0] += 1
            add[1] += len(item.blob)
            if (why := self._over_quota(sender, {item.to: add}, quota)) is not None:
                return EnqueueOutcome(Status.QUOTA, why)
            fresh.append(item)
        stored = []
        for item in fresh:
            cur = conn.execute(
                "INSERT INTO envelopes (device, mid, sender, recipient, prio, blob, "
                "received_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item.device, send.message_id, sender, item.to, send.priority, item.blob,
                 now, expires_at))
            seq = cur.lastrowid or 0
            stored.append(QueuedEnvelope(seq, Envelope(
                send.message_id, sender, item.to, item.device, send.priority, item.blob, now)))
        for addr, (count, size) in extra.items():
            self._used(sender, addr, count, size)
        self._record_exchange(conn, sender, send.message_id, {i.to for i in send.items}, now)
        return EnqueueOutcome(Status.OK, "stored", tuple(stored))

    def enqueue_forwarded(self, sender: str, send: Send, now: float, expires_at: float,
                          quota: Quota) -> Awaitable[EnqueueOutcome]:
        def op(conn: sqlite3.Connection) -> EnqueueOutcome:
            fresh = tuple(i for i in send.items if conn.execute(
                "SELECT 1 FROM forwarded_in WHERE device=? AND mid=?",
                (i.device, send.message_id)).fetchone() is None)
            if not fresh:
                return EnqueueOutcome(Status.OK, "stored")
            outcome = self._enqueue_checked(conn, sender, Send(
                send.id, send.message_id, send.priority, fresh, send.sender), now,
                expires_at, quota)
            if outcome.status == Status.OK:
                conn.executemany("INSERT OR IGNORE INTO forwarded_in VALUES (?, ?, ?)",
                                 [(i.device, send.message_id, now) for i in fresh])
            return outcome

        return self._submit(op)

    async def queue_outbound(self, sender: str, send: Send, now: float, expires_at: float,
                             max_queued: int) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            waiting = conn.execute("SELECT COUNT(*) FROM outbound WHERE sender=? AND "
                                   "state='queued'", (sender,)).fetchone()[0]
            if waiting + len(send.items) > max_queued:
                return (f"{sender} already has {waiting} envelopes waiting for other "
                        f"domains, limit {max_queued}")
            conn.executemany(
                "INSERT OR IGNORE INTO outbound (domain, mid, sender, recipient, device, prio,"
                " blob, queued_at, expires_at, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                [(i.to.rpartition("@")[2], send.message_id, sender, i.to, i.device,
                  send.priority, i.blob, now, expires_at, now) for i in send.items])
            return None

        return await self._submit(op)

    async def outbound_domains(self) -> list[str]:
        return await self._submit(lambda conn: [r[0] for r in conn.execute(
            "SELECT DISTINCT domain FROM outbound WHERE state='queued'")])

    async def outbound_due(self, domain: str, after: int, limit: int) -> list[OutboundRow]:
        def op(conn: sqlite3.Connection) -> list[OutboundRow]:
            rows = conn.execute(
                "SELECT id, domain, mid, sender, recipient, device, prio, blob, expires_at "
                "FROM outbound WHERE state='queued' AND domain=? AND id>? ORDER BY id LIMIT ?",
                (domain, after, limit)).fetchall()
            return [OutboundRow(*r) for r in rows]

        return await self._submit(op)

    async def outbound_done(self, ids: list[int], state: str, reason: str | None,
                            now: float) -> None:
        if state not in ("delivered", "bounced"):
            raise ValueError(f"not a final outbound state: {state!r}")

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE outbound SET state=?, error=?, blob=NULL, updated_at=? "
                             "WHERE id=? AND state='queued'",
                             [(state, reason, now, i) for i in ids])

        await self._submit(op)

    async def outbound_failed(self, domain: str, error: str, now: float) -> None:
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbound SET since=COALESCE(since, ?), error=?, updated_at=? "
            "WHERE state='queued' AND domain=?", (now, error[:500], now, domain)) and None)

    async def outbound_expire(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "UPDATE outbound SET state='bounced', blob=NULL, updated_at=?, "
                "error='not delivered to ' || domain || ' before it expired (' || "
                "COALESCE(error, 'no attempt succeeded') || ')' "
                "WHERE state='queued' AND expires_at<=? RETURNING id", (now, now)).fetchall()
            conn.execute("DELETE FROM outbound WHERE state<>'queued' AND updated_at<=?",
                         (now - FORWARD_MEMORY,))
            conn.execute("DELETE FROM forwarded_in WHERE at<=?", (now - FORWARD_MEMORY,))
            return len(rows)

        return await self._submit(op)

    async def withdraw(self, sender: str, message_id: bytes) -> tuple[int, int]:
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            # No index on mid alone: a scan, for a rare command, rather than a cost on
            # every SEND.
            gone = conn.execute("DELETE FROM envelopes WHERE mid=? AND sender=? "
                                "RETURNING recipient, length(blob)",
                                (message_id, sender)).fetchall()
            for recipient, size in gone:
                self._used(sender, recipient, -1, -size)
            out = conn.execute("DELETE FROM outbound WHERE sender=? AND mid=? AND "
                               "state='queued'", (sender, message_id)).rowcount
            return len(gone), out

        return await self._submit(op)

    async def track(self, sender: str, message_id: bytes) -> list[OutboundState]:
        def op(conn: sqlite3.Connection) -> list[OutboundState]:
            rows = conn.execute(
                "SELECT recipient, state, queued_at, since, error, updated_at FROM outbound "
                "WHERE sender=? AND mid=? ORDER BY recipient, id",
                (sender, message_id)).fetchall()
            return per_recipient([OutboundState(*r) for r in rows])

        return await self._submit(op)

    async def pending(self, device: bytes, after: int, upto: int, limit: int,
                      now: float) -> list[QueuedEnvelope]:
        return await self._submit(lambda conn: _pending(conn, device, after, upto, limit, now))

    async def list_infos(self, device: bytes, after: int, limit: int,
                         now: float) -> list[QueuedInfo]:
        def op(conn: sqlite3.Connection) -> list[QueuedInfo]:
            rows = conn.execute(
                "SELECT seq, mid, sender, recipient, device, prio, length(blob), received_at "
                "FROM envelopes WHERE device=? AND seq>? AND expires_at>? ORDER BY seq LIMIT ?",
                (device, after, now, limit)).fetchall()
            return [QueuedInfo(r[0], EnvelopeInfo(*r[1:])) for r in rows]

        return await self._submit(op)

    async def retrieve(self, device: bytes, message_id: bytes, now: float) -> Envelope | None:
        def op(conn: sqlite3.Connection) -> Envelope | None:
            row = conn.execute(
                f"SELECT {ENVELOPE_COLUMNS} FROM envelopes "
                "WHERE device=? AND mid=? AND expires_at>?", (device, message_id, now)).fetchone()
            return None if row is None else queued_envelope(row).envelope

        return await self._submit(op)

    def remove(self, device: bytes, message_id: bytes) -> Awaitable[bool]:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("DELETE FROM envelopes WHERE device=? AND mid=? "
                               "RETURNING sender, recipient, length(blob)",
                               (device, message_id)).fetchone()
            if row is None:
                return False
            self._used(row[0], row[1], -1, -row[2])
            return True

        return self._submit(op)

    async def devices(self, address: str) -> list[DeviceRecord] | None:
        def op(conn: sqlite3.Connection) -> list[DeviceRecord] | None:
            if conn.execute("SELECT 1 FROM accounts WHERE address=?", (address,)).fetchone() \
                    is None:
                return None
            rows = conn.execute("SELECT verify_key, peer_id, last_seen, advertise, vouch "
                                "FROM devices WHERE address=? ORDER BY added",
                                (address,)).fetchall()
            return [DeviceRecord(vk, pid, seen, load_advertise(adv), vouch)
                    for vk, pid, seen, adv, vouch in rows]

        return await self._submit(op)

    async def finger(self, asker: str, address: str) -> FingerView:
        pair = (min(asker, address), max(asker, address))

        def op(conn: sqlite3.Connection) -> FingerView:
            # Both queries run whether or not the account exists (see `Store.finger`).
            exchanged = asker == address or conn.execute(
                "SELECT 1 FROM exchanged WHERE a=? AND b=?", pair).fetchone() is not None
            if conn.execute("SELECT 1 FROM accounts WHERE address=?", (address,)).fetchone() \
                    is None:
                return FingerView(None, False)
            rows = conn.execute("SELECT verify_key, peer_id, last_seen, advertise, vouch "
                                "FROM devices WHERE address=? ORDER BY added",
                                (address,)).fetchall()
            return FingerView([DeviceRecord(vk, pid, seen, load_advertise(adv), vouch)
                               for vk, pid, seen, adv, vouch in rows], exchanged)

        return await self._submit(op)

    async def hold_pipe(self, device: bytes, message: PipeMessage, expires_at: float,
                        now: float, quota: PipeQuota) -> str | None:
        size = pipe_hold.cost(message.payload)

        def op(conn: sqlite3.Connection) -> str | None:
            dropped = conn.execute("DELETE FROM pipe_held WHERE device=? AND expires_at<=? "
                                   "RETURNING cost", (device, now)).fetchall()
            self._pipe_total -= sum(c for (c,) in dropped)
            dc, db, sc, sb = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(cost), 0), "
                "COALESCE(SUM(sender=?), 0), COALESCE(SUM(CASE WHEN sender=? THEN cost END), 0) "
                "FROM pipe_held WHERE device=?",
                (message.sender, message.sender, device)).fetchone()
            used = pipe_hold.HoldUsage(dc, db, sc, sb, self._pipe_total)
            if (why := pipe_hold.refusal(used, size, quota)) is not None:
                return why
            conn.execute("INSERT INTO pipe_held (device, sender, sender_device, payload, cost, "
                         "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (device, message.sender, message.sender_device, message.payload,
                          size, expires_at))
            self._pipe_total += size
            return None

        return await self._submit(op)

    async def take_pipes(self, device: bytes, now: float) -> list[PipeMessage]:
        def op(conn: sqlite3.Connection) -> list[PipeMessage]:
            rows = conn.execute("DELETE FROM pipe_held WHERE device=? "
                                "RETURNING id, sender, sender_device, payload, cost, expires_at",
                                (device,)).fetchall()
            self._pipe_total -= sum(r[4] for r in rows)
            return [PipeMessage(r[1], r[2], r[3]) for r in sorted(rows) if r[5] > now]

        return await self._submit(op)

    async def reread_accounts(self, devices: list[bytes]) -> set[bytes]:
        """Drop the cached bindings and usage (an operator changed the file from outside:
        `accounts delete`, `devices revoke`) and say which of `devices` are still bound."""
        def op(conn: sqlite3.Connection) -> set[bytes]:
            self._reload_caches(conn)
            return {d for d in devices
                    if conn.execute("SELECT 1 FROM devices WHERE peer_id=?", (d,)).fetchone()}

        return await self._submit(op)

    async def relay_usage(self, account: str, day: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT used FROM relay_usage WHERE account=? AND day=?",
                               (account, day)).fetchone()
            return 0 if row is None else int(row[0])

        return await self._submit(op)

    async def save_relay_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        rows = [(account, day, used) for account, (day, used) in usage.items()]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO relay_usage VALUES (?, ?, ?) ON CONFLICT (account) "
                             "DO UPDATE SET day=excluded.day, used=excluded.used", rows)

        await self._submit(op)

    async def set_advertise(self, device: bytes, advertise: dict[str, Any]) -> None:
        raw = packb(advertise)
        await self._submit(lambda conn: conn.execute(
            "UPDATE devices SET advertise=? WHERE peer_id=?", (raw, device)) and None)

    async def touch(self, device: bytes, last_seen: float) -> None:
        await self._submit(lambda conn: conn.execute(
            "UPDATE devices SET last_seen=? WHERE peer_id=?", (last_seen, device)) and None)

    async def expire(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute("DELETE FROM envelopes WHERE expires_at<=? "
                                "RETURNING sender, recipient, length(blob)", (now,)).fetchall()
            for sender, recipient, size in rows:
                self._used(sender, recipient, -1, -size)
            conn.execute("DELETE FROM invites WHERE expires_at<=?", (now,))
            held = conn.execute("DELETE FROM pipe_held WHERE expires_at<=? RETURNING cost",
                                (now,)).fetchall()
            self._pipe_total -= sum(c for (c,) in held)
            conn.execute("DELETE FROM relay_usage WHERE day<?", (int(now // 86400),))
            return len(rows)

        return await self._submit(op)

    async def add_invite(self, address: str, token: str, now: float, expires_at: float) -> None:
        await self._submit(lambda conn: conn.execute(
            "INSERT INTO invites VALUES (?, ?, ?, ?, NULL)",
            (token, address, now, expires_at)) and None)

    async def stats(self) -> StoreStats:
        return await self._submit(lambda conn: _stats(conn, self.path))


def _pending(conn: sqlite3.Connection, device: bytes, after: int, upto: int, limit: int,
             now: float) -> list[QueuedEnvelope]:
    rows = conn.execute(
        f"SELECT {ENVELOPE_COLUMNS} FROM envelopes WHERE device=? AND seq>? AND seq<=? "
        "AND expires_at>? ORDER BY seq LIMIT ?", (device, after, upto, now, limit)).fetchall()
    return [queued_envelope(r) for r in rows]


def _register(conn: sqlite3.Connection, address: str, verify_key: bytes, peer_id: bytes,
              register: bool, invite: str | None, now: float,
              policy: RegistrationPolicy, vouch: bytes | None) -> AuthOutcome | None:
    """Bind a new device (creating the account if needed), or say why not
    (`judge_registration`)."""
    found, verdict = _judge(conn, address, verify_key, register, invite, now, policy, vouch)
    if verdict.refusal is not None:
        return verdict.refusal
    if not found.exists:
        conn.execute("INSERT INTO accounts VALUES (?, ?)", (address, now))
    conn.execute("INSERT INTO devices (peer_id, verify_key, address, added, vouch) "
                 "VALUES (?, ?, ?, ?, ?)", (peer_id, verify_key, address, now, verdict.vouch))
    if verdict.invite_ok:
        conn.execute("UPDATE invites SET used_by=? WHERE token=?", (peer_id, invite))
    return None


def _judge(conn: sqlite3.Connection, address: str, verify_key: bytes, register: bool,
           invite: str | None, now: float, policy: RegistrationPolicy,
           vouch: bytes | None) -> tuple[RegistrationFacts, RegistrationVerdict]:
    """What the database says about binding a new device, and the rules' verdict; reads
    only."""
    found = RegistrationFacts(
        exists=conn.execute("SELECT 1 FROM accounts WHERE address=?",
                            (address,)).fetchone() is not None,
        invite=None if invite is None else conn.execute(
            "SELECT address, expires_at, used_by FROM invites WHERE token=?",
            (invite,)).fetchone(),
        device_keys=frozenset(bytes(r[0]) for r in conn.execute(
            "SELECT verify_key FROM devices WHERE address=?", (address,))))
    return found, judge_registration(address, verify_key, register, invite, now, policy,
                                     vouch, found)


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, exc in results:
        settle(fut, value, exc)


def file_size(path: Path) -> int:
    """Bytes of the database and its WAL on disk."""
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())
