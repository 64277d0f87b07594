"""The downloader: fetch a content's missing chunks from several holders at once.

Per source, one task: connect, handshake (refusing a holder that isn't the expected peer),
then in one flight OPEN with a capability proof, the chunk-hash list's requests if we don't
have a verified one yet (and no other source is getting it) and the first window of GETs,
then two loops joined in a TaskGroup: the *requester* keeps the source's window of GETs
outstanding as `ChunkScheduler` decides (rarest first, duplicates only in the endgame) and
sends CANCELs; the *reader* files what comes back: chunks, refusals and HAVE updates from a
partial holder. `SourcePace` sizes each window from the source's measured rate and says
when the source has stalled, relative to that rate.

Arrived chunks go to `writers` filing threads (a `WorkQueue`) that verify, open and write
each one and mark it held (`write_chunk`, one blocking call per chunk), so the loop keeps
receiving while the AEAD and BLAKE3 use the other core (both release the GIL); the loop
hears back in batches, not once per chunk. Chunks arrive in page-aligned buffers
(`TransferSession.align_payloads`) and are opened in place and written from there; a
stored chunk's buffer goes back to its session for a later chunk.
A chunk that doesn't verify bans its source for this content and goes back to the pool; a
source that errors or stalls is dropped and its requests reassigned. Sources can be added
while the download runs (`add_source`: a provider found by a later DHT lookup; `add_found`:
those a lookup still running will name, which the download waits for). When chunks
are missing that no connected source has, the download asks each partial holder for one of
them after `probe_after` seconds (a sender that shows its chunks a few at a time serves
it), waits `have_wait` seconds for a HAVE or a new source, then gives up with
NoSourceReachable (the node retries later).
A source connected through a slow path (the relay, WebRTC: `SLOW_PATHS`) is dialled again
over the fast rungs alone (`Source.upgrade`) in the background, after `upgrade_after`
seconds and then backing off to `upgrade_max`, unless the download would be over within
`upgrade_left` seconds at its rate anyway. When one connects and its handshake proves the
same peer, the source moves over (`_Moved`): its slow session's loops stop, the chunks it
still had outstanding go back to the pool (those that arrived are filed as usual), the slow
session is closed, and the new one opens the content and serves the source from then on.
The source neither fails nor restarts; `SourceStats.by_path` keeps the bytes each path
carried.
Memory is bounded by the windows and the write queue, never by the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity
from overlay.content.partial import PartialContent
from overlay.transfer.errors import RemoteError, SessionFailed, TransferError
from overlay.transfer.frames import Chunk, ErrorCode, Have
from overlay.transfer.pacing import SourcePace
from overlay.transfer.requester import TransferSession, open_transfer_session
from overlay.transfer.scheduler import Arrival, ChunkScheduler
from overlay.transfer.workers import WorkQueue
from overlay.transports.ladder import SLOW_PATHS, Source
from overlay.transports.stream import StreamError
from rendezvous.backoff import Backoff
from rendezvous.errors import is_disk_full

log = logging.getLogger(__name__)

# Bytes that must arrive within one stall period for a slow chunk to count as progress
# (a source trickling less than this is as good as stalled).
MIN_TRICKLE = 16 * 1024
# GETs sent to a source at a time, at most (and at most half its window): see _may_refill.
REFILL = 4
# Seconds a download waits, stuck (no connected source shows a missing chunk), before it
# asks each partial holder for a chunk it did not show (`_probe`): a sender super-seeding
# (superseed.py) serves it and shows more. At once, a recipient whose co-recipients were
# still connecting or fetching took the chunk from the sender: in the simulator's nat-mix
# (seeds 1-3) the sender uploaded 13.7, 23.4 and 19.4 MB of a 5 MB clip; after 3 s 10.0,
# 15.2 and 15.2; after 5 s 10.0, 14.2 and 14.2. The price: a recipient that shares but
# finds no co-recipient holding a chunk waits that long when shown nothing. The node looks
# the co-recipients up meanwhile (`Stuck`; STUCK_LOOKUP in overlay/app/holders.py) and
# those that got chunks serve them: 2 MB to three recipients on a shaped 5 Mbit/s uplink
# (tests/natlab/test_fidelity.py), the last was done after 8.8 s with sourcing on, against
# 11.7-12.1 when they were looked up only every 10 s, and 10.0 with sourcing off. One that
# fetches from the sender alone (sourcing off: `alone`) is shown every chunk and never
# waits: in the simulator (family-video, 2 MB to three recipients online within 10 s,
# sourcing off, seeds 1-3) two of the three waited, done 9.4-10.7 s after coming online
# against 4.1-4.6 for the first; now all three are done after 4.1-7.6 s.
PROBE_AFTER = 5.0
# Filing threads. Each spends about 0.6 ms of CPU per 2 MiB chunk (open, hash) and then
# waits 2-6 ms for its O_DIRECT write, so two of them were busy 97% of a 1 GiB delivery
# in 2 MiB chunks here with chunks queueing behind them; four took that delivery from
# about 1.0 to 1.25 GB/s. Eight were no faster: each write then waited 11 ms instead of 6,
# the disk giving about 1.5 GB/s while both cores were busy (2.1 GB/s with nothing else
# running).
WRITERS = 4
# Chunks between arrival and stored (being filed or queued for it): 2 * writers + 1, but no
# more than FILING_BYTES of them, and at least one per writer. The receiving loop reads no
# further ahead, so this also bounds the chunk buffers a download keeps. With 2 and 4 MiB
# chunks the 18 and 36 MiB of nine cost more than they gave: in `benchmarks transfer`,
# alternating pairs of 1 GiB deliveries, 4 MiB chunks: against two writers with five
# chunks, four writers with four chunks gave a median pair of 1.06 and 1.04 (5 pairs each),
# with five 1.04, with six 0.97, with three 1.01; six writers with six 0.97. 2 MiB chunks
# (`--media`), four chunks against nine: 1.04 (6 pairs) and 1.01 (8 pairs), five 1.01. 1 MiB
# chunks (256 MiB), four against nine: 0.98 (8 pairs). A writer waiting on the disk holds
# its chunk and no core (perf sched over 0.5 s of a delivery with four writers and nine
# chunks: 1.4 s between them waiting on the disk, and both cores idle 11-16% of the time;
# about half of those waits were for ext4's inode lock, see `diskio.preallocate`).
FILING_BYTES = 9 << 20


def filing_limit(writers: int, chunk_size: int) -> int:
    """Chunks of `chunk_size` bytes a download with `writers` filing threads lets arrive
    before it waits for one to be stored: 9 for four writers of 1 MiB chunks, 4 of 2 MiB
    chunks or larger."""
    return min(2 * writers + 1, max(writers, FILING_BYTES // max(chunk_size, 1)))


# A source on a slow path (SLOW_PATHS) is dialled over the fast rungs again after this many
# seconds, then after twice that and so on up to UPGRADE_MAX: a holder that was starting
# again listens within seconds, and one that can only be relayed costs a failed dial (and
# at most a STUN and a PIPE for the punch) every two minutes, not a stream of them.
UPGRADE_AFTER = 3.0
UPGRADE_MAX = 120.0
# No upgrade is tried when the rest of the download would take less than this at the
# source's current rate: the move itself costs a round trip or two and a new window.
UPGRADE_LEFT = 5.0


@dataclass(frozen=True, slots=True)
class SourceConnected:
    source: str
    path: str
    has_all: bool


@dataclass(frozen=True, slots=True)
class ChunkStored:
    index: int
    source: str


@dataclass(frozen=True, slots=True)
class SourceBanned:
    """The source lied (a bad chunk or hash list): not used again for this content."""

    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class SourceFailed:
    """The source could not be reached, refused, errored or stalled."""

    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class Stuck:
    """Chunks are missing and no connected source shows any of them (a sender
    super-seeding shows them to others first): only a HAVE or a new source helps."""

    remaining: int


FetchEvent = SourceConnected | ChunkStored | SourceBanned | SourceFailed | Stuck


@dataclass(slots=True)
class SourceStats:
    """What one source did for this download."""

    label: str
    path: str = ""
    chunks: int = 0
    bytes: int = 0
    first_at: float | None = None
    last_at: float | None = None
    outcome: str = "pending"  # pending | active | done | banned | failed
    reason: str = ""
    window: int = 0  # GETs it may have outstanding now
    recent_rate: float = 0.0  # its measured rate now (bytes/s), what its window follows
    source_changed: bool = False  # it answered SOURCE_CHANGED: it will never serve this
    gone: str = ""  # the text of that answer
    no_content: bool = False  # its last try was answered UNKNOWN_CONTENT: it lacks this
    # Bytes each path carried, in the order the source used them (relay, then tcp after a
    # move to a fast path); they add up to `bytes`.
    by_path: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Bytes per second: the current measured rate while active, else the average
        over the time it delivered."""
        if self.outcome == "active" and self.recent_rate > 0:
            return self.recent_rate
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.bytes / (self.last_at - self.first_at)


