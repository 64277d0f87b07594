"""Which chunk to ask which source for: the multi-source scheduling decision, sans-I/O.

Every missing chunk is in exactly one place: the pool (nobody has it), *requested* from one
source (GET sent, no reply yet) or *verifying* (arrived, being checked and written). A
source's window bounds its requested chunks, which bounds outstanding bytes per source.
A failed, stalled or banned source gives its requested chunks back to the pool.

Now: lowest index first, fixed windows, no duplicates. Issue 4 extends this class with
rate-sized windows, rarest-first over HAVE bitfields and endgame duplicates.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

HasChunk = Callable[[int], bool]


@dataclass(slots=True)
class _SourceState:
    window: int
    has: HasChunk | None  # None: holds every chunk
    requested: set[int] = field(default_factory=set)
    lacks: set[int] = field(default_factory=set)


class ChunkScheduler:
    """Assigns missing chunks to sources and tracks each chunk until it is stored."""

    def __init__(self, missing: Iterable[int]) -> None:
        self._pool: list[int] = sorted(set(missing))  # a heap; sorted is a valid heap
        self._in_pool: set[int] = set(self._pool)
        self._requested_by: dict[int, str] = {}
        self._verifying: set[int] = set()
        self._sources: dict[str, _SourceState] = {}
        self.remaining = len(self._in_pool)

    # --- sources ----------------------------------------------------------------------
    def add_source(self, sid: str, *, window: int, has: HasChunk | None = None) -> None:
        """A source ready for requests; `has` None means it holds every chunk."""
        if sid in self._sources:
            raise ValueError(f"source {sid!r} already added")
        if window < 1:
            raise ValueError("window must be at least 1")
        self._sources[sid] = _SourceState(window, has)

    def remove_source(self, sid: str) -> list[int]:
        """Forget a source; its requested chunks go back to the pool (returned)."""
        state = self._sources.pop(sid, None)
        if state is None:
            return []
        back = sorted(state.requested)
        for i in back:
            self._requested_by.pop(i, None)
            self._to_pool(i)
        return back

    def sources(self) -> list[str]:
        return list(self._sources)

    # --- decisions --------------------------------------------------------------------
    def next_request(self, sid: str) -> int | None:
        """The next chunk to ask `sid` for, or None (window full, or nothing it can give)."""
        state = self._sources.get(sid)
        if state is None or len(state.requested) >= state.window or not self._pool:
            return None
        pick: int | None = None
        if state.has is None and not state.lacks:
            pick = self._pop_pool()
        else:
            # Partial holders scan the pool in order; fine at today's sizes, and the
            # rarest-first version of issue 4 replaces it.
            for i in sorted(self._in_pool):
                if i not in state.lacks and (state.has is None or state.has(i)):
                    pick = i
                    break
            if pick is not None:
                self._in_pool.discard(pick)
        if pick is None:
            return None
        state.requested.add(pick)
        self._requested_by[pick] = sid
        return pick

    def _pop_pool(self) -> int | None:
        while self._pool:
            i = heapq.heappop(self._pool)
            if i in self._in_pool:
                self._in_pool.discard(i)
                return i
        return None

    def _to_pool(self, i: int) -> None:
        if i not in self._in_pool:
            self._in_pool.add(i)
            heapq.heappush(self._pool, i)

    # --- outcomes ---------------------------------------------------------------------
    def chunk_received(self, sid: str, index: int) -> bool:
        """A chunk arrived from `sid`. False if it was not requested from it (unasked,
        cancelled or reassigned): drop it then."""
        if self._requested_by.get(index) != sid:
            return False
        del self._requested_by[index]
        state = self._sources.get(sid)
        if state is not None:
            state.requested.discard(index)
        self._verifying.add(index)
        return True

    def chunk_stored(self, index: int) -> None:
        """The chunk was verified and written: done for good."""
        if index in self._verifying:
            self._verifying.discard(index)
            self.remaining -= 1

    def chunk_failed(self, sid: str, index: int, *, lacks: bool = False) -> None:
        """The chunk did not arrive or did not verify: back to the pool. `lacks` records
        that `sid` said it doesn't hold it, so it is not asked again."""
        if self._requested_by.get(index) == sid:
            del self._requested_by[index]
        self._verifying.discard(index)
        state = self._sources.get(sid)
        if state is not None:
            state.requested.discard(index)
            if lacks:
                state.lacks.add(index)
        self._to_pool(index)

    # --- questions --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.remaining == 0

    def requested(self, sid: str) -> int:
        state = self._sources.get(sid)
        return len(state.requested) if state is not None else 0

    @property
    def in_flight(self) -> int:
        """Chunks requested or being verified, across all sources."""
        return len(self._requested_by) + len(self._verifying)

    def hopeless(self, sid: str) -> bool:
        """`sid` can't help with what is left, and nothing in flight may change that."""
        state = self._sources.get(sid)
        if state is None or self.done:
            return True
        if self.in_flight:
            return False
        return not any(
            i not in state.lacks and (state.has is None or state.has(i)) for i in self._in_pool
        )
