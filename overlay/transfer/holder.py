"""The holder's request logic for one session, sans-I/O.

Takes the requester's messages and gives back the replies to send and the GETs to serve.
Checking capability proofs, the open-content set, the GET queue and its bound, CANCEL,
the HAVE updates of a partial holder and the bad-input counters all live here, so tests
run them without sockets and the asyncio server (`server.py`) only moves bytes and seals
chunks.
"""

from __future__ import annotations

import collections
import logging
from collections import Counter
from collections.abc import Callable

from crypto.capability import check_capability_proof
from crypto.errors import VerificationError
from overlay.content.diskio import bit
from overlay.content.interfaces import Catalog, GrowingContent, ServedContent
from overlay.content.local import LocalContent
from overlay.transfer.frames import (
    MAX_HASH_PAGE,
    MAX_HAVE_BYTES,
    MAX_HAVE_ITEMS,
    Cancel,
    Error,
    ErrorCode,
    Get,
    Gets,
    Hashes,
    HashesRequest,
    Have,
    Message,
    Open,
    Opened,
)
from overlay.transfer.superseed import SuperSeed

log = logging.getLogger(__name__)

# What a requester is told when the file behind a content changed: never the holder's path.
SOURCE_CHANGED_TEXT = ("source changed: the file was edited, moved or deleted after it was "
                       "sent, so it can't be served")


WITHDRAWN_TEXT = "withdrawn: the sender cancelled this message"

# What a co-recipient says of its own copy gone: the content, and the sender's file, may
# well be as sent.
HOLDER_GONE_TEXT = ("this holder no longer has the file: its copy was edited, moved or "
                    "deleted after it was received")


def source_changed(content: ServedContent) -> bool:
    """Whether `content` is a file that is no longer what was sent (it never will be)."""
    return isinstance(content, LocalContent) and content.source_changed() is not None


def gone_text(content: ServedContent) -> str:
    """What a requester is told of a content `source_changed` holds true for."""
    if isinstance(content, LocalContent) and content.changed.withdrawn:
        return WITHDRAWN_TEXT
    if isinstance(content, LocalContent) and content.received:
        return HOLDER_GONE_TEXT
    return SOURCE_CHANGED_TEXT

MAX_OPEN_CONTENTS = 64
MAX_QUEUED_GETS = 64