class FetchError(Exception):
    """The download could not complete now."""


class NoSourceReachable(FetchError):
    """No source could deliver the remaining chunks; retry later (with backoff)."""

    def __init__(self, failures: dict[str, str], missing: int) -> None:
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items()) or "no sources given"
        super().__init__(f"no source reachable for {missing} missing chunks ({detail})")
        self.failures = failures
        self.missing = missing


class DiskFull(FetchError):
    """A chunk could not be written for want of room on this disk: not a source's fault,
    and freeing space ends it."""


class SourceChanged(FetchError):
    """The sender's file changed after sending and no other source can finish: failed."""


SOURCE_CHANGED = "source changed"
SOURCE_CHANGED_FAILURE = (f"{SOURCE_CHANGED}: the sender's file was edited, moved or deleted "
                          "after it was sent; they are told, and can send it again")


def changed_source(error: str | None) -> bool:
    """Whether a recorded failure is a changed source's, in this wording or an older one."""
    return error is not None and error.startswith(SOURCE_CHANGED + ":")


WITHDRAWN_FAILURE = "withdrawn: the sender cancelled this message"


class _Ban(Exception):
    pass


class _Stalled(TransferError):
    pass


class _Moved(Exception):
    """A source's upgrade connected: its session is `session` from now on, `after` seconds
    after its slow session opened."""

    def __init__(self, session: TransferSession, after: float) -> None:
        super().__init__("moved to a faster path")
        self.session = session
        self.after = after


@dataclass(slots=True)
class _SourceRun:
    source: Source
    stats: SourceStats
    task: asyncio.Task[None] | None = None
    session: TransferSession | None = None
    pace: SourcePace | None = None
    ended: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # the requester's
    cancels: list[int] = field(default_factory=list)  # CANCELs the requester owes
    urgent: list[int] = field(default_factory=list)  # wanted GETs it owes, before any other
    read_timeout: asyncio.Timeout | None = None  # the reader's current wait
    probed_at: int = -1  # chunks remaining when it was last probed (`_probe`)
    reclaim: list[int] = field(default_factory=list)  # outstanding when it moved (`_move`)


