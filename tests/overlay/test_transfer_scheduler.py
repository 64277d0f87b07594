"""ChunkScheduler properties, and the upload token bucket."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transfer.ratelimit import TokenBucket
from overlay.transfer.scheduler import ChunkScheduler

SOURCES = ["a", "b", "c"]
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "request", "receive", "store", "fail", "lack", "remove"]),
        st.sampled_from(SOURCES),
        st.integers(0, 40),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 30), script=ops, windows=st.lists(st.integers(1, 5), min_size=3,
                                                           max_size=3))
def test_every_chunk_is_in_exactly_one_place(n: int, script: list[tuple[str, str, int]],
                                             windows: list[int]) -> None:
    sched = ChunkScheduler(range(n))
    requested: dict[str, set[int]] = {s: set() for s in SOURCES}
    verifying: set[int] = set()
    stored: set[int] = set()
    lacks: dict[str, set[int]] = {s: set() for s in SOURCES}
    # Source "c" is a partial holder of the even chunks.
    has = {"a": None, "b": None, "c": lambda i: i % 2 == 0}
    added: set[str] = set()
    for op, sid, k in script:
        if op == "add" and sid not in added:
            sched.add_source(sid, window=windows[SOURCES.index(sid)], has=has[sid])
            added.add(sid)
        elif op == "request":
            i = sched.next_request(sid)
            if i is not None:
                assert sid in added and i not in stored and i not in verifying
                assert all(i not in r for r in requested.values()), "no duplicate requests"
                assert has[sid] is None or has[sid](i)  # type: ignore[misc]
                assert i not in lacks[sid]
                requested[sid].add(i)
                assert len(requested[sid]) <= windows[SOURCES.index(sid)]
        elif op == "receive" and requested[sid]:
            i = sorted(requested[sid])[k % len(requested[sid])]
            assert sched.chunk_received(sid, i)
            requested[sid].discard(i)
            verifying.add(i)
        elif op == "receive":
            assert not sched.chunk_received(sid, k % n), "an unasked chunk is refused"
        elif op == "store" and verifying:
            i = sorted(verifying)[k % len(verifying)]
            sched.chunk_stored(i)
            verifying.discard(i)
            stored.add(i)
        elif op in ("fail", "lack") and requested[sid]:
            i = sorted(requested[sid])[k % len(requested[sid])]
            sched.chunk_failed(sid, i, lacks=op == "lack")
            requested[sid].discard(i)
            if op == "lack":
                lacks[sid].add(i)
        elif op == "remove" and sid in added:
            assert sorted(sched.remove_source(sid)) == sorted(requested[sid])
            requested[sid].clear()
            added.discard(sid)
            lacks[sid].clear()
        assert sched.remaining == n - len(stored)
        assert sched.in_flight == sum(map(len, requested.values())) + len(verifying)
        for s in SOURCES:
            assert sched.requested(s) == len(requested[s])
    # Whatever happened, an all-holding source can then finish the job.
    for s in list(added):
        sched.remove_source(s)
    for i in sorted(verifying):
        sched.chunk_stored(i)
    sched.add_source("z", window=3)
    while (i := sched.next_request("z")) is not None:
        assert sched.chunk_received("z", i)
        sched.chunk_stored(i)
    assert sched.done and sched.hopeless("z")


def test_hopeless_only_when_nothing_can_change() -> None:
    sched = ChunkScheduler(range(4))
    sched.add_source("even", window=4, has=lambda i: i % 2 == 0)
    sched.add_source("all", window=1)
    picks = [sched.next_request("even"), sched.next_request("even")]
    assert picks == [0, 2] and sched.next_request("even") is None
    assert not sched.hopeless("even")  # its chunks are in flight: one may come back
    for i in (0, 2):
        sched.chunk_received("even", i)
        sched.chunk_stored(i)
    assert sched.hopeless("even") and not sched.hopeless("all")
    assert sched.next_request("all") == 1


def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0
    assert bucket.reserve(1000, 0.0) == pytest.approx(1.0)
    assert bucket.reserve(100, 0.5) == pytest.approx(1.1 - 0.5)
    # Long idle refills only up to the burst.
    assert bucket.reserve(500, 100.0) == 0.0
    assert bucket.reserve(1, 100.0) > 0
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
