"""Several instances (`serve` processes) of one domain on one database.

An `InstanceBus` is what one instance needs to know of the others:

- **Identity.** Each instance has an id (random per start) and the host:port it is
  reached at (`--advertise`, else its listening address).
- **Shared presence with a lease.** The devices with a session on an instance are
  rows (device, instance); an instance renews its lease (`heartbeat_at`, the database's
  clock) every `heartbeat` seconds, and a row counts as online only while its instance's
  lease is younger than `lease` (3 heartbeats by default). A killed instance's devices so
  look offline within `lease` seconds; its rows are swept later.
- **Events between instances**, broadcast on one LISTEN/NOTIFY channel (a JSON batch of
  at most 7,000 bytes per notification, sent after the commit they announce):
  `e` an envelope (device, seq) was stored, so an instance with a session of that
  device reads it (all of a batch in one query on its listening connection) and pushes
  it; `p` PIPE messages were held for a device, so an instance with a session takes them
  (`Store.take_pipes`); `r` a relay invite for a device, naming the instance that hosts
  the splice (host, port and domain key); `s` an instance's events may have been lost
  (a failed publish, its connection opened again), so every instance re-reads;
  `a` an operator changed accounts or devices in the database (`accounts delete`,
  `devices revoke --store`, sent in the transaction that changed them, so it arrives
  after their commit), so every instance re-reads them and ends the sessions of devices
  no longer bound (`BusHost.reread_accounts`).
  Each instance ignores its own events and those for devices it has no session of.
  Measured on loopback (tests/rendezvous/test_instances_e2e.py, PostgreSQL without
  fsync, load average 4-6 on 2 cores): 2-6 ms median from a SEND on one instance to the
  push on the other, at most 35-90 ms.

Pushes stay exactly once per session. An envelope is stored by exactly one instance, which
pushes it to its own sessions; the others push it only from its `e` event, and only to
sessions whose queue flush did not cover it. Sequence numbers are not in commit order
across instances: an envelope committed by another instance just after a session read its
queue may have a seq below that session's `flush_hi`, so for a minute after a login
(server.py's `_LATE_COMMIT`) the server keeps the seqs the session was pushed at or below
`flush_hi`, and the flush and the events each push what the other has not. An event
that arrives while the device's authentication is still at the store is kept (the last
`RECENT` (device, seq) pairs) and replayed to the session once it is up (`session_up`).
A listener connection that drops loses notifications: after it reconnects, the instance
re-reads accounts, and the queue (above `flush_hi`) and held PIPE messages of every device
it has a session of, skipping the seqs it saw pushed (the last `RECENT`). It does the same on an
`s` event and when another instance's lease ends (it may have died between a commit and
its announcement).

`LocalBus` is the single-instance bus (SQLite): nothing is shared, presence is the
server's own sessions. `PgInstanceBus` is the PostgreSQL one (asyncpg); its tables
(`MIGRATIONS`) are a step of the store's versioned migrations (rendezvous/pg_schema.py),
so it starts after the store has opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crypto.address import format_hostport
from crypto.codec import Fields
from rendezvous.backoff import Backoff
from rendezvous.cliutil import counted
from rendezvous.logfmt import kv
from rendezvous.messages import RelayInvite
from rendezvous.store import ENVELOPE_COLUMNS, QueuedEnvelope, queued_envelope
from rendezvous.taskset import TaskSet, raise_if_cancelled

log = logging.getLogger("rendezvous.instances")

CHANNEL = "peerpost_bus"
MAX_PAYLOAD = 7000          # bytes of one NOTIFY payload (PostgreSQL's limit is 8000)
RECENT = 65_536             # (device, seq) pairs remembered for replay and rescan
RECENT_PER_DEVICE = 1024
DEAD_AFTER = 600.0          # seconds after its lease ended that an instance's rows go

# Schema of the instance tables, as (version, SQL) steps of the store's migrations.
MIGRATIONS: tuple[tuple[int, str], ...] = ((1, """
CREATE TABLE IF NOT EXISTS rv_instances (
    id text PRIMARY KEY,
    host text NOT NULL,
    port integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stats jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE TABLE IF NOT EXISTS rv_presence (
    device bytea NOT NULL,
    instance text NOT NULL REFERENCES rv_instances(id) ON DELETE CASCADE,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, instance)
);
CREATE INDEX IF NOT EXISTS rv_presence_instance ON rv_presence (instance);
"""),)


async def ensure_schema(conn: Any) -> None:
    """Create the instance tables where missing (for a database without the store)."""
    for _, sql in MIGRATIONS:
        await conn.execute(sql)


def new_instance_id() -> str:
    return secrets.token_hex(6)


class BusHost(Protocol):
    """What a bus needs of its server (`RendezvousServer` provides it)."""

    def bus_local_devices(self) -> list[bytes]:
        """Devices with a live session here."""
        ...

    async def bus_deliver(self, device: bytes, seqs: set[int] | None,
                          skip: set[int] | None = None, only: object | None = None) -> int:
        """Push stored envelopes of `device` to its sessions here: those in `seqs` (None:
        every queued one above each session's flush mark, except those in `skip`); only
        to the session `only` when given. Returns how many pushes went out."""
        ...

    def bus_push(self, device: bytes, queued: list[QueuedEnvelope],
                 only: object | None = None) -> int:
        """Push these envelopes of `device` (read by the bus) to its sessions here that
        have not had them; how many pushes went out."""
        ...

    async def bus_take_pipes(self, device: bytes) -> None:
        """Push the PIPE messages held for `device` to its sessions here."""
        ...

    def bus_relay_invite(self, device: bytes, invite: RelayInvite) -> bool:
        """Push `invite` to the sessions of `device` here; False when there is none."""
        ...

    def bus_stats(self) -> dict[str, Any]:
        """This instance's figures, kept with its lease for `stats`."""
        ...

    async def reread_accounts(self) -> int:
        """Re-read accounts and devices and end the sessions of devices no longer bound;
        how many sessions ended."""
        ...


class InstanceBus(Protocol):
    """How instances of one domain share presence and events (see the module text)."""

    instance: str
    address: tuple[str, int] | None
    shared: bool  # other instances may store envelopes for our sessions

    async def start(self, host: BusHost, address: tuple[str, int]) -> None: ...

    async def aclose(self) -> None: ...

    def session_up(self, device: bytes, flush_hi: int) -> set[int]:
        """A session of `device` is up here (its queue flush covers seq <= flush_hi);
        the seqs recently announced for it, to push to that session unless its flush had
        them."""
        ...

    def session_down(self, device: bytes) -> None:
        """The last session of `device` here ended."""
        ...

    def stored(self, queued: Sequence[QueuedEnvelope]) -> None:
        """Envelopes this instance stored (and pushed to its own sessions)."""
        ...

    async def online_elsewhere(self, devices: Sequence[bytes]) -> dict[bytes, str]:
        """Of `devices`, those with a session on another live instance: device -> id."""
        ...

    def pipes_held(self, devices: Iterable[bytes]) -> None:
        """PIPE messages were held for `devices`: an instance with a session takes them."""
        ...

    def relay_invite(self, device: bytes, invite: RelayInvite) -> None:
        """Push `invite` to the sessions of `device` on other instances."""
        ...

    def snapshot(self) -> dict[str, Any]: ...

    def instances(self) -> list[InstanceRow]:
        """The domain's instances as last read with the lease ([]: this one alone)."""
        ...


class LocalBus:
    """One instance alone (the SQLite store): nothing to share."""

    shared = False

    def __init__(self, instance: str = "local") -> None:
        # No random id: the simulator seeds what the code draws, and one alone needs none.
        self.instance = instance
        self.address: tuple[str, int] | None = None

    async def start(self, host: BusHost, address: tuple[str, int]) -> None:
        self.address = address

    async def aclose(self) -> None:
        return None

    def session_up(self, device: bytes, flush_hi: int) -> set[int]:
        return set()

    def session_down(self, device: bytes) -> None:
        return None

    def stored(self, queued: Sequence[QueuedEnvelope]) -> None:
        return None

    async def online_elsewhere(self, devices: Sequence[bytes]) -> dict[bytes, str]:
        return {}

    def pipes_held(self, devices: Iterable[bytes]) -> None:
        return None

    def relay_invite(self, device: bytes, invite: RelayInvite) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"instance": self.instance}

    def instances(self) -> list[InstanceRow]:
        return []


