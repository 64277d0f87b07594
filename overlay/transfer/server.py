"""The serving side: answers transfer sessions on any Stream, listens on direct TCP.

Per session, activities joined in a TaskGroup: the reader (feeds the core, answers
OPEN/HASHES/bad input at once, queues GETs in `ServingSession`), the sender (rate limit,
then chunk frame onto the stream) and the announcer (a partial holder's new verified chunks
become HAVE frames: the store calls back from the writing thread, the announcer wakes on the
loop and sends what the log holds since). Queued GETs go to the server's sealing threads
(a `WorkQueue`, two: sealing runs on both cores while the loop sends), at most
`SEALERS + SEALED_AHEAD` chunks per session being sealed or sealed and waiting for the
sender: memory per session stays at a few chunks whatever the file size. A misbehaving
requester costs a counter and an error reply or its own session; the server and every other
session carry on. A device that comes back on a new session (its network changed) and opens
a content again ends its old, silent session for it at once, and so frees that session's
upload slot (REPLACED_SILENCE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from crypto.address import parse_hostport
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.content.interfaces import Catalog, ContentStoreError, ServedContent
from overlay.transfer.core import (
    BadMessage,
    ConnectionClosed,
    ConnectionFailed,
    Event,
    HandshakeComplete,
    Role,
    State,
    TransferConnection,
)
from overlay.transfer.frames import Chunk, Error, ErrorCode, Get, Message, Open, Opened
from overlay.transfer.holder import (
    MAX_QUEUED_GETS,
    ServingSession,
    gone_text,
    source_changed,
)
from overlay.transfer.superseed import SuperSeed
from overlay.transfer.workers import WorkQueue
from overlay.transports.stream import Stream, StreamError
from overlay.transports.tcp import TcpServer
from rendezvous.limits import TokenBucket, source_of
from rendezvous.taskset import wait_ended

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 16
SEALED_AHEAD = 2
PACE_SLICE = 64 << 10  # bytes sent at a time under an upload cap
SEALERS = 2  # two chunks sealed at once: one per core, so sealing is not the cap
# Chunks going out at once, over all sessions (BitTorrent's unchoke slots). Without a cap, a
# flash crowd splits a home uplink so thin (5 Mbit/s over 64 sessions: ~10 KB/s each) that
# no 1 MiB chunk finishes before the requester judges the session stalled or our own send
# timeout fires: chunks only we hold never get out, and the swarm starves. With four, each
# chunk goes out at a quarter of the uplink and co-recipients pass it on.
UPLOAD_SLOTS = 4
# Sessions at once from one IP address (an IPv6 /64, `rendezvous.limits.source_key`): a
# household or an office behind one NAT fetches several files at once, but one host cannot
# take every session slot.
SESSIONS_PER_IP = 8
# A requester that stops reading must not hold its session and upload slot for ever, and
# one that reads slowly has not stopped: a send that moved less than this many bytes in
# `send_timeout` seconds counts as stopped (64 KiB in 60 s: about 1.1 KB/s). One timeout
# for a whole chunk cut chunks that were still moving: in the simulator, 3 MB to four
# recipients over a 400 kbit/s uplink (four slots of 12.5 KB/s, 84 s per 1 MiB chunk)
# took 364-604 s, against 246-251 s with chunks left to finish (the link allows 251 s).
MIN_SEND_PROGRESS = 64 << 10
# A requester that reads slowly, but not slowly enough to count as stopped, holds an upload
# slot for as long as its chunk takes: 1 MiB at 2 KB/s is nine minutes, and a few such
# peers take every slot while others wait. While another session waits for a slot, a chunk
# that moved less than SLOW_RATE bytes/s over SLOW_WINDOW seconds ends its session (the
# slot goes to the one waiting; the requester may fetch from another source or come back).
# 8 KiB/s is below a slot's share of any uplink over 256 kbit/s with four slots (the
# 400 kbit/s simulator case above runs at 12.5 KB/s a slot); under an upload cap the floor
# is at most half a slot's share of it. With nobody waiting, a slow requester keeps its
# slot, as before.
SLOW_RATE = 8 << 10
SLOW_WINDOW = 30.0
# Seconds from accepting a session to its first OPEN with a valid capability proof. Only a
# requester that holds a capability for something here may keep a session.
PROOF_TIMEOUT = 10.0
# A requester whose network changed (a laptop from home Wi-Fi to a phone hotspot) comes
# back over a new connection, and its old one goes silent: no FIN, no RST, and the kernel
# gives it up only after TCP_USER_TIMEOUT (20 s, overlay.transports.tcp), an upload slot
# held all that time. So when a device opens a content again (a valid OPEN, the same device
# key) while its older session for that content has moved no byte either way for this many
# seconds, the older one ends at once. The downloader keeps one session per holder per
# download (a source's label is the holder's peer id, and a label in use is not added
# again), so a second session means the first is lost on the requester's side; the silence
# guards the session that is not. 2 s is the downloader's own judgement the other way: it
# drops a fast source it hears nothing from for 2 s (pacing's min_stall). A session stuck
# in a chunk is timed from the new OPEN (its sent count moved until then), so the slot is
# free 2 s after the device came back, not 20. An old session heard from after the new
# OPEN is alive, and is left alone.
REPLACED_SILENCE = 2.0
# Refusals that say this holder does not serve the content (now or ever again).
GONE = frozenset({ErrorCode.UNKNOWN_CONTENT, ErrorCode.SOURCE_CHANGED})


@runtime_checkable
class SendsMany(Protocol):
    """A stream that can take several buffers at once (direct TCP)."""

    async def send_many(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None: ...


@runtime_checkable
class CountsSent(Protocol):
    """A stream that says how many bytes have left this process (TCP, WebRTC)."""

    def bytes_sent(self) -> int: ...


class SlowRequester(Exception):
    """A session's chunk moved under the slow rate while another waited for its slot."""


