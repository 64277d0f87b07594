"""The relay of last resort: two relay connections of one session, spliced back to back.

For a pair that can't reach each other directly (symmetric NAT on both sides, UDP
blocked), the caller opens a dedicated TCP connection to the rendezvous server, authorizes
it with `relay` (the usual challenge, so the server knows whose account pays) and sends
RELAY(to, device, session id). The server pushes RELAY-INVITE(caller, session id) to the
callee device's live control sessions; the callee opens its own relay connection and sends
RELAY-ACCEPT(session id). The server answers both with OK "spliced" and from then on copies
raw bytes between the two sockets. The transfer handshake (crypto/handshake.py) runs end to
end inside, so the server only ever sees sealed bytes. A connection per stream, not the
control session: bulk bytes there would hold PIPE and DELIVER up behind them.

This module holds what the server adapter (server.py) needs besides its connections:

- `RelayRegistry`: sessions offered and not yet accepted, live splices, a meter per
  account, counters, and the bounds `relay_sessions_per_account` / `_total` (offered and
  spliced together).
- `AccountMeter`, the caps. The *caller's* account pays for both directions of its
  sessions: a recipient fetching from a popular sender pays for its own download, and
  nobody can spend another account's volume by dialing it. A `TokenBucket` of
  `relay_rate` bytes/s and a volume of `relay_daily` bytes per UTC day (the day comes
  from the injected wall clock). The daily volume lives in the store, so a restart
  forgives nothing: a meter starts from the day's saved figure (`restore`), and the
  server saves the meters that changed (`changed_usage`) on every sweep (at most a
  minute apart) and at shutdown; a crash forgets at most the bytes since the last save.
- `Splice`, the copying. Relayed bytes are never stored, only held in the two transports'
  buffers: reading one side pauses while the other side has more than `relay_high_water`
  bytes unsent (it resumes on `resume_writing`) and while the payer's bucket is in debt
  (it resumes by `call_later` when the debt is paid). Over the daily volume the splice is
  cut: both sockets are reset, so each stream sees a break, not a clean end, and the
  account's next RELAY is refused with the reason. EOF on one side becomes EOF on the
  other (half-close); a reset becomes a reset (RST: `abort` alone would end with a FIN).
- When both legs are plaintext TCP (`--plaintext`, or TLS ended in front of the server)
  the kernel moves the bytes instead: os.splice from one socket into a pipe of
  `relay_high_water` bytes and from the pipe into the other, driven by the loop's readers
  and writers on duplicates of the two sockets while their transports stay paused; the
  switch waits until the "spliced" replies are out. The same rules hold: os.splice
  returns byte counts, which are charged (a read never asks for more than the day's
  volume has left, so a cut passes the volume to the byte), reading stops while the pipe
  waits for the other socket or the bucket is in debt, EOF is a shutdown(SHUT_WR) of the
  other, a failed socket resets the other. No bytes pass through the process: on
  loopback the server's CPU per relayed GB is about 0.38 s instead of 0.53 (with 1 MiB
  pipes 0.28), while MB/s stays the same there (benchmarks/paths.py). A splice whose
  pipes come out under 64 KiB (a user over fs.pipe-user-pages-soft gets a page or two)
  keeps copying, as TLS legs (how nodes reach a server) always do.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rendezvous.limits import DAY, Limits, TokenBucket
from rendezvous.logfmt import kv
from rendezvous.status import Status

log = logging.getLogger("rendezvous.relay")

C = TypeVar("C")
Refusal = tuple[Status, str]
_MIN_BURST = 64 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SWITCH_POLL = 0.001  # seconds between looks at the reply frames still unsent
_SWITCH_TRIES = 2000  # ...for at most about two seconds, then the splice stays copying
_MIN_PIPE = 64 * 1024  # a kernel splice with smaller pipes copies instead


def _mb(n: float) -> str:
    return f"{n / 1e6:g} MB"


class AccountMeter:
    """One account's relay caps: a byte-rate bucket and a volume per UTC day."""

    __slots__ = ("_bucket", "daily", "day", "exhausted", "used")

    def __init__(self, rate: float, daily: int, now: float) -> None:
        # A small burst, so the rate holds over seconds, not only over minutes.
        self._bucket = (TokenBucket(rate, max(_MIN_BURST, rate / 10), now)
                        if rate > 0 else None)
        self.daily = daily
        self.day = -1
        self.used = 0
        self.exhausted = False  # a splice was cut for it today: nothing more until tomorrow

    def used_on(self, day: int) -> int:
        """Bytes relayed on UTC day `day` (a new day starts from zero)."""
        if day != self.day:
            self.day = day
            self.used = 0
            self.exhausted = False
        return self.used

    def over_daily(self, day: int, more: int = 0) -> bool:
        """Whether relaying `more` bytes today would pass the daily volume."""
        used = self.used_on(day)
        return self.daily > 0 and (self.exhausted or used + more > self.daily)

    def charge(self, n: int, now: float, day: int) -> float:
        """Count `n` relayed bytes; seconds to pause reading so the rate holds (0: none)."""
        self.used_on(day)
        self.used += n
        return self._bucket.spend(n, now) if self._bucket is not None else 0.0

    def debt(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 when it is not in debt)."""
        return self._bucket.spend(0, now) if self._bucket is not None else 0.0

    @property
    def idle(self) -> bool:
        return self.used == 0


def _reset(t: asyncio.Transport) -> None:
    """Close `t` with a reset (RST): abort() alone ends a socket with a FIN when nothing
    is unread, which the peer can't tell from a clean end."""
    sock = t.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t.abort()