class _Recent:
    """The last (device, seq) pairs pushed or announced, bounded in total and per device."""

    def __init__(self, limit: int = RECENT, per_device: int = RECENT_PER_DEVICE) -> None:
        self.limit = limit
        self.per_device = per_device
        self._by_device: OrderedDict[bytes, deque[int]] = OrderedDict()
        self._size = 0

    def add(self, device: bytes, seq: int) -> None:
        seqs = self._by_device.get(device)
        if seqs is None:
            seqs = self._by_device[device] = deque(maxlen=self.per_device)
        else:
            self._by_device.move_to_end(device)
        if len(seqs) < self.per_device:
            self._size += 1
        seqs.append(seq)
        while self._size > self.limit:
            _, old = self._by_device.popitem(last=False)
            self._size -= len(old)

    def seqs(self, device: bytes) -> set[int]:
        return set(self._by_device.get(device, ()))


@dataclass(slots=True)
class _Outgoing:
    """Events waiting to be published (one batch per round trip)."""

    envelopes: list[tuple[bytes, int]]
    pipes: list[bytes]
    invites: list[tuple[bytes, RelayInvite]]
    rescan: bool = False  # events of ours were lost: every instance re-reads its queues
    accounts: bool = False  # accounts or devices changed: every instance re-reads them

    def __bool__(self) -> bool:
        return bool(self.envelopes or self.pipes or self.invites or self.rescan
                    or self.accounts)


