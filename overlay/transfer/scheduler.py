"""Which chunk to ask which source for: the multi-source scheduling decision, sans-I/O.

Every missing chunk is in exactly one place: the pool (nobody is asked for it), *requested*
(GET sent to one source, or in the endgame to two) or *verifying* (arrived, being checked
and written). A source's window bounds its requested chunks, which bounds outstanding bytes
per source. A failed, stalled or banned source gives its requested chunks back to the pool.

- Rarest first (BitTorrent's piece selection): a source is asked for the pool chunk that
  the fewest connected partial holders have, ties broken by the injected `rng`. Full
  holders have every chunk, so they count the same for every chunk and are left out of the
  counts; chunks only full holders have come first, which is what keeps co-recipients
  trading among themselves while the sender hands out what nobody else has yet.
- Partial holders are known by their OPENED bitmap plus HAVE updates (`add_have`).
- Endgame: only once the pool is empty does a source that is about to run dry (fewer
  than `endgame_below` requests outstanding) get a duplicate request, for the oldest
  chunk still requested from one other source: the one most likely stuck behind a slow
  or dying holder. (BitTorrent duplicates every remaining block; with rate-sized windows
  that would be dozens of requests, each costing a CANCEL.) The
  first copy to arrive wins; `chunk_received` names the other sources so the caller sends
  them CANCEL. A copy arriving after that is *late* (dropped), not *unasked* (a ban): every
  source remembers each chunk it was ever asked for.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum, auto

MAX_REQUESTERS = 2  # the endgame asks at most two sources for one chunk


class Arrival(Enum):
    ACCEPTED = auto()  # requested from this source: verify and store it
    LATE = auto()  # asked of this source once, but no longer needed from it: drop
    UNASKED = auto()  # never asked of this source: it is misbehaving


class _IndexedSet:
    """A set of ints with O(1) add, discard and random pick (for the rarity buckets)."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, i: int) -> None:
        if i not in self._pos:
            self._pos[i] = len(self._items)
            self._items.append(i)

    def discard(self, i: int) -> None:
        k = self._pos.pop(i, None)
        if k is None:
            return
        last = self._items.pop()
        if k < len(self._items):
            self._items[k] = last
            self._pos[last] = k

    def scan(self, rng: random.Random) -> Iterator[int]:
        """Every item once, from a random starting point."""
        n = len(self._items)
        if not n:
            return
        start = rng.randrange(n)
        for j in range(n):
            yield self._items[(start + j) % n]


def _bit(bitmap: bytes | bytearray, i: int) -> bool:
    byte = i >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (i & 7)))


@dataclass(slots=True)
class _SourceState:
    window: int
    have: bytearray | None  # None: holds every chunk
    asked: bytearray  # every chunk ever requested from it, for telling late from unasked
    requested: set[int] = field(default_factory=set)
    lacks: set[int] = field(default_factory=set)

    def can_give(self, i: int) -> bool:
        return (self.have is None or _bit(self.have, i)) and i not in self.lacks


