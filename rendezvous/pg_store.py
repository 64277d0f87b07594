"""`PgStore`: the `Store` on PostgreSQL (asyncpg), for several instances of one domain.

The same guarantees as `SqliteStore`, and the same shape: requests queue up while a
transaction commits and then run together in the next one (group commit) on one
connection, then a single COMMIT, then every caller's future is resolved in submission
order; nothing is acknowledged before its commit returned. `synchronous_commit` is left
at the server's setting (on by default: a commit is flushed to the WAL on disk).

What one process keeps in memory for SQLite lives in the database here, since another
instance may change it at any moment: queued count and bytes per recipient (`usage`),
per sender and recipient (`pair_usage`) and per sending domain of envelopes that came
over a link (`domain_usage`). A batch first reads the device bindings it needs and
locks the `usage` rows of every account it queues for or removes from, in address order
(`SELECT ... ORDER BY address FOR NO KEY UPDATE`), so quotas hold exactly across
instances and two instances' batches never wait on each other in a cycle through those
rows; the counters are written back once at the end of the batch.

SEND and REMOVE, nearly all the traffic, run as arrays: the REMOVEs of a stretch of the
batch are one `DELETE ... USING unnest(...)`, its SENDs one `INSERT ... SELECT FROM unnest
(...) ON CONFLICT (device, mid) DO NOTHING`; the quota checks in between are done in
Python on the locked counters. The REMOVEs of a stretch go before its SENDs: every request
of one batch was submitted before any of them was answered, so any order among them is
one the callers could have seen, and a SEND's quota may then count a slot freed in the
same batch. Any other request is a barrier: what came before it runs first, so an
AUTHORIZATION reads the queue after the SENDs submitted before it (the server's push of
`seq > hi` relies on this within an instance). Envelope sequence numbers come from an
identity column; across instances they are not in commit order: an envelope committed by
another instance after an AUTHORIZATION read `hi` may have a smaller seq.

`expire` and `withdraw` change usage of accounts known only once the rows are read; each
runs in a transaction of its own that locks those accounts first. A request that raises
(or a deadlock PostgreSQL broke) rolls back its batch, which then runs again with every
request in a transaction of its own, so one bad request spoils nothing else. A lost
connection fails the batch (those SENDs are not acknowledged and are retried by their
clients; a retried SEND stores nothing twice) and the next batch reconnects.

The exchanged-mail pairs already written (bounded) and the recipients of recent message
ids are kept in memory only to skip writes, as in `SqliteStore`; both are dropped when a
batch rolls back.

Every instance drains the one outbound queue, so `outbound_due` claims the rows it returns
for `outbound_claim` seconds (default 60): each envelope for another domain is forwarded
by one instance, and when that instance dies its rows go to another once the claim lapses
(the federation worker wakes every waiting domain at half that interval). While it holds
claims, a live instance renews them every third of that, so a page that takes longer than
the claim to forward, or a domain it retries with backoff, stays its own: a claim lapses
only when its instance dies or stalls. Closing releases this instance's claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from crypto.codec import packb
from crypto.identity import peer_id_of
from rendezvous import pg_schema, pipe_hold
from rendezvous.domainkey import decode_key, encode_key, fingerprint
from rendezvous.errors import STORAGE_FULL, DatabaseAway, error_text, is_database_away
from rendezvous.logfmt import kv
from rendezvous.messages import PipeMessage, Send, SendItem
from rendezvous.records import Envelope, EnvelopeInfo
from rendezvous.sqlite_store import FORWARD_MEMORY
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
from rendezvous.taskset import TaskSet

T = TypeVar("T")
log = logging.getLogger("rendezvous.pg_store")
_MAX_BATCH = 1024
_PAIR_CACHE = 65_536
_PIPE_LOCK = 0x7065657270_02     # advisory lock: the PIPE hold's server-wide total
_OUTBOUND_LOCK = 0x7065657270_03  # advisory lock (with the sender's hash): outbound cap
_INSERT = """
INSERT INTO envelopes (device, mid, sender, recipient, prio, blob, received_at, expires_at,
                       linked)
SELECT d, m, s, r, p, b, ra, ea, l
FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::int[], $6::bytea[],
            $7::float8[], $8::float8[], $9::bool[]) WITH ORDINALITY
     AS t(d, m, s, r, p, b, ra, ea, l, o)
ORDER BY o
ON CONFLICT (device, mid) DO NOTHING
RETURNING seq, device, mid"""
_DELETE = """
DELETE FROM envelopes e USING unnest($1::bytea[], $2::bytea[]) AS k(d, m)
WHERE e.device = k.d AND e.mid = k.m
RETURNING e.device, e.mid, e.sender, e.recipient, octet_length(e.blob), e.linked"""


def is_postgres_url(text: str) -> bool:
    """Whether `--store` names a PostgreSQL database."""
    return text.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """`url` without its password, for messages and logs."""
    head, sep, tail = url.partition("://")
    creds, at, host = tail.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{head}{sep}{creds.split(':', 1)[0]}:***@{host}"


def _password_given(url: str) -> bool:
    """Whether libpq's rules give `url` a password: in it, PGPASSWORD, or a password file."""
    passfile = os.path.expanduser(os.environ.get("PGPASSFILE", "~/.pgpass"))
    return redacted(url) != url or bool(os.environ.get("PGPASSWORD")) or os.path.exists(passfile)


