"""Which chunk to ask which source for: the multi-source scheduling decision, sans-I/O.

Every missing chunk is in exactly one place: the pool (nobody is asked for it), *requested*
(GET sent to one source, or in the endgame to two) or *verifying* (arrived, being checked
and written). A source's window bounds its requested chunks, which bounds outstanding bytes
per source. A failed, stalled or banned source gives its requested chunks back to the pool.

- Rarest first (BitTorrent's piece selection): a source is asked for the pool chunk that
  the fewest connected partial holders have, ties broken by the injected `rng` (uniform,
  or among a bounded sample where that would cost a scan: see `_pick_in_level`). Full
  holders have every chunk, so they count the same for every chunk and are left out of
  the counts; chunks only full holders have come first, which is what keeps co-recipients
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
- Wanted ranges (`want_first`): a player's playhead, the index at the end of a clip, a seek
  target. The last MAX_RANGES are kept, newest first, and their chunks are picked before
  rarest first; pinned ranges (a clip's index at its end) after them, kept until stored.
  `hurry` makes a wanted chunk nobody is asked for the *next* GET of the fastest source
  that has it: a holder serves its GETs in order, so the source's requests for chunks not
  wanted, but its oldest (already being sent), are released to the pool and the caller
  sends them CANCEL (at 4 MB/s each chunk queued before a seek's target cost 0.26 s). A
  released chunk that still arrives is late, not unasked.

State is one byte per chunk plus bitmaps, never an object per chunk, so a content of
2^20 chunks costs about 1 MiB here before any source is contacted (per-chunk sets and
buckets cost 150 MiB and 0.5 s for it). `_state[i]` is 0 when chunk i is not in the pool,
else 1 + the number of connected partial holders that have it: the pool, its rarity
buckets and their membership in one bytearray, searched with `bytearray.find` (memchr).
Only chunks in flight (requested or verifying, bounded by the windows) are in dicts and
sets. Per source: its have-bitmap (partial holders), the bitmap of chunks ever asked of it,
and the bitmap of chunks it said it lacks (made on the first such refusal). Adding or
removing a partial holder shifts the availability of every pool chunk it has with whole-
bytearray integer arithmetic, not a Python loop per chunk.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

MAX_REQUESTERS = 2  # the endgame asks at most two sources for one chunk
# Partial holders counted in the availability (a chunk's state byte is 1 + its count). One
# connected beyond that is still asked for chunks, but its chunks look no less rare.
MAX_COUNTED = 254
# Chunks of the rarest level a source cannot give that a pick steps over before it
# intersects that level with what the source can give in one pass (O(chunks / word), not a
# Python step per chunk): a partial holder asking among chunks held by another one.
SCAN_LIMIT = 64
# A pick in a level holding at least 1/DENSE of the chunks tries TRIES random positions
# first; otherwise it chooses among the SAMPLE chunks after a random starting point.
DENSE = 64
TRIES = 32
SAMPLE = 16
# Chunks a playhead range (`want_first`) may span: a player needs the next few seconds.
MAX_WANTED = 64
# Wanted ranges kept at once, newest first: a seek asks for the clip's index at the end and
# then for the target, and the stream still playing asks for its own next chunks.
MAX_RANGES = 8
# Requests of a source `hurry` leaves in place, oldest first: the one its holder is sending
# already arrives whatever we do, so cancelling it would only waste it.
KEEP_AHEAD = 1

_SPREAD = tuple(bytes((b >> k) & 1 for k in range(8)) for b in range(256))
_NONZERO = bytes([0] + [1] * 255)  # translate: in the pool -> 1, else 0
_INVERT = bytes([1, 0] + [0] * 254)  # translate: a spread bitmap's 0 -> 1, 1 -> 0


class Arrival(Enum):
    ACCEPTED = auto()  # requested from this source: verify and store it
    LATE = auto()  # asked of this source once, but no longer needed from it: drop
    UNASKED = auto()  # never asked of this source: it is misbehaving


def _bit(bitmap: bytes | bytearray, i: int) -> bool:
    byte = i >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (i & 7)))


def _spread(bitmap: bytes | bytearray, count: int) -> bytes:
    """One byte per chunk, 1 where the bitmap (bit i = chunk i, LSB first) has it."""
    return b"".join(map(_SPREAD.__getitem__, bitmap))[:count].ljust(count, b"\0")


def _as_int(data: bytes | bytearray) -> int:
    return int.from_bytes(data, "little")


@functools.cache
def _equals(v: int) -> bytes:
    """translate: byte value v -> 1, every other -> 0."""
    return bytes(1 if j == v else 0 for j in range(256))


def _next_set_byte(mask: int, start: int) -> int:
    """The first chunk at or after `start` (wrapping) whose byte in `mask` is nonzero."""
    high = mask >> (8 * start)
    if high:
        return start + ((high & -high).bit_length() - 1) // 8
    return ((mask & -mask).bit_length() - 1) // 8


@dataclass(slots=True)
class _SourceState:
    window: int
    have: bytearray | None  # None: holds every chunk
    asked: bytearray  # every chunk ever requested from it, for telling late from unasked
    counted: bool  # a partial holder in the availability counts
    requested: dict[int, None] = field(default_factory=dict)  # in the order asked
    lacks: bytearray | None = None  # chunks it said it doesn't hold (a bitmap, made lazily)
    give: int | None = None  # cache: one byte per chunk, 1 where it can give it (an int)

    def can_give(self, i: int) -> bool:
        return ((self.have is None or _bit(self.have, i))
                and (self.lacks is None or not _bit(self.lacks, i)))


class ChunkScheduler:
    """Assigns missing chunks to sources and tracks each chunk until it is stored.

    The missing chunks are `missing` (an iterable of indexes) or, for a content being
    received, the zero bits of `held` (its have-bitmap) over `count` chunks."""

    def __init__(self, missing: Iterable[int] = (), *, count: int | None = None,
                 held: bytes | bytearray | None = None, rng: random.Random | None = None,
                 endgame_below: int = 2) -> None:
        if held is not None:
            if count is None:
                raise ValueError("a have-bitmap needs the chunk count")
            nbytes = (count + 7) // 8
            bits = bytes(held[:nbytes]).ljust(nbytes, b"\0")
            if bits.count(0) == nbytes:
                state = bytearray(b"\x01") * count  # nothing held: no spreading
            else:
                state = bytearray(_spread(bits, count).translate(_INVERT))
        else:
            pool = sorted(set(missing))
            count = count if count is not None else (pool[-1] + 1 if pool else 0)
            if pool and (pool[0] < 0 or pool[-1] >= count):
                raise ValueError("missing chunk index outside the content")
            state = bytearray(count)
            for i in pool:
                state[i] = 1
        self.count = count
        self.rng = rng or random.Random()
        self.endgame_below = endgame_below
        self._state = state
        self._pool = state.count(1)
        self._levels = [0] * 256  # pool chunks per state byte value
        self._levels[1] = self._pool
        self._counted = 0  # partial holders in the availability counts
        self._requesters: dict[int, list[str]] = {}  # insertion order: oldest first
        self._verifying: set[int] = set()
        self._sources: dict[str, _SourceState] = {}
        self.remaining = self._pool
        self.duplicates = 0  # endgame duplicate requests made
        self.late = 0  # copies that arrived after another copy won
        self._wanted: list[tuple[int, int]] = []  # [first, end) ranges, newest first
        self._pinned: list[tuple[int, int]] = []  # ranges kept until stored (an index)

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
        counted = False
        if have is not None:
            bitmap = bytearray(have[:nbytes].ljust(nbytes, b"\0"))
            if self.count & 7:
                bitmap[-1] &= (1 << (self.count & 7)) - 1  # no bits past the last chunk
            counted = self._counted < MAX_COUNTED
            if counted:
                self._counted += 1
                self._shift(bitmap, +1)
        self._sources[sid] = _SourceState(window, bitmap, bytearray(nbytes), counted)

    def set_have(self, sid: str, have: bytes | None) -> None:
        """A source added before its holder said what it has (its first GETs went out with
        the OPEN, asked as of a full holder) has answered: `have`, None for every chunk.
        Its requests stay as they are: the caller releases those the holder did not take
        (`chunk_failed`)."""
        state = self._sources.get(sid)
        if state is None or have is None:
            return
        if state.have is not None:
            raise ValueError(f"source {sid!r} already has a bitmap")
        del self._sources[sid]
        self.add_source(sid, window=state.window, have=have)
        new = self._sources[sid]
        new.requested, new.asked, new.lacks = state.requested, state.asked, state.lacks

    def remove_source(self, sid: str) -> list[int]:
        """Forget a source; chunks requested from it alone go back to the pool (returned)."""
        state = self._sources.get(sid)
        if state is None:
            return []
        if state.counted and state.have is not None:
            self._shift(state.have, -1)
            self._counted -= 1
        del self._sources[sid]
        back = []
        for i in sorted(state.requested):
            who = self._requesters.get(i, [])
            if sid in who:
                who.remove(sid)
            if not who:
                self._requesters.pop(i, None)
                self._to_pool(i)
                back.append(i)
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
                state.give = None
                v = self._state[i]
                if v and state.counted:
                    self._state[i] = v + 1
                    self._levels[v] -= 1
                    self._levels[v + 1] += 1
                useful = useful or bool(v) or i in self._requesters
        return useful

    def availability(self, index: int) -> int:
        """How many connected partial holders (of those counted) have chunk `index`."""
        return sum(1 for s in self._sources.values()
                   if s.counted and s.have is not None and _bit(s.have, index))

    def _shift(self, have: bytearray, delta: int) -> None:
        """Every pool chunk in `have` is one partial holder more (+1) or fewer (-1) rare.
        Byte-wise addition on the whole state as one integer: no byte carries, since a
        state byte is at most 1 + MAX_COUNTED = 255 after +1 and at least 2 before -1."""
        if not self._pool:
            return
        state = self._state
        sel = _as_int(_spread(have, self.count)) & _as_int(state.translate(_NONZERO))
        if not sel:
            return
        top = self._counted + 2  # state values in use are below this (before a -1)
        whole = _as_int(state)
        whole = whole + sel if delta > 0 else whole - sel
        state[:] = whole.to_bytes(self.count, "little")
        for v in range(1, top):
            self._levels[v] = state.count(v)

    def _to_pool(self, i: int) -> None:
        if not self._state[i]:
            v = 1 + self.availability(i)
            self._state[i] = v
            self._levels[v] += 1
            self._pool += 1

    def _take(self, i: int) -> None:
        v = self._state[i]
        if v:
            self._state[i] = 0
            self._levels[v] -= 1
            self._pool -= 1

    def _in_pool(self, i: int) -> bool:
        return 0 <= i < self.count and bool(self._state[i])

    def _give(self, state: _SourceState) -> int:
        """One byte per chunk, 1 where `state` can give it, as an integer (cached)."""
        if state.give is None:
            g = (_as_int(_spread(state.have, self.count)) if state.have is not None
                 else _as_int(b"\x01" * self.count))
            if state.lacks is not None:
                g ^= g & _as_int(_spread(state.lacks, self.count))
            state.give = g
        return state.give

    # --- decisions --------------------------------------------------------------------
    def want_first(self, first: int, end: int, *, pinned: bool = False) -> None:
        """Ask for chunks `first`..`end`-1 (at most MAX_WANTED) before any other, in
        order: a player's playhead, moved by each seek (WebTorrent's select). The range
        goes before the ones wanted earlier (the last MAX_RANGES not yet stored are kept).
        A `pinned` range (a clip's index) stays until stored, comes after the other wanted
        ranges and is never cancelled by `hurry`: a playing stream asks for its next chunks
        every quarter second at 4 MB/s, and each ask would cancel the index again. The rest
        of the pool still goes rarest first."""
        first = max(0, min(first, self.count))
        new = (first, max(first, min(end, self.count, first + MAX_WANTED)))
        if pinned:
            kept = [w for w in self._pinned if w != new and not self._stored_range(w)]
            self._pinned = [*kept, new][-MAX_RANGES:]
            return
        kept = [w for w in self._wanted if w != new and not self._stored_range(w)]
        self._wanted = [new, *kept][:MAX_RANGES]

    @property
    def wanted(self) -> list[tuple[int, int]]:
        """The wanted ranges, newest first, then the pinned ones."""
        return [*self._wanted, *self._pinned]

    def unshown_wanted(self) -> list[int]:
        """Wanted chunks nobody is asked for that no connected source can give."""
        return [i for first, end in (*self._wanted, *self._pinned) for i in range(first, end)
                if self._state[i] and not any(s.can_give(i) for s in self._sources.values())]

    def _stored_range(self, w: tuple[int, int]) -> bool:
        return not any(self._state[i] or i in self._requesters or i in self._verifying
                       for i in range(*w))

    def _rank(self, i: int) -> int:
        """-1 for a chunk of a pinned range; 0 for one of the newest wanted range, 1 for
        the one before...; not wanted: MAX_RANGES."""
        if any(a <= i < b for a, b in self._pinned):
            return -1
        for rank, (a, b) in enumerate(self._wanted):
            if a <= i < b:
                return rank
        return MAX_RANGES

    def _playhead(self, state: _SourceState) -> int | None:
        for first, end in (*self._wanted, *self._pinned):  # at most 2 * MAX_RANGES ranges
            for i in range(first, end):
                if self._state[i] and state.can_give(i):
                    return i
        return None

    def hurry(self, order: Sequence[str], *, keep: int = KEEP_AHEAD,
              ) -> dict[str, tuple[list[int], list[int]]]:
        """Request each wanted chunk that is in the pool from the first source of `order`
        (fastest first) that can give it and has room, so that it is that source's next
        GET. The first time a source is picked here, requests of it that would go before
        are released, but its `keep` oldest: every request not wanted, and those of an
        older wanted range that another source of `order` can give (it is asked for them
        next). An older range's chunk is not cancelled and asked again of the same source:
        a holder that gets CANCEL and GET for a chunk it is sealing may send it twice.
        Returns, per source, (the chunks to GET now, in order; the chunks to CANCEL), the
        CANCELs to be sent first."""
        out: dict[str, tuple[list[int], list[int]]] = {}
        released: dict[int, str] = {}
        ranges = [*enumerate(self._wanted), *((MAX_RANGES - 1, w) for w in self._pinned)]
        for rank, (first, end) in ranges:
            for i in range(first, end):
                if not self._state[i]:
                    continue
                for sid in order:
                    state = self._sources.get(sid)
                    if state is None or not state.can_give(i) or released.get(i) == sid:
                        continue
                    if sid not in out:
                        gone = self._release_behind(sid, state, rank, keep, order)
                        released.update(dict.fromkeys(gone, sid))
                        out[sid] = ([], gone)
                    if len(state.requested) >= state.window:
                        continue  # full of wanted or kept requests: try a slower one
                    self._take(i)
                    self._requesters[i] = [sid]
                    state.requested[i] = None
                    state.asked[i >> 3] |= 1 << (i & 7)
                    out[sid][0].append(i)
                    break
        return {sid: v for sid, v in out.items() if v[0] or v[1]}

    def _release_behind(self, sid: str, state: _SourceState, rank: int, keep: int,
                        order: Sequence[str]) -> list[int]:
        """Give back `sid`'s requests that would go before a chunk of range `rank`, but
        its `keep` oldest (send them CANCEL): see `hurry`."""
        others = [st for o in order if o != sid and (st := self._sources.get(o)) is not None]
        released = []
        for i in list(state.requested)[max(0, keep):]:
            r = self._rank(i)
            if r == MAX_RANGES or (r > rank and any(o.can_give(i) for o in others)):
                released.append(i)
                self._release(sid, state, i)
        return released

    def _release(self, sid: str, state: _SourceState, i: int) -> None:
        """`sid` is no longer asked for chunk `i`: back to the pool if nobody else is."""
        state.requested.pop(i, None)
        who = self._requesters.get(i)
        if who is not None and sid in who:
            who.remove(sid)
            if not who:
                del self._requesters[i]
                self._to_pool(i)

    def next_request(self, sid: str) -> int | None:
        """The next chunk to ask `sid` for, or None (window full, or nothing it can give).
        A duplicate (endgame) only when the pool is empty."""
        state = self._sources.get(sid)
        if state is None or len(state.requested) >= state.window:
            return None
        if self._pool:
            pick = self._playhead(state)
            if pick is None:
                pick = self._rarest(state)
        elif len(state.requested) < self.endgame_below:
            pick = self._duplicate(sid, state)
        else:
            return None  # busy enough: duplicates are for sources about to go idle
        if pick is None:
            return None
        if self._state[pick]:
            self._take(pick)
            self._requesters[pick] = [sid]
        else:
            self._requesters[pick].append(sid)
            self.duplicates += 1
        state.requested[pick] = None
        state.asked[pick >> 3] |= 1 << (pick & 7)
        return pick

    def _rarest(self, state: _SourceState) -> int | None:
        # A counted partial holder has none of the chunks no counted partial holder has.
        seen = 0
        for v in range(1, 256):
            n = self._levels[v]
            if not n:
                continue
            if v > 1 or not state.counted:
                pick = self._pick_in_level(state, v, n)
                if pick is not None:
                    return pick
            seen += n
            if seen >= self._pool:
                break
        return None

    def _pick_in_level(self, state: _SourceState, v: int, n: int) -> int | None:
        """A chunk of level `v` (n chunks) that `state` can give, at random: uniformly when
        the level is dense (random positions) or small (all of it is looked at), else one of
        the SAMPLE next ones after a random starting point. Never just the first one after
        it: every receiver sees the same gaps, so the chunk after the widest gap would be
        everyone's pick and the sender would upload it several times (the swarm benchmark's
        sender uploaded the content 1.39 times that way, against 1.22)."""
        everything = state.have is None and state.lacks is None
        rng, states, count = self.rng, self._state, self.count
        if n * DENSE >= count:
            for _ in range(TRIES):
                i = rng.randrange(count)
                if states[i] == v and (everything or state.can_give(i)):
                    return i
        start = rng.randrange(count)
        find, skipped = states.find, 0
        hits: list[int] = []
        for lo, hi in ((start, count), (0, start)):
            pos = lo
            while len(hits) < SAMPLE and skipped + len(hits) < n:
                i = find(v, pos, hi)
                if i < 0:
                    break
                pos = i + 1
                if everything or state.can_give(i):
                    hits.append(i)
                    continue
                skipped += 1
                if skipped >= SCAN_LIMIT and not hits:
                    mask = _as_int(states.translate(_equals(v))) & self._give(state)
                    return _next_set_byte(mask, start) if mask else None
        return rng.choice(hits) if hits else None

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
                    other.requested.pop(index, None)
            self._verifying.add(index)
            return Arrival.ACCEPTED, others
        if (state is not None and asked and self._in_pool(index)
                and state.can_give(index)):
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
            state.requested.pop(index, None)
            if lacks and 0 <= index < self.count:
                if state.lacks is None:
                    state.lacks = bytearray((self.count + 7) // 8)
                state.lacks[index >> 3] |= 1 << (index & 7)
                state.give = None
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
        return self._pool

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
        if state is None or not self._pool:
            return False
        if state.have is None and state.lacks is None:
            return True
        return bool(_as_int(self._state.translate(_NONZERO)) & self._give(state))

    def probe(self, sid: str, index: int | None = None) -> int | None:
        """Ask partial holder `sid` for a missing chunk it did not say it has nor refused
        (`index`, or any when None): the download is stuck, or a player waits for that
        chunk and no source shows it, and a sender that shows its chunks a few at a time
        (super-seeding) serves it and shows more, where a partial holder without it
        answers that it lacks it. None if there is no such chunk or `sid` is busy."""
        state = self._sources.get(sid)
        if state is None or state.have is None or not self._pool:
            return None
        if index is None:
            if state.requested:
                return None
            mask = _as_int(self._state.translate(_NONZERO))
            mask &= ~self._give(state)
            if state.lacks is not None:
                mask &= ~_as_int(_spread(state.lacks, self.count))
            if not mask:
                return None
            i = _next_set_byte(mask, self.rng.randrange(self.count))
        else:
            i = index
            if (not self._in_pool(i) or _bit(state.have, i) or len(state.requested)
                    >= state.window or (state.lacks is not None and _bit(state.lacks, i))):
                return None
        self._take(i)
        self._requesters[i] = [sid]
        state.requested[i] = None
        state.asked[i >> 3] |= 1 << (i & 7)
        return i

    def stuck(self) -> bool:
        """Chunks are missing, nothing is in flight, and no source has any of them: only a
        HAVE or a new source can change that."""
        if self.done or self.in_flight:
            return False
        return not any(self.can_help(s) for s in self._sources)