def encode_events(origin: str, out: _Outgoing) -> list[str]:
    """NOTIFY payloads carrying `out`, each under `MAX_PAYLOAD` bytes."""
    items: list[list[Any]] = [["e", d.hex(), s] for d, s in out.envelopes]
    items += [["p", d.hex()] for d in out.pipes]
    items += [["r", d.hex(), i.sender, i.sender_device.hex(), i.session.hex(), i.host,
               i.port, (i.key or b"").hex()] for d, i in out.invites]
    if out.rescan:
        items.append(["s"])
    if out.accounts:
        items.append(["a"])
    payloads: list[str] = []
    head = f'{{"o":{json.dumps(origin)},"v":['
    batch: list[str] = []
    size = len(head) + 2
    for item in items:
        text = json.dumps(item, separators=(",", ":"))
        if batch and size + len(text) + 1 > MAX_PAYLOAD:
            payloads.append(head + ",".join(batch) + "]}")
            batch, size = [], len(head) + 2
        batch.append(text)
        size += len(text) + 1
    if batch:
        payloads.append(head + ",".join(batch) + "]}")
    return payloads


async def announce_accounts_changed(conn: Any) -> None:
    """Tell every instance (an `a` event) that accounts or devices changed; inside a
    transaction the notification goes out with its commit, and not at all on rollback."""
    (payload,) = encode_events("operator", _Outgoing([], [], [], accounts=True))
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


@dataclass(frozen=True, slots=True)
class Events:
    origin: str
    envelopes: list[tuple[bytes, int]]
    pipes: list[bytes]
    invites: list[tuple[bytes, RelayInvite]]
    rescan: bool
    accounts: bool = False


def decode_events(payload: str) -> Events:
    """The events of one NOTIFY payload; ValueError when it is not one of ours."""
    try:
        doc = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("o"), str) \
            or not isinstance(doc.get("v"), list):
        raise ValueError("not a bus event batch")
    envelopes: list[tuple[bytes, int]] = []
    pipes: list[bytes] = []
    invites: list[tuple[bytes, RelayInvite]] = []
    rescan = accounts = False
    for item in doc["v"]:
        if not isinstance(item, list) or not item or not isinstance(item[0], str):
            raise ValueError("malformed event")
        kind = item[0]
        if kind == "e" and len(item) == 3 and isinstance(item[2], int):
            envelopes.append((bytes.fromhex(item[1]), item[2]))
        elif kind == "p" and len(item) == 2:
            pipes.append(bytes.fromhex(item[1]))
        elif kind == "r" and len(item) == 8:
            _, dev, sender, sdev, session, host, port, key = item
            # The checks a client makes of a RELAY-INVITE (a DecodeError is a ValueError).
            invite = RelayInvite.decode(Fields(
                {"from": sender, "from_device": bytes.fromhex(sdev),
                 "session": bytes.fromhex(session), "host": host, "port": port,
                 "key": bytes.fromhex(key)}, "RELAY-INVITE"))
            invites.append((bytes.fromhex(dev), invite))
        elif kind == "s" and len(item) == 1:
            rescan = True
        elif kind == "a" and len(item) == 1:
            accounts = True
        else:
            raise ValueError(f"unknown event {kind!r}")
    return Events(doc["o"], envelopes, pipes, invites, rescan, accounts)


