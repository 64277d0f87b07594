"""ChunkScheduler properties, SourcePace, and the upload token bucket."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transfer import scheduler
from overlay.transfer.pacing import SourcePace
from overlay.transfer.scheduler import Arrival, ChunkScheduler
from rendezvous.limits import TokenBucket

SOURCES = ["a", "b", "c", "d"]
OPS = ["add", "have", "request", "receive", "stray", "store", "reject", "fail", "lack",
       "remove", "opened"]
ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.sampled_from(SOURCES), st.integers(0, 40)),
    max_size=250,
)


class Model:
    """What the scheduler should believe, kept the obvious way."""

    def __init__(self, n: int, windows: list[int]) -> None:
        self.n = n
        self.windows = dict(zip(SOURCES, windows, strict=True))
        self.pool = set(range(n))
        self.requesters: dict[int, set[str]] = {}
        self.verifying: set[int] = set()
        self.stored: set[int] = set()
        self.has: dict[str, set[int] | None] = {}
        self.lacks: dict[str, set[int]] = {}
        self.asked: dict[str, set[int]] = {}
        self.unopened: set[str] = set()  # added as of a full holder before its OPENED

    def requested(self, sid: str) -> set[int]:
        return {i for i, who in self.requesters.items() if sid in who}

    def can_give(self, sid: str, i: int) -> bool:
        h = self.has[sid]
        return (h is None or i in h) and i not in self.lacks[sid]

    def avail(self, i: int) -> int:
        return sum(1 for h in self.has.values() if h is not None and i in h)

    def back_to_pool(self, i: int, sid: str) -> None:
        who = self.requesters.get(i)
        if who is not None and sid in who:
            who.discard(sid)
            if not who:
                del self.requesters[i]
                self.pool.add(i)


def initial_have(sid: str, n: int) -> set[int] | None:
    # "a" and "b" hold everything; "c" starts with the even chunks, "d" with nothing.
    return None if sid in "ab" else ({i for i in range(n) if i % 2 == 0} if sid == "c"
                                     else set())


def bitmap(chunks: set[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in chunks:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 30), script=ops, seed=st.integers(0, 3),
       windows=st.lists(st.integers(1, 5), min_size=4, max_size=4))
def test_every_chunk_is_in_exactly_one_place(n: int, script: list[tuple[str, str, int]],
                                             seed: int, windows: list[int]) -> None:
    """Rarest first, windows and holdings respected, duplicates only once the pool is
    empty and at most two per chunk, late copies told from unasked ones."""
    check_script(n, script, seed, windows)


def check_script(n: int, script: list[tuple[str, str, int]], seed: int,
                 windows: list[int]) -> None:
    sched = ChunkScheduler(range(n), count=n, rng=random.Random(seed))
    m = Model(n, windows)
    for op, sid, k in script:
        present = sid in m.has
        if op == "add" and not present:
            h = initial_have(sid, n)
            if h is not None and k % 2:  # its first GETs go before its OPENED says
                h = None
                m.unopened.add(sid)
            sched.add_source(sid, window=m.windows[sid],
                             have=None if h is None else bitmap(h, n))
            m.has[sid], m.lacks[sid], m.asked[sid] = h, set(), set()
        elif op == "opened" and sid in m.unopened:
            h = initial_have(sid, n)
            assert h is not None
            sched.set_have(sid, bitmap(h, n))  # what it asked stays asked
            m.has[sid] = h
            m.unopened.discard(sid)
        elif op == "have" and present:
            h = m.has[sid]
            useful = sched.add_have(sid, [k % n])
            if h is not None:
                assert useful == ((k % n) not in h and k % n not in m.stored
                                  and k % n not in m.verifying)
                h.add(k % n)
        elif op == "request":
            pool_before = set(m.pool)
            i = sched.next_request(sid)
            if not present or len(m.requested(sid)) >= m.windows[sid]:
                assert i is None
                continue
            givable = [j for j in pool_before if m.can_give(sid, j)]
            if i is None:
                assert not givable, "nothing it can give in the pool"
                if not pool_before and len(m.requested(sid)) < 2:
                    assert not [j for j, who in m.requesters.items()
                                if len(who) == 1 and sid not in who and m.can_give(sid, j)]
                continue
            assert m.can_give(sid, i) and sid not in m.requesters.get(i, set())
            if i in pool_before:
                assert m.avail(i) == min(m.avail(j) for j in givable), "rarest first"
                m.pool.discard(i)
                m.requesters[i] = {sid}
            else:
                assert not pool_before, "a duplicate only in the endgame"
                assert len(m.requested(sid)) < 2, "only for a source about to run dry"
                assert len(m.requesters[i]) == 1, "at most two requesters per chunk"
                m.requesters[i].add(sid)
            m.asked[sid].add(i)
        elif op == "receive" and present and m.requested(sid):
            i = sorted(m.requested(sid))[k % len(m.requested(sid))]
            status, others = sched.chunk_received(sid, i)
            assert status is Arrival.ACCEPTED
            assert set(others) == m.requesters.pop(i) - {sid}
            m.verifying.add(i)
        elif op == "stray":
            i = k % n
            status, others = sched.chunk_received(sid, i)
            if present and sid in m.requesters.get(i, set()):
                assert status is Arrival.ACCEPTED
                assert set(others) == m.requesters.pop(i) - {sid}
                m.verifying.add(i)
            elif present and i in m.asked[sid] and i in m.pool and m.can_give(sid, i):
                assert (status, others) == (Arrival.ACCEPTED, [])
                m.pool.discard(i)
                m.verifying.add(i)
            elif present and i in m.asked[sid]:
                assert status is Arrival.LATE
            else:
                assert status is Arrival.UNASKED, "never asked of it: a ban"
        elif op == "store" and m.verifying:
            i = sorted(m.verifying)[k % len(m.verifying)]
            sched.chunk_stored(i)
            m.verifying.discard(i)
            m.stored.add(i)
        elif op == "reject" and m.verifying:
            i = sorted(m.verifying)[k % len(m.verifying)]
            sched.chunk_rejected(i)
            m.verifying.discard(i)
            m.pool.add(i)
        elif op in ("fail", "lack") and present and m.requested(sid):
            i = sorted(m.requested(sid))[k % len(m.requested(sid))]
            sched.chunk_failed(sid, i, lacks=op == "lack")
            m.back_to_pool(i, sid)
            if op == "lack":
                m.lacks[sid].add(i)
        elif op == "remove" and present:
            mine = m.requested(sid)
            back = sched.remove_source(sid)
            for i in mine:
                m.back_to_pool(i, sid)
            assert set(back) == {i for i in mine if i in m.pool}
            del m.has[sid], m.lacks[sid], m.asked[sid]
            m.unopened.discard(sid)
        # Every chunk in exactly one place, and the scheduler agrees on each count.
        places = [m.pool, set(m.requesters), m.verifying, m.stored]
        assert sum(map(len, places)) == n and set().union(*places) == set(range(n))
        assert sched.remaining == n - len(m.stored)
        assert sched.pool_size == len(m.pool)
        assert sched.in_flight == len(m.requesters) + len(m.verifying)
        for s in SOURCES:
            assert sched.requested(s) == len(m.requested(s))
            if s in m.has:
                assert sched.can_help(s) == any(m.can_give(s, j) for j in m.pool)
            assert sorted(sched.requesters(k % n)) == sorted(m.requesters.get(k % n, ()))
    # Whatever happened, an all-holding source can then finish the job.
    for s in list(m.has):
        sched.remove_source(s)
    for i in sorted(m.verifying):
        sched.chunk_stored(i)
    sched.add_source("z", window=3)
    while (i := sched.next_request("z")) is not None:
        assert sched.chunk_received("z", i)[0] is Arrival.ACCEPTED
        sched.chunk_stored(i)
    assert sched.done and not sched.can_help("z") and not sched.stuck()


def test_rarest_first_when_picks_intersect_a_whole_level(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same properties when every pick that steps over a chunk the source can't give
    intersects the level with what it can give in one pass (the path a partial holder
    takes among many chunks another one has)."""
    monkeypatch.setattr(scheduler, "SCAN_LIMIT", 1)
    # Scripts where partial holders connect early and ask often: the sources, then HAVEs
    # and requests mostly from the partial holders "c" and "d", then the rest.
    rnd = random.Random(7)
    for _ in range(150):
        n = rnd.randint(2, 40)
        script = [("add", s, 0) for s in rnd.sample(SOURCES, 4)]
        for _ in range(rnd.randint(10, 200)):
            op = rnd.choice([*OPS, "have", "request", "request", "receive", "store"])
            script.append((op, rnd.choice(["c", "d", "c", "d", "a"]), rnd.randint(0, 40)))
        check_script(n, script, rnd.randint(0, 3), [rnd.randint(1, 5) for _ in SOURCES])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100])
