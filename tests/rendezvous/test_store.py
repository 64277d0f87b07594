"""The `Store` conformance suite, run once per backend: SqliteStore on a real file and
PgStore on a real PostgreSQL (tests/pgtest.py). Registration rules, queue semantics,
quotas, group commit, exactly-once removal, durability across reopening."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rendezvous.messages import PipeMessage, Send, SendItem
from rendezvous.pg_store import PgStore
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.store import EnqueueOutcome, PipeQuota, Quota, RegistrationPolicy

from .conftest import ident, mid

OPEN = RegistrationPolicy(open_registration=True)
CLOSED = RegistrationPolicy(open_registration=False)
BIG = Quota(1000, 1 << 30)
BOB = ident(2)


AnyStore = SqliteStore | PgStore


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], AnyStore]:
    """A factory of stores on one database of the backend (a new store object per call,
    as after a restart)."""
    if request.param == "sqlite":
        path = tmp_path / "rv.sqlite3"
        return lambda: SqliteStore(path)
    url = request.getfixturevalue("pg_url")
    return lambda: PgStore(url)


@pytest.fixture
async def store(make_store: Callable[[], AnyStore]) -> AsyncIterator[AnyStore]:
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def register(store: AnyStore, n: int, address: str) -> None:
    out = await store.authenticate(address, ident(n).public.verify_key, register=True,
                                   invite=None, advertise=None, now=1.0, policy=OPEN, page=10)
    assert out.status == Status.OK, out.text


def send(message_id: bytes, *items: tuple[str, bytes, bytes]) -> Send:
    return Send(1, message_id, 0, tuple(SendItem(*i) for i in items))


async def test_registration_rules(store: AnyStore) -> None:
    key = ident(1).public.verify_key
    auth = store.authenticate
    r = await auth("a@example.net", key, register=False, invite=None, advertise=None, now=1,
                   policy=OPEN, page=1)
    assert (r.status, r.text) == (401, "no account a@example.net: register with an invite first")
    r = await auth("a@example.net", key, register=True, invite=None, advertise=None, now=1,
                   policy=CLOSED, page=1)
    assert r.status == Status.FORBIDDEN and "needs an invite" in r.text
    await store.add_invite("a@example.net", "tok", 1, 100)
    r = await auth("a@example.net", key, register=True, invite="wrong", advertise=None, now=1,
                   policy=CLOSED, page=1)
    assert r.status == Status.FORBIDDEN and "invite is not valid" in r.text
    r = await auth("a@example.net", key, register=True, invite="tok", advertise=None, now=2,
                   policy=CLOSED, page=1)
    assert r.status == Status.OK and r.created
    # a second device needs its own invite; the used one is spent
    key2 = ident(3).public.verify_key
    r = await auth("a@example.net", key2, register=True, invite="tok", advertise=None, now=3,
                   policy=OPEN, page=1)
    assert r.status == Status.FORBIDDEN and "invite is not valid" in r.text
    r = await auth("a@example.net", key2, register=True, invite=None, advertise=None, now=3,
                   policy=OPEN, page=1)
    assert r.status == Status.FORBIDDEN and "needs an invite" in r.text
    # the same key can't be another address
    r = await auth("b@example.net", key, register=True, invite=None, advertise=None, now=3,
                   policy=OPEN, page=1)
    assert r.status == Status.FORBIDDEN and "bound to another address" in r.text
    # an expired invite is refused
    await store.add_invite("c@example.net", "old", 1, 5)
    r = await auth("c@example.net", key2, register=True, invite="old", advertise=None, now=6,
                   policy=CLOSED, page=1)
    assert r.status == Status.FORBIDDEN


async def test_a_login_that_records_nothing(store: AnyStore) -> None:
    """`record=False` (the server's disk is full): a known device gets in with its queued
    mail and nothing about it changes; a new one is refused with the reason."""
    await register(store, 2, "bob@example.net")
    key = ident(2).public.verify_key
    before = await store.devices("bob@example.net")
    r = await store.authenticate("bob@example.net", key, register=False, invite=None,
                                 advertise={"addrs": ["192.0.2.7:4000"], "nat": False},
                                 now=50.0, policy=OPEN, page=10, record=False)
    assert r.status == Status.OK and not r.created
    assert await store.devices("bob@example.net") == before  # last seen 1.0, no advert
    r = await store.authenticate("new@example.net", ident(5).public.verify_key, register=True,
                                 invite=None, advertise=None, now=50.0, policy=OPEN, page=10,
                                 record=False)
    assert (r.status, r.text) == (Status.UNAVAILABLE,
                                  "the server's storage is full: try again later")
    assert await store.devices("new@example.net") is None


async def test_a_login_that_records_nothing_still_refuses_what_the_rules_refuse(
        store: AnyStore) -> None:
    """`record=False`: a device the server would refuse anyway (not bound, as a revoked
    one is not; no invite on a closed server) gets that refusal, not the full disk's 503,
    which a node takes as 'try again later' and retries for as long as the disk is full."""
    await register(store, 2, "bob@example.net")
    r = await store.authenticate("bob@example.net", ident(3).public.verify_key,
                                 register=False, invite=None, advertise=None, now=50.0,
                                 policy=OPEN, page=10, record=False)
    assert (r.status, r.text) == (Status.UNAUTHORIZED,
                                  "this device is not bound to bob@example.net")
    r = await store.authenticate("new@example.net", ident(5).public.verify_key,
                                 register=True, invite=None, advertise=None, now=50.0,
                                 policy=CLOSED, page=10, record=False)
    assert r.status == Status.FORBIDDEN and "needs an invite" in r.text
    assert await store.devices("new@example.net") is None


async def test_send_is_all_or_nothing_and_idempotent(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    m = mid()
    bad = send(m, ("bob@example.net", BOB.peer_id, b"1"), ("nobody@example.net", bytes(20), b"2"))
    out = await store.enqueue("a@example.net", bad, 1, 100, BIG)
    assert (out.status, out.text) == (404, "no such address: nobody@example.net")
    wrong_dev = send(m, ("bob@example.net", bytes(20), b"1"))
    out = await store.enqueue("a@example.net", wrong_dev, 1, 100, BIG)
    assert out.status == 404 and "is not bound to bob@example.net" in out.text
    assert (await store.stats()).queued_envelopes == 0
    good = send(m, ("bob@example.net", BOB.peer_id, b"sealed"))
    first = await store.enqueue("a@example.net", good, 1, 100, BIG)
    again = await store.enqueue("a@example.net", good, 2, 100, BIG)
    assert first.status == again.status == Status.OK
    assert len(first.stored) == 1 and again.stored == ()
    (q,) = await store.pending(BOB.peer_id, 0, 1 << 62, 10, 1)
    assert q.envelope.blob == b"sealed" and q.envelope.sender == "a@example.net"


async def test_quota_counts_and_bytes(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    quota = Quota(2, 10)
    for blob in (b"12345", b"1234"):
        out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                                blob)), 1, 100, quota)
        assert out.status == Status.OK
    out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"1")), 1, 100, quota)
    assert out.status == Status.QUOTA
    assert out.text == "quota exceeded for bob@example.net: 2 envelopes / 9 bytes queued, " \
                       "limit 2 / 10"
    (first, *_) = await store.pending(BOB.peer_id, 0, 1 << 62, 10, 1)
    assert await store.remove(BOB.peer_id, first.envelope.message_id)
    assert not await store.remove(BOB.peer_id, first.envelope.message_id)
    out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"1")), 1, 100, quota)
    assert out.status == Status.OK


async def test_expiry_hides_and_then_drops(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    m = mid()
    await store.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, b"x")),
                        10, 20, BIG)
    assert await store.retrieve(BOB.peer_id, m, 19) is not None
    assert await store.retrieve(BOB.peer_id, m, 20) is None
    assert await store.expire(25) == 1
    assert (await store.stats()).queued_envelopes == 0


async def test_group_commit_batches_concurrent_sends(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    commits = store.commits
    outs = await asyncio.gather(*(
        store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id, b"x")),
                      1, 100, BIG) for _ in range(300)))
    assert all(o.status == Status.OK for o in outs)
    assert store.commits - commits < 300  # several SENDs shared a commit
    seqs = [o.stored[0].seq for o in outs]
    assert seqs == sorted(seqs)  # acked in submission order


async def test_everything_survives_reopening(make_store: Callable[[], AnyStore]) -> None:
    s = make_store()
    await s.open()
    await register(s, 2, "bob@example.net")
    ids = [mid() for _ in range(5)]
    for m in ids:
        await s.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, m)), 1, 1e12,
                        Quota(5, 1000))
    await s.aclose()
    s2 = make_store()
    await s2.open()
    try:
        got = await s2.pending(BOB.peer_id, 0, 1 << 62, 100, 2)
        assert [q.envelope.message_id for q in got] == ids
        # usage was reloaded: the quota is still full
        out = await s2.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                             b"x")), 1, 1e12, Quota(5, 1000))
        assert out.status == Status.QUOTA
    finally:
        await s2.aclose()


async def test_a_failing_op_spoils_nothing_else_in_its_batch(store: AnyStore) -> None:
    """The batch runs without savepoints; one op raising reruns it op by op, so the
    others keep their results and their writes, and the in-memory usage stays right."""
    await register(store, 2, "bob@example.net")
    m1, m2 = mid(), mid()
    quota = Quota(3, 1000)

    def broken_sqlite(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    async def broken_pg(tx: Any) -> None:
        await tx.conn.execute("INSERT INTO no_such_table VALUES (1)")

    commits = store.commits
    broken = (store._submit(broken_sqlite) if isinstance(store, SqliteStore)
              else store._submit(broken_pg))
    outs = await asyncio.gather(
        store.enqueue("a@example.net", send(m1, ("bob@example.net", BOB.peer_id, b"one")), 1,
                      100, quota),
        broken,
        store.enqueue("a@example.net", send(m2, ("bob@example.net", BOB.peer_id, b"two")), 1,
                      100, quota),
        return_exceptions=True)
    if isinstance(store, SqliteStore):
        assert store.commits - commits == 1  # one batch, savepoints
        assert isinstance(outs[1], sqlite3.OperationalError)
    else:
        assert store.rollbacks == 1  # one batch, rolled back, then each op alone
        assert type(outs[1]).__name__ == "UndefinedTableError"
    assert isinstance(outs[0], EnqueueOutcome) and outs[0].status == Status.OK
    assert isinstance(outs[2], EnqueueOutcome) and outs[2].status == Status.OK
    got = await store.pending(BOB.peer_id, 0, 1 << 62, 10, 1)
    assert [q.envelope.blob for q in got] == [b"one", b"two"]
    # usage counts exactly the two stored: one more fits the quota of 3, then no more
    out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"3")), 1, 100, quota)
    assert out.status == Status.OK
    out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"4")), 1, 100, quota)
    assert out.status == Status.QUOTA


async def test_removes_in_one_batch_are_exactly_once(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    ids = [mid() for _ in range(20)]
    for m in ids:
        await store.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, b"x")), 1,
                            100, BIG)
    commits = store.commits
    removed = await asyncio.gather(*(store.remove(BOB.peer_id, m) for m in ids + ids))
    assert store.commits - commits < 40  # they shared commits
    assert removed == [True] * 20 + [False] * 20
    assert (await store.stats()).queued_envelopes == 0


async def test_per_sender_quota_and_exchanged_pairs(store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    await register(store, 3, "carol@example.net")
    carol = ident(3)
    quota = Quota(10, 1000, sender_count=2, sender_bytes=100)
    for _ in range(2):
        out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                                b"x")), 1, 100, quota)
        assert out.status == Status.OK
    out = await store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"x")), 1, 100, quota)
    assert out.status == Status.QUOTA
    assert out.text == ("quota exceeded for bob@example.net from a@example.net: 2 envelopes / "
                        "2 bytes of yours queued there, limit 2 / 100 per sender")
    # another sender still fits; one message to two recipients makes them co-recipients
    both = send(mid(), ("bob@example.net", BOB.peer_id, b"y"),
                ("carol@example.net", carol.peer_id, b"y"))
    assert (await store.enqueue("d@example.net", both, 1, 100, quota)).status == Status.OK
    assert (await store.finger("bob@example.net", "carol@example.net")).exchanged
    assert (await store.finger("bob@example.net", "d@example.net")).devices is None
    assert not (await store.finger("carol@example.net", "a@example.net")).exchanged
    view = await store.finger("a@example.net", "bob@example.net")
    assert view.exchanged and view.devices is not None and len(view.devices) == 1


async def test_pipe_hold_bounds_and_take(store: AnyStore) -> None:
    quota = PipeQuota(per_device=3, bytes_per_device=10_000, per_sender=2,
                      bytes_per_sender=10_000, total_bytes=1_000_000)
    dev = BOB.peer_id
    for n in range(2):
        msg = PipeMessage("a@example.net", bytes(20), b"offer%d" % n)
        assert await store.hold_pipe(dev, msg, 100.0, 1.0, quota) is None
    third = PipeMessage("a@example.net", bytes(20), b"offer2")
    assert "from you already held" in (await store.hold_pipe(dev, third, 100.0, 1.0, quota)
                                       or "")
    assert await store.hold_pipe(dev, PipeMessage("c@example.net", bytes(20), b"c"), 5.0, 1.0,
                                 quota) is None
    taken = await store.take_pipes(dev, 6.0)  # the one of c@ expired at 5.0
    assert [m.payload for m in taken] == [b"offer0", b"offer1"]
    assert await store.take_pipes(dev, 6.0) == []


async def test_outbound_queue_withdraw_and_track(store: AnyStore) -> None:
    far = send(mid(), ("x@far.test", bytes(20), b"1"), ("y@far.test", bytes([1]) * 20, b"2"))
    assert await store.queue_outbound("a@example.net", far, 1.0, 50.0, 10) is None
    assert await store.queue_outbound("a@example.net", far, 1.0, 50.0, 10) is None  # retried
    refused = await store.queue_outbound(
        "a@example.net", send(mid(), ("z@far.test", bytes([2]) * 20, b"3")), 1.0, 50.0, 2)
    assert refused == ("a@example.net already has 2 envelopes waiting for other domains, "
                       "limit 2")
    assert await store.outbound_domains() == ["far.test"]
    due = await store.outbound_due("far.test", 0, 10)
    assert [r.recipient for r in due] == ["x@far.test", "y@far.test"]
    await store.outbound_done([due[0].id], "delivered", None, 2.0)
    await store.outbound_failed("far.test", "no route", 3.0)
    states = {s.recipient: s for s in await store.track("a@example.net", far.message_id)}
    assert states["x@far.test"].state == "delivered"
    assert states["y@far.test"].state == "queued" and states["y@far.test"].error == "no route"
    assert await store.outbound_expire(60.0) == 1
    bounced = {s.recipient: s for s in await store.track("a@example.net", far.message_id)}
    assert bounced["y@far.test"].state == "bounced"
    assert "before it expired (no route)" in (bounced["y@far.test"].error or "")
    # withdraw takes back what is still queued here and waiting outbound
    await register(store, 2, "bob@example.net")
    m = mid()
    await store.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, b"q")), 1,
                        100, BIG)
    await store.queue_outbound("a@example.net", send(m, ("w@far.test", bytes(20), b"w")), 1.0,
                               50.0, 10)
    assert await store.withdraw("a@example.net", m) == (1, 1)
    assert await store.withdraw("a@example.net", m) == (0, 0)
    assert (await store.stats()).queued_envelopes == 0


async def test_forwarded_envelopes_are_stored_once_and_count_per_domain(
        store: AnyStore) -> None:
    await register(store, 2, "bob@example.net")
    quota = Quota(100, 1 << 20, domain_count=2, domain_bytes=1 << 20)
    m = mid()
    fwd = send(m, ("bob@example.net", BOB.peer_id, b"f"))
    first = await store.enqueue_forwarded("x@far.test", fwd, 1, 100, quota)
    assert first.status == Status.OK and len(first.stored) == 1
    assert await store.remove(BOB.peer_id, m)
    again = await store.enqueue_forwarded("x@far.test", fwd, 2, 100, quota)
    assert again.status == Status.OK and again.stored == ()  # downloaded and removed: once
    for _ in range(2):
        out = await store.enqueue_forwarded(
            "y@far.test", send(mid(), ("bob@example.net", BOB.peer_id, b"g")), 3, 100, quota)
        assert out.status == Status.OK
    over = await store.enqueue_forwarded(
        "z@far.test", send(mid(), ("bob@example.net", BOB.peer_id, b"h")), 3, 100, quota)
    assert over.status == Status.QUOTA and "mail from far.test: 2 envelopes" in over.text


async def test_relay_usage_and_expiry_of_days(store: AnyStore) -> None:
    await store.save_relay_usage({"a@example.net": (10, 500), "b@example.net": (9, 7)})
    assert await store.relay_usage("a@example.net", 10) == 500
    assert await store.relay_usage("a@example.net", 11) == 0
    await store.save_relay_usage({"a@example.net": (11, 5)})
    assert await store.relay_usage("a@example.net", 11) == 5
    await store.expire(11 * 86400.0)
    assert await store.relay_usage("b@example.net", 9) == 0


async def test_two_instances_share_one_quota(pg_url: str) -> None:
    """Two PgStores on one database (two server instances): concurrent SENDs to one
    recipient from both never pass its quota, and each envelope is removed once."""
    a, b = PgStore(pg_url), PgStore(pg_url)
    await a.open()
    await b.open()
    try:
        await register(a, 2, "bob@example.net")
        quota = Quota(25, 1 << 20)
        outs = await asyncio.gather(*(
            s.enqueue(f"s{n}@example.net", send(mid(), ("bob@example.net", BOB.peer_id, b"x")),
                      1, 100, quota) for n in range(30) for s in (a, b)))
        stored = [o.stored[0].envelope.message_id for o in outs if o.status == Status.OK]
        assert len(stored) == 25
        assert sum(o.status == Status.QUOTA for o in outs) == 35
        removed = await asyncio.gather(*(s.remove(BOB.peer_id, m) for m in stored
                                         for s in (a, b)))
        assert sum(removed) == 25
        out = await b.enqueue("s@example.net", send(mid(), ("bob@example.net", BOB.peer_id,
                                                            b"x")), 1, 100, quota)
        assert out.status == Status.OK  # the quota was given back exactly
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_lost_database_connection_acks_nothing_and_the_next_batch_reconnects(
        pg_url: str) -> None:
    import asyncpg

    store = PgStore(pg_url)
    await store.open()
    try:
        await register(store, 2, "bob@example.net")
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        m = mid()
        item = send(m, ("bob@example.net", BOB.peer_id, b"x"))
        # The store may notice the dead connection before the batch (and reconnect) or in
        # it (the SEND fails: not acknowledged). Either way the client's retry stores it
        # exactly once.
        try:
            first = await store.enqueue("a@example.net", item, 1, 100, BIG)
        except Exception:  # whichever way asyncpg reports the dead session
            first = None
        out = await store.enqueue("a@example.net", item, 1, 100, BIG)  # the client's retry
        assert out.status == Status.OK
        assert len(out.stored) == (1 if first is None else 0)
        assert [q.envelope.message_id for q in
                await store.pending(BOB.peer_id, 0, 1 << 62, 10, 1)] == [m]
    finally:
        await store.aclose()