class PgInstanceBus:
    """The instances of a domain sharing one PostgreSQL database (module text).

    It keeps two connections of its own: one that only LISTENs, and one for presence,
    leases and publishing. `heartbeat` seconds between lease renewals; `lease` is how long
    an instance counts as alive after its last renewal.
    """

    def __init__(self, dsn: str, *, instance: str | None = None,
                 advertise: tuple[str, int] | None = None, heartbeat: float = 1.0,
                 lease: float | None = None) -> None:
        if heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        self.dsn = dsn
        self.instance = instance or new_instance_id()
        self.address: tuple[str, int] | None = advertise
        self.heartbeat = heartbeat
        self.lease = lease if lease is not None else 3 * heartbeat
        self.shared = True
        self._host: BusHost | None = None
        self._conn: Any = None       # asyncpg.Connection: presence, leases, publishing
        self._listener: Any = None   # asyncpg.Connection: LISTEN only
        self._lock = asyncio.Lock()  # one statement at a time on `_conn`
        self._listener_lock = asyncio.Lock()  # and on `_listener` (fetches, pings)
        self._tasks = TaskSet("instance-bus", logger=log)
        self._out = _Outgoing([], [], [])
        self._out_ready = asyncio.Event()
        self._presence_dirty: set[bytes] = set()
        self._presence_ready = asyncio.Event()
        self._local: set[bytes] = set()
        self._recent = _Recent()         # pushed or announced: skipped by a rescan
        self._announced = _Recent()      # announced by other instances: replayed at login
        self._fetch: dict[bytes, set[int]] = {}
        self._fetch_ready = asyncio.Event()
        self._listening = asyncio.Event()
        self._closed = False
        # counters
        self.published = 0
        self.received = 0
        self.pushed_remote = 0
        self.bad_events = 0
        self.listener_reconnects = 0
        self.rescans = 0
        self.accounts_rereads = 0
        self._instances: list[InstanceRow] = []
        self._owe_rescan = False
        self._alive: set[str] = set()
        self._presence_unread = False  # online_elsewhere's last read failed (warned once)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, host: BusHost, address: tuple[str, int]) -> None:
        import asyncpg

        from rendezvous.pg_store import redacted

        self._host = host
        if self.address is None:
            self.address = address
        self._conn = await self._connect()
        h, p = self.address
        try:
            await self._conn.execute(
                "INSERT INTO rv_instances (id, host, port) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET host = $2, port = $3, heartbeat_at = now()",
                self.instance, h, p)
            await self._listen()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # One line naming the database, as the store's errors are: PostgreSQL's refusal,
            # or the connection lost or timed out in the middle of a statement.
            raise RuntimeError(f"{redacted(self.dsn)}: {str(exc) or type(exc).__name__}") from None
        self._tasks.spawn(self._publisher(), name="bus-publish")
        self._tasks.spawn(self._presence_writer(), name="bus-presence")
        self._tasks.spawn(self._fetcher(), name="bus-fetch")
        self._tasks.spawn(self._heartbeats(), name="bus-heartbeat")
        log.info(kv("instance.up", instance=self.instance, host=h, port=p,
                    heartbeat=self.heartbeat, lease=self.lease))
        if h in ("0.0.0.0", "::", ""):
            log.warning(kv("instance.advertise_unspecified", host=h, note="relay callees "
                           "on other instances cannot reach this address: set --advertise "
                           "HOST:PORT"))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._tasks.aclose()
        with contextlib.suppress(Exception):
            if self._conn is not None:
                # Leaving cleanly: our sessions are offline at once, not after the lease.
                await asyncio.wait_for(self._conn.execute(
                    "DELETE FROM rv_instances WHERE id = $1", self.instance), 2.0)
        for conn in (self._listener, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        log.info(kv("instance.down", instance=self.instance))

    async def settle(self) -> None:
        """Write pending presence changes and publish pending events now."""
        dirty, self._presence_dirty = self._presence_dirty, set()
        await self._write_presence([d for d in dirty if d in self._local],
                                   [d for d in dirty if d not in self._local])
        out, self._out = self._out, _Outgoing([], [], [])
        if out:
            await self._publish(out)

    # --- the server's side -----------------------------------------------------------------
    def session_up(self, device: bytes, flush_hi: int) -> set[int]:
        self._local.add(device)
        self._presence_dirty.add(device)
        self._presence_ready.set()
        # Our own envelopes need no replay: above `flush_hi` we pushed them after this
        # login, at or below it our store's commit order put them in the flush.
        return self._announced.seqs(device)

    def session_down(self, device: bytes) -> None:
        self._local.discard(device)
        self._presence_dirty.add(device)
        self._presence_ready.set()

    def stored(self, queued: Sequence[QueuedEnvelope]) -> None:
        for q in queued:
            self._recent.add(q.envelope.device, q.seq)
            self._out.envelopes.append((q.envelope.device, q.seq))
        if queued:
            self._out_ready.set()

    def pipes_held(self, devices: Iterable[bytes]) -> None:
        self._out.pipes.extend(devices)
        self._out_ready.set()

    def relay_invite(self, device: bytes, invite: RelayInvite) -> None:
        self._out.invites.append((device, invite))
        self._out_ready.set()

    async def online_elsewhere(self, devices: Sequence[bytes]) -> dict[bytes, str]:
        """Which of `devices` have a session on another live instance. Nothing when the
        database can't say (its connection lost until the next heartbeat reconnects it,
        or the server down): a FINGER then answers with this instance's presence alone,
        as a server of one instance would, instead of failing. One warning per outage."""
        if not devices or self._conn is None:
            return {}
        try:
            async with self._lock:
                rows = await self._conn.fetch(
                    "SELECT p.device, p.instance FROM rv_presence p "
                    "JOIN rv_instances i ON i.id = p.instance "
                    "WHERE p.device = ANY($1::bytea[]) AND p.instance <> $2 "
                    "AND i.heartbeat_at > now() - make_interval(secs => $3)",
                    list(devices), self.instance, self.lease)
        except Exception as exc:
            if not self._presence_unread:
                self._presence_unread = True
                log.warning(kv("instance.presence_read_failed", error=str(exc) or repr(exc),
                               note="presence on other instances unknown until the "
                               "database answers again"))
            return {}
        self._presence_unread = False
        return {bytes(r["device"]): str(r["instance"]) for r in rows}

    def snapshot(self) -> dict[str, Any]:
        return {"instance": self.instance,
                "instance_address": format_hostport(*self.address) if self.address else None,
                "bus_published": self.published, "bus_received": self.received,
                "pushed_remote": self.pushed_remote, "bus_bad_events": self.bad_events,
                "bus_listener_reconnects": self.listener_reconnects}

    def instances(self) -> list[InstanceRow]:
        return list(self._instances)

    # --- listening -------------------------------------------------------------------------
    async def _connect(self) -> Any:
        """A connection to the database; one that fails is a RuntimeError or OSError naming
        it (serve prints it as its one line when the bus starts: the listeners are bound)."""
        from rendezvous.pg_store import connect

        return await connect(self.dsn)

    async def _listen(self) -> None:
        self._listener = await self._connect()
        self._listener.add_termination_listener(self._listener_lost)
        await self._listener.add_listener(CHANNEL, self._notified)
        self._listening.set()

    def _listener_lost(self, conn: Any) -> None:
        if self._closed or conn is not self._listener or not self._listening.is_set():
            return  # closing, an old listener, or this one's loss is seen already
        self._listening.clear()
        log.warning(kv("instance.listener_lost", instance=self.instance))
        self._tasks.spawn(self._relisten(), name="bus-relisten")

    async def _relisten(self) -> None:
        attempt = 0
        backoff = Backoff(0.1, 5.0, jitter=0.5)
        while not self._closed:
            attempt += 1
            try:
                await self._listen()
            except Exception as exc:
                log.warning(kv("instance.relisten_failed", instance=self.instance,
                               error=str(exc) or repr(exc), attempt=attempt))
                await asyncio.sleep(backoff.delay(attempt))
                continue
            self.listener_reconnects += 1
            log.info(kv("instance.relistened", instance=self.instance))
            await self._rescan()
            if self._host is not None:  # an `a` event may have been lost too
                await self._reread_accounts(self._host)
            return

    async def _rescan(self) -> None:
        """After notifications may have been lost: push what is queued and held."""
        host = self._host
        if host is None:
            return
        self.rescans += 1
        for device in host.bus_local_devices():
            try:
                await host.bus_deliver(device, None, skip=self._recent.seqs(device))
                await host.bus_take_pipes(device)
            except Exception as exc:
                log.warning(kv("instance.rescan_failed", error=str(exc) or repr(exc)))
                return

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            events = decode_events(payload)
        except (ValueError, TypeError) as exc:
            self.bad_events += 1
            log.warning(kv("instance.bad_event", error=str(exc)))
            return
        if events.origin == self.instance:
            return
        self.received += 1
        host = self._host
        for device, seq in events.envelopes:
            self._recent.add(device, seq)
            self._announced.add(device, seq)
            if device in self._local:
                self._fetch.setdefault(device, set()).add(seq)
                self._fetch_ready.set()
        for device in events.pipes:
            if device in self._local and host is not None:
                self._tasks.spawn(host.bus_take_pipes(device), name="bus-pipes")
        for device, invite in events.invites:
            if device in self._local and host is not None:
                host.bus_relay_invite(device, invite)
        if events.rescan:
            self._tasks.spawn(self._rescan(), name="bus-rescan")
        if events.accounts and host is not None:
            self._tasks.spawn(self._reread_accounts(host), name="bus-accounts")

    async def _reread_accounts(self, host: BusHost) -> None:
        self.accounts_rereads += 1
        try:
            ended = await host.reread_accounts()
        except Exception as exc:
            log.warning(kv("instance.accounts_reread_failed", error=str(exc) or repr(exc)))
            return
        log.info(kv("instance.accounts_reread", instance=self.instance,
                    sessions_ended=ended))

    async def _fetcher(self) -> None:
        """Read the announced envelopes of our devices, all of a batch in one query on
        the listening connection (the store's connection stays free for its writes),
        and push them."""
        while True:
            await self._fetch_ready.wait()
            self._fetch_ready.clear()
            batch, self._fetch = self._fetch, {}
            host = self._host
            if host is None or not batch:
                continue
            wanted = [s for seqs in batch.values() for s in seqs]
            try:
                async with self._listener_lock:
                    rows = await self._listener.fetch(
                        f"SELECT {ENVELOPE_COLUMNS} FROM envelopes "
                        "WHERE seq = ANY($1::bigint[]) ORDER BY seq", wanted)
            except Exception as exc:
                log.warning(kv("instance.fetch_failed", error=str(exc) or repr(exc),
                               envelopes=len(wanted)))
                for device, seqs in batch.items():  # through the store instead
                    with contextlib.suppress(Exception):
                        self.pushed_remote += await host.bus_deliver(device, seqs)
                continue
            by_device: dict[bytes, list[QueuedEnvelope]] = {}
            for row in rows:
                queued = queued_envelope(row)
                if queued.envelope.device in batch:
                    by_device.setdefault(queued.envelope.device, []).append(queued)
            for device, queued_list in by_device.items():
                self.pushed_remote += host.bus_push(device, queued_list)

    # --- writing ---------------------------------------------------------------------------
    async def _publisher(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready.clear()
            out, self._out = self._out, _Outgoing([], [], [])
            if not out:
                continue
            try:
                await self._publish(out)
            except Exception as exc:
                # The envelopes are stored; the next batch that goes out asks every
                # instance to re-read the queues of its sessions.
                log.warning(kv("instance.publish_failed", error=str(exc) or repr(exc),
                               events=len(out.envelopes) + len(out.pipes)
                               + len(out.invites)))
                self._owe_rescan = True

    async def _publish(self, out: _Outgoing) -> None:
        out.rescan = out.rescan or self._owe_rescan
        payloads = encode_events(self.instance, out)
        async with self._lock:
            await self._conn.execute("SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x",
                                     CHANNEL, payloads)
        self.published += len(payloads)
        if out.rescan:
            self._owe_rescan = False

    async def _presence_writer(self) -> None:
        while True:
            await self._presence_ready.wait()
            self._presence_ready.clear()
            dirty, self._presence_dirty = self._presence_dirty, set()
            up = [d for d in dirty if d in self._local]
            down = [d for d in dirty if d not in self._local]
            try:
                await self._write_presence(up, down)
            except Exception as exc:
                log.warning(kv("instance.presence_failed", error=str(exc) or repr(exc)))
                self._presence_dirty |= dirty
                await asyncio.sleep(self.heartbeat)
                self._presence_ready.set()

    async def _write_presence(self, up: list[bytes], down: list[bytes]) -> None:
        async with self._lock:
            if up:
                await self._conn.execute(
                    "INSERT INTO rv_presence (device, instance) "
                    "SELECT d, $2 FROM unnest($1::bytea[]) AS d ON CONFLICT DO NOTHING",
                    up, self.instance)
            if down:
                await self._conn.execute(
                    "DELETE FROM rv_presence WHERE instance = $2 AND device = ANY($1::bytea[])",
                    down, self.instance)

    async def _heartbeats(self) -> None:
        """Renew the lease with this instance's figures; sweep long-dead instances."""
        beats = 0
        while True:
            # Its SELECT 1 below waits under asyncio.wait_for, which can hand back the answer
            # instead of aclose()'s cancel: the loop went on and aclose waited for ever.
            raise_if_cancelled()
            await asyncio.sleep(self.heartbeat)
            host = self._host
            stats = host.bus_stats() if host is not None else {}
            stats.update(pushed_remote=self.pushed_remote, bus_published=self.published,
                         bus_received=self.received, lease=self.lease)
            try:
                async with self._lock:
                    found = await self._conn.fetchval(
                        "UPDATE rv_instances SET heartbeat_at = now(), stats = $2::jsonb "
                        "WHERE id = $1 RETURNING id", self.instance, json.dumps(stats))
                    if found is None:
                        # Swept as dead after a long stall: come back with our sessions.
                        await self._conn.execute(
                            "INSERT INTO rv_instances (id, host, port) VALUES ($1, $2, $3)",
                            self.instance, *(self.address or ("", 0)))
                        self._presence_dirty |= self._local
                        self._presence_ready.set()
                    beats += 1
                    if beats % 30 == 1:
                        await self._conn.execute(
                            "DELETE FROM rv_instances WHERE heartbeat_at < "
                            "now() - make_interval(secs => $1)", self.lease + DEAD_AFTER)
                    rows = await _instance_rows(self._conn, self.lease)
                    self._instances = rows
                    alive = {r.id for r in rows if r.alive}
                    if self._alive - alive - {self.instance}:
                        # An instance died, perhaps between a commit and its announcement.
                        self._tasks.spawn(self._rescan(), name="bus-rescan")
                    self._alive = alive
                if self._listener is not None and self._listening.is_set():
                    async with self._listener_lock:
                        await asyncio.wait_for(self._listener.fetchval("SELECT 1"),
                                               self.lease)
            except Exception as exc:
                log.warning(kv("instance.heartbeat_failed", error=str(exc) or repr(exc)))
                if self._conn is not None and self._conn.is_closed():
                    await self._reconnect()
                if self._listener is not None and self._listener.is_closed():
                    # asyncpg aborts a connection on a protocol error (PostgreSQL ending
                    # the session mid-statement) without calling termination listeners.
                    self._listener_lost(self._listener)

    async def _reconnect(self) -> None:
        """The main connection is gone: open another, renew the lease, restate presence."""
        try:
            conn = await self._connect()
            h, p = self.address or ("", 0)
            await conn.execute(
                "INSERT INTO rv_instances (id, host, port) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()", self.instance, h, p)
        except Exception as exc:
            log.warning(kv("instance.reconnect_failed", error=str(exc) or repr(exc)))
            return
        self._conn = conn
        self._presence_dirty |= self._local
        self._presence_ready.set()
        self._owe_rescan = True  # what we stored while cut off was announced to nobody
        self._out.rescan = True
        self._out_ready.set()
        log.info(kv("instance.reconnected", instance=self.instance))


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One instance as the database knows it, for `stats`."""

    id: str
    host: str
    port: int
    alive: bool
    started_at: float
    heartbeat_age: float
    sessions: int
    stats: dict[str, Any]


async def read_instances(dsn: str, lease: float = 3.0) -> list[InstanceRow]:
    """Every instance with rows in the database, live ones first."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await _instance_rows(conn, lease)
    finally:
        await conn.close()


async def _instance_rows(conn: Any, lease: float) -> list[InstanceRow]:
    rows = await conn.fetch(
        "SELECT i.id, i.host, i.port, extract(epoch FROM i.started_at)::float8 AS started, "
        "extract(epoch FROM now() - i.heartbeat_at)::float8 AS age, i.stats::text AS stats, "
        "(SELECT count(*) FROM rv_presence p WHERE p.instance = i.id) AS sessions "
        "FROM rv_instances i ORDER BY i.heartbeat_at DESC")
    out = []
    for r in rows:
        age = float(r["age"])
        try:
            stats = json.loads(r["stats"])
        except ValueError:
            stats = {}
        if not isinstance(stats, dict):
            stats = {}
        row_lease = stats.get("lease", lease)
        alive = age < (row_lease if isinstance(row_lease, int | float) else lease)
        out.append(InstanceRow(r["id"], r["host"], int(r["port"]), alive,
                               float(r["started"]), age, int(r["sessions"]),
                               stats))
    return out


def domain_totals(rows: Sequence[InstanceRow]) -> dict[str, int]:
    """Sums over the live instances: sessions, devices online, messages pushed."""
    keys = ("online_sessions", "online_devices", "sends", "delivered", "pushed_remote")
    live = [r for r in rows if r.alive]
    totals = {k: sum(int(r.stats.get(k, 0) or 0) for r in live) for k in keys}
    totals["instances_alive"] = len(live)
    totals["instances_dead"] = len(rows) - len(live)
    return totals


def make_bus(store: str | None, *, advertise: tuple[str, int] | None = None,
             heartbeat: float = 2.0) -> InstanceBus:
    """The bus `serve` uses: shared for a PostgreSQL store URL, else this instance alone."""
    if store is not None and store.startswith(("postgresql://", "postgres://")):
        return PgInstanceBus(store, advertise=advertise, heartbeat=heartbeat)
    return LocalBus()


def instances_report(rows: Sequence[InstanceRow]) -> dict[str, Any]:
    """What `stats --store` shows of the instances: each one, and the domain's totals."""
    return {
        "instances": [{
            "id": r.id, "address": format_hostport(r.host, r.port), "alive": r.alive,
            "lease_renewed_s_ago": round(r.heartbeat_age, 1), "devices": r.sessions,
            "sessions": int(r.stats.get("online_sessions", 0) or 0),
            **{k: int(r.stats.get(k, 0) or 0) for k in (
                "sends", "delivered", "pushed_remote")}}
            for r in rows],
        "domain": domain_totals(rows),
    }


def instances_lines(report: dict[str, Any]) -> list[str]:
    """`instances_report` as text, one line per instance, then the domain's."""
    lines = []
    for i in report["instances"]:
        state = "alive" if i["alive"] else f"lease expired {i['lease_renewed_s_ago']:g} s ago"
        lines.append(f"instance {i['id']} at {i['address']} ({state}): "
                     f"{counted(i['devices'], 'device')} in "
                     f"{counted(i['sessions'], 'session')}, {counted(i['sends'], 'message')} "
                     f"in, {i['delivered']} pushed ({i['pushed_remote']} stored by other "
                     "instances)")
    d = report["domain"]
    lines.append(f"domain: {counted(d['instances_alive'], 'instance')} alive, "
                 f"{d['instances_dead']} expired; {counted(d['online_devices'], 'device')} in "
                 f"{counted(d['online_sessions'], 'session')}, "
                 f"{counted(d['sends'], 'message')} in, {d['delivered']} pushed")
    return lines
