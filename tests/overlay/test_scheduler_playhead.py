"""The playhead range of the chunk scheduler: asked for first, the rest rarest first."""

from __future__ import annotations

import random

from overlay.transfer.scheduler import MAX_WANTED, ChunkScheduler


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
    assert s._wanted == (0, MAX_WANTED)