async def connect(url: str, wait: float = 10.0) -> Any:
    """An asyncpg connection to `url`; a failure is a RuntimeError or OSError that names
    the database (password left out): DatabaseAway, an OSError, when the server did not
    answer, refused the connection or is starting up or shutting down."""
    import asyncpg  # only an operator who chose PostgreSQL needs it

    try:
        return await asyncpg.connect(url, timeout=wait, command_timeout=60)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        hint = ""
        if isinstance(exc, asyncpg.InvalidPasswordError) and not _password_given(url):
            # The documented URL form has no password; say where one goes.
            hint = (" (no password was given: set PGPASSWORD, or a ~/.pgpass line for the "
                    "user serve runs as, or put it in the URL, USER:PASSWORD@)")
        text = f"cannot connect to {redacted(url)}: {error_text(exc)}{hint}"
        if isinstance(exc, TimeoutError) or is_database_away(exc):
            raise DatabaseAway(text) from None
        raise RuntimeError(text) from None
    except OSError as exc:
        text = f"cannot connect to {redacted(url)}: {exc.strerror or exc}"
        if isinstance(exc, ConnectionError):
            raise DatabaseAway(text) from None
        raise OSError(text) from None


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass
class _Tx:
    """One transaction of a batch: the connection and the counters it has locked."""

    conn: Any
    usage: dict[str, list[int]] = field(default_factory=dict)      # locked recipients
    pairs: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (sender, to)
    domains: dict[str, list[int]] = field(default_factory=dict)    # locked sending domains
    dirty: set[str] = field(default_factory=set)
    dirty_pairs: set[tuple[str, str]] = field(default_factory=set)
    dirty_domains: set[str] = field(default_factory=set)
    bound: dict[bytes, str | None] = field(default_factory=dict)   # device -> address
    exchanged: dict[tuple[str, str], float] = field(default_factory=dict)

    async def bindings(self, devices: Iterable[bytes]) -> None:
        missing = [d for d in set(devices) if d not in self.bound]
        if not missing:
            return
        for d in missing:
            self.bound[d] = None
        for row in await self.conn.fetch(
                "SELECT peer_id, address FROM devices WHERE peer_id = ANY($1::bytea[])",
                missing):
            self.bound[bytes(row[0])] = row[1]

    async def lock(self, addresses: Iterable[str]) -> None:
        """Lock the usage rows of `addresses` (in address order) and read them."""
        missing = sorted({a for a in addresses if a not in self.usage})
        if not missing:
            return
        rows = await self.conn.fetch(
            "SELECT address, count, bytes FROM usage WHERE address = ANY($1::text[]) "
            "ORDER BY address FOR NO KEY UPDATE", missing)
        for a in missing:
            self.usage[a] = [0, 0]
        for address, count, size in rows:
            self.usage[address] = [int(count), int(size)]

    async def load_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Read (sender, recipient) usage; the recipients' rows must be locked."""
        missing = list({p for p in pairs if p not in self.pairs})
        if not missing:
            return
        for p in missing:
            self.pairs[p] = [0, 0]
        rows = await self.conn.fetch(
            "SELECT p.sender, p.recipient, p.count, p.bytes FROM pair_usage p "
            "JOIN unnest($1::text[], $2::text[]) AS k(s, r) "
            "ON p.recipient = k.r AND p.sender = k.s",
            [p[0] for p in missing], [p[1] for p in missing])
        for sender, recipient, count, size in rows:
            self.pairs[sender, recipient] = [int(count), int(size)]

    async def lock_domains(self, domains: Iterable[str]) -> None:
        missing = sorted({d for d in domains if d not in self.domains})
        if not missing:
            return
        await self.conn.execute(
            "INSERT INTO domain_usage (domain) SELECT unnest($1::text[]) "
            "ON CONFLICT DO NOTHING", missing)
        rows = await self.conn.fetch(
            "SELECT domain, count, bytes FROM domain_usage WHERE domain = ANY($1::text[]) "
            "ORDER BY domain FOR NO KEY UPDATE", missing)
        for domain, count, size in rows:
            self.domains[domain] = [int(count), int(size)]

    def used(self, sender: str, address: str, count: int, size: int, linked: bool) -> None:
        """Count an envelope in (+1) or out (-1); its rows were locked and read."""
        u = self.usage.setdefault(address, [0, 0])
        u[0] += count
        u[1] += size
        self.dirty.add(address)
        p = self.pairs.setdefault((sender, address), [0, 0])
        p[0] += count
        p[1] += size
        self.dirty_pairs.add((sender, address))
        if linked:
            d = self.domains.setdefault(_domain(sender), [0, 0])
            d[0] += count
            d[1] += size
            self.dirty_domains.add(_domain(sender))

    async def write_back(self) -> None:
        """The changed counters and the exchanged pairs, in one statement (each part a
        data-modifying CTE; one round trip less per part than separate statements)."""
        if not (self.dirty or self.dirty_pairs or self.dirty_domains or self.exchanged):
            return
        users = sorted(self.dirty)
        keep = sorted(p for p in self.dirty_pairs if self.pairs[p][0] > 0)
        gone = sorted(p for p in self.dirty_pairs if self.pairs[p][0] <= 0)
        domains = sorted(self.dirty_domains)
        pairs = sorted(self.exchanged)
        await self.conn.execute(_WRITE_BACK,
            users, [max(0, self.usage[k][0]) for k in users],
            [max(0, self.usage[k][1]) for k in users],
            [p[0] for p in keep], [p[1] for p in keep],
            [self.pairs[p][0] for p in keep], [self.pairs[p][1] for p in keep],
            [p[0] for p in gone], [p[1] for p in gone],
            domains, [self.domains[k][0] for k in domains],
            [self.domains[k][1] for k in domains],
            [p[0] for p in pairs], [p[1] for p in pairs],
            [self.exchanged[p] for p in pairs])


_WRITE_BACK = """
WITH u AS (
    INSERT INTO usage (address, count, bytes)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
    ON CONFLICT (address) DO UPDATE SET count = excluded.count, bytes = excluded.bytes
    RETURNING 1
), k AS (
    INSERT INTO pair_usage (sender, recipient, count, bytes)
    SELECT * FROM unnest($4::text[], $5::text[], $6::bigint[], $7::bigint[])
    ON CONFLICT (recipient, sender) DO UPDATE SET count = excluded.count,
                                                  bytes = excluded.bytes
    RETURNING 1
), g AS (
    DELETE FROM pair_usage p USING unnest($8::text[], $9::text[]) AS z(s, r)
    WHERE p.recipient = z.r AND p.sender = z.s
    RETURNING 1
), d AS (
    UPDATE domain_usage du SET count = GREATEST(v.c, 0), bytes = GREATEST(v.b, 0)
    FROM unnest($10::text[], $11::bigint[], $12::bigint[]) AS v(d, c, b)
    WHERE du.domain = v.d
    RETURNING 1
), x AS (
    INSERT INTO exchanged (a, b, at)
    SELECT * FROM unnest($13::text[], $14::text[], $15::float8[])
    ON CONFLICT (a, b) DO UPDATE SET at = excluded.at
    RETURNING 1
)
SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM k) + (SELECT count(*) FROM g)
       + (SELECT count(*) FROM d) + (SELECT count(*) FROM x)"""


_ENQ, _REM, _OTHER = 0, 1, 2