class ServingSession:
    """Answers one authenticated requester; `transcript` binds its capability proofs."""

    def __init__(
        self, catalog: Catalog, transcript: bytes, counters: Counter[str], *, peer: str = "?",
        max_open: int = MAX_OPEN_CONTENTS, max_queued: int = MAX_QUEUED_GETS,
        seeder: SuperSeed | None = None, device: bytes | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._transcript = transcript
        self.counters = counters
        self._peer = peer
        self._max_open = max_open
        self._max_queued = max_queued
        self._open: dict[bytes, ServedContent] = {}
        self._gets: collections.deque[Get] = collections.deque()
        # Popped GETs being read, sealed or queued to send (a few: the sealers and the
        # sealed queue bound them) → whether a CANCEL came for it meanwhile.
        self._in_service: dict[tuple[bytes, int], bool] = {}
        # Growing (partial) contents opened here: cursor into their held-chunk log as of
        # the OPENED bitmap. `_unannounced` until the adapter has sent that OPENED and
        # watches the content; only then may HAVEs for it go out (never before OPENED).
        self._cursors: dict[bytes, int] = {}
        self._unannounced: dict[bytes, GrowingContent] = {}
        # The have-bitmap an OPENED showed (None: every chunk), which the GETS sent with
        # the OPEN is held to (`Gets.shown`); kept until the first GET of that content.
        self._shown_at_open: dict[bytes, bytes | None] = {}
        # Contents (None: a bad message) a refusal was logged for, at most `max_open`.
        self._refused: set[bytes | None] = set()
        # An OPEN with a valid capability proof came: the requester knows a content here.
        self.proven = False
        # Super-seeding across the holder's sessions (superseed.py); None: every requester
        # of a content held in full is told it holds every chunk.
        self._seeder = seeder
        self._device = device  # the requester's peer id, from the handshake
        self._wake = wake  # super-seeding has more to show this requester (see `reveals`)

    def content(self, content_id: bytes) -> ServedContent | None:
        """An opened content of this session."""
        return self._open.get(content_id)

    @property
    def queued(self) -> int:
        return len(self._gets)

    def pop_get(self) -> Get | None:
        """The next GET to serve, oldest first; it is *in service* until `finish_get`."""
        if not self._gets:
            return None
        get = self._gets.popleft()
        self._in_service[(get.content_id, get.index)] = False
        return get

    def finish_get(self, content_id: bytes, index: int) -> bool:
        """The chunk is about to go out (or can't be served): False if a CANCEL came for it
        meanwhile, so don't send it (upload is what a rate-limited holder lacks)."""
        cancelled = self._in_service.pop((content_id, index), False)
        if cancelled:
            self.counters["cancelled"] += 1
        return not cancelled

    def take_growing(self) -> list[tuple[bytes, GrowingContent]]:
        """Growing contents opened since the last call, whose OPENED has now been sent: the
        adapter watches each for new chunks, then `haves()` reports them."""
        out = list(self._unannounced.items())
        self._unannounced.clear()
        return out

    def haves(self) -> list[Have]:
        """HAVE frames for chunks that became held since the OPENED bitmap or the last
        call, for every announced growing content."""
        out: list[Have] = []
        for cid, cursor in self._cursors.items():
            if cid in self._unannounced:
                continue
            content = self._open.get(cid)
            if not isinstance(content, GrowingContent):
                continue
            new, self._cursors[cid] = content.held_since(cursor)
            for k in range(0, len(new), MAX_HAVE_ITEMS):
                out.append(Have(cid, tuple(new[k : k + MAX_HAVE_ITEMS])))
        self.counters["haves_sent"] += len(out)
        return out

    def sent(self, content_id: bytes, index: int, now: float) -> bool:
        """A chunk went out at `now`. True if super-seeding may show this requester more
        now."""
        if self._seeder is None:
            return False
        self._seeder.sent(self, content_id, index, now)
        return self._seeder.showing(self, content_id)

    def reveals(self, now: float) -> list[Have]:
        """HAVE frames for the chunks super-seeding shows this requester at `now`."""
        out: list[Have] = []
        if self._seeder is None:
            return out
        for cid in self._open:
            if not self._seeder.showing(self, cid):
                continue
            outstanding = (sum(1 for g in self._gets if g.content_id == cid)
                           + sum(1 for c, _ in self._in_service if c == cid))
            new = self._seeder.reveal(self, cid, outstanding, now)
            for k in range(0, len(new), MAX_HAVE_ITEMS):
                out.append(Have(cid, tuple(new[k : k + MAX_HAVE_ITEMS])))
        self.counters["super_seed_haves"] += len(out)
        return out

    def next_reveal(self) -> float | None:
        """When an idle requester is next due more chunks shown (None: not waiting)."""
        if self._seeder is None:
            return None
        due = [t for cid in self._open if (t := self._seeder.due(self, cid)) is not None]
        return min(due, default=None)

    def close(self, now: float | None = None) -> None:
        """The session ended: at `now` when the requester closed it, None when it failed
        (super-seeding then takes nothing from how long it lasted)."""
        if self._seeder is not None:
            self._seeder.close(self, now)

    def bad_message(self, reason: str) -> Error:
        """The reply to an authentic frame that was not a valid message."""
        return self._refuse("bad_frame", ErrorCode.BAD_REQUEST, f"bad message: {reason}")

    def _refuse(
        self, counter: str, code: ErrorCode, text: str, content_id: bytes | None = None,
        index: int | None = None,
    ) -> Error:
        """The refusal to send, counted. Logged once per content per session: the GETs
        a requester sends with its OPEN, in one flight, are each refused too when the OPEN
        is ("content not opened"), and the log said so in a line each."""
        self.counters[counter] += 1
        first = content_id not in self._refused
        if first and len(self._refused) < self._max_open:
            self._refused.add(content_id)
        what = "" if content_id is None else f" content {content_id.hex()[:16]}"
        log.log(logging.INFO if first else logging.DEBUG, "transfer: refused %s%s: %s",
                self._peer, what, text)
        return Error(code, text, content_id, index)

    def handle(self, msg: Message, now: float) -> list[Message]:
        """Process one request that came at `now` (the adapter's clock); returns the
        replies to send now."""
        if isinstance(msg, Open):
            return [self._handle_open(msg, now)]
        if isinstance(msg, HashesRequest):
            return [self._handle_hashes(msg)]
        if isinstance(msg, Get):
            self._shown_at_open.pop(msg.content_id, None)
            refusal = self._handle_get(msg, now)
            return [] if refusal is None else [refusal]
        if isinstance(msg, Gets):
            shown = self._shown_at_open.pop(msg.content_id, None)
            if not msg.shown:
                shown = None
            out: list[Message] = []
            for index in msg.indexes:  # as that many GETs, each refused on its own
                if shown is not None and not (index >> 3 < len(shown) and bit(shown, index)):
                    self.counters["first_not_shown"] += 1
                    continue  # not shown: the requester, reading the OPENED, drops it too
                refusal = self._handle_get(Get(msg.content_id, index), now)
                if refusal is not None:
                    out.append(refusal)
            return out
        if isinstance(msg, Cancel):
            self._handle_cancel(msg)
            return []
        return [self.bad_message(f"{type(msg).__name__} is not a request")]

    def _handle_open(self, msg: Open, now: float) -> Message:
        content = self._catalog.lookup(msg.content_id)
        if content is None:
            return self._refuse("unknown_content", ErrorCode.UNKNOWN_CONTENT,
                                "no such content here", msg.content_id)
        try:
            check_capability_proof(content.capability, msg.content_id, self._transcript,
                                   msg.proof)
        except VerificationError:
            return self._refuse("bad_capability", ErrorCode.BAD_CAPABILITY,
                                "capability proof rejected", msg.content_id)
        if source_changed(content):
            return self._refuse("source_changed", ErrorCode.SOURCE_CHANGED,
                                gone_text(content), msg.content_id)
        if isinstance(content, GrowingContent):
            have, cursor = content.held_snapshot()
        else:
            have, cursor = content.have_bitmap(), None
            if have is None and self._seeder is not None and content.leaves is not None:
                have = self._seeder.open(self, msg.content_id, len(content.leaves), now,
                                         device=self._device, wake=self._wake,
                                         alone=msg.alone)
        if content.leaves is None or (have is not None and len(have) > MAX_HAVE_BYTES):
            return self._refuse("unavailable", ErrorCode.UNAVAILABLE,
                                "this holder cannot serve that content yet", msg.content_id)
        if msg.content_id not in self._open and len(self._open) >= self._max_open:
            return self._refuse("busy", ErrorCode.BUSY, "too many open contents",
                                msg.content_id)
        self._open[msg.content_id] = content
        if cursor is not None and isinstance(content, GrowingContent):
            if msg.content_id not in self._cursors:
                self._unannounced[msg.content_id] = content
            self._cursors[msg.content_id] = cursor
        self.counters["opened"] += 1
        self.proven = True
        self._shown_at_open[msg.content_id] = have
        return Opened(msg.content_id, content.size, content.chunk_size, have)

    def _handle_hashes(self, msg: HashesRequest) -> Message:
        content = self._open.get(msg.content_id)
        if content is None or content.leaves is None:
            return self._refuse("not_open", ErrorCode.NOT_OPEN, "content not opened",
                                msg.content_id)
        leaves = content.leaves
        if msg.start >= len(leaves):
            return self._refuse("bad_frame", ErrorCode.BAD_REQUEST,
                                f"hash index {msg.start} outside 0..{len(leaves) - 1}",
                                msg.content_id)
        end = min(len(leaves), msg.start + min(msg.count, MAX_HASH_PAGE))
        return Hashes(msg.content_id, msg.start, tuple(leaves[msg.start : end]))

    def _handle_get(self, msg: Get, now: float) -> Error | None:
        content = self._open.get(msg.content_id)
        if content is None:
            return self._refuse("not_open", ErrorCode.NOT_OPEN, "content not opened",
                                msg.content_id, msg.index)
        if not content.has(msg.index):
            if source_changed(content):
                return self._refuse("source_changed", ErrorCode.SOURCE_CHANGED,
                                    gone_text(content), msg.content_id, msg.index)
            return self._refuse("not_held", ErrorCode.NOT_HELD,
                                f"chunk {msg.index} not held here", msg.content_id, msg.index)
        if len(self._gets) >= self._max_queued:
            return self._refuse("busy", ErrorCode.BUSY, "too many outstanding requests",
                                msg.content_id, msg.index)
        self._gets.append(msg)
        if self._seeder is not None and self._seeder.requested(self, msg.content_id,
                                                               msg.index, now):
            self.counters["super_seed_probes"] += 1  # a chunk not shown to it: a probe
        return None

    def _handle_cancel(self, msg: Cancel) -> None:
        for g in self._gets:
            if g.content_id == msg.content_id and g.index == msg.index:
                self._gets.remove(g)
                self.counters["cancelled"] += 1
                return
        key = (msg.content_id, msg.index)
        if key in self._in_service:
            self._in_service[key] = True