def test_built_from_a_have_bitmap(n: int) -> None:
    """From the receiver's have-bitmap (bits past the last chunk ignored) the scheduler
    believes what it does from the list of missing chunks."""
    held = {i for i in range(n) if i % 3 == 0}
    bits = bytearray(bitmap(held, n))
    bits[-1] |= 0xFF << (n & 7) & 0xFF if n & 7 else 0
    sched = ChunkScheduler(count=n, held=bytes(bits), rng=random.Random(0))
    missing = [i for i in range(n) if i not in held]
    assert sched.remaining == sched.pool_size == len(missing)
    sched.add_source("full", window=n)
    got = []
    while (i := sched.next_request("full")) is not None:
        got.append(i)
    assert sorted(got) == missing
    with pytest.raises(ValueError):
        ChunkScheduler(count=None, held=b"")
    done = ChunkScheduler(count=n, held=b"\xff" * ((n + 7) // 8))
    assert done.done and done.pool_size == 0


def test_partial_holders_past_the_counted_ones_still_serve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "MAX_COUNTED", 1)
    sched = ChunkScheduler(range(4), rng=random.Random(3))
    sched.add_source("p", window=4, have=bitmap({0, 1}, 4))
    sched.add_source("q", window=4, have=bitmap({1, 2}, 4))  # not counted
    assert [sched.availability(i) for i in range(4)] == [1, 1, 0, 0]
    assert sched.next_request("q") == 2  # rarest by the counted holder: 2 before 1
    assert sched.next_request("q") == 1
    assert sched.next_request("q") is None and not sched.can_help("q")
    assert sched.remove_source("p") == [] and sched.pool_size == 2
    assert sorted(sched.remove_source("q")) == [1, 2] and sched.pool_size == 4
    sched.add_source("r", window=4, have=bitmap({3}, 4))  # counted again
    assert sched.availability(3) == 1 and sched.next_request("r") == 3


def test_ties_are_not_the_chunk_after_the_widest_gap() -> None:
    """Every receiver sees the same gaps in the pool; picking the first chunk after a
    random start would make the one after the widest gap everyone's pick (the sender
    uploads it several times). Ties go uniformly: here 1 in 11, not 99 in 100."""
    count, pool = 1000, [*range(10), 999]
    picks = []
    for seed in range(1100):
        sched = ChunkScheduler(pool, count=count, rng=random.Random(seed))
        sched.add_source("sender", window=1)
        picks.append(sched.next_request("sender"))
    assert set(picks) == set(pool)
    assert 50 < picks.count(999) < 150  # 100 expected


def test_stuck_only_when_nothing_can_change() -> None:
    sched = ChunkScheduler(range(4), rng=random.Random(1))
    sched.add_source("even", window=4, have=bitmap({0, 2}, 4))
    picks = {sched.next_request("even"), sched.next_request("even")}
    assert picks == {0, 2} and sched.next_request("even") is None
    assert not sched.stuck()  # its chunks are in flight: one may come back
    for i in (0, 2):
        sched.chunk_received("even", i)
        sched.chunk_stored(i)
    assert sched.stuck() and not sched.can_help("even")
    assert sched.add_have("even", [3])  # it got chunk 3 meanwhile
    assert not sched.stuck() and sched.next_request("even") == 3


def test_rarest_first_over_partial_holders() -> None:
    sched = ChunkScheduler(range(6), rng=random.Random(2))
    sched.add_source("p", window=6, have=bitmap({0, 1, 2, 3}, 6))
    sched.add_source("q", window=6, have=bitmap({2, 3, 4, 5}, 6))
    sched.add_source("full", window=6)
    # 0,1 only at p; 4,5 only at q; 2,3 at both: each partial holder gets its own chunks
    # first, the shared ones last; the full holder is asked for the rarest left.
    p_picks = [sched.next_request("p"), sched.next_request("p")]
    assert set(p_picks) == {0, 1}
    assert {sched.next_request("full"), sched.next_request("full")} == {4, 5}
    assert {sched.next_request("q"), sched.next_request("q")} == {2, 3}
    assert sched.pool_size == 0
    # Endgame: no duplicates while every source has two requests outstanding; once the
    # full holder is about to run dry, it duplicates the oldest request it can serve.
    assert sched.next_request("full") is None
    assert sched.chunk_received("full", 4) == (Arrival.ACCEPTED, [])
    oldest = p_picks[0]
    assert oldest is not None
    assert sched.next_request("full") == oldest and sched.duplicates == 1
    assert sched.chunk_received("full", oldest) == (Arrival.ACCEPTED, ["p"])
    assert sched.chunk_received("p", oldest) == (Arrival.LATE, [])
    assert sched.late == 1


def test_pacing_windows_follow_rate_and_stalls_are_relative() -> None:
    pace = SourcePace(1 << 20, min_window=2, max_window=16, target_latency=0.5,
                      min_stall=1.0, max_stall=30.0, stall_chunks=8)
    assert pace.window == 2 and pace.stall_after() == 30.0 and pace.deadline() is None
    pace.busy(0.0)
    # A holder serving 8 MiB/s: one chunk every 1/8 s, window full each time.
    t = 0.0
    for _ in range(40):
        t += 0.125
        pace.delivered(1 << 20, t, window_was_full=True)
    assert pace.rate == pytest.approx(8 << 20, rel=0.01)
    assert pace.window == 4  # 8 MiB/s x 0.5 s / 1 MiB
    assert pace.stall_after() == 1.0  # 8 chunk-times = 1 s
    assert pace.deadline() == pytest.approx(t + 1.0)
    slow = SourcePace(1 << 20, min_stall=1.0, max_stall=30.0)
    slow.busy(0.0)
    slow.delivered(1 << 20, 4.0, window_was_full=True)  # 256 KiB/s
    assert slow.window == 2 and slow.stall_after() == 30.0  # 8 x 4 s, capped
    slow.idle()
    assert slow.deadline() is None


def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.spend(500, 0.0) == 0.0
    assert bucket.spend(1000, 0.0) == pytest.approx(1.0)
    assert bucket.spend(100, 0.5) == pytest.approx(1.1 - 0.5)
    # Long idle refills only up to the burst.
    assert bucket.spend(500, 100.0) == 0.0
    assert bucket.spend(1, 100.0) > 0
    with pytest.raises(ValueError):
        TokenBucket(rate=-1, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0)
