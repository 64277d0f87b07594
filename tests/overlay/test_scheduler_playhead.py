"""The wanted ranges of the chunk scheduler: asked for first, newest first, the rest
rarest first; `hurry` makes a wanted chunk the next GET of the fastest source that has it."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.transfer.scheduler import MAX_RANGES, MAX_WANTED, Arrival, ChunkScheduler


def test_playhead_chunks_come_first_in_order_then_the_rest() -> None:
    s = ChunkScheduler(count=100, held=bytes(13), rng=random.Random(3))
    s.add_source("a", window=100)
    s.want_first(80, 84)
    picks = [s.next_request("a") for _ in range(100)]
    assert picks[:4] == [80, 81, 82, 83]
    assert sorted(p for p in picks if p is not None) == list(range(100))


def test_a_seek_moves_the_playhead_and_held_chunks_are_skipped() -> None:
    held = bytearray(13)
    held[1] = 0b0000_0011  # chunks 8 and 9 held
    s = ChunkScheduler(count=100, held=bytes(held), rng=random.Random(1))
    s.add_source("a", window=100)
    s.want_first(8, 12)
    assert [s.next_request("a") for _ in range(2)] == [10, 11]
    s.want_first(50, 52)
    assert [s.next_request("a") for _ in range(2)] == [50, 51]


def test_a_partial_holder_is_asked_only_for_playhead_chunks_it_has() -> None:
    s = ChunkScheduler(count=16, held=bytes(2), rng=random.Random(2))
    have = bytearray(2)
    have[0] = 0b0010_0000  # chunk 5 only
    s.add_source("p", window=4, have=bytes(have))
    s.want_first(4, 8)
    assert s.next_request("p") == 5


def test_the_playhead_range_is_bounded() -> None:
    s = ChunkScheduler(count=10_000, held=bytes(1250), rng=random.Random(4))
    s.want_first(-5, 10**9)
    assert s.wanted == [(0, MAX_WANTED)]
    for k in range(MAX_RANGES + 3):
        s.want_first(100 * k, 100 * k + 1)
    assert len(s.wanted) == MAX_RANGES
    assert s.wanted[0] == (100 * (MAX_RANGES + 2), 100 * (MAX_RANGES + 2) + 1)


def test_several_wanted_ranges_newest_first() -> None:
    """A seek asks for the index at the end, then for the target: both are kept, the
    target first; a range already stored is dropped."""
    s = ChunkScheduler(count=100, held=bytes(13), rng=random.Random(5))
    s.want_first(98, 100)
    s.want_first(80, 82)
    s.add_source("a", window=100)
    assert [s.next_request("a") for _ in range(4)] == [80, 81, 98, 99]
    for i in (80, 81):
        assert s.chunk_received("a", i)[0] is Arrival.ACCEPTED
        s.chunk_stored(i)
    s.want_first(10, 11)
    assert s.wanted == [(10, 11), (98, 100)]


def _full_window(s: ChunkScheduler, sid: str) -> list[int]:
    picks = []
    while (i := s.next_request(sid)) is not None:
        picks.append(i)
    return picks


def test_hurry_cancels_the_unwanted_requests_queued_before_a_wanted_chunk() -> None:
    s = ChunkScheduler(count=100, held=bytes(13), rng=random.Random(6))
    s.add_source("a", window=4)
    picks = _full_window(s, "a")
    assert len(picks) == 4 and 50 not in picks
    s.want_first(50, 51)
    out = s.hurry(["a"])
    # The oldest request is being sent already: kept. The other three go back to the pool.
    assert out == {"a": ([50], picks[1:])}
    assert s.requesters(50) == ["a"] and s.requested("a") == 2
    assert s.pool_size == 100 - 2
    # Released chunks are asked for again later; a copy still arriving is never a ban.
    assert s.chunk_received("a", picks[1]) == (Arrival.ACCEPTED, [])  # needed after all
    s.add_source("b", window=10)
    s.want_first(picks[2], picks[2] + 1)
    assert s.next_request("b") == picks[2]
    assert s.chunk_received("a", picks[2])[0] is Arrival.LATE
    assert s.hurry(["a", "b"]) == {}  # nothing wanted is left in the pool


def test_hurry_puts_the_newest_range_before_older_ones_and_skips_who_lacks_it() -> None:
    s = ChunkScheduler(count=64, held=bytes(8), rng=random.Random(7))
    have = bytearray(8)
    have[1] = 0xFF  # chunks 8..15
    s.add_source("p", window=2, have=bytes(have))  # the fastest, but a partial holder
    s.add_source("a", window=3)
    s.want_first(8, 11)  # the stream before a seek
    assert [s.next_request("a") for _ in range(3)] == [8, 9, 10]
    s.want_first(20, 22)  # the seek's target
    out = s.hurry(["p", "a"])
    # "p" lacks 20 and 21. "a" is sending 8; 9 and 10 (an older range) would wait behind
    # the target, so they are cancelled there, and "p", idle, gets them.
    assert out == {"a": ([20, 21], [9, 10]), "p": ([9, 10], [])}
    assert s.requesters(8) == ["a"] and s.requesters(9) == ["p"]
    assert s.wanted[:2] == [(20, 22), (8, 11)]
    # Only newer ranges cancel: hurrying again changes nothing.
    assert s.hurry(["p", "a"]) == {}


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6),
       script=st.lists(st.tuples(st.sampled_from(["req", "recv", "want", "hurry", "fail",
                                                  "store", "stray"]),
                                 st.sampled_from("abc"), st.integers(0, 63)), max_size=200))
def test_hurry_keeps_every_chunk_in_exactly_one_place(seed: int,
                                                       script: list[tuple[str, str, int]],
                                                       ) -> None:
    """Whatever the wants, hurries and arrivals: each chunk is in the pool, requested,
    verifying or stored, once; windows hold; a chunk asked of a source is never UNASKED."""
    n = 40
    s = ChunkScheduler(count=n, held=bytes(5), rng=random.Random(seed))
    windows = {"a": 3, "b": 2, "c": 4}
    have_c = bytearray(5)
    have_c[0] = 0xFF
    s.add_source("a", window=3)
    s.add_source("b", window=2)
    s.add_source("c", window=4, have=bytes(have_c))
    asked: dict[str, set[int]] = {x: set() for x in windows}
    verifying: set[int] = set()
    stored: set[int] = set()
    for op, sid, k in script:
        i = k % n
        if op == "req":
            j = s.next_request(sid)
            if j is not None:
                asked[sid].add(j)
        elif op == "want":
            s.want_first(i, i + 1 + k % 3)
        elif op == "hurry":
            order = ["c", "a", "b"][k % 3:] + ["c", "a", "b"][:k % 3]
            for who, (gets, _) in s.hurry(order).items():
                asked[who].update(gets)
        elif op == "recv" and s.requested(sid):
            mine = sorted(j for j in asked[sid] if sid in s.requesters(j))
            if mine:
                j = mine[k % len(mine)]
                status, _ = s.chunk_received(sid, j)
                assert status is Arrival.ACCEPTED
                verifying.add(j)
        elif op == "stray":
            status, _ = s.chunk_received(sid, i)
            if i in asked[sid]:
                assert status is not Arrival.UNASKED
                if status is Arrival.ACCEPTED:
                    verifying.add(i)
            else:
                assert status is Arrival.UNASKED
        elif op == "fail":
            mine = [j for j in asked[sid] if sid in s.requesters(j)]
            if mine:
                s.chunk_failed(sid, mine[k % len(mine)])
        elif op == "store" and verifying:
            j = sorted(verifying)[k % len(verifying)]
            s.chunk_stored(j)
            verifying.discard(j)
            stored.add(j)
        requested = {j for j in range(n) if s.requesters(j)}
        assert len(s.wanted) <= MAX_RANGES
        for x, w in windows.items():
            assert s.requested(x) <= w
            assert s.requested(x) == sum(1 for j in range(n) if x in s.requesters(j))
        assert not requested & verifying and not requested & stored
        assert s.pool_size + len(requested) + len(verifying) + len(stored) == n
        assert s.remaining == n - len(stored)


def test_a_pinned_range_comes_after_the_playhead_and_is_never_cancelled() -> None:
    """A clip's index at the end is pinned: the stream's later asks don't cancel it."""
    s = ChunkScheduler(count=100, held=bytes(13), rng=random.Random(8))
    s.want_first(99, 100, pinned=True)
    s.want_first(0, 1)
    s.add_source("a", window=3)
    assert [s.next_request("a") for _ in range(3)][:2] == [0, 99]
    for k in range(1, 12):  # a stream asking for its next chunk, again and again
        s.want_first(k, k + 2)
        for gets, cancels in s.hurry(["a"]).values():
            assert 99 not in cancels
            for i in gets:
                assert s.chunk_received("a", i)[0] is Arrival.ACCEPTED
                s.chunk_stored(i)
    assert s.requesters(99) == ["a"]
    assert s.wanted[-1] == (99, 100)


def test_one_source_keeps_an_older_ranges_requests_rather_than_asking_them_again() -> None:
    """CANCEL and GET of one chunk to one holder can make it send the chunk twice, so with
    no other source an older wanted range's requests stay where they are."""
    s = ChunkScheduler(count=64, held=bytes(8), rng=random.Random(9))
    s.add_source("a", window=6)
    s.want_first(8, 11)
    assert [s.next_request("a") for _ in range(3)] == [8, 9, 10]
    s.next_request("a")  # an unwanted one
    s.want_first(40, 41)
    [(gets, cancels)] = s.hurry(["a"]).values()
    assert gets == [40] and len(cancels) == 1 and cancels[0] not in (8, 9, 10)
