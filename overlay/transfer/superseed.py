"""Super-seeding: a full holder serving several requesters of one content at once shows
each a few chunks at a time, those it has handed out least, so each chunk leaves it about
once and the requesters fetch the rest from each other. Sans-I/O: `now` comes in.

BitTorrent's super-seeding (BEP 16) has a seed tell each peer it holds one piece nobody
else was shown, and show another once that one spread. Here a requester that opens a
content this holder holds in full while another requester has it open is answered, in
OPENED, with a have-bitmap of at most `AHEAD` chunks that no requester was shown, asked for
or sent yet (possibly none), as a partial holder would answer. Each chunk then sent to it
shows it one more (a HAVE): a requester that gets its chunks here goes on at the pace it
asks. A GET for a chunk it was not shown is served all the same, and shows it one more
too: the downloader sends one when it is stuck, no source it knows showing a chunk it
lacks (`Downloader._probe`). One that asks for nothing for `IDLE` seconds is shown `AHEAD`
more, least spread first (a copy sent weighs `SENT`, a requester shown it or asking for
it 1), for requesters that never probe. A requester alone is shown every chunk (no
bitmap): one recipient gets the sender's whole uplink, as before. Sessions of one device
(`device`) are one requester: a download that moves to a faster path opens its new session
while the holder may still count the old one, and would be shown AHEAD chunks, one more per
chunk sent, instead of every chunk. A small content this holder delivered whole within
`QUICK` seconds is no longer super-seeded (see QUICK): an uplink that fast has no copies
to save.

A requester that fetches from no other holder (`alone`: its node's co-recipient sourcing
is off, `Open.alone`) is shown every chunk too, whoever else fetches: nobody passes chunks
on to it, so hiding them bought nothing and cost it the downloader's probe wait whenever
others had asked for every chunk already. It still counts as another requester for those
that share: its node announces what it holds from its first chunk and serves it, so one
that opens later is shown only chunks nobody asked for and fetches the rest from it.
In the simulator (family-video, 2 MB to three recipients online within 10 s, sourcing
off, seeds 1-3) the last was done 10.7, 10.3 and 10.7 s after coming online, two of the
three having waited to probe; with `alone` 6.0, 7.6 and 5.7 s. (20 MB within 30 s, where
a few chunks shown at a time kept each busy: p50 81.0-84.2 s against 81.1-82.4.)

Measured in the simulator (seeds 1-3, docs/simulator.md): in nat-mix (a 5-chunk clip, 16
recipients, the sender on a 5 Mbit/s uplink) every recipient asked the sender for the
few chunks no co-recipient it knew held, the same ones at once: the sender uploaded 26.1,
18.1 and 19.4 MB (3.6-5.2 copies). With this 10.0, 14.2 and 14.2 MB, completion p50
31.8, 20.4 and 16.9 s against 32.4, 22.6 and 21.5. The code of today (the downloader, the
ladder and this policy as they stand) gives 5.0, 14.0 and 11.3 MB, p50 31.8, 22.4 and
17.1 s (`sim.scenario.run("nat-mix", seed=N)`); before stuck downloads looked the
co-recipients up every 2 s, 5.0, 16.3 and 13.1 MB, p50 30.8, 21.9 and 17.1 s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

AHEAD = 2  # chunks shown at once to a requester that shares this holder with others
IDLE = 30.0  # seconds without a GET after which such a requester is shown AHEAD more
SENT = 16  # a chunk's spread per copy sent, against 1 per requester shown it
# Contents whose spread is kept, the least recently opened forgotten first (one byte per
# chunk: 1 MiB for a content of 2^20 chunks); one still open is kept whatever the count.
CONTENTS = 64
# A content of at most QUICK_CHUNKS chunks that one requester fetched whole from this
# holder, every chunk sent to it, within QUICK seconds of its OPEN (timed to the end of its
# session, so bytes still queued in a socket don't count as delivered) is not super-seeded
# any more: every requester is shown every chunk, and those waiting on a few are shown the
# rest at once. Super-seeding saves a slow uplink copies; one that delivers a copy that fast
# has nothing to save, and a small content's first requester asks for every chunk in its
# first window, so the others, shown nothing, waited for the downloader's probe: 4 MB to
# three recipients on loopback, two of them done after 5.2 s instead of 0.2.
QUICK = 1.0
QUICK_CHUNKS = 64


def _bit(bitmap: bytearray, i: int) -> bool:
    return bool(bitmap[i >> 3] & (1 << (i & 7)))


@dataclass(slots=True)
class _Shown:
    """What one requester was shown of one content."""

    bitmap: bytearray
    left: int  # chunks not shown to it yet
    last_active: float  # its last GET, chunk sent or reveal
    credit: int = 0  # chunks sent to it since the last reveal: as many to show


@dataclass(slots=True)
class _Content:
    spread: bytearray  # per chunk: SENT per copy sent + 1 per requester shown it (max 255)
    fetching: set[object] = field(default_factory=set)  # sessions with it open
    cursor: int = 0  # where the next search for a least-spread chunk starts
    # A whole copy went out within QUICK seconds (see QUICK): nothing is hidden any more.
    quick: bool = False
    # Per session with it open, while it may still prove QUICK: when it opened, and which
    # chunks were sent to it.
    copies: dict[object, tuple[float, set[int]]] = field(default_factory=dict)


class SuperSeed:
    """One holder's super-seeding over all its sessions; a session is any hashable token."""

    def __init__(self, *, ahead: int = AHEAD, idle: float = IDLE) -> None:
        if ahead < 1 or idle <= 0:
            raise ValueError("ahead must be at least 1 and idle positive")
        self.ahead = ahead
        self.idle = idle
        self._contents: dict[bytes, _Content] = {}
        self._shown: dict[tuple[object, bytes], _Shown] = {}
        self._devices: dict[object, bytes] = {}  # the device of each token opened with one
        # Called when a content turns quick, per session shown only some of it: it may ask
        # for the rest now (the holder's HAVE for what `reveal` then shows).
        self._wakers: dict[object, Callable[[], None]] = {}

    def open(self, token: object, content_id: bytes, count: int, now: float, *,
             device: bytes | None = None, wake: Callable[[], None] | None = None,
             alone: bool = False) -> bytes | None:
        """A session opens a content held in full: the have-bitmap to answer with. None
        (every chunk) when the requester fetches from no other holder (`alone`), no
        session of another device (or of no known device) has it open, or the content is
        quick (QUICK); else up to AHEAD chunks nobody was shown, asked for or sent yet.
        `wake` is called should the content turn quick while this session is shown only
        some of it."""
        content = self._contents.pop(content_id, None)
        if content is None or len(content.spread) != count:
            content = _Content(bytearray(count))
        self._contents[content_id] = content  # the most recently opened last
        while len(self._contents) > CONTENTS:
            oldest = next(iter(self._contents))
            if self._contents[oldest].fetching:
                break
            del self._contents[oldest]
        if device is not None:
            self._devices[token] = device
        if wake is not None:
            self._wakers[token] = wake
        if not content.quick and count <= QUICK_CHUNKS:
            content.copies.setdefault(token, (now, set()))
        others = any(t != token and (device is None or self._devices.get(t) != device)
                     for t in content.fetching)
        content.fetching.add(token)
        if alone:
            self._shown.pop((token, content_id), None)
            return None
        shown = self._shown.get((token, content_id))
        if shown is not None:  # opened again in the same session
            return bytes(shown.bitmap)
        if not others or content.quick:
            return None
        shown = _Shown(bytearray((count + 7) // 8), count, now)
        self._shown[(token, content_id)] = shown
        self._show(content, shown, self.ahead, below=1)
        return bytes(shown.bitmap)

    def close(self, token: object, now: float | None = None) -> None:
        """The session ended (at `now`: None, when it is not known, proves nothing quick)."""
        self._devices.pop(token, None)
        self._wakers.pop(token, None)
        for cid, content in self._contents.items():
            content.fetching.discard(token)
            self._shown.pop((token, cid), None)
            copy = content.copies.pop(token, None)
            if (copy is not None and now is not None and not content.quick
                    and len(copy[1]) == len(content.spread) and now - copy[0] <= QUICK):
                self._turn_quick(cid, content)

    def _turn_quick(self, cid: bytes, content: _Content) -> None:
        """A whole copy of this content went out within QUICK: wake every session still
        shown only some of it (their next `reveal` shows the rest)."""
        content.quick = True
        content.copies.clear()
        for token in list(content.fetching):
            shown = self._shown.get((token, cid))
            if shown is not None and shown.left and (wake := self._wakers.get(token)):
                wake()

    def showing(self, token: object, content_id: bytes) -> bool:
        """This session was shown only some chunks so far (more are to come)."""
        shown = self._shown.get((token, content_id))
        return shown is not None and shown.left > 0

    def requested(self, token: object, content_id: bytes, index: int, now: float) -> bool:
        """A GET of this session came in: it is not idle. A chunk asked for by a session
        shown everything counts as shown. True if the chunk was not shown to it (the
        downloader's probe when stuck)."""
        shown = self._shown.get((token, content_id))
        content = self._contents.get(content_id)
        if content is None or not 0 <= index < len(content.spread):
            return False
        if shown is None:
            content.spread[index] = max(1, content.spread[index])
            return False
        shown.last_active = now
        if _bit(shown.bitmap, index):
            return False
        # A chunk it was not shown: it has nowhere else to get what it lacks. Counted as
        # shown; one more shown for it.
        shown.bitmap[index >> 3] |= 1 << (index & 7)
        shown.left -= 1
        content.spread[index] = min(255, content.spread[index] + 1)
        shown.credit += 1
        return True

    def sent(self, token: object, content_id: bytes, index: int, now: float) -> None:
        """Chunk `index` went out to this session: one more chunk to show it."""
        content = self._contents.get(content_id)
        if content is not None and 0 <= index < len(content.spread):
            content.spread[index] = min(255, content.spread[index] + SENT)
            if (copy := content.copies.get(token)) is not None:
                copy[1].add(index)
        shown = self._shown.get((token, content_id))
        if shown is not None:
            shown.last_active = now
            shown.credit += 1

    def reveal(self, token: object, content_id: bytes, outstanding: int, now: float
               ) -> list[int]:
        """Chunks to show this session now (a HAVE): one per chunk sent to it since the
        last call, or AHEAD when nothing is `outstanding` here and it was idle `idle`
        seconds; every one left once the content is quick."""
        shown = self._shown.get((token, content_id))
        content = self._contents.get(content_id)
        if shown is None or content is None or not shown.left:
            return []
        if content.quick:
            shown.credit = 0
            return self._show(content, shown, shown.left)
        n, shown.credit = shown.credit, 0
        if outstanding:
            shown.last_active = now  # waiting for chunks here is not idle
        elif now >= shown.last_active + self.idle:
            n = max(n, self.ahead)
            shown.last_active = now
        return self._show(content, shown, n)

    def due(self, token: object, content_id: bytes) -> float | None:
        """When this session is next due a reveal if it stays idle (None: never)."""
        shown = self._shown.get((token, content_id))
        if shown is None or not shown.left:
            return None
        content = self._contents.get(content_id)
        if content is not None and content.quick:
            return shown.last_active  # due now
        return shown.last_active + self.idle

    def _show(self, content: _Content, shown: _Shown, n: int, below: int = 256
              ) -> list[int]:
        """Show up to `n` chunks not shown to this session yet, the least spread first
        (only those spread less than `below`), searching from a cursor that moves on, so
        ties go round the content."""
        out: list[int] = []
        spread, bitmap, count = content.spread, shown.bitmap, len(content.spread)
        level = 0
        while len(out) < n and shown.left and level < below:
            found = False
            start = content.cursor
            for lo, hi in ((start, count), (0, start)):
                pos = lo
                while len(out) < n and (i := spread.find(level, pos, hi)) >= 0:
                    pos = i + 1
                    if _bit(bitmap, i):
                        continue
                    bitmap[i >> 3] |= 1 << (i & 7)
                    shown.left -= 1
                    spread[i] = min(255, level + 1)
                    content.cursor = pos % count
                    out.append(i)
                    found = True
            if not found:
                level += 1
        return out
