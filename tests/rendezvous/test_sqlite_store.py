"""SqliteStore on a real file: registration rules, queue semantics, quotas, durability."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rendezvous.messages import Send, SendItem
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.store import EnqueueOutcome, Quota, RegistrationPolicy

from .conftest import ident, mid

OPEN = RegistrationPolicy(open_registration=True)
CLOSED = RegistrationPolicy(open_registration=False)
BIG = Quota(1000, 1 << 30)
BOB = ident(2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "rv.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def register(store: SqliteStore, n: int, address: str) -> None:
    out = await store.authenticate(address, ident(n).public.verify_key, register=True,
                                   invite=None, advertise=None, now=1.0, policy=OPEN, page=10)
    assert out.status == Status.OK, out.text


def send(message_id: bytes, *items: tuple[str, bytes, bytes]) -> Send:
    return Send(1, message_id, 0, tuple(SendItem(*i) for i in items))


async def test_registration_rules(store: SqliteStore) -> None:
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


async def test_send_is_all_or_nothing_and_idempotent(store: SqliteStore) -> None:
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


async def test_quota_counts_and_bytes(store: SqliteStore) -> None:
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


async def test_expiry_hides_and_then_drops(store: SqliteStore) -> None:
    await register(store, 2, "bob@example.net")
    m = mid()
    await store.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, b"x")),
                        10, 20, BIG)
    assert await store.retrieve(BOB.peer_id, m, 19) is not None
    assert await store.retrieve(BOB.peer_id, m, 20) is None
    assert await store.expire(25) == 1
    assert (await store.stats()).queued_envelopes == 0


async def test_group_commit_batches_concurrent_sends(store: SqliteStore) -> None:
    await register(store, 2, "bob@example.net")
    commits = store.commits
    outs = await asyncio.gather(*(
        store.enqueue("a@example.net", send(mid(), ("bob@example.net", BOB.peer_id, b"x")),
                      1, 100, BIG) for _ in range(300)))
    assert all(o.status == Status.OK for o in outs)
    assert store.commits - commits < 300  # several SENDs shared a commit
    seqs = [o.stored[0].seq for o in outs]
    assert seqs == sorted(seqs)  # acked in submission order


async def test_everything_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "rv.sqlite3"
    s = SqliteStore(path)
    await s.open()
    await register(s, 2, "bob@example.net")
    ids = [mid() for _ in range(5)]
    for m in ids:
        await s.enqueue("a@example.net", send(m, ("bob@example.net", BOB.peer_id, m)), 1, 1e12,
                        Quota(5, 1000))
    await s.aclose()
    s2 = SqliteStore(path)
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


async def test_a_failing_op_spoils_nothing_else_in_its_batch(store: SqliteStore) -> None:
    """The batch runs without savepoints; one op raising reruns it op by op, so the
    others keep their results and their writes, and the in-memory usage stays right."""
    await register(store, 2, "bob@example.net")
    m1, m2 = mid(), mid()
    quota = Quota(3, 1000)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    commits = store.commits
    outs = await asyncio.gather(
        store.enqueue("a@example.net", send(m1, ("bob@example.net", BOB.peer_id, b"one")), 1,
                      100, quota),
        store._submit(broken),
        store.enqueue("a@example.net", send(m2, ("bob@example.net", BOB.peer_id, b"two")), 1,
                      100, quota),
        return_exceptions=True)
    assert store.commits - commits == 1  # one batch
    assert isinstance(outs[0], EnqueueOutcome) and outs[0].status == Status.OK
    assert isinstance(outs[1], sqlite3.OperationalError)
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


async def test_removes_in_one_batch_are_exactly_once(store: SqliteStore) -> None:
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