@dataclass(slots=True)
class _Arrival:
    run: _SourceRun
    chunk: Chunk = field(repr=False)
    session: TransferSession = field(repr=False)  # the one whose buffer holds it


_Filed = tuple[_Arrival, bool | None, BaseException | None]  # from the filing workers


def _first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that ended a source's loops (not the cancellations it caused)."""
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return asyncio.CancelledError()


class Downloader:
    """One download of one content; `await run()` returns the final path.

    `window` is the most GETs one source may have outstanding; each source's actual window
    starts at `min_window` and follows its rate (`SourcePace`). `counters` count what a
    test or a status page wants to see: duplicate requests, cancels, late copies, HAVEs.

    `alone`: this download fetches from the sender only, never from co-recipients (the
    node's co-recipient sourcing is off). Its OPENs say so (`Open.alone`), and a sender
    that super-seeds shows it every chunk: hiding chunks from it buys nothing, as nobody
    else will pass them on, and cost it `probe_after` seconds whenever other recipients
    had asked for every chunk already. A download with sourcing on does not say so, even
    while the sender is its only source: co-recipients join it later, found in the DHT.

    `sender`: the label of the sender's source. Only its 410 fails the download as the
    source changed (or withdrawn); a co-recipient's says that its own copy is gone, and
    the file may well be as sent. None: any source's 410 counts.
    """

    def __init__(
        self, partial: PartialContent, sources: Sequence[Source], identity: DeviceIdentity,
        *, window: int = 8, min_window: int = 2, target_latency: float = 1.0,
        refill: int = REFILL, writers: int = WRITERS, stall_timeout: float = 30.0,
        min_stall: float = 2.0,
        connect_timeout: float = 10.0, handshake_timeout: float = 10.0,
        have_wait: float | None = None, probe_after: float = PROBE_AFTER,
        upgrade_after: float = UPGRADE_AFTER, upgrade_max: float = UPGRADE_MAX,
        upgrade_left: float = UPGRADE_LEFT, rng: random.Random | None = None,
        on_event: Callable[[FetchEvent], None] | None = None, alone: bool = False,
        sender: str | None = None,
    ) -> None:
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError("source labels must be unique")
        self.partial = partial
        self.identity = identity
        self.window = window
        self.min_window = min(min_window, window)
        self.target_latency = target_latency
        self.refill = max(1, refill)
        self.stall_timeout = stall_timeout
        self.min_stall = min_stall
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.have_wait = stall_timeout if have_wait is None else have_wait
        self.probe_after = probe_after
        self.upgrade_backoff = Backoff(upgrade_after, max(upgrade_after, upgrade_max))
        self.upgrade_left = upgrade_left
        self.alone = alone
        self.sender = sender
        self._on_event = on_event
        self._runs: dict[str, _SourceRun] = {s.label: _SourceRun(s, SourceStats(s.label))
                                             for s in sources}
        # From the have-bitmap: one byte of state per chunk, not an int per missing chunk.
        held = partial.have_bitmap()
        self.scheduler = (ChunkScheduler(count=partial.count, held=held, rng=rng)
                          if held is not None else ChunkScheduler(count=partial.count, rng=rng))
        self._filer: WorkQueue[_Arrival, bool] = WorkQueue(
            self._file, self._filed, workers=writers, name="filer")
        self._filing_limit = filing_limit(writers, partial.chunk_size)
        self._failure: BaseException | None = None  # the disk failed: the download ends
        self._changed = asyncio.Event()
        self._leaves_lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None
        self._accepting = True
        self._lookups = 0  # lookups whose sources `add_found` adds once they end
        self.chunks_received = 0
        self.counters: Counter[str] = Counter()

    @property
    def in_flight_bound(self) -> int:
        """Most chunks that can be requested or received but not yet stored at any moment:
        every source's window and the chunks being filed. A kill loses at most these; a
        banned source can have served at most its share of them."""
        return self.window * len(self._runs) + self._filing_limit

    @property
    def stats(self) -> list[SourceStats]:
        return [r.stats for r in self._runs.values()]

    @property
    def source_labels(self) -> list[str]:
        """Every source given or added so far, whatever its outcome (to avoid duplicates)."""
        return list(self._runs)

    def is_using(self, label: str) -> bool:
        """The source is connecting or delivering now."""
        run = self._runs.get(label)
        return run is not None and not run.ended

    def add_source(self, source: Source) -> bool:
        """Use one more holder, also while `run()` runs (a provider found later).

        False if the download is over, the label is in use now, or it was banned. A source
        that failed or finished earlier is tried again (it may be back, or hold more),
        except one that answered it has no such content or no longer serves it (410):
        a provider that dropped the content stays named in the DHT until its record
        lapses (up to 48 h), and every provider refresh (10 s) connected to it again."""
        if not self._accepting:
            return False
        old = self._runs.get(source.label)
        if old is not None and (not old.ended or old.stats.outcome == "banned"
                                or old.stats.no_content or old.stats.source_changed):
            return False
        stats = old.stats if old is not None else SourceStats(source.label)
        stats.outcome, stats.reason, stats.no_content = "pending", "", False
        run = _SourceRun(source, stats)
        self._runs[source.label] = run
        if self._tg is not None:
            self._start(run, self._tg)
        return True

    def add_found(self, lookup: asyncio.Future[list[Source]]) -> None:
        """Add the sources `lookup` names once it ends (a DHT provider lookup that started
        with the download: a walk of several round trips, longer with dead nodes to time
        out). Until it ends the download does not end for want of a source: with every
        source failed, or none showing a missing chunk, it waits for the lookup's before
        NoSourceReachable, as when it started only once the lookup was back. A lookup that
        fails or is cancelled adds nothing."""
        self._lookups += 1

        def ended(done: asyncio.Future[list[Source]]) -> None:
            self._lookups -= 1
            if not done.cancelled() and done.exception() is None:
                for source in done.result():
                    if self.add_source(source):
                        log.info("fetch %s: source %s found", self.partial.file_name,
                                 source.label)
            self._wake_all()

        lookup.add_done_callback(ended)

    def _start(self, run: _SourceRun, tg: asyncio.TaskGroup) -> None:
        run.task = tg.create_task(self._run_source(run))
        run.task.add_done_callback(lambda _: self._never_ran(run))

    def _never_ran(self, run: _SourceRun) -> None:
        """A task cancelled before its first step never runs `_run_source`'s `finally`:
        the supervisor retires a source still connecting once every chunk is in, and a
        source added in that same loop turn (a provider refresh) was cancelled unstarted
        and left the download waiting for it for ever. Mark it ended here instead."""
        if not run.ended:
            run.ended = True
            self._wake_all()

    def want_first(self, first: int, end: int, *, pinned: bool = False) -> None:
        """Fetch chunks `first`..`end`-1 before the others (a player's playhead, a clip's
        index): each one nobody is asked for becomes the next GET of the fastest source
        that has it, its unwanted requests queued before it cancelled (`ChunkScheduler.
        hurry`). Before that, a rate-capped sender served a wanted chunk after the window
        already asked of it: 1.3 s per seek step at 4 MB/s."""
        self.scheduler.want_first(first, end, pinned=pinned)
        self._hurry()
        self._probe_wanted()
        self._wake_all()

    def _active_runs(self) -> list[_SourceRun]:
        """Sources connected and fetching (their pace known)."""
        return [r for r in self._runs.values()
                if not r.ended and r.stats.outcome == "active" and r.pace is not None]

    def _hurry(self) -> None:
        active = self._active_runs()
        active.sort(key=lambda r: -(r.pace.rate or 0.0) if r.pace is not None else 0.0)
        for label, (gets, cancels) in self.scheduler.hurry(
                [r.stats.label for r in active]).items():
            run = self._runs[label]
            run.cancels.extend(cancels)
            run.urgent.extend(gets)
            self.counters["hurried"] += len(gets)
            self.counters["hurry_cancels"] += len(cancels)
            log.debug("fetch %s: wanted %s next from %s, %d requests cancelled before them",
                      self.partial.file_name, gets, label, len(cancels))

    def _probe_wanted(self) -> None:
        """Wanted chunks no source shows: ask a partial holder for each at once (a sender
        super-seeding serves it) rather than when the download is stuck."""
        active = self._active_runs()
        for i in self.scheduler.unshown_wanted():
            for run in active:
                if self.scheduler.probe(run.stats.label, i) is not None:
                    run.urgent.append(i)
                    self.counters["probes"] += 1
                    break

    def _emit(self, event: FetchEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _notify(self) -> None:
        # Wake every waiter once: they wait on the current Event, which is then replaced.
        self._changed.set()
        self._changed = asyncio.Event()

    def _wake_all(self) -> None:
        """Something every source may care about changed (a chunk stored or back in the
        pool, a source gone): every requester looks again, and so does the supervisor."""
        for run in self._runs.values():
            run.wake.set()
        self._notify()

    async def run(self) -> Path:
        """Fetch every missing chunk, then complete (rename) the file; returns its path.

        Raises NoSourceReachable when the sources given cannot finish it."""
        try:
            if not self.scheduler.done:
                await self._fetch_all()
        finally:
            self._accepting = False
        if not self.partial.is_complete:
            runs = [r.stats for r in self._runs.values()]
            # Failed for good only when the sender said its file changed and every other
            # one was reached and could not finish it either (one that could not be
            # reached may hold the rest later: that is a retry).
            changed = [r for r in runs if r.source_changed
                       and (self.sender is None or r.label == self.sender)]
            if changed and all(r.source_changed or r.outcome != "failed" for r in runs):
                said = changed[0].gone
                raise SourceChanged(WITHDRAWN_FAILURE if said.startswith("withdrawn") else
                                    SOURCE_CHANGED_FAILURE)
            # The sources that said why they don't serve it first: the inbox keeps the
            # first 500 characters of this, and the reason of a sender that could not be
            # reached (each rung of the ladder, one after the other) took them all.
            said_why = sorted(runs, key=lambda r: not (r.no_content or r.source_changed))
            failures = {r.label: r.reason or r.outcome for r in said_why}
            raise NoSourceReachable(failures, self.scheduler.remaining)
        return await asyncio.to_thread(self.partial.complete)

    async def _fetch_all(self) -> None:
        failed: BaseException | None = None
        try:
            await self._run_tasks()
        except* OSError as eg:  # the disk, not a source: nothing to retry elsewhere
            failed = eg
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
        # Raised here, not in the except* block: Python before 3.11.4 (Debian 12's python3
        # is 3.11.2) wraps what that block raises in an ExceptionGroup, which no caller's
        # `except DiskFull` or `except FetchError` catches.
        if failed is None:
            return
        if is_disk_full(failed):
            raise DiskFull(f"the disk is full: cannot write {self.partial.part_path} "
                           f"({getattr(failed, 'strerror', None) or failed})")
        raise FetchError(f"cannot write {self.partial.part_path}: {failed}")

    async def _run_tasks(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    for run in self._runs.values():
                        if run.task is None and not run.ended:
                            self._start(run, tg)
                    await self._supervise()
                    self._accepting = False
                    while self._filer.pending:
                        await self._filer.changed()
                finally:
                    self._tg = None
                    self._accepting = False
        finally:
            await self._filer.aclose()
        if self._failure is not None:
            raise self._failure

    async def _supervise(self) -> None:
        """Wait until every source has ended; retire the connected ones when chunks are
        missing that none of them has and nothing changed for `have_wait` seconds."""
        loop = asyncio.get_running_loop()
        stuck_since: float | None = None
        stuck_remaining = -1
        while True:
            changed = self._changed
            if self._failure is not None:
                raise self._failure
            live = [r for r in self._runs.values() if not r.ended]
            if not live and (self.scheduler.done or not self._lookups):
                return
            connecting = bool(self._lookups) or any(r.stats.outcome == "pending" for r in live)
            if self.scheduler.done:
                for r in live:  # still connecting: not needed any more
                    if r.stats.outcome == "pending" and r.task is not None:
                        r.stats.outcome, r.stats.reason = "done", "not needed any more"
                        r.task.cancel()
            deadline = None
            # Stuck: a source is connected and none shows a missing chunk. The wait runs on
            # while more sources connect (those the node's lookups find every STUCK_LOOKUP
            # seconds while stuck, a refresh's): one that connects and shows nothing does
            # not start it over, or each lookup that found one would put the probe off.
            stuck = self.scheduler.stuck() and bool(self._active_runs())
            if stuck and (stuck_since is None or self.scheduler.remaining != stuck_remaining):
                # Stuck again after chunks came in (a super-seeding sender shows its
                # chunks a few at a time): a new wait, not the old one going on. The
                # waits added up, and a download that was moving gave up.
                stuck_since, stuck_remaining = loop.time(), self.scheduler.remaining
                self._emit(Stuck(stuck_remaining))
            if stuck and stuck_since is not None and not connecting:
                now = loop.time()
                # Deadlines compared as computed: `now - since >= wait` could stay a hair
                # short at the very time the timer fired, and a virtual clock never moves on.
                probe_at = stuck_since + self.probe_after
                give_up_at = stuck_since + self.have_wait
                if now >= probe_at and self._probe(live):
                    continue
                if now >= give_up_at:
                    for r in live:
                        if r.stats.outcome == "active":
                            r.stats.outcome = "done"
                            r.stats.reason = "holds none of the missing chunks"
                        if r.task is not None:
                            r.task.cancel()
                    await asyncio.wait([r.task for r in live if r.task is not None])
                    return
                deadline = give_up_at if now >= probe_at else min(probe_at, give_up_at)
            elif not stuck:
                stuck_since = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await changed.wait()

    def _probe(self, live: list[_SourceRun]) -> bool:
        """Stuck: ask each connected partial holder for one missing chunk it did not show
        (`ChunkScheduler.probe`). A sender super-seeding serves it and shows more at once,
        instead of after its idle wait; a partial holder answers that it lacks it. One
        probe per source until a chunk is stored. True if a probe went out."""
        sent = False
        remaining = self.scheduler.remaining
        for run in live:
            if run.stats.outcome != "active" or run.probed_at == remaining:
                continue
            run.probed_at = remaining
            index = self.scheduler.probe(run.stats.label)
            if index is not None:
                run.urgent.append(index)
                run.wake.set()
                self.counters["probes"] += 1
                sent = True
        return sent

    # --- one source -------------------------------------------------------------------
    async def _run_source(self, run: _SourceRun) -> None:
        label = run.stats.label
        try:
            await self._serve_from(run)
            if run.stats.outcome != "banned":
                run.stats.outcome = "done"
        except _Ban as exc:
            self._ban(run, str(exc))
        except (StreamError, TransferError, TimeoutError, OSError) as exc:
            if isinstance(exc, RemoteError) and exc.code == ErrorCode.SOURCE_CHANGED:
                run.stats.source_changed, run.stats.gone = True, exc.text
            if run.stats.outcome != "banned":
                reason = "stalled or timed out" if isinstance(exc, TimeoutError) else str(exc)
                run.stats.outcome, run.stats.reason = "failed", reason
                run.stats.no_content = (isinstance(exc, RemoteError)
                                        and exc.code == ErrorCode.UNKNOWN_CONTENT)
                log.info("fetch %s: source %s failed: %s", self.partial.file_name, label,
                         reason)
                self._emit(SourceFailed(label, reason))
        finally:
            run.ended = True
            self.scheduler.remove_source(label)
            self._wake_all()
            if run.session is not None:
                with contextlib.suppress(StreamError):
                    await run.session.aclose()

    def _ban(self, run: _SourceRun, reason: str) -> None:
        if run.stats.outcome == "banned":
            return
        run.stats.outcome, run.stats.reason = "banned", reason
        log.warning("fetch %s: banned source %s: %s", self.partial.file_name, run.stats.label,
                    reason)
        self._emit(SourceBanned(run.stats.label, reason))
        self.scheduler.remove_source(run.stats.label)
        self._wake_all()
        if run.task is not None and not run.ended and run.task is not asyncio.current_task():
            run.task.cancel()

    async def _serve_from(self, run: _SourceRun) -> None:
        async with asyncio.timeout(self.connect_timeout):
            stream = await run.source.connect()
        session: TransferSession | None = await open_transfer_session(
            stream, self.identity, expected_peer=run.source.peer_id,
            handshake_timeout=self.handshake_timeout)
        while session is not None:
            session = await self._serve_session(run, session)

    async def _serve_session(self, run: _SourceRun, session: TransferSession
                             ) -> TransferSession | None:
        """Serve the source over `session` until the download no longer needs it; returns
        the session it moved to when its upgrade connected (None when it is done)."""
        p, sched, label = self.partial, self.scheduler, run.stats.label
        run.session = session
        run.stats.path = session.path
        # The handle gives the layout, so OPEN, the HASHES requests (one source at a time
        # while the hash list is not known) and the first GETs go in one flight: the first
        # chunk comes one round trip after the handshake, not three. The GETs are picked as
        # of a holder of every chunk; the holder serves those its OPENED shows (`Gets.
        # shown`), and the others go back to the pool here. The holder answers in order:
        # the hash list goes out before it even reads the GETs (a chunk queued first held
        # it back a whole chunk's time on a slow uplink, past the stall timeout), and the
        # chunks wait in the session until the hash list is verified.
        # A source's chunks wait for the filer (up to its limit) and one more arrives.
        session.align_payloads(p.scheme.seal_lead, spare=self._filing_limit + 1)
        run.pace = pace = SourcePace(
            p.chunk_size, min_window=self.min_window, max_window=self.window,
            target_latency=self.target_latency, min_stall=self.min_stall,
            max_stall=self.stall_timeout)
        sched.add_source(label, window=pace.window)
        first = list(iter(lambda: sched.next_request(label), None))
        pages: list[tuple[int, int]] | None = None
        ask_leaves = p.leaves is None and not self._leaves_lock.locked()
        if ask_leaves:
            await self._leaves_lock.acquire()  # not held: taken at once
        try:
            session.queue_open(p.content_id, p.capability, alone=self.alone)
            if ask_leaves:
                pages = session.queue_hashes(p.content_id, p.size, p.chunk_size)
            self.counters["get_frames"] += session.queue_first(p.content_id, first)
            await session.flush()
            if first:
                pace.busy(asyncio.get_running_loop().time())
            # The filing threads start while the flight is out, not as its chunks arrive:
            # started by a submit, each held the loop 0.7-2.6 ms here (both cores busy).
            self._filer.start()
            async with asyncio.timeout(self.stall_timeout):
                info = await session.opened(p.content_id)
            if (info.size, info.chunk_size) != (p.size, p.chunk_size):
                raise _Ban(f"claims layout {info.size}/{info.chunk_size}, "
                           f"the handle says {p.size}/{p.chunk_size}")
            sched.set_have(label, info.have)
            taken = [i for i in first if info.has(i)]
            for i in first:
                if not info.has(i):
                    sched.chunk_failed(label, i)  # not shown: not served, back to the pool
            self.counters["gets"] += len(taken)
            self.counters["first_gets"] += len(taken)  # sent with the OPEN
            if pages is not None:
                await self._verify_leaves(session, pages)
        finally:
            if ask_leaves:
                self._leaves_lock.release()
        await self._ensure_leaves(session)
        run.stats.outcome, run.stats.window = "active", pace.window
        self._emit(SourceConnected(run.stats.label, session.path, info.have is None))
        # The supervisor too: a source that holds none of the missing chunks (a partial
        # holder, or a sender showing a few at a time) may leave the download stuck, and
        # the supervisor, last woken while it was connecting, would not start the wait.
        self._probe_wanted()
        self._wake_all()
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._receive_loop(run, session, pace))
                upgrader = tg.create_task(self._upgrade_loop(run, session))
                await self._request_loop(run, session, pace)
                reader.cancel()
                upgrader.cancel()
        except BaseExceptionGroup as eg:
            exc = _first_error(eg)
            if not isinstance(exc, _Moved):
                raise exc from None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled as the upgrade connected (the TaskGroup raised the move, not
                # the cancel): the new session is not needed.
                with contextlib.suppress(StreamError):
                    await exc.session.aclose()
                raise asyncio.CancelledError() from None
            await self._move(run, session, exc)
            return exc.session
        return None

    async def _upgrade_loop(self, run: _SourceRun, session: TransferSession) -> None:
        """While the source is on a slow path, dial its fast rungs again now and then
        (`Source.upgrade`; see the module docstring); raises _Moved with the new session
        once one connects and proves the same peer."""
        upgrade, peer = run.source.upgrade, run.source.peer_id
        if upgrade is None or peer is None or session.path not in SLOW_PATHS:
            return
        label = run.stats.label
        loop = asyncio.get_running_loop()
        opened = loop.time()
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(self.upgrade_backoff.delay(attempt))
            if self.scheduler.done:
                return
            # Its average over this session, not the pace's recent rate: a relay's first
            # burst (its token bucket full) measured five times its steady rate here.
            left = self.scheduler.remaining * self.partial.chunk_size
            rate = session.bytes_received / max(loop.time() - opened, 1e-3)
            if session.bytes_received and left < rate * self.upgrade_left:
                return  # over within seconds anyway
            self.counters["upgrade_attempts"] += 1
            try:
                async with asyncio.timeout(self.connect_timeout):
                    stream = await upgrade()
            except (StreamError, OSError, TimeoutError) as exc:
                log.debug("fetch %s: source %s still on %s: %s", self.partial.file_name,
                          label, session.path, exc)
                continue
            try:
                new = await open_transfer_session(stream, self.identity, expected_peer=peer,
                                                  handshake_timeout=self.handshake_timeout)
            except TransferError as exc:  # the stream is closed
                log.info("fetch %s: source %s: its %s connection failed the handshake: %s",
                         self.partial.file_name, label, stream.path, exc)
                continue
            except BaseException:
                await stream.aclose()
                raise
            raise _Moved(new, loop.time() - opened)

    async def _move(self, run: _SourceRun, old: TransferSession, moved: _Moved) -> None:
        """Hand the source over from `old` to the session it `moved` to: its loops on `old`
        have stopped; the chunks it had outstanding there go back to the pool (no CANCEL:
        `old` is closed, and whatever it still carries is dropped with it) and are asked of
        the new session first (`_reclaim`). Chunks that arrived on `old` are being filed
        and count as usual; the new session joins the scheduler as the same source when
        its OPEN flight goes out."""
        label = run.stats.label
        run.pace, run.read_timeout = None, None
        run.urgent.clear()
        run.cancels.clear()
        back = self.scheduler.remove_source(label)
        run.reclaim = back
        run.session = moved.session  # what `_run_source` closes should this be cancelled
        self.counters["moves"] += 1
        self.counters["moved_back_to_pool"] += len(back)
        with contextlib.suppress(StreamError):
            await old.aclose()
        log.info("fetch %s: %s moved from %s to %s after %.1f s (%d bytes over %s; %d "
                 "requests back in the pool)", self.partial.file_name, label, old.path,
                 moved.session.path, moved.after, run.stats.by_path.get(old.path, 0),
                 old.path, len(back))
        self._wake_all()

    async def _ensure_leaves(self, session: TransferSession) -> None:
        """The verified hash list, asked of this source if no other one got it (the source
        that asked for it with its OPEN holds the lock meanwhile)."""
        async with self._leaves_lock:
            if self.partial.leaves is None:
                await self._verify_leaves(session, None)

    async def _verify_leaves(self, session: TransferSession,
                             pages: list[tuple[int, int]] | None) -> None:
        """Read the hash list (the replies to `pages` asked for already, or asked now) and
        check it against the content id; the leaves lock is held."""
        p = self.partial
        async with asyncio.timeout(self.stall_timeout):
            if pages is None:
                leaves = await session.all_hashes(p.content_id, p.size, p.chunk_size)
            else:
                leaves = await session.hash_pages(p.content_id, pages)
        try:
            await asyncio.to_thread(p.set_leaves, leaves)
        except VerificationError:
            raise _Ban("hash list does not match the content id") from None

    def _may_refill(self, label: str) -> bool:
        """Request more of this source now: a batch's worth of its window is free (or it
        has nothing outstanding). Asking for chunks a few at a time rather than one per
        arrival costs a GETS frame per batch; the half of the window still outstanding
        keeps the holder busy meanwhile."""
        sched = self.scheduler
        outstanding = sched.requested(label)
        free = sched.window(label) - outstanding
        return free > 0 and (outstanding == 0 or free >= self._refill_batch(label))

    def _refill_batch(self, label: str) -> int:
        return max(1, min(self.refill, self.scheduler.window(label) // 2))

    async def _request_loop(self, run: _SourceRun, session: TransferSession,
                            pace: SourcePace) -> None:
        """Keep the window full, a batch at a time (`_may_refill`); send the CANCELs other
        sources' arrivals asked for."""
        sched, label, cid = self.scheduler, run.stats.label, self.partial.content_id
        loop = asyncio.get_running_loop()
        while True:
            run.wake.clear()
            if sched.done:
                return
            sched.set_window(label, pace.window)
            # Wanted chunks `_hurry` put on this source go first, whatever the batching.
            gets, run.urgent = run.urgent, []
            if run.reclaim and self._may_refill(label):
                self._reclaim(run, gets)
            if self._may_refill(label):
                while (index := sched.next_request(label)) is not None:
                    gets.append(index)
                    if len(sched.requesters(index)) > 1:
                        self.counters["duplicate_requests"] += 1
                        if self.counters["endgame_at_remaining"] == 0:
                            self.counters["endgame_at_remaining"] = sched.remaining
            cancels, run.cancels = run.cancels, []
            if gets or cancels:
                if gets:
                    pace.busy(loop.time())
                    timeout = run.read_timeout
                    if timeout is not None and timeout.when() is None:
                        timeout.reschedule(pace.deadline())  # the reader was idle
                self.counters["gets"] += len(gets)
                self.counters["cancels_sent"] += len(cancels)
                self.counters["get_frames"] += await session.send_requests(cid, gets, cancels)
            await run.wake.wait()

    def _reclaim(self, run: _SourceRun, gets: list[int]) -> None:
        """Ask the source again, as its window allows, for the chunks its previous session
        had outstanding when it moved, the holder's OPENED showing them or not: a holder
        super-seeding among several requesters (superseed.py) shows a new session only
        chunks nobody asked for yet, and the old session had asked for these (a holder
        that counts that session as another requester hides them too), so each waited
        for the stuck download's probe (5 s apiece here). Those it shows anyway, or that
        are no longer wanted, take the usual way."""
        sched, label = self.scheduler, run.stats.label
        left, run.reclaim = run.reclaim, []
        for n, i in enumerate(left):
            if sched.requested(label) >= sched.window(label):
                run.reclaim = left[n:]
                return
            if sched.probe(label, i) is not None:
                gets.append(i)
                self.counters["reclaimed"] += 1

    async def _receive_loop(self, run: _SourceRun, session: TransferSession,
                            pace: SourcePace) -> None:
        """File every reply of this source until the download no longer needs it."""
        sched, label, cid = self.scheduler, run.stats.label, self.partial.content_id
        loop = asyncio.get_running_loop()
        seen = session.bytes_received
        while True:
            if sched.requested(label) == 0:
                pace.idle()  # waiting for HAVEs or new work is not slowness
            try:
                async with asyncio.timeout_at(pace.deadline()) as run.read_timeout:
                    reply = await session.next_chunk()
            except TimeoutError:
                if session.bytes_received - seen >= MIN_TRICKLE:
                    seen = session.bytes_received
                    pace.trickled(loop.time())  # a chunk is still arriving, slowly
                    continue
                rate = f"{pace.rate / 1e6:.2f} MB/s" if pace.rate else "no chunk yet"
                raise _Stalled(f"stalled: nothing for {pace.stall_after():.1f} s "
                               f"(its rate was {rate})") from None
            finally:
                run.read_timeout = None
            seen = session.bytes_received
            now = loop.time()
            if isinstance(reply, Have):
                self.counters["haves_received"] += 1
                if reply.content_id == cid and sched.add_have(label, reply.indexes):
                    run.wake.set()
                continue
            if not isinstance(reply, Chunk):
                if reply.index is None:
                    raise SessionFailed(f"holder error: {reply.code} {reply.text}")
                pace.replied(now)
                busy = reply.code == ErrorCode.BUSY
                sched.chunk_failed(label, reply.index, lacks=not busy)
                self._wake_all()
                if busy or reply.code == ErrorCode.SOURCE_CHANGED:  # the latter: for good
                    raise RemoteError(reply.code, reply.text)
                continue
            if reply.content_id != cid:
                raise _Ban("sends chunks nobody asked for")
            # The window limited us if the requester was waiting for room in it.
            window_was_full = not self._may_refill(label)
            status, others = sched.chunk_received(label, reply.index)
            if status is Arrival.UNASKED:
                # A source sending junk would also keep the stall timer happy for ever.
                raise _Ban("sends chunks nobody asked for")
            pace.replied(now)
            if status is Arrival.LATE:
                self.counters["late_chunks"] += 1
                if self._may_refill(label):
                    run.wake.set()
                continue
            for other in others:
                other_run = self._runs.get(other)
                if other_run is not None and not other_run.ended:
                    other_run.cancels.append(reply.index)
                    other_run.wake.set()
            self.chunks_received += 1
            pace.delivered(len(reply.data), now, window_was_full=window_was_full)
            sched.set_window(label, pace.window)
            if self._may_refill(label):
                run.wake.set()
            st = run.stats
            st.first_at = now if st.first_at is None else st.first_at
            st.last_at = now
            st.bytes += len(reply.data)
            st.by_path[session.path] = st.by_path.get(session.path, 0) + len(reply.data)
            st.window, st.recent_rate = pace.window, pace.rate or 0.0
            try:
                while self._filer.pending >= self._filing_limit:
                    await self._filer.changed()
            finally:
                # Filed even when this loop is cancelled meanwhile (the source moved to a
                # faster path, or is done): the scheduler counts it arrived, and nothing
                # else would ask for it again.
                self._filer.submit(_Arrival(run, reply, session))

    # --- verify and write -------------------------------------------------------------
    def _file(self, arrival: _Arrival) -> bool:
        """In a filing thread: verify, open, write, mark held."""
        return self.partial.write_chunk(arrival.chunk.index, arrival.chunk.data)

    def _filed(self, filed: list[_Filed]) -> None:
        """Outcomes from the filer (on the loop): stored, a chunk that did not verify (ban
        its source, the chunk goes back to the pool), or the disk failed (the download
        ends)."""
        sched = self.scheduler
        back_in_pool = False
        for arrival, _, error in filed:
            run, chunk = arrival.run, arrival.chunk
            if isinstance(error, VerificationError):
                sched.chunk_rejected(chunk.index)
                self._ban(run, f"bad chunk {chunk.index}: {error}")
                back_in_pool = True
                continue
            if error is not None:
                if self._failure is None:
                    self._failure = error
                continue
            arrival.session.recycle(chunk)  # the filing thread is done with its buffer
            sched.chunk_stored(chunk.index)
            run.stats.chunks += 1
            self._emit(ChunkStored(chunk.index, run.stats.label))
        if self._failure is not None:
            self._notify()
        elif back_in_pool or sched.in_flight == 0:
            # A stored chunk changes nothing a requester waits for (its window was freed
            # when it arrived) except the end: done, or nothing left in flight (stuck?).
            self._wake_all()


async def fetch(
    partial: PartialContent, sources: Sequence[Source], identity: DeviceIdentity, *,
    window: int = 8, stall_timeout: float = 30.0,
    on_event: Callable[[FetchEvent], None] | None = None,
) -> Path:
    """Download every missing chunk of `partial` from `sources`; returns the final path.

    Raises NoSourceReachable if the sources can't finish it (the node retries later)."""
    return await Downloader(partial, sources, identity, window=window,
                            stall_timeout=stall_timeout, on_event=on_event).run()