@dataclass
class _Op:
    kind: int
    fut: asyncio.Future[Any]
    fn: Callable[[_Tx], Awaitable[Any]] | None = None   # _OTHER
    alone: bool = False                                 # its own transaction
    # _ENQ
    sender: str = ""
    send: Send | None = None
    now: float = 0.0
    expires_at: float = 0.0
    quota: Quota | None = None
    # _REM
    device: bytes = b""
    mid: bytes = b""
    # set while running
    result: Any = None
    error: BaseException | None = None


class PgStore:
    """PostgreSQL-backed `Store` with group commit; see the module doc."""

    def __init__(self, url: str, *, domain: str | None = None, domain_key: bytes | None = None,
                 connect_timeout: float = 10.0, outbound_claim: float = 60.0) -> None:
        if outbound_claim <= 0:
            raise ValueError("outbound_claim must be positive")
        self.url = url
        # `outbound_due` claims the rows it returns for this long (see there).
        self.outbound_claim = outbound_claim
        self.claimant = secrets.token_hex(6)
        self._claims_held = False  # set by `outbound_due`, cleared by a renewal finding none
        self.domain = domain  # recorded on the first open, refused if another later
        # The domain key's public half, recorded and refused alike: an instance started
        # without a copy of the domain's domain_key.json would make its own key and prove
        # it to nodes pinned to the domain's one (they refuse it at failover).
        self.domain_key = domain_key
        self.connect_timeout = connect_timeout
        self._conn: Any = None  # None while open: the last one was lost, reconnect
        self._opened = False
        self._pending: list[_Op] = []
        self._wake = asyncio.Event()
        self._tasks = TaskSet("pg-store", logger=log)
        self._closing = False
        self._pairs: set[tuple[str, str]] = set()
        self._recent = RecentMessages()
        self.commits = 0
        self.ops = 0
        self.rollbacks = 0

    # --- lifecycle -------------------------------------------------------------------
    async def _connect(self) -> Any:
        return await connect(self.url, self.connect_timeout)

    async def open(self) -> None:
        """Connect, create the schema in an empty database, refuse one of another
        version (`pg_schema.check`) or domain, and start the batch writer."""
        if self._opened:
            return
        import asyncpg

        conn = await self._connect()
        try:
            # Held from the check to the last migration: an instance started beside one
            # creating the schema waits for it, instead of reading a half-made schema's
            # version and refusing it.
            await conn.execute("SELECT pg_advisory_lock($1)", pg_schema.MIGRATE_LOCK)
            try:
                if await pg_schema.check(conn, redacted(self.url)) is None:
                    applied = await pg_schema.migrate(conn)
                    log.info(kv("store.schema_created", version=pg_schema.SCHEMA_VERSION,
                                migrations=len(applied)))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", pg_schema.MIGRATE_LOCK)
            if self.domain is not None:
                await conn.execute("INSERT INTO meta VALUES ('domain', $1) "
                                   "ON CONFLICT DO NOTHING", self.domain)
                served = await conn.fetchval("SELECT value FROM meta WHERE key = 'domain'")
                if served != self.domain:
                    raise pg_schema.SchemaError(f"{redacted(self.url)} serves {served}, "
                                                f"not {self.domain}")
            if self.domain_key is not None:
                mine = encode_key(self.domain_key)
                await conn.execute("INSERT INTO meta VALUES ('domain_key', $1) "
                                   "ON CONFLICT DO NOTHING", mine)
                recorded = await conn.fetchval(
                    "SELECT value FROM meta WHERE key = 'domain_key'")
                if recorded != mine:
                    raise pg_schema.SchemaError(
                        f"{redacted(self.url)} is served with the domain key "
                        f"{fingerprint(decode_key(recorded))}, and this instance's "
                        f"domain_key.json holds {fingerprint(self.domain_key)}: every "
                        "instance of a domain needs a copy of the one domain_key.json "
                        "in its --data folder (its DNS TXT record publishes it): copy it "
                        "from an instance that serves")
        except asyncpg.PostgresError as exc:
            await conn.close()
            raise RuntimeError(f"{redacted(self.url)}: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._opened = True
        self._closing = False
        self._tasks.spawn(self._writer(), name="pg-store-writer")
        self._tasks.spawn(self._renew_claims(), name="pg-store-claims", key="claims")

    async def aclose(self) -> None:
        """Finish the queued work, commit, close the connection."""
        if not self._opened:
            return
        self._closing = True
        self._wake.set()
        self._tasks.cancel("claims")
        await self._tasks.wait()
        await self._tasks.aclose()
        conn, self._conn = self._conn, None
        with contextlib.suppress(Exception):  # leaving: another instance may take them now
            await asyncio.wait_for(conn.execute(
                "UPDATE outbound SET claimed_by = NULL, claim_until = NULL "
                "WHERE claimed_by = $1 AND state = 'queued'", self.claimant), 2.0)
        for op in self._pending:  # submitted after the writer ended
            settle(op.fut, None, RuntimeError("store is closed"))
        self._pending = []
        self._opened = False
        if conn is not None:
            await conn.close()

    def _queue(self, op: _Op) -> asyncio.Future[Any]:
        if not self._opened or self._closing:
            raise RuntimeError("store is not open")
        self._pending.append(op)
        self._wake.set()
        return op.fut

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _submit(self, fn: Callable[[_Tx], Awaitable[T]], *,
                alone: bool = False) -> asyncio.Future[T]:
        return self._queue(_Op(_OTHER, self._new_future(), fn, alone))

    # --- the writer ----------------------------------------------------------------------
    async def _writer(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            ops, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            start = 0
            for i, op in enumerate(ops):  # an `alone` op gets a transaction of its own
                if op.alone:
                    if i > start:
                        await self._run_batch(ops[start:i])
                    await self._run_batch([op])
                    start = i + 1
            if start < len(ops):
                await self._run_batch(ops[start:])

    async def _run_batch(self, ops: list[_Op]) -> None:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await self._connect()
            except (OSError, RuntimeError) as exc:  # the database is away: fail the batch
                log.warning(kv("store.reconnect_failed", ops=len(ops), error=str(exc)))
                for op in ops:
                    settle(op.fut, None, exc)
                return
        try:
            await self._transaction(ops)
        except Exception as exc:
            self.rollbacks += 1
            self._pairs = set()
            self._recent = RecentMessages()
            if _connection_lost(exc):
                # Not an error PostgreSQL reported on a healthy session: drop the
                # connection, whatever state it is in; the next batch opens a new one.
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
            if len(ops) == 1 or self._conn is None:
                log.warning(kv("store.batch_failed", ops=len(ops), error=repr(exc)[:300]))
                for op in ops:
                    op.error = exc
            else:
                for op in ops:  # one at a time: a bad op spoils nothing else
                    op.result = op.error = None
                    try:
                        await self._transaction([op])
                    except Exception as one:
                        self._pairs = set()
                        self._recent = RecentMessages()
                        op.error = one
        self.ops += len(ops)
        for op in ops:
            settle(op.fut, op.result, op.error)

    async def _transaction(self, ops: list[_Op]) -> None:
        conn = self._conn
        tx = _Tx(conn)
        for op in ops:
            op.result = op.error = None
        async with conn.transaction():
            await self._lock_phase(tx, ops)
            stretch: list[_Op] = []
            for op in ops:
                if op.kind != _OTHER:
                    stretch.append(op)
                    continue
                if stretch:
                    await self._run_stretch(tx, stretch)
                    stretch = []
                if op.fn is not None:
                    op.result = await op.fn(tx)
            if stretch:
                await self._run_stretch(tx, stretch)
            await tx.write_back()
        self.commits += 1
        for pair in tx.exchanged:
            if len(self._pairs) >= _PAIR_CACHE:
                self._pairs.clear()
            self._pairs.add(pair)

    async def _lock_phase(self, tx: _Tx, ops: list[_Op]) -> None:
        """Bindings of every device the batch names; lock the usage rows of every
        account it queues for or removes from, in one statement, in address order."""
        devices: set[bytes] = set()
        addresses: set[str] = set()
        for op in ops:
            if op.kind == _ENQ and op.send is not None:
                devices.update(i.device for i in op.send.items)
                addresses.update(i.to for i in op.send.items)
            elif op.kind == _REM:
                devices.add(op.device)
        if not devices:
            return
        await tx.bindings(devices)
        addresses.update(a for d, a in tx.bound.items() if a is not None and d in devices)
        await tx.lock(addresses)

    async def _run_stretch(self, tx: _Tx, ops: list[_Op]) -> None:
        removes = [op for op in ops if op.kind == _REM]
        if removes:
            await self._remove_many(tx, removes)
        sends = [op for op in ops if op.kind == _ENQ]
        if sends:
            await self._enqueue_many(tx, sends)

    async def _remove_many(self, tx: _Tx, ops: list[_Op]) -> None:
        rows = await tx.conn.fetch(_DELETE, [op.device for op in ops], [op.mid for op in ops])
        gone = {(bytes(r[0]), bytes(r[1])): (r[2], r[3], int(r[4]), bool(r[5])) for r in rows}
        await tx.lock(r[1] for r in gone.values())
        await tx.load_pairs((r[0], r[1]) for r in gone.values())
        await tx.lock_domains(_domain(r[0]) for r in gone.values() if r[3])
        for op in ops:
            row = gone.pop((op.device, op.mid), None)
            op.result = row is not None
            if row is not None:
                tx.used(row[0], row[1], -1, -row[2], row[3])

    async def _enqueue_many(self, tx: _Tx, ops: list[_Op]) -> None:
        """The SENDs of a stretch: the common case decided in Python and stored with one
        INSERT; a SEND the quick check refuses is decided item by item instead."""
        await tx.bindings(i.device for op in ops if op.send for i in op.send.items)
        await tx.load_pairs((op.sender, i.to) for op in ops if op.send for i in op.send.items)
        staged: list[tuple[_Op, Any]] = []   # (op, item) waiting for the INSERT
        keys: set[tuple[bytes, bytes]] = set()
        for op in ops:
            send, quota = op.send, op.quota
            if send is None or quota is None:
                continue
            adding: dict[str, list[int]] = {}
            quick = not (quota.domain_count or quota.domain_bytes)
            for item in send.items:
                if tx.bound.get(item.device) != item.to:
                    quick = False
                    break
                add = adding.setdefault(item.to, [0, 0])
                add[0] += 1
                add[1] += len(item.blob)
            if quick and _over_quota(tx, op.sender, adding, quota) is None:
                op.result = []
                for item in send.items:
                    key = (item.device, send.message_id)
                    if key in keys:
                        continue  # the same envelope twice in this batch: stored once
                    keys.add(key)
                    staged.append((op, item))
                    tx.used(op.sender, item.to, 1, len(item.blob), False)
                self._record_exchange(tx, op.sender, send.message_id, set(adding), op.now)
                continue
            await self._insert(tx, staged)
            staged, keys = [], set()
            op.result = await self._enqueue_checked(tx, op.sender, send, op.now,
                                                    op.expires_at, quota, linked=False)
        await self._insert(tx, staged)
        for op in ops:
            if isinstance(op.result, list):
                op.result = EnqueueOutcome(Status.OK, "stored", tuple(op.result))

    async def _insert(self, tx: _Tx, staged: list[tuple[_Op, Any]]) -> None:
        """INSERT the staged items; those already stored are counted out again."""
        if not staged:
            return
        cols: list[list[Any]] = [[] for _ in range(9)]
        for op, item in staged:
            send = op.send
            if send is None:
                continue
            for col, value in zip(cols, (item.device, send.message_id, op.sender, item.to,
                                         send.priority, item.blob, op.now, op.expires_at,
                                         False), strict=True):
                col.append(value)
        rows = await tx.conn.fetch(_INSERT, *cols)
        seqs = {(bytes(r[1]), bytes(r[2])): int(r[0]) for r in rows}
        for op, item in staged:
            send = op.send
            if send is None:
                continue
            seq = seqs.get((item.device, send.message_id))
            if seq is None:  # a retried SEND: already stored, ack again
                tx.used(op.sender, item.to, -1, -len(item.blob), False)
                continue
            op.result.append(QueuedEnvelope(seq, Envelope(
                send.message_id, op.sender, item.to, item.device, send.priority, item.blob,
                op.now)))

    async def _enqueue_checked(self, tx: _Tx, sender: str, send: Send, now: float,
                               expires_at: float, quota: Quota, *,
                               linked: bool) -> EnqueueOutcome:
        """`enqueue` item by item: which refusal comes first, quota for new items only."""
        conn = tx.conn
        await tx.bindings(i.device for i in send.items)
        await tx.lock(i.to for i in send.items if tx.bound.get(i.device) == i.to)
        await tx.load_pairs((sender, i.to) for i in send.items)
        if linked or quota.domain_count or quota.domain_bytes:
            await tx.lock_domains([_domain(sender)])
        fresh: list[SendItem] = []
        extra: dict[str, list[int]] = {}
        for item in send.items:
            if tx.bound.get(item.device) != item.to:
                known = await conn.fetchval("SELECT 1 FROM accounts WHERE address = $1",
                                            item.to)
                if known is None:
                    return EnqueueOutcome(Status.NOT_FOUND, f"no such address: {item.to}")
                return EnqueueOutcome(
                    Status.NOT_FOUND, f"device {item.device.hex()} is not bound to {item.to}")
            if await conn.fetchval("SELECT 1 FROM envelopes WHERE device = $1 AND mid = $2",
                                   item.device, send.message_id) is not None:
                continue  # a retried SEND: already stored, ack again
            if any(i.device == item.device for i in fresh):
                continue
            add = extra.setdefault(item.to, [0, 0])
            add[0] += 1
            add[1] += len(item.blob)
            if (why := _over_quota(tx, sender, {item.to: add}, quota)) is not None:
                return EnqueueOutcome(Status.QUOTA, why)
            fresh.append(item)
        stored = []
        if fresh:
            rows = await conn.fetch(
                _INSERT, [i.device for i in fresh], [send.message_id] * len(fresh),
                [sender] * len(fresh), [i.to for i in fresh], [send.priority] * len(fresh),
                [i.blob for i in fresh], [now] * len(fresh), [expires_at] * len(fresh),
                [linked] * len(fresh))
            seqs = {bytes(r[1]): int(r[0]) for r in rows}
            for item in fresh:
                seq = seqs.get(item.device)
                if seq is None:
                    continue  # stored meanwhile by another instance's copy of this SEND
                tx.used(sender, item.to, 1, len(item.blob), linked)
                stored.append(QueuedEnvelope(seq, Envelope(
                    send.message_id, sender, item.to, item.device, send.priority, item.blob,
                    now)))
        self._record_exchange(tx, sender, send.message_id, {i.to for i in send.items}, now)
        return EnqueueOutcome(Status.OK, "stored", tuple(stored))

    def _record_exchange(self, tx: _Tx, sender: str, message_id: bytes,
                         recipients: set[str], now: float) -> None:
        """As `SqliteStore._record_exchange`; written at the end of the batch."""
        for pair in self._recent.exchanged(sender, message_id, recipients) - self._pairs:
            tx.exchanged[pair] = now

    # --- Store: the hot path ------------------------------------------------------------
    def enqueue(self, sender: str, send: Send, now: float, expires_at: float,
                quota: Quota) -> Awaitable[EnqueueOutcome]:
        return self._queue(_Op(_ENQ, self._new_future(), sender=sender, send=send, now=now,
                               expires_at=expires_at, quota=quota))

    def remove(self, device: bytes, message_id: bytes) -> Awaitable[bool]:
        return self._queue(_Op(_REM, self._new_future(), device=device, mid=message_id))

    def enqueue_forwarded(self, sender: str, send: Send, now: float, expires_at: float,
                          quota: Quota) -> Awaitable[EnqueueOutcome]:
        async def op(tx: _Tx) -> EnqueueOutcome:
            known = {bytes(r[0]) for r in await tx.conn.fetch(
                "SELECT device FROM forwarded_in WHERE mid = $1 AND device = ANY($2::bytea[])",
                send.message_id, [i.device for i in send.items])}
            fresh = tuple(i for i in send.items if i.device not in known)
            if not fresh:
                return EnqueueOutcome(Status.OK, "stored")
            outcome = await self._enqueue_checked(tx, sender, Send(
                send.id, send.message_id, send.priority, fresh, send.sender), now,
                expires_at, quota, linked=True)
            if outcome.status == Status.OK:
                await tx.conn.execute(
                    "INSERT INTO forwarded_in (device, mid, at) "
                    "SELECT unnest($1::bytea[]), $2, $3 ON CONFLICT DO NOTHING",
                    [i.device for i in fresh], send.message_id, now)
            return outcome

        return self._submit(op)

    # --- Store: the rest -----------------------------------------------------------------
    async def authenticate(self, address: str, verify_key: bytes, *, register: bool,
                           invite: str | None, advertise: dict[str, Any] | None, now: float,
                           policy: RegistrationPolicy, page: int,
                           vouch: bytes | None = None, record: bool = True) -> AuthOutcome:
        peer_id = peer_id_of(verify_key)

        async def op(tx: _Tx) -> AuthOutcome:
            conn = tx.conn
            created = False
            bound = await conn.fetchval("SELECT address FROM devices WHERE peer_id = $1",
                                        peer_id)
            if bound is not None and bound != address:
                return AuthOutcome(Status.FORBIDDEN,
                                   "this device key is bound to another address")
            if bound is None:
                if not record:
                    # Binding it would write. The rules' refusal (an unknown or revoked
                    # device: 401) still stands; only a device they would let in waits.
                    _, verdict = await _judge(conn, address, verify_key, register, invite,
                                              now, policy, vouch)
                    return verdict.refusal or AuthOutcome(Status.UNAVAILABLE, STORAGE_FULL)
                refusal = await _register(conn, address, verify_key, peer_id, register,
                                          invite, now, policy, vouch)
                if refusal is not None:
                    return refusal
                tx.bound[peer_id] = address
                created = True
            if record:
                adv = None if advertise is None else packb(advertise)
                await conn.execute("UPDATE devices SET last_seen = $1, "
                                   "advertise = COALESCE($2, advertise) WHERE peer_id = $3",
                                   now, adv, peer_id)
            hi = int(await conn.fetchval("SELECT COALESCE(max(seq), 0) FROM envelopes"))
            first = await _pending(conn, peer_id, 0, hi, page, now)
            return AuthOutcome(Status.OK, "authenticated", created, tuple(first), hi)

        return await self._submit(op)

    async def pending(self, device: bytes, after: int, upto: int, limit: int,
                      now: float) -> list[QueuedEnvelope]:
        return await self._submit(lambda tx: _pending(tx.conn, device, after, upto, limit,
                                                      now))

    async def list_infos(self, device: bytes, after: int, limit: int,
                         now: float) -> list[QueuedInfo]:
        async def op(tx: _Tx) -> list[QueuedInfo]:
            rows = await tx.conn.fetch(
                "SELECT seq, mid, sender, recipient, device, prio, octet_length(blob), "
                "received_at FROM envelopes WHERE device = $1 AND seq > $2 AND expires_at > $3 "
                "ORDER BY seq LIMIT $4", device, after, now, limit)
            return [QueuedInfo(int(r[0]), EnvelopeInfo(bytes(r[1]), r[2], r[3], bytes(r[4]),
                                                        r[5], r[6], r[7])) for r in rows]

        return await self._submit(op)

    async def retrieve(self, device: bytes, message_id: bytes, now: float) -> Envelope | None:
        async def op(tx: _Tx) -> Envelope | None:
            row = await tx.conn.fetchrow(
                f"SELECT {ENVELOPE_COLUMNS} FROM envelopes "
                "WHERE device = $1 AND mid = $2 AND expires_at > $3", device, message_id, now)
            return None if row is None else queued_envelope(row).envelope

        return await self._submit(op)

    async def devices(self, address: str) -> list[DeviceRecord] | None:
        async def op(tx: _Tx) -> list[DeviceRecord] | None:
            if await tx.conn.fetchval("SELECT 1 FROM accounts WHERE address = $1",
                                      address) is None:
                return None
            return await _device_records(tx.conn, address)

        return await self._submit(op)

    async def finger(self, asker: str, address: str) -> FingerView:
        pair = (min(asker, address), max(asker, address))

        async def op(tx: _Tx) -> FingerView:
            conn = tx.conn
            exchanged = asker == address or await conn.fetchval(
                "SELECT 1 FROM exchanged WHERE a = $1 AND b = $2", *pair) is not None
            if await conn.fetchval("SELECT 1 FROM accounts WHERE address = $1",
                                   address) is None:
                return FingerView(None, False)
            return FingerView(await _device_records(conn, address), exchanged)

        return await self._submit(op)

    async def hold_pipe(self, device: bytes, message: PipeMessage, expires_at: float,
                        now: float, quota: PipeQuota) -> str | None:
        size = pipe_hold.cost(message.payload)

        async def op(tx: _Tx) -> str | None:
            conn = tx.conn
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PIPE_LOCK)
            await conn.execute("DELETE FROM pipe_held WHERE device = $1 AND expires_at <= $2",
                               device, now)
            dc, db, sc, sb = await conn.fetchrow(
                "SELECT count(*), COALESCE(sum(cost), 0), count(*) FILTER (WHERE sender = $1), "
                "COALESCE(sum(cost) FILTER (WHERE sender = $1), 0) "
                "FROM pipe_held WHERE device = $2", message.sender, device)
            total = await conn.fetchval("SELECT COALESCE(sum(cost), 0) FROM pipe_held")
            used = pipe_hold.HoldUsage(int(dc), int(db), int(sc), int(sb), int(total))
            if (why := pipe_hold.refusal(used, size, quota)) is not None:
                return why
            await conn.execute(
                "INSERT INTO pipe_held (device, sender, sender_device, payload, cost, "
                "expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                device, message.sender, message.sender_device, message.payload, size,
                expires_at)
            return None

        return await self._submit(op)

    async def take_pipes(self, device: bytes, now: float) -> list[PipeMessage]:
        async def op(tx: _Tx) -> list[PipeMessage]:
            rows = await tx.conn.fetch(
                "DELETE FROM pipe_held WHERE device = $1 "
                "RETURNING id, sender, sender_device, payload, expires_at", device)
            return [PipeMessage(r[1], bytes(r[2]), bytes(r[3]))
                    for r in sorted(rows, key=lambda r: int(r[0])) if r[4] > now]

        return await self._submit(op)

    async def reread_accounts(self, devices: list[bytes]) -> set[bytes]:
        """Nothing of accounts is cached across batches here; say which of `devices` are
        still bound."""
        async def op(tx: _Tx) -> set[bytes]:
            self._pairs = set()
            self._recent = RecentMessages()
            rows = await tx.conn.fetch(
                "SELECT peer_id FROM devices WHERE peer_id = ANY($1::bytea[])", devices)
            return {bytes(r[0]) for r in rows}

        return await self._submit(op)

    async def relay_usage(self, account: str, day: int) -> int:
        async def op(tx: _Tx) -> int:
            used = await tx.conn.fetchval(
                "SELECT used FROM relay_usage WHERE account = $1 AND day = $2", account, day)
            return 0 if used is None else int(used)

        return await self._submit(op)

    async def save_relay_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        accounts = sorted(usage)

        async def op(tx: _Tx) -> None:
            await tx.conn.execute(
                "INSERT INTO relay_usage (account, day, used) "
                "SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) "
                "ON CONFLICT (account) DO UPDATE SET day = excluded.day, used = excluded.used",
                accounts, [usage[a][0] for a in accounts], [usage[a][1] for a in accounts])

        await self._submit(op)

    async def set_advertise(self, device: bytes, advertise: dict[str, Any]) -> None:
        raw = packb(advertise)

        async def op(tx: _Tx) -> None:
            await tx.conn.execute("UPDATE devices SET advertise = $1 WHERE peer_id = $2",
                                  raw, device)

        await self._submit(op)

    async def touch(self, device: bytes, last_seen: float) -> None:
        async def op(tx: _Tx) -> None:
            await tx.conn.execute("UPDATE devices SET last_seen = $1 WHERE peer_id = $2",
                                  last_seen, device)

        await self._submit(op)

    async def expire(self, now: float) -> int:
        async def op(tx: _Tx) -> int:
            conn = tx.conn
            await tx.lock(r[0] for r in await conn.fetch(
                "SELECT DISTINCT recipient FROM envelopes WHERE expires_at <= $1", now))
            rows = await conn.fetch(
                "DELETE FROM envelopes WHERE expires_at <= $1 "
                "RETURNING sender, recipient, octet_length(blob), linked", now)
            await _count_out(tx, rows)
            await conn.execute("DELETE FROM invites WHERE expires_at <= $1", now)
            await conn.execute("DELETE FROM pipe_held WHERE expires_at <= $1", now)
            await conn.execute("DELETE FROM relay_usage WHERE day < $1", int(now // 86400))
            return len(rows)

        return await self._submit(op, alone=True)

    async def add_invite(self, address: str, token: str, now: float, expires_at: float) -> None:
        async def op(tx: _Tx) -> None:
            await tx.conn.execute("INSERT INTO invites VALUES ($1, $2, $3, $4, NULL)",
                                  token, address, now, expires_at)

        await self._submit(op)

    async def stats(self) -> StoreStats:
        return await self._submit(lambda tx: _stats(tx.conn))

    # --- federation ----------------------------------------------------------------------
    async def queue_outbound(self, sender: str, send: Send, now: float, expires_at: float,
                             max_queued: int) -> str | None:
        async def op(tx: _Tx) -> str | None:
            conn = tx.conn
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               _OUTBOUND_LOCK & 0x7FFFFFFF, sender)
            waiting = int(await conn.fetchval(
                "SELECT count(*) FROM outbound WHERE sender = $1 AND state = 'queued'",
                sender))
            if waiting + len(send.items) > max_queued:
                return (f"{sender} already has {waiting} envelopes waiting for other "
                        f"domains, limit {max_queued}")
            items = send.items
            await conn.execute(
                "INSERT INTO outbound (domain, mid, sender, recipient, device, prio, blob, "
                "queued_at, expires_at, state, updated_at) "
                "SELECT d, $2, $3, r, dev, $4, b, $5, $6, 'queued', $5 "
                "FROM unnest($1::text[], $7::text[], $8::bytea[], $9::bytea[]) "
                "AS t(d, r, dev, b) ON CONFLICT (device, mid) DO NOTHING",
                [_domain(i.to) for i in items], send.message_id, sender, send.priority, now,
                expires_at, [i.to for i in items], [i.device for i in items],
                [i.blob for i in items])
            return None

        return await self._submit(op)

    async def outbound_domains(self) -> list[str]:
        async def op(tx: _Tx) -> list[str]:
            return [r[0] for r in await tx.conn.fetch(
                "SELECT DISTINCT domain FROM outbound WHERE state = 'queued'")]

        return await self._submit(op)

    async def outbound_due(self, domain: str, after: int, limit: int) -> list[OutboundRow]:
        """The waiting rows no other instance holds, claimed for this one (`claimant`)
        for `outbound_claim` seconds on the database's clock: unclaimed rows, our own, and
        those whose claim lapsed (an instance that died or stalled). SKIP LOCKED passes
        over rows another instance is claiming in a transaction still open, so two
        instances draining one domain take disjoint rows. Each call renews our claims."""
        async def op(tx: _Tx) -> list[OutboundRow]:
            rows = await tx.conn.fetch(
                "UPDATE outbound SET claimed_by = $4, "
                "claim_until = now() + make_interval(secs => $5) "
                "WHERE id IN (SELECT id FROM outbound WHERE state = 'queued' "
                "AND domain = $1 AND id > $2 AND (claimed_by IS NULL OR claimed_by = $4 "
                "OR claim_until <= now()) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "RETURNING id, domain, mid, sender, recipient, device, prio, blob, expires_at",
                domain, after, limit, self.claimant, self.outbound_claim)
            if rows:
                self._claims_held = True
            return sorted((OutboundRow(int(r[0]), r[1], bytes(r[2]), r[3], r[4], bytes(r[5]),
                                       r[6], bytes(r[7]), r[8]) for r in rows),
                          key=lambda r: r.id)

        return await self._submit(op)

    async def _renew_claims(self) -> None:
        """Every third of `outbound_claim`, while this instance holds outbound claims,
        extend them (see the module text)."""
        async def op(tx: _Tx) -> None:
            renewed = await tx.conn.fetch(
                "UPDATE outbound SET claim_until = now() + make_interval(secs => $2) "
                "WHERE claimed_by = $1 AND state = 'queued' RETURNING id", self.claimant,
                self.outbound_claim)
            if not renewed:  # in the writer's order: an `outbound_due` after sets it again
                self._claims_held = False

        while not self._closing:
            await asyncio.sleep(self.outbound_claim / 3)
            if not self._claims_held or self._closing:
                continue
            try:
                await self._submit(op)
            except Exception as exc:  # a lost connection: the next round tries again
                if not self._closing:
                    log.warning(kv("store.claims_renewal_failed", error=repr(exc)[:300]))

    async def outbound_done(self, ids: list[int], state: str, reason: str | None,
                            now: float) -> None:
        if state not in ("delivered", "bounced"):
            raise ValueError(f"not a final outbound state: {state!r}")

        async def op(tx: _Tx) -> None:
            await tx.conn.execute(
                "UPDATE outbound SET state = $1, error = $2, blob = NULL, updated_at = $3 "
                "WHERE id = ANY($4::bigint[]) AND state = 'queued'", state, reason, now, ids)

        await self._submit(op)

    async def outbound_failed(self, domain: str, error: str, now: float) -> None:
        async def op(tx: _Tx) -> None:
            await tx.conn.execute(
                "UPDATE outbound SET since = COALESCE(since, $1), error = $2, updated_at = $1 "
                "WHERE state = 'queued' AND domain = $3", now, error[:500], domain)

        await self._submit(op)

    async def outbound_expire(self, now: float) -> int:
        async def op(tx: _Tx) -> int:
            conn = tx.conn
            rows = await conn.fetch(
                "UPDATE outbound SET state = 'bounced', blob = NULL, updated_at = $1, "
                "error = 'not delivered to ' || domain || ' before it expired (' || "
                "COALESCE(error, 'no attempt succeeded') || ')' "
                "WHERE state = 'queued' AND expires_at <= $1 RETURNING id", now)
            await conn.execute("DELETE FROM outbound WHERE state <> 'queued' AND "
                               "updated_at <= $1", now - FORWARD_MEMORY)
            await conn.execute("DELETE FROM forwarded_in WHERE at <= $1", now - FORWARD_MEMORY)
            return len(rows)

        return await self._submit(op)

    async def withdraw(self, sender: str, message_id: bytes) -> tuple[int, int]:
        async def op(tx: _Tx) -> tuple[int, int]:
            conn = tx.conn
            await tx.lock(r[0] for r in await conn.fetch(
                "SELECT DISTINCT recipient FROM envelopes WHERE mid = $1 AND sender = $2",
                message_id, sender))
            gone = await conn.fetch(
                "DELETE FROM envelopes WHERE mid = $1 AND sender = $2 "
                "RETURNING sender, recipient, octet_length(blob), linked", message_id, sender)
            await _count_out(tx, gone)
            out = await conn.fetch("DELETE FROM outbound WHERE sender = $1 AND mid = $2 AND "
                                   "state = 'queued' RETURNING id", sender, message_id)
            return len(gone), len(out)

        return await self._submit(op, alone=True)

    async def track(self, sender: str, message_id: bytes) -> list[OutboundState]:
        async def op(tx: _Tx) -> list[OutboundState]:
            rows = await tx.conn.fetch(
                "SELECT recipient, state, queued_at, since, error, updated_at FROM outbound "
                "WHERE sender = $1 AND mid = $2 ORDER BY recipient, id", sender, message_id)
            return per_recipient([OutboundState(*r) for r in rows])

        return await self._submit(op)


async def _count_out(tx: _Tx, rows: list[Any]) -> None:
    """Count deleted envelopes (sender, recipient, size, linked) out of the usage."""
    await tx.lock(r[1] for r in rows)
    await tx.load_pairs((r[0], r[1]) for r in rows)
    await tx.lock_domains(_domain(r[0]) for r in rows if r[3])
    for sender, recipient, size, linked in rows:
        tx.used(sender, recipient, -1, -int(size), bool(linked))


def _over_quota(tx: _Tx, sender: str, adding: dict[str, list[int]],
                quota: Quota) -> str | None:
    """The refusal text if adding [count, bytes] per recipient passes a quota, from the
    counters the transaction has locked."""
    return over_quota(sender, adding, quota, domains=tx.domains, usage=tx.usage,
                      pairs=tx.pairs)


async def _pending(conn: Any, device: bytes, after: int, upto: int, limit: int,
                   now: float) -> list[QueuedEnvelope]:
    rows = await conn.fetch(
        f"SELECT {ENVELOPE_COLUMNS} FROM envelopes WHERE device = $1 AND seq > $2 "
        "AND seq <= $3 AND expires_at > $4 ORDER BY seq LIMIT $5",
        device, after, upto, now, limit)
    return [queued_envelope(r) for r in rows]


async def _device_records(conn: Any, address: str) -> list[DeviceRecord]:
    rows = await conn.fetch("SELECT verify_key, peer_id, last_seen, advertise, vouch "
                            "FROM devices WHERE address = $1 ORDER BY added", address)
    return [DeviceRecord(bytes(vk), bytes(pid), seen,
                         load_advertise(None if adv is None else bytes(adv)),
                         None if vouch is None else bytes(vouch))
            for vk, pid, seen, adv, vouch in rows]


async def _stats(conn: Any) -> StoreStats:
    accounts = await conn.fetchval("SELECT count(*) FROM accounts")
    devices = await conn.fetchval("SELECT count(*) FROM devices")
    count, size = await conn.fetchrow(
        "SELECT count(*), COALESCE(sum(octet_length(blob)), 0) FROM envelopes")
    on_disk = await conn.fetchval("SELECT pg_database_size(current_database())")
    outbound = await conn.fetchval("SELECT count(*) FROM outbound WHERE state = 'queued'")
    return StoreStats(int(accounts), int(devices), int(count), int(size), int(on_disk),
                      int(outbound))


async def _register(conn: Any, address: str, verify_key: bytes, peer_id: bytes,
                    register: bool, invite: str | None, now: float,
                    policy: RegistrationPolicy, vouch: bytes | None) -> AuthOutcome | None:
    """Bind a new device (creating the account if needed), or say why not
    (`judge_registration`)."""
    found, verdict = await _judge(conn, address, verify_key, register, invite, now, policy,
                                  vouch)
    if verdict.refusal is not None:
        return verdict.refusal
    if not found.exists:
        await conn.execute("INSERT INTO accounts VALUES ($1, $2)", address, now)
        await conn.execute("INSERT INTO usage (address) VALUES ($1) ON CONFLICT DO NOTHING",
                           address)
    await conn.execute("INSERT INTO devices (peer_id, verify_key, address, added, vouch) "
                       "VALUES ($1, $2, $3, $4, $5)", peer_id, verify_key, address, now,
                       verdict.vouch)
    if verdict.invite_ok:
        await conn.execute("UPDATE invites SET used_by = $1 WHERE token = $2", peer_id, invite)
    return None


async def _judge(conn: Any, address: str, verify_key: bytes, register: bool,
                 invite: str | None, now: float, policy: RegistrationPolicy,
                 vouch: bytes | None) -> tuple[RegistrationFacts, RegistrationVerdict]:
    """What the database says about binding a new device, and the rules' verdict; reads
    only."""
    found = RegistrationFacts(
        exists=await conn.fetchval("SELECT 1 FROM accounts WHERE address = $1",
                                   address) is not None,
        invite=None if invite is None else await conn.fetchrow(
            "SELECT address, expires_at, used_by FROM invites WHERE token = $1", invite),
        device_keys=frozenset(bytes(r[0]) for r in await conn.fetch(
            "SELECT verify_key FROM devices WHERE address = $1", address)))
    return found, judge_registration(address, verify_key, register, invite, now, policy,
                                     vouch, found)


def _connection_lost(exc: BaseException) -> bool:
    import asyncpg

    # Anything but an error the server reported (a PostgresError: bad SQL, a deadlock, a
    # constraint) leaves the connection in doubt: closed, or mid-protocol.
    return not isinstance(exc, asyncpg.PostgresError) or isinstance(
        exc, asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.CannotConnectNowError | asyncpg.exceptions.AdminShutdownError)


async def migrate(url: str) -> tuple[int | None, list[pg_schema.Migration]]:
    """`peerpost-rendezvous migrate --store URL`: (version before, migrations applied)."""
    conn = await connect(url)
    try:
        before = await pg_schema.current_version(conn)
        return before, await pg_schema.migrate(conn)
    finally:
        await conn.close()


async def create_invite(url: str, address: str, token: str, now: float,
                        expires_at: float) -> None:
    """`peerpost-rendezvous invite --store URL`: record a single-use invite."""
    store = PgStore(url)
    await store.open()
    try:
        await store.add_invite(address, token, now, expires_at)
    finally:
        await store.aclose()


async def read_stats(url: str) -> StoreStats:
    """`peerpost-rendezvous stats --store URL`: counts straight from the database."""
    store = PgStore(url)
    await store.open()
    try:
        return await store.stats()
    finally:
        await store.aclose()


async def served_domain(url: str) -> str | None:
    """The domain the database was first served for (None: never served)."""
    conn = await connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL"):
            return None
        value: str | None = await conn.fetchval(
            "SELECT value FROM meta WHERE key = 'domain'")
        return value
    finally:
        await conn.close()
