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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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


class Splice:
    """Two transports copied into each other, with backpressure and the payer's caps.

    Side 0 is the caller, side 1 the callee. The server adapter forwards its protocol
    callbacks here once a connection is spliced.
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
        for t in self._t:
            t.set_write_buffer_limits(high=registry.limits.relay_high_water)

    # --- callbacks from the two connections ----------------------------------------------
    def data_received(self, side: int, data: bytes) -> None:
        """Bytes from `side`: forward them, count them, and pause `side` if over the rate."""
        if self.ended:
            return
        n = len(data)
        day = self.registry.day()
        if self.meter.over_daily(day, n):
            self.meter.exhausted = True
            # Saved as the whole volume, so the refusal outlives a restart of the server.
            self.meter.used = max(self.meter.used, self.meter.daily)
            self.registry.charged(self.account, self.meter)
            self.registry.cut_daily += 1
            self.cut(f"daily relay volume of {self.account} used up "
                     f"({_mb(self.meter.used_on(day))} of {_mb(self.meter.daily)})")
            return
        self._t[1 - side].write(data)
        self.bytes += n
        self.registry.relayed_bytes += n
        delay = self.meter.charge(n, self.loop.time(), day)
        self.registry.charged(self.account, self.meter)
        if delay > 0 and self._rate_timer[side] is None:
            self._block(side, "rate")
            self._rate_timer[side] = self.loop.call_later(delay, self._rate_paid, side)

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
        other = self._t[1 - side]
        if exc is not None:
            _reset(other)
        elif not other.is_closing():
            other.close()
        self._end()

    def pause_writing(self, side: int) -> None:
        """`side` has too much unsent: stop reading what would be written to it."""
        self._block(1 - side, "full")

    def resume_writing(self, side: int) -> None:
        self._unblock(1 - side, "full")

    # --- control ------------------------------------------------------------------------
    def cut(self, reason: str) -> None:
        """End the splice now: reset both sockets (what is buffered is dropped)."""
        if self.ended:
            return
        log.info(kv("relay.cut", session=self.session, account=self.account, reason=reason,
                    bytes=self.bytes))
        for t in self._t:
            _reset(t)
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        for i, timer in enumerate(self._rate_timer):
            if timer is not None:
                timer.cancel()
                self._rate_timer[i] = None
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
            t = self._t[side]
            if not t.is_closing():
                t.pause_reading()
        reasons.add(why)

    def _unblock(self, side: int, why: str) -> None:
        reasons = self._blocked[side]
        if why not in reasons:
            return
        reasons.discard(why)
        if not reasons:
            t = self._t[side]
            if not t.is_closing():
                t.resume_reading()


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