class Replaced(Exception):
    """The session's device opened the content again on a new one while it was silent."""


@dataclass(frozen=True, slots=True)
class _SealJob:
    session: _ServedSession
    get: Get
    content: ServedContent


def _seal(job: _SealJob) -> bytes | bytearray:
    """In a sealing thread: the chunk read and sealed."""
    return job.content.read_sealed(job.get.index)


def _sealed(done: list[tuple[_SealJob, bytes | bytearray | None, BaseException | None]]
            ) -> None:
    for job, sealed, error in done:
        job.session.seal_done(job.get, sealed, error)


class TransferServer:
    """Serves the contents of `catalog` to requesters that prove their capability."""

    def __init__(
        self, identity: DeviceIdentity, catalog: Catalog, *, max_sessions: int = 64,
        max_upload_rate: int | None = None, handshake_timeout: float = 10.0,
        idle_timeout: float = 300.0, send_timeout: float = 60.0,
        max_queued_gets: int = MAX_QUEUED_GETS, upload_slots: int = UPLOAD_SLOTS,
        sessions_per_ip: int = SESSIONS_PER_IP, proof_timeout: float = PROOF_TIMEOUT,
        slow_rate: float = SLOW_RATE, slow_window: float = SLOW_WINDOW,
        super_seed: bool = True, replaced_silence: float = REPLACED_SILENCE,
    ) -> None:
        self.identity = identity
        self.catalog = catalog
        self.counters: Counter[str] = Counter()
        self.max_sessions = max_sessions
        self.max_upload_rate = max_upload_rate
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_queued_gets = max_queued_gets
        if upload_slots < 1 or sessions_per_ip < 1:
            raise ValueError("upload_slots and sessions_per_ip must be at least 1")
        if slow_rate < 0 or slow_window <= 0:
            raise ValueError("slow_rate must be at least 0 and slow_window positive")
        self.slow_rate = slow_rate
        self.slow_window = slow_window
        if replaced_silence <= 0:
            raise ValueError("replaced_silence must be positive")
        self.replaced_silence = replaced_silence
        # (device peer id, content id) -> the running sessions of that device that opened
        # that content; entries leave with their sessions.
        self._openers: dict[tuple[bytes, bytes], list[_ServedSession]] = {}
        self.sessions_per_ip = sessions_per_ip
        self.proof_timeout = proof_timeout
        # Running sessions per peer IPv4 address or IPv6 /64 (relayed streams, which name
        # no peer, are not counted here: the relay limits them per account). Entries leave
        # at zero.
        self._per_ip: Counter[str] = Counter()
        self.slot_count = upload_slots
        self.upload_slots = asyncio.Semaphore(upload_slots)
        self.slot_waiters = 0  # sessions with a sealed chunk waiting for an upload slot
        self._bucket: TokenBucket | None = None
        self._tcp: TcpServer | None = None
        self._running: set[asyncio.Task[object]] = set()
        self._served_by_content: Counter[bytes] = Counter()
        # Requesters of a content held in full that another requester is fetching are
        # shown a few chunks at a time, the least spread (superseed.py); None: off.
        self.seeder = SuperSeed() if super_seed else None
        self.sealers: WorkQueue[_SealJob, bytes | bytearray] = WorkQueue(
            _seal, _sealed, workers=SEALERS, name="sealer")
        # Told the id of each content a requester is refused as not here (404) or no
        # longer served (410): the node stops offering it in the DHT. None: nobody.
        self.unserved: Callable[[bytes], object] | None = None

    def chunks_served(self, content_id: bytes) -> int:
        """How many chunks of this content went out (since start)."""
        return self._served_by_content[content_id]

    def count_served(self, content_id: bytes) -> None:
        self.counters["chunks_served"] += 1
        # Bounded: one entry per content this node holds and served.
        self._served_by_content[content_id] += 1

    @property
    def active_sessions(self) -> int:
        return len(self._running)

    def set_upload_rate(self, rate: int | None) -> None:
        """Change the upload cap (bytes/s; None: none) of the running server: the next
        chunk sent waits under the new rate."""
        self.max_upload_rate = rate
        self._bucket = None

    def slow_floor(self) -> float:
        """Bytes/s under which a chunk gives its slot up to a waiting session: `slow_rate`,
        or half a slot's share of the upload cap when that is lower (under a 100 KB/s cap
        with four slots every chunk moves at 25 KB/s at most)."""
        if self.max_upload_rate is None:
            return self.slow_rate
        return min(self.slow_rate, self.max_upload_rate / self.slot_count / 2)

    def bucket(self, now: float) -> TokenBucket | None:
        """The shared upload-rate bucket (None: unlimited)."""
        if self.max_upload_rate is None:
            return None
        if self._bucket is None:
            burst = max(self.max_upload_rate / 10, 64 << 10)
            self._bucket = TokenBucket(self.max_upload_rate, burst, now)
        return self._bucket

    def session_opened(self, session: _ServedSession, content_id: bytes) -> None:
        """`session` opened `content_id` (its OPEN was valid): its device's older sessions
        for that content are ended once silent for `replaced_silence` seconds."""
        if session.device is None:
            return
        openers = self._openers.setdefault((session.device, content_id), [])
        if session in openers:
            return
        older = [s for s in openers if not s.ended]
        openers.append(session)
        for old in older:
            old.heard_since_replaced = False
            self._check_replaced(old, session, content_id)

    def session_ended(self, session: _ServedSession) -> None:
        """Forget `session` in the record of who opened what."""
        if session.device is None:
            return
        for cid in session.opened:
            key = (session.device, cid)
            openers = [s for s in self._openers.get(key, ()) if s is not session]
            if openers:
                self._openers[key] = openers
            else:
                self._openers.pop(key, None)

    def _check_replaced(self, old: _ServedSession, new: _ServedSession,
                        content_id: bytes) -> None:
        """End `old` if it has been silent long enough since `new` opened the content;
        look again when it would be, while both run and `old` is not heard from."""
        if old.ended or new.ended or old.heard_since_replaced:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        silent = old.silent_for(now)
        if silent < self.replaced_silence:
            old.later(loop.call_at(now + self.replaced_silence - silent, self._check_replaced,
                                   old, new, content_id))
            return
        self.counters["sessions_replaced"] += 1
        log.info("transfer: ended the silent session of %s for %s (nothing for %.1f s): it "
                 "reconnected from %s", old.label, content_id.hex()[:16], silent, new.peer)
        old.replace()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for direct TCP sessions; returns the bound address (port 0: any)."""
        # A few more TCP slots than sessions, so the excess gets counted and refused here.
        self._tcp = TcpServer(self.handle_stream, max_connections=self.max_sessions + 8)
        bound = await self._tcp.start(host, port)
        # The sealing threads now, not inside the first GETs of the first session.
        self.sealers.start()
        return bound

    async def handle_stream(self, stream: Stream) -> None:
        """Serve one session on an already connected stream (TCP, WebRTC, relay) until it
        ends; closes the stream."""
        task = asyncio.current_task()
        ip = _peer_source(stream.peer_address())
        counted = False
        try:
            if task is None or len(self._running) >= self.max_sessions:
                self.counters["sessions_refused"] += 1
                return
            if ip is not None:
                if self._per_ip[ip] >= self.sessions_per_ip:
                    self.counters["sessions_refused"] += 1
                    self.counters["sessions_refused.per_ip"] += 1
                    log.info("transfer: refused %s: %d sessions from there already",
                             ip, self._per_ip[ip])
                    return
                self._per_ip[ip] += 1
                counted = True
            self._running.add(task)
            self.counters["sessions"] += 1
            await _ServedSession(self, stream).run()
        except* StreamError as eg:
            self.counters["stream_errors"] += 1
            log.debug("transfer session stream error: %s", eg.exceptions[0])
        except* Replaced:
            pass  # counted and logged where it was decided (`_check_replaced`)
        except* SlowRequester as eg:
            self.counters["slow_dropped"] += 1
            log.info("transfer: %s %s; session dropped", stream.peer_address(),
                     eg.exceptions[0])
        except* TimeoutError:
            self.counters["send_timeouts"] += 1
            log.info("transfer: %s stopped reading; session dropped", stream.peer_address())
        finally:
            if task is not None:
                self._running.discard(task)
            if counted and ip is not None:
                self._per_ip[ip] -= 1
                if self._per_ip[ip] <= 0:
                    del self._per_ip[ip]
            await stream.aclose()

    async def aclose(self) -> None:
        """Stop listening, end every running session and the sealing threads. A cancel of
        the caller meanwhile is raised once all of that is done (it was eaten, and the
        caller carried on as if nothing had happened)."""
        cancelled: asyncio.CancelledError | None = None
        if self._tcp is not None:
            tcp, self._tcp = self._tcp, None
            try:
                await tcp.aclose()
            except asyncio.CancelledError as exc:  # raised by TaskSet.aclose once closed
                cancelled = exc
        tasks = list(self._running)
        for t in tasks:
            t.cancel()
        cancelled = await wait_ended(tasks) or cancelled
        try:
            await self.sealers.aclose()
        except asyncio.CancelledError as exc:
            cancelled = exc
        if cancelled is not None:
            raise cancelled


def _peer_source(address: str | None) -> str | None:
    """What the per-address cap counts "host:port" or "[v6]:port" under (`source_of`: an
    IPv6 host as its /64); None where the stream names no peer."""
    if not address:
        return None
    try:
        host, _ = parse_hostport(address)
    except DecodeError:
        host = address
    return source_of(host) or None


class _ServedSession:
    def __init__(self, server: TransferServer, stream: Stream) -> None:
        self.server = server
        self.stream = stream
        self.peer = stream.peer_address() or stream.path
        self.conn = TransferConnection(Role.RESPONDER, server.identity)
        self._sends_many = isinstance(stream, SendsMany)
        self._bytes_sent = stream.bytes_sent if isinstance(stream, CountsSent) else None
        self.logic: ServingSession | None = None
        self.sealing = 0  # GETs with the sealers
        self.sealed: collections.deque[Message] = collections.deque()  # for the sender
        self.sealed_more = asyncio.Event()
        self.ended = False
        self.write_lock = asyncio.Lock()
        self.held_more = asyncio.Event()
        self._unwatch: list[Callable[[], None]] = []
        # Who is at the other end (from the handshake), and what it opened here: the
        # server ends this session when the same device opens one of these contents again
        # on a new session while this one is silent (REPLACED_SILENCE).
        self.device: bytes | None = None
        self.opened: set[bytes] = set()
        # When bytes last came in or left: as of the last read or write, or of the last
        # `silent_for` that saw the stream's sent count move (a blocked write moves it).
        self.active_at = 0.0
        self._sent_mark = 0
        self.moved(asyncio.get_running_loop().time())
        self.heard_since_replaced = False
        self._replaced = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self.closed_at: float | None = None  # when the requester closed it (not cut)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.send_loop()), tg.create_task(self.announce_loop()),
                         tg.create_task(self._until_replaced())]
                try:
                    await self.read_loop()
                finally:
                    for t in tasks:
                        t.cancel()
        finally:
            self.ended = True  # sealed chunks still coming back are dropped
            for stop in self._unwatch:
                stop()
            for timer in self._timers:
                timer.cancel()
            self.server.session_ended(self)
            if self.logic is not None:
                self.logic.close(self.closed_at)

    @property
    def label(self) -> str:
        """The peer's address, with its device id once the handshake named it."""
        return self.peer if self.device is None else f"{self.device.hex()[:12]}@{self.peer}"

    def moved(self, now: float) -> None:
        """Bytes came in or left at `now`."""
        self.active_at = now
        if self._bytes_sent is not None:
            self._sent_mark = self._bytes_sent()

    def silent_for(self, now: float) -> float:
        """Seconds since a byte last came in or left. A write blocked on the path moves
        the sent count without returning: a count that moved since the last look counts
        as moving now, so a session stuck in a chunk is silent from the first look that
        sees its count stand still."""
        if self._bytes_sent is not None and self._bytes_sent() != self._sent_mark:
            self.moved(now)
        return now - self.active_at

    def later(self, timer: asyncio.TimerHandle) -> None:
        """Keep `timer` (a look at this session) to cancel when the session ends."""
        now = asyncio.get_running_loop().time()
        self._timers = [t for t in self._timers if t.when() > now]  # those not yet run
        self._timers.append(timer)

    def replace(self) -> None:
        """End the session at once (its device came back on a new one): the chunk it is
        sending is cancelled and its upload slot released."""
        self._replaced.set()

    async def _until_replaced(self) -> None:
        await self._replaced.wait()
        raise Replaced(f"{self.label} reconnected")

    def _watch_growing(self) -> None:
        """Start HAVE updates for growing contents whose OPENED went out."""
        if self.logic is None:
            return
        loop = asyncio.get_running_loop()

        def chunk_held() -> None:  # called from the thread that wrote the chunk
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to tell
                loop.call_soon_threadsafe(self.held_more.set)

        for _, content in self.logic.take_growing():
            self._unwatch.append(content.watch(chunk_held))
            self.held_more.set()  # chunks held between the OPENED snapshot and now

    async def announce_loop(self) -> None:
        """HAVE frames: a growing content's new chunks, and the chunks super-seeding shows
        next (after each chunk sent, or once the requester was idle long enough)."""
        loop = asyncio.get_running_loop()
        while True:
            due = self.logic.next_reveal() if self.logic is not None else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self.held_more.wait()
            self.held_more.clear()
            if self.logic is not None:
                for have in [*self.logic.haves(), *self.logic.reveals(loop.time())]:
                    await self._send(have)

    async def _write_out(self) -> None:
        bufs = self.conn.data_to_send()
        if self._sends_many and len(bufs) > 1:
            # A CHUNK's header and payload in one go (one writev on uvloop).
            await cast(SendsMany, self.stream).send_many(bufs)
        else:
            for buf in bufs:
                await self.stream.send_all(buf)
        self.moved(asyncio.get_running_loop().time())

    async def _flush(self) -> None:
        # Nothing queued: no need to wait for the lock, which a chunk paced under the upload
        # cap holds for seconds while the requester's CANCELs still need reading.
        if not self.conn.has_output:
            return
        async with self.write_lock:
            await self._write_out()

    async def _send(self, msg: Message) -> None:
        if (isinstance(msg, Error) and msg.code in GONE and msg.content_id is not None
                and self.server.unserved is not None):
            self.server.unserved(msg.content_id)
        async with self.write_lock:
            self.conn.send(msg)
            await self._while_moving(self._write_out())

    async def _while_moving(self, write: Awaitable[None]) -> None:
        """Await `write`; TimeoutError once it moved less than MIN_SEND_PROGRESS bytes in
        `send_timeout` seconds (a stream that can't tell: once it takes longer than that)."""
        limit = self.server.send_timeout
        count = self._bytes_sent
        if count is None:
            async with asyncio.timeout(limit):
                await write
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as deadline:
            last = count()
            timer: asyncio.TimerHandle | None = None

            def check() -> None:
                nonlocal last, timer
                now = count()
                if now - last < MIN_SEND_PROGRESS:
                    deadline.reschedule(loop.time())  # expires now: the write is cancelled
                    return
                last = now
                timer = loop.call_later(limit, check)

            timer = loop.call_later(limit, check)
            try:
                await write
            finally:
                if timer is not None:
                    timer.cancel()

    async def _holding_slot(self, send: Awaitable[None]) -> None:
        """Await `send`, a chunk going out under an upload slot; SlowRequester once it
        moved less than `slow_floor()` bytes/s over `slow_window` seconds (pauses under
        the upload cap included) while another session waited for a slot."""
        server = self.server
        count = self._bytes_sent
        if count is None or server.slow_rate <= 0:
            await send
            return
        loop = asyncio.get_running_loop()
        window = server.slow_window
        slow: str | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout(None) as deadline:
                mark = count()

                def check() -> None:
                    nonlocal mark, slow, timer
                    now = count()
                    moved = now - mark
                    if server.slot_waiters and moved < server.slow_floor() * window:
                        slow = (f"reads at {moved / window:.0f} B/s while "
                                f"{server.slot_waiters} wait for an upload slot")
                        deadline.reschedule(loop.time())  # the send is cancelled
                        return
                    mark = now
                    timer = loop.call_later(window, check)

                timer = loop.call_later(window, check)
                await send
        except TimeoutError:
            if slow is not None:
                raise SlowRequester(slow) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _send_paced(self, msg: Message, bucket: TokenBucket) -> None:
        """`_send` under the upload cap, PACE_SLICE bytes at a time, each after the bucket
        allows it: the requester sees bytes arrive at the capped rate (its stall timer
        counts them) instead of a whole chunk's silence followed by a burst, 14 s of it
        for a 2 MiB chunk at 150 KB/s. Each slice is held to the rule of `_while_moving`
        (the pauses between them are not): a slice that finds the write buffer over its
        high-water mark waits while 768 KiB drain, so one timeout per slice cut a reader
        under 12.8 KB/s as if it had stopped."""
        loop = asyncio.get_running_loop()
        async with self.write_lock:
            self.conn.send(msg)
            for buf in self.conn.data_to_send():
                view = memoryview(buf)
                for start in range(0, len(view), PACE_SLICE):
                    piece = view[start : start + PACE_SLICE]
                    delay = bucket.spend(len(piece), loop.time())
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await self._while_moving(self.stream.send_all(piece))
                    self.moved(loop.time())

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        handshake_deadline = started + self.server.handshake_timeout
        proof_deadline = started + self.server.proof_timeout
        while True:
            while (event := self.conn.next_event()) is not None:
                if not await self.on_event(event):
                    return
            await self._flush()
            # The core keeps no clock: the deadlines are this adapter's.
            if self.conn.state is State.HANDSHAKE:
                deadline = min(handshake_deadline, proof_deadline)
            elif self.logic is None or not self.logic.proven:
                deadline = proof_deadline
            else:
                deadline = loop.time() + self.server.idle_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except TimeoutError:
                self.server.counters["timeouts"] += 1
                if self.conn.state is not State.HANDSHAKE and (
                        self.logic is None or not self.logic.proven):
                    self.server.counters["timeouts.no_capability"] += 1
                    log.info("transfer: %s proved no capability within %.0f s; closed",
                             self.peer, self.server.proof_timeout)
                    return
                log.info("transfer: %s timed out (%s)", self.peer, self.conn.state.name)
                return
            if data:
                self.moved(loop.time())
                self.heard_since_replaced = True
            self.conn.receive_data(data)

    async def on_event(self, event: Event) -> bool:
        """Handle one event from the core; False ends the session."""
        counters = self.server.counters
        if isinstance(event, HandshakeComplete):
            self.device = event.peer.peer_id
            self.logic = ServingSession(
                self.server.catalog, event.transcript, counters, peer=self.label,
                max_queued=self.server.max_queued_gets, seeder=self.server.seeder,
                device=self.device, wake=self.held_more.set,
            )
            return True
        if isinstance(event, ConnectionFailed):
            counters["connections_cut" if event.cut else "protocol_failed"] += 1
            log.info("transfer: dropped %s: %s", self.peer, event.reason)
            return False
        if isinstance(event, ConnectionClosed):
            self.closed_at = asyncio.get_running_loop().time()
            return False
        if self.logic is None:  # the core emits messages only after the handshake
            return False
        if isinstance(event, BadMessage):
            await self._send(self.logic.bad_message(event.reason))
            return True
        replies = self.logic.handle(event, asyncio.get_running_loop().time())
        if isinstance(event, Open) and any(isinstance(r, Opened) for r in replies):
            self.opened.add(event.content_id)
            self.server.session_opened(self, event.content_id)
        for reply in replies:
            await self._send(reply)
        self._watch_growing()
        if self.logic.next_reveal() is not None:
            self.held_more.set()  # the announcer's wait for an idle requester starts
        self.feed()
        return True

    def feed(self) -> None:
        """Hand queued GETs to the sealers while this session has room for their chunks."""
        logic = self.logic
        while logic is not None and not self.ended and (
                self.sealing + len(self.sealed) < SEALERS + SEALED_AHEAD):
            get = logic.pop_get()
            if get is None:
                return
            content = logic.content(get.content_id)
            if content is None:
                logic.finish_get(get.content_id, get.index)
                continue
            self.sealing += 1
            self.server.sealers.submit(_SealJob(self, get, content))

    def seal_done(self, get: Get, sealed: bytes | bytearray | None,
                  error: BaseException | None) -> None:
        """A sealer is done with `get` (on the loop)."""
        self.sealing -= 1
        if self.ended:
            return
        if error is not None or sealed is None:
            self.server.counters["read_errors"] += 1
            if isinstance(error, ContentStoreError | OSError):
                log.warning("transfer: cannot serve chunk %d: %s", get.index, error)
            else:
                log.error("transfer: sealing chunk %d failed", get.index, exc_info=error)
            reply = Error(ErrorCode.UNAVAILABLE, "chunk unavailable here", get.content_id,
                          get.index)
            if self.logic is not None:
                self.logic.finish_get(get.content_id, get.index)
                content = self.logic.content(get.content_id)
                if content is not None and source_changed(content):
                    reply = Error(ErrorCode.SOURCE_CHANGED, gone_text(content),
                                  get.content_id, get.index)
            self.sealed.append(reply)
        else:
            self.sealed.append(Chunk(get.content_id, get.index, sealed))
        self.sealed_more.set()
        self.feed()

    async def send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        counters = self.server.counters
        while True:
            while not self.sealed:
                self.sealed_more.clear()
                await self.sealed_more.wait()
            msg = self.sealed.popleft()
            self.feed()
            if not isinstance(msg, Chunk):
                await self._send(msg)
                continue
            slots = self.server.upload_slots
            self.server.slot_waiters += 1
            try:
                await slots.acquire()  # waiting here is not sending: no timeout
            finally:
                self.server.slot_waiters -= 1
            try:
                if self.logic is not None and not self.logic.finish_get(msg.content_id,
                                                                        msg.index):
                    continue  # cancelled while it was sealed or waited: save the upload
                bucket = self.server.bucket(loop.time())
                await self._holding_slot(self._send(msg) if bucket is None
                                         else self._send_paced(msg, bucket))
            finally:
                slots.release()
            self.server.count_served(msg.content_id)
            if self.logic is not None:
                if self.logic.sent(msg.content_id, msg.index, loop.time()):
                    self.held_more.set()  # super-seeding shows this requester another
            counters["bytes_served"] += len(msg.data)