class ChunkScheduler:
    """Assigns missing chunks to sources and tracks each chunk until it is stored."""

    def __init__(self, missing: Iterable[int], *, count: int | None = None,
                 rng: random.Random | None = None, endgame_below: int = 2) -> None:
        pool = sorted(set(missing))
        self.count = count if count is not None else (pool[-1] + 1 if pool else 0)
        if pool and (pool[0] < 0 or pool[-1] >= self.count):
            raise ValueError("missing chunk index outside the content")
        self.rng = rng or random.Random()
        self.endgame_below = endgame_below
        self._avail = [0] * self.count  # partial holders connected that have chunk i
        self._buckets: dict[int, _IndexedSet] = {}  # pool chunks by availability
        self._in_pool: set[int] = set()
        for i in pool:
            self._to_pool(i)
        self._requesters: dict[int, list[str]] = {}  # insertion order: oldest first
        self._verifying: set[int] = set()
        self._sources: dict[str, _SourceState] = {}
        self.remaining = len(pool)
        self.duplicates = 0  # endgame duplicate requests made
        self.late = 0  # copies that arrived after another copy won

    # --- sources ----------------------------------------------------------------------
    def add_source(self, sid: str, *, window: int, have: bytes | None = None) -> None:
        """A source ready for requests; `have` is its bitmap (bit i = chunk i, LSB first),
        None when it holds every chunk."""
        if sid in self._sources:
            raise ValueError(f"source {sid!r} already added")
        if window < 1:
            raise ValueError("window must be at least 1")
        nbytes = (self.count + 7) // 8
        bitmap = None
        if have is not None:
            bitmap = bytearray(have[:nbytes].ljust(nbytes, b"\0"))
            for i in range(self.count):
                if _bit(bitmap, i):
                    self._bump(i, +1)
        self._sources[sid] = _SourceState(window, bitmap, bytearray(nbytes))

    def remove_source(self, sid: str) -> list[int]:
        """Forget a source; chunks requested from it alone go back to the pool (returned)."""
        state = self._sources.pop(sid, None)
        if state is None:
            return []
        back = []
        for i in sorted(state.requested):
            who = self._requesters.get(i, [])
            if sid in who:
                who.remove(sid)
            if not who:
                self._requesters.pop(i, None)
                self._to_pool(i)
                back.append(i)
        if state.have is not None:
            for i in range(self.count):
                if _bit(state.have, i):
                    self._bump(i, -1)
        return back

    def sources(self) -> list[str]:
        return list(self._sources)

    def set_window(self, sid: str, window: int) -> None:
        state = self._sources.get(sid)
        if state is not None:
            state.window = max(1, window)

    def add_have(self, sid: str, indexes: Iterable[int]) -> bool:
        """`sid` now holds these chunks too (a HAVE). True if one of them is still needed."""
        state = self._sources.get(sid)
        if state is None or state.have is None:
            return False
        useful = False
        for i in indexes:
            if 0 <= i < self.count and not _bit(state.have, i):
                state.have[i >> 3] |= 1 << (i & 7)
                self._bump(i, +1)
                useful = useful or i in self._in_pool or i in self._requesters
        return useful

    def availability(self, index: int) -> int:
        """How many connected partial holders have chunk `index`."""
        return self._avail[index]

    def _bump(self, i: int, delta: int) -> None:
        if i in self._in_pool:
            self._bucket_of(i).discard(i)
            self._avail[i] += delta
            self._bucket_of(i).add(i)
        else:
            self._avail[i] += delta

    def _bucket_of(self, i: int) -> _IndexedSet:
        a = self._avail[i]
        bucket = self._buckets.get(a)
        if bucket is None:
            bucket = self._buckets[a] = _IndexedSet()
        return bucket

    def _to_pool(self, i: int) -> None:
        if i not in self._in_pool:
            self._in_pool.add(i)
            self._bucket_of(i).add(i)

    def _take(self, i: int) -> None:
        self._in_pool.discard(i)
        self._bucket_of(i).discard(i)

    # --- decisions --------------------------------------------------------------------
    def next_request(self, sid: str) -> int | None:
        """The next chunk to ask `sid` for, or None (window full, or nothing it can give).
        A duplicate (endgame) only when the pool is empty."""
        state = self._sources.get(sid)
        if state is None or len(state.requested) >= state.window:
            return None
        if self._in_pool:
            pick = self._rarest(state)
        elif len(state.requested) < self.endgame_below:
            pick = self._duplicate(sid, state)
        else:
            return None  # busy enough: duplicates are for sources about to go idle
        if pick is None:
            return None
        if pick in self._in_pool:
            self._take(pick)
            self._requesters[pick] = [sid]
        else:
            self._requesters[pick].append(sid)
            self.duplicates += 1
        state.requested.add(pick)
        state.asked[pick >> 3] |= 1 << (pick & 7)
        return pick

    def _rarest(self, state: _SourceState) -> int | None:
        for avail in sorted(a for a, b in self._buckets.items() if len(b)):
            if state.have is not None and avail == 0:
                continue  # no partial holder has these, so neither has this one
            for i in self._buckets[avail].scan(self.rng):
                if state.can_give(i):
                    return i
        return None

    def _duplicate(self, sid: str, state: _SourceState) -> int | None:
        for i, who in self._requesters.items():
            if len(who) < MAX_REQUESTERS and sid not in who and state.can_give(i):
                return i
        return None

    # --- outcomes ---------------------------------------------------------------------
    def chunk_received(self, sid: str, index: int) -> tuple[Arrival, list[str]]:
        """A chunk arrived from `sid`. ACCEPTED with the other sources it was requested from
        (send them CANCEL); LATE if it is no longer needed from `sid`; UNASKED if `sid` was
        never asked for it (ban it)."""
        state = self._sources.get(sid)
        asked = state is not None and 0 <= index < self.count and _bit(state.asked, index)
        who = self._requesters.get(index)
        if state is not None and who is not None and sid in who:
            del self._requesters[index]
            others = [s for s in who if s != sid]
            for s in who:
                other = self._sources.get(s)
                if other is not None:
                    other.requested.discard(index)
            self._verifying.add(index)
            return Arrival.ACCEPTED, others
        if state is not None and asked and index in self._in_pool and state.can_give(index):
            self._take(index)  # a late copy that is needed again after all (a bad copy lost)
            self._verifying.add(index)
            return Arrival.ACCEPTED, []
        if asked:
            self.late += 1
            return Arrival.LATE, []
        return Arrival.UNASKED, []

    def chunk_stored(self, index: int) -> None:
        """The chunk was verified and written: done for good."""
        if index in self._verifying:
            self._verifying.discard(index)
            self.remaining -= 1

    def chunk_failed(self, sid: str, index: int, *, lacks: bool = False) -> None:
        """`sid` refused the request for chunk `index`. It goes back to the pool unless
        another source is still asked for it. `lacks` records that `sid` said it doesn't
        hold it, so it is not asked again."""
        state = self._sources.get(sid)
        if state is not None:
            state.requested.discard(index)
            if lacks:
                state.lacks.add(index)
        who = self._requesters.get(index)
        if who is not None and sid in who:
            who.remove(sid)
            if not who:
                del self._requesters[index]
                self._to_pool(index)

    def chunk_rejected(self, index: int) -> None:
        """An accepted chunk did not verify (its source gets banned): back to the pool."""
        if index in self._verifying:
            self._verifying.discard(index)
            self._to_pool(index)

    # --- questions --------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def pool_size(self) -> int:
        return len(self._in_pool)

    def requested(self, sid: str) -> int:
        state = self._sources.get(sid)
        return len(state.requested) if state is not None else 0

    def window(self, sid: str) -> int:
        state = self._sources.get(sid)
        return state.window if state is not None else 0

    def requesters(self, index: int) -> list[str]:
        """The sources chunk `index` is requested from now."""
        return list(self._requesters.get(index, ()))

    @property
    def in_flight(self) -> int:
        """Chunks requested or being verified, across all sources."""
        return len(self._requesters) + len(self._verifying)

    def can_help(self, sid: str) -> bool:
        """`sid` holds a chunk of the pool that it was not refused."""
        state = self._sources.get(sid)
        if state is None:
            return False
        if state.have is None and not state.lacks:
            return bool(self._in_pool)
        return any(state.can_give(i) for i in self._in_pool)

    def stuck(self) -> bool:
        """Chunks are missing, nothing is in flight, and no source has any of them: only a
        HAVE or a new source can change that."""
        if self.done or self.in_flight:
            return False
        return not any(self.can_help(s) for s in self._sources)
