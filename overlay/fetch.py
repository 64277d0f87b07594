"""The downloader: fetch a content's missing chunks from several holders at once.

One task per source: connect, handshake (refusing a holder that isn't the expected peer),
OPEN with a capability proof, get the chunk-hash list if we don't have a verified one yet,
then keep a window of GETs outstanding as `ChunkScheduler` decides. Arrived chunks go
through a small queue to writer tasks that verify, open and write them in a worker thread,
so the loop keeps receiving while libsodium and BLAKE3 use the other core. A chunk that
doesn't verify bans its source for this content and goes back to the pool; a source that
errors or stalls is dropped and its requests reassigned. Memory is bounded by the windows
and the write queue, never by the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity
from overlay.store import PartialContent
from overlay.stream import Stream, StreamError
from overlay.transfer.errors import RemoteError, SessionFailed, TransferError
from overlay.transfer.frames import Chunk, ErrorCode
from overlay.transfer.scheduler import ChunkScheduler
from overlay.transfer.session import TransferSession, open_transfer_session

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """One holder to try: `connect()` opens a Stream to it (TCP, WebRTC, relay)."""

    label: str
    connect: Callable[[], Awaitable[Stream]]
    peer_id: bytes | None = None  # the holder's peer id, checked in the handshake


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


FetchEvent = SourceConnected | ChunkStored | SourceBanned | SourceFailed


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

    @property
    def rate(self) -> float:
        """Bytes per second while it delivered."""
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


class _Ban(Exception):
    pass


@dataclass(slots=True)
class _SourceRun:
    source: Source
    stats: SourceStats
    task: asyncio.Task[None] | None = None
    session: TransferSession | None = None
    ended: bool = False


@dataclass(slots=True)
class _Arrival:
    run: _SourceRun
    chunk: Chunk = field(repr=False)


class Downloader:
    """One download of one content; `await run()` returns the final path."""

    def __init__(
        self, partial: PartialContent, sources: Sequence[Source], identity: DeviceIdentity,
        *, window: int = 8, writers: int = 2, stall_timeout: float = 30.0,
        connect_timeout: float = 10.0, on_event: Callable[[FetchEvent], None] | None = None,
    ) -> None:
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError("source labels must be unique")
        self.partial = partial
        self.identity = identity
        self.window = window
        self.stall_timeout = stall_timeout
        self.connect_timeout = connect_timeout
        self._on_event = on_event
        self._runs = [_SourceRun(s, SourceStats(s.label)) for s in sources]
        self._writers = writers
        self.scheduler = ChunkScheduler(partial.missing())
        self._arrivals: asyncio.Queue[_Arrival] = asyncio.Queue(maxsize=writers + 1)
        self._changed = asyncio.Event()
        self._leaves_lock = asyncio.Lock()
        self.chunks_received = 0

    @property
    def in_flight_bound(self) -> int:
        """Most chunks that can be requested or received but not yet stored at any moment:
        every source's window, the arrival queue and the chunks being written. A kill loses
        at most these; a banned source can have served at most its share of them."""
        return self.window * len(self._runs) + self._arrivals.maxsize + self._writers

    @property
    def stats(self) -> list[SourceStats]:
        return [r.stats for r in self._runs]

    def _emit(self, event: FetchEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _notify(self) -> None:
        # Wake every waiter once: they wait on the current Event, which is then replaced.
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> Path:
        """Fetch every missing chunk, then complete (rename) the file; returns its path.

        Raises NoSourceReachable when the sources given cannot finish it."""
        if not self.scheduler.done:
            await self._fetch_all()
        if not self.partial.is_complete:
            failures = {r.stats.label: r.stats.reason or r.stats.outcome for r in self._runs}
            raise NoSourceReachable(failures, self.scheduler.remaining)
        return await asyncio.to_thread(self.partial.complete)

    async def _fetch_all(self) -> None:
        try:
            await self._run_tasks()
        except* OSError as eg:  # the disk, not a source: nothing to retry elsewhere
            raise FetchError(f"cannot write {self.partial.part_path}: {eg.exceptions[0]}"
                             ) from None

    async def _run_tasks(self) -> None:
        async with asyncio.TaskGroup() as tg:
            writers = [tg.create_task(self._write_loop()) for _ in range(self._writers)]
            for run in self._runs:
                run.task = tg.create_task(self._run_source(run))
            tasks = [r.task for r in self._runs if r.task is not None]
            if tasks:
                await asyncio.wait(tasks)
            await self._arrivals.join()
            for w in writers:
                w.cancel()

    # --- one source -------------------------------------------------------------------
    async def _run_source(self, run: _SourceRun) -> None:
        label = run.stats.label
        try:
            await self._serve_from(run)
            run.stats.outcome = "done"
        except _Ban as exc:
            self._ban(run, str(exc))
        except (StreamError, TransferError, TimeoutError, OSError) as exc:
            reason = "stalled or timed out" if isinstance(exc, TimeoutError) else str(exc)
            run.stats.outcome, run.stats.reason = "failed", reason
            log.info("fetch %s: source %s failed: %s", self.partial.file_name, label, reason)
            self._emit(SourceFailed(label, reason))
        finally:
            run.ended = True
            self.scheduler.remove_source(label)
            self._notify()
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
        self._notify()
        if run.task is not None and not run.ended and run.task is not asyncio.current_task():
            run.task.cancel()

    async def _serve_from(self, run: _SourceRun) -> None:
        p = self.partial
        async with asyncio.timeout(self.connect_timeout):
            stream = await run.source.connect()
        run.session = session = await open_transfer_session(
            stream, self.identity, expected_peer=run.source.peer_id,
            handshake_timeout=self.connect_timeout)
        run.stats.path = session.path
        async with asyncio.timeout(self.stall_timeout):
            info = await session.open(p.content_id, p.capability)
        if (info.size, info.chunk_size) != (p.size, p.chunk_size):
            raise _Ban(f"claims layout {info.size}/{info.chunk_size}, "
                       f"the handle says {p.size}/{p.chunk_size}")
        await self._ensure_leaves(session)
        self.scheduler.add_source(run.stats.label, window=self.window,
                                  has=None if info.have is None else info.has)
        run.stats.outcome = "active"
        self._emit(SourceConnected(run.stats.label, session.path, info.have is None))
        await self._pipeline(run, session)

    async def _ensure_leaves(self, session: TransferSession) -> None:
        p = self.partial
        async with self._leaves_lock:
            if p.leaves is not None:
                return
            async with asyncio.timeout(self.stall_timeout):
                leaves = await session.all_hashes(p.content_id, p.size, p.chunk_size)
            try:
                await asyncio.to_thread(p.set_leaves, leaves)
            except VerificationError:
                raise _Ban("hash list does not match the content id") from None

    async def _pipeline(self, run: _SourceRun, session: TransferSession) -> None:
        sched, label, cid = self.scheduler, run.stats.label, self.partial.content_id
        loop = asyncio.get_running_loop()
        while True:
            while (index := sched.next_request(label)) is not None:
                await session.request(cid, index)
            if sched.requested(label) == 0:
                if sched.done or sched.hopeless(label):
                    return
                await self._changed.wait()
                continue
            async with asyncio.timeout(self.stall_timeout):
                reply = await session.next_chunk()
            if not isinstance(reply, Chunk):
                if reply.index is None:
                    raise SessionFailed(f"holder error: {reply.code} {reply.text}")
                busy = reply.code == ErrorCode.BUSY
                sched.chunk_failed(label, reply.index, lacks=not busy)
                self._notify()
                if busy:
                    raise RemoteError(reply.code, reply.text)
                continue
            if reply.content_id != cid or not sched.chunk_received(label, reply.index):
                # We never send CANCEL (yet: an endgame would, and must then allow for late
                # chunks), so this was not asked for. A source sending junk would also keep
                # the stall timer happy for ever.
                raise _Ban("sends chunks nobody asked for")
            self.chunks_received += 1
            now = loop.time()
            run.stats.first_at = now if run.stats.first_at is None else run.stats.first_at
            run.stats.last_at = now
            run.stats.bytes += len(reply.data)
            await self._arrivals.put(_Arrival(run, reply))

    # --- verify and write -------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            arrival = await self._arrivals.get()
            try:
                await self._store(arrival)
            finally:
                self._arrivals.task_done()

    async def _store(self, arrival: _Arrival) -> None:
        run, chunk = arrival.run, arrival.chunk
        label = run.stats.label
        try:
            await asyncio.to_thread(self.partial.write_chunk, chunk.index, chunk.data)
        except VerificationError as exc:
            self.scheduler.chunk_failed(label, chunk.index)
            self._ban(run, f"bad chunk {chunk.index}: {exc}")
            return
        self.scheduler.chunk_stored(chunk.index)
        run.stats.chunks += 1
        self._emit(ChunkStored(chunk.index, label))
        self._notify()


async def fetch(
    partial: PartialContent, sources: Sequence[Source], identity: DeviceIdentity, *,
    window: int = 8, stall_timeout: float = 30.0,
    on_event: Callable[[FetchEvent], None] | None = None,
) -> Path:
    """Download every missing chunk of `partial` from `sources`; returns the final path.

    Raises NoSourceReachable if the sources can't finish it (the node retries later)."""
    return await Downloader(partial, sources, identity, window=window,
                            stall_timeout=stall_timeout, on_event=on_event).run()