def _kernel_fds(transports: tuple[asyncio.Transport, asyncio.Transport]) -> tuple[int, int] | None:
    """The two TCP sockets' descriptors when the kernel can move the bytes (None: it can't:
    TLS, a simulated transport, no os.splice)."""
    if not hasattr(os, "splice"):
        return None
    fds = []
    for t in transports:
        sock = t.get_extra_info("socket")
        if (t.get_extra_info("ssl_object") is not None or sock is None
                or sock.family not in (socket.AF_INET, socket.AF_INET6)
                or sock.type != socket.SOCK_STREAM):
            return None
        fds.append(sock.fileno())
    return fds[0], fds[1]


class _Kernel:
    """A plaintext splice while the kernel moves its bytes: a duplicate of each socket
    (their transports stay paused until the end) and a pipe per direction."""

    __slots__ = ("chunk", "fds", "inpipe", "pipes", "socks", "writing")

    def __init__(self, fds: tuple[int, int], pipe_size: int) -> None:
        socks: list[socket.socket] = []
        pipes: list[tuple[int, int]] = []
        try:
            for fd in fds:
                dup = os.dup(fd)
                try:
                    socks.append(socket.socket(fileno=dup))
                except OSError:
                    os.close(dup)
                    raise
            for _ in fds:
                pipes.append(os.pipe())
                with contextlib.suppress(OSError):  # over the pipe quota: the default size
                    fcntl.fcntl(pipes[-1][1], fcntl.F_SETPIPE_SZ, pipe_size)
        except OSError:
            for s in socks:
                s.close()
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        self.socks = (socks[0], socks[1])
        self.fds = (socks[0].fileno(), socks[1].fileno())
        self.pipes = (pipes[0], pipes[1])
        # Bytes per read from side i: what its pipe holds, as reading waits for it to empty.
        self.chunk = tuple(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) for _, w in self.pipes)
        self.inpipe = [0, 0]             # bytes from side i in its pipe, not yet sent on
        self.writing = [False, False]    # side i's pipe waits for the other socket

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the duplicates and the pipes (the sockets stay open in their transports)."""
        for fd in self.fds:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        for s in self.socks:
            s.close()
        for r, w in self.pipes:
            os.close(r)
            os.close(w)


class Splice:
    """Two transports joined back to back, with backpressure and the payer's caps.

    Side 0 is the caller, side 1 the callee. The server adapter forwards its protocol
    callbacks here once a connection is spliced. Plaintext TCP legs move to the kernel
    (`_to_kernel`) once the "spliced" replies are out: os.splice socket -> pipe -> socket,
    driven by the loop's readers and writers on duplicates of the two sockets, with the
    same caps, half-close, reset and backpressure; other legs keep copying bytes objects.
    """

    def __init__(self, registry: RelayRegistry[Any], session: bytes, account: str,
                 meter: AccountMeter, caller: asyncio.Transport,
                 callee: asyncio.Transport) -> None:
        self.registry = registry
        self.session = session
        self.account = account
        self.meter = meter
        self.loop = registry.loop
        self.bytes = 0
        self.ended = False
        self._t = (caller, callee)
        self._blocked: tuple[set[str], set[str]] = (set(), set())
        self._eof = [False, False]
        self._rate_timer: list[asyncio.TimerHandle | None] = [None, None]
        self._kernel: _Kernel | None = None
        self._switch: asyncio.Handle | None = None
        self._switch_tries = 0
        for t in self._t:
            t.set_write_buffer_limits(high=registry.limits.relay_high_water)
        self._fds = _kernel_fds(self._t)
        if self._fds is not None:
            self._switch = self.loop.call_soon(self._to_kernel)

    @property
    def in_kernel(self) -> bool:
        """Whether the kernel moves this splice's bytes (plaintext TCP on both legs)."""
        return self._kernel is not None

    # --- callbacks from the two connections ----------------------------------------------
    def data_received(self, side: int, data: bytes) -> None:
        """Bytes from `side`: forward them, count them, and pause `side` if over the rate."""
        if self.ended or not self._admit(len(data)):
            return
        self._t[1 - side].write(data)
        self._charge(side, len(data))

    def eof_received(self, side: int) -> None:
        """`side` sent EOF: pass it on; once both have, close (after flushing)."""
        self._eof[side] = True
        other = self._t[1 - side]
        if not other.is_closing() and other.can_write_eof():
            other.write_eof()
        if all(self._eof):
            for t in self._t:
                t.close()

    def connection_lost(self, side: int, exc: Exception | None) -> None:
        """`side` is gone: close the other side the same way (reset for a reset)."""
        self._leave_kernel()
        other = self._t[1 - side]
        if exc is not None:
            _reset(other)
        elif not other.is_closing():
            other.close()
        self._end()

    def pause_writing(self, side: int) -> None:
        """`side` has too much unsent: stop reading what would be written to it."""
        if self._kernel is None:
            self._block(1 - side, "full")

    def resume_writing(self, side: int) -> None:
        if self._kernel is None:
            self._unblock(1 - side, "full")

    # --- control ------------------------------------------------------------------------
    def cut(self, reason: str) -> None:
        """End the splice now: reset both sockets (what is buffered is dropped)."""
        if self.ended:
            return
        log.info(kv("relay.cut", session=self.session, account=self.account, reason=reason,
                    bytes=self.bytes))
        self._leave_kernel()
        for t in self._t:
            _reset(t)
        self._end()

    def _admit(self, n: int) -> bool:
        """Whether `n` more bytes fit today's volume; if not, cut the splice (False)."""
        day = self.registry.day()
        if not self.meter.over_daily(day, n):
            return True
        self.meter.exhausted = True
        # Saved as the whole volume, so the refusal outlives a restart of the server.
        self.meter.used = max(self.meter.used, self.meter.daily)
        self.registry.charged(self.account, self.meter)
        self.registry.cut_daily += 1
        self.cut(f"daily relay volume of {self.account} used up "
                 f"({_mb(self.meter.used_on(day))} of {_mb(self.meter.daily)})")
        return False

    def _charge(self, side: int, n: int) -> None:
        """Count `n` bytes forwarded from `side`; pause `side` while the rate is in debt."""
        self.bytes += n
        self.registry.relayed_bytes += n
        delay = self.meter.charge(n, self.loop.time(), self.registry.day())
        self.registry.charged(self.account, self.meter)
        if delay > 0 and self._rate_timer[side] is None:
            self._block(side, "rate")
            self._rate_timer[side] = self.loop.call_later(delay, self._rate_paid, side)

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._leave_kernel()
        for i, timer in enumerate(self._rate_timer):
            if timer is not None:
                timer.cancel()
                self._rate_timer[i] = None
        if self._switch is not None:
            self._switch.cancel()
            self._switch = None
        self.registry._splice_ended(self)

    def _rate_paid(self, side: int) -> None:
        self._rate_timer[side] = None
        if self.ended:
            return
        # Other sessions of the same account may have spent meanwhile: wait for them too.
        delay = self.meter.debt(self.loop.time())
        if delay > 0:
            self._rate_timer[side] = self.loop.call_later(delay, self._rate_paid, side)
            return
        self._unblock(side, "rate")

    def _block(self, side: int, why: str) -> None:
        reasons = self._blocked[side]
        if not reasons:
            if self._kernel is not None:
                self.loop.remove_reader(self._kernel.fds[side])
            elif not (t := self._t[side]).is_closing():
                t.pause_reading()
        reasons.add(why)

    def _unblock(self, side: int, why: str) -> None:
        reasons = self._blocked[side]
        if why not in reasons:
            return
        reasons.discard(why)
        if not reasons:
            self._resume(side)

    def _resume(self, side: int) -> None:
        if (k := self._kernel) is not None:
            if not self._eof[side]:
                self.loop.add_reader(k.fds[side], self._readable, side)
        elif not (t := self._t[side]).is_closing():
            t.resume_reading()

    # --- the kernel's copy (plaintext TCP on both legs) ----------------------------------
    def _to_kernel(self) -> None:
        """Move the bytes into the kernel once nothing is left in the transports."""
        self._switch = None
        if self.ended or self._fds is None:
            return
        if any(self._eof) or any(t.is_closing() for t in self._t):
            self._switch_done()
            return
        if any(t.get_write_buffer_size() for t in self._t):
            # A "spliced" reply (or relayed bytes) still unsent: the kernel must not
            # overtake it. Hold both sides until it is out.
            self._switch_tries += 1
            if self._switch_tries > _SWITCH_TRIES:
                self._switch_done()
                return
            for side in (0, 1):
                self._block(side, "switch")
            self._switch = self.loop.call_later(_SWITCH_POLL, self._to_kernel)
            return
        try:
            kernel = _Kernel(self._fds, self.registry.limits.relay_high_water)
        except OSError as exc:  # out of descriptors: copying works too
            log.warning(kv("relay.no_kernel", session=self.session, error=exc))
            self._switch_done()
            return
        if min(kernel.chunk) < _MIN_PIPE:
            # Over the user's pipe quota (fs.pipe-user-pages-soft) a pipe holds a page or
            # two: a syscall per 4 KiB would cost more than copying.
            log.warning(kv("relay.no_kernel", session=self.session,
                           error=f"pipes of {min(kernel.chunk)} bytes"))
            kernel.close(self.loop)
            self._switch_done()
            return
        for side in (0, 1):
            reasons = self._blocked[side]
            if not reasons:
                self._t[side].pause_reading()  # for good: the kernel reads from here on
            reasons.discard("full")  # nothing is unsent any more
            reasons.discard("switch")
        self._kernel = kernel
        for side in (0, 1):
            if not self._blocked[side]:
                self._resume(side)

    def _switch_done(self) -> None:
        for side in (0, 1):
            self._unblock(side, "switch")

    def _readable(self, side: int) -> None:
        """Bytes (or EOF) from `side`: into its pipe, counted, and on to the other side."""
        k = self._kernel
        if k is None:
            return
        want = k.chunk[side]
        if self.meter.daily > 0:
            # All of the volume goes through; then one byte more is enough to cut.
            want = min(want, max(1, self.meter.daily - self.meter.used_on(self.registry.day())))
        try:
            n = os.splice(k.fds[side], k.pipes[side][1], want, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._kernel_lost(side, exc)
            return
        if n == 0:
            self._eof[side] = True
            self.loop.remove_reader(k.fds[side])
            self._drain(side)
            return
        k.inpipe[side] += n
        if not self._admit(n):
            return
        self._charge(side, n)
        if self._kernel is k:
            self._drain(side)

    def _drain(self, side: int) -> None:
        """Send `side`'s pipe on; wait for the other socket while it takes no more."""
        k = self._kernel
        if k is None:
            return
        dst = k.fds[1 - side]
        while k.inpipe[side]:
            try:
                n = os.splice(k.pipes[side][0], dst, k.inpipe[side], flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if not k.writing[side]:
                    k.writing[side] = True
                    self._block(side, "full")
                    self.loop.add_writer(dst, self._drain, side)
                return
            except OSError as exc:
                self._kernel_lost(1 - side, exc)
                return
            k.inpipe[side] -= n
        if k.writing[side]:
            k.writing[side] = False
            self.loop.remove_writer(dst)
            self._unblock(side, "full")
        if self._eof[side]:
            self._kernel_eof(side)

    def _kernel_eof(self, side: int) -> None:
        """`side`'s EOF is through its pipe: half-close the other; once both, close."""
        k = self._kernel
        if k is None:
            return
        try:
            k.socks[1 - side].shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._kernel_lost(1 - side, exc)
            return
        if all(self._eof) and not any(k.inpipe):
            self._leave_kernel()
            for t in self._t:
                t.close()
            self._end()

    def _kernel_lost(self, side: int, exc: OSError) -> None:
        """`side`'s socket failed (reset, broken pipe): reset the other, close both."""
        log.debug(kv("relay.lost", session=self.session, side=side, error=exc))
        self._leave_kernel()
        _reset(self._t[1 - side])
        self._t[side].abort()
        self._end()

    def _leave_kernel(self) -> None:
        k, self._kernel = self._kernel, None
        if k is not None:
            k.close(self.loop)


@dataclass(slots=True)
class PendingRelay(Generic[C]):
    """A session offered by a RELAY and not yet accepted."""

    session: bytes
    caller: C                 # the caller's connection (the server's type)
    account: str
    device: bytes
    callee: str
    callee_device: bytes
    request_id: int
    # None once spliced; a refusal when it ends otherwise (caller gone, shutdown).
    outcome: asyncio.Future[Refusal | None] = field(repr=False)


class RelayRegistry(Generic[C]):
    """Offered sessions, live splices, meters and counters of one server."""

    def __init__(self, limits: Limits, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float]) -> None:
        self.limits = limits
        self.loop = loop
        self.clock = clock
        self.pending: dict[bytes, PendingRelay[C]] = {}
        self.splices: set[Splice] = set()
        self._meters: dict[str, AccountMeter] = {}
        self._sessions: dict[str, int] = {}  # offered + spliced, per paying account
        self._pruned_day = -1
        self._changed: dict[str, AccountMeter] = {}  # meters charged since the last save
        # counters (see `snapshot`)
        self.relayed_bytes = 0
        self.sessions_spliced = 0
        self.refused = 0
        self.expired = 0
        self.cut_daily = 0

    def day(self) -> int:
        """The UTC day number of the wall clock (the daily volume's period)."""
        return int(self.clock() // DAY)

    def meter(self, account: str) -> AccountMeter:
        m = self._meters.get(account)
        if m is None:
            m = self._meters[account] = AccountMeter(self.limits.relay_rate,
                                                     self.limits.relay_daily, self.loop.time())
        return m

    def needs_restore(self, account: str) -> bool:
        """Whether `account` has no meter yet (its saved volume must be read first)."""
        return account not in self._meters

    def restore(self, account: str, day: int, used: int) -> None:
        """Start `account`'s meter from the volume saved for `day` (the store's figure)."""
        m = self.meter(account)
        if m.used_on(day) < used:
            m.used = used

    def charged(self, account: str, meter: AccountMeter) -> None:
        """`meter` counted more bytes: save it with the next `changed_usage`."""
        self._changed[account] = meter

    def changed_usage(self) -> dict[str, tuple[int, int]]:
        """account -> (day, bytes that day) of the meters charged since the last call."""
        changed, self._changed = self._changed, {}
        return {a: (m.day, m.used) for a, m in changed.items()}

    def refusal(self, account: str, session: bytes) -> Refusal | None:
        """Why `account` may not open another session now (None: it may)."""
        lim = self.limits
        day = self.day()
        if day != self._pruned_day:
            self._pruned_day = day
            for name in [a for a, m in self._meters.items()
                         if m.day != day and a not in self._sessions]:
                del self._meters[name]
        meter = self.meter(account)
        if meter.over_daily(day, 1):
            self.refused += 1
            return (Status.RATE_LIMITED,
                    f"daily relay volume of {account} used up: {_mb(meter.used)} of "
                    f"{_mb(lim.relay_daily)} today; it resets at 00:00 UTC")
        if self._sessions.get(account, 0) >= lim.relay_sessions_per_account:
            self.refused += 1
            return (Status.RATE_LIMITED, f"{account} already has "
                    f"{lim.relay_sessions_per_account} relay sessions, the limit")
        if sum(self._sessions.values()) >= lim.relay_sessions_total:
            self.refused += 1
            return Status.UNAVAILABLE, "the relay is at capacity; try again later"
        if session in self.pending:
            return Status.BAD_REQUEST, "relay session id already in use; pick a fresh one"
        return None

    def offer(self, pending: PendingRelay[C]) -> None:
        """Register a session (after `refusal` said None)."""
        self.pending[pending.session] = pending
        self._sessions[pending.account] = self._sessions.get(pending.account, 0) + 1

    def withdraw(self, pending: PendingRelay[C], refusal: Refusal) -> None:
        """Forget a session that was not spliced (idempotent); its RELAY gets `refusal`."""
        if self.pending.get(pending.session) is not pending:
            return
        del self.pending[pending.session]
        self._release(pending.account)
        if not pending.outcome.done():
            pending.outcome.set_result(refusal)

    def withdraw_caller(self, caller: C) -> None:
        """The caller's connection closed: drop whatever it offered."""
        for p in [p for p in self.pending.values() if p.caller is caller]:
            self.withdraw(p, (Status.UNAVAILABLE, "the relay connection closed"))

    def splice(self, pending: PendingRelay[C], caller: asyncio.Transport,
               callee: asyncio.Transport) -> Splice:
        """Join the two transports of an accepted session; the session counts on as live."""
        del self.pending[pending.session]
        s = Splice(self, pending.session, pending.account, self.meter(pending.account),
                   caller, callee)
        self.splices.add(s)
        self.sessions_spliced += 1
        if not pending.outcome.done():
            pending.outcome.set_result(None)
        log.info(kv("relay.spliced", session=pending.session, caller=pending.account,
                    callee=pending.callee))
        return s

    def _splice_ended(self, s: Splice) -> None:
        if s in self.splices:
            self.splices.discard(s)
            self._release(s.account)
            log.info(kv("relay.ended", session=s.session, account=s.account, bytes=s.bytes))

    def _release(self, account: str) -> None:
        left = self._sessions.get(account, 0) - 1
        if left > 0:
            self._sessions[account] = left
            return
        self._sessions.pop(account, None)
        # Bound the meters: an account with no session keeps one only while it has used
        # some of today's volume (that must survive until the day ends).
        meter = self._meters.get(account)
        if meter is not None and (meter.idle or meter.day != self.day()):
            del self._meters[account]

    def close(self) -> None:
        """Shutdown: refuse every offered session and reset every splice."""
        for p in list(self.pending.values()):
            self.withdraw(p, (Status.UNAVAILABLE, "server shutting down"))
        for s in list(self.splices):
            s.cut("server shutting down")

    def snapshot(self) -> dict[str, int]:
        """Counters for `stats`."""
        return {
            "relayed_bytes": self.relayed_bytes,
            "relay_sessions": self.sessions_spliced,
            "relay_active": len(self.splices),
            "relay_pending": len(self.pending),
            "relay_refused": self.refused,
            "relay_expired": self.expired,
            "relay_cut_daily": self.cut_daily,
        }
