"""Where a content can be fetched from, and the connection ladder that reaches each place.

A holder (the sender, or a co-recipient found in the DHT) is reached along a ladder:
direct TCP to the addresses it advertises first;
a TCP hole punch (overlay.transports.punch) started after a short delay, or at once when
the holder says it is behind NAT, racing direct TCP (the first path that works wins and
the others are closed);
QUIC over a punched UDP pair (overlay.transports.quic) once the TCP punch has failed (or
has had a head start of a second, which a punch that can join needs at most), racing on;
a WebRTC data channel once QUIC has failed (or has had its budget), racing on;
and, only when all of them fail, a stream relayed by the rendezvous server. TCP, direct
or punched, goes first (~2 GB/s through the NAT lab); QUIC serves the pairs a TCP punch
can't join (a symmetric NAT on one side): 168 MB/s at 7.7 CPU s/GB through the lab's
full-cone/symmetric pair, where a WebRTC data channel (aiortc, pure-Python SCTP) moved
26 MB/s at 73. WebRTC stays for a peer with QUIC turned off or of the earlier protocol,
and for UDP that QUIC's probes don't get through; the relay for the pairs ICE can't join
either.

A Source reached by a slow rung (`SLOW_PATHS`) also carries `upgrade`, the fast rungs alone
(direct TCP, then the TCP punch): the Downloader tries it again now and then while the
download runs, and moves the download over when it connects (a holder that was starting
again, a punch that lost its race, a NAT mapping that changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from crypto.address import parse_hostport
from crypto.location import LocationMessage
from overlay.transports.punch import PUNCH_BUDGET
from overlay.transports.quic import QUIC_BUDGET
from overlay.transports.stream import Stream, StreamBroken, StreamError
from overlay.transports.tcp import connect_tcp

log = logging.getLogger("peerpost.sources")

MAX_ADDRESSES_PER_HOLDER = 8
CONNECT_TIMEOUT = 5.0
WEBRTC_DELAY = 0.25  # give direct TCP a head start (to the punch too: it costs a STUN)
# QUIC starts this long after the TCP punch even while the punch still tries: a punch that
# can join does so in < 0.5 s on a home line, one that can't (a symmetric NAT drops its
# SYNs) would otherwise hold QUIC back for its whole budget (3 s).
PUNCH_HEAD_START = 1.0

# Paths a download tries to leave for direct TCP or the punch while it runs: the relay (2 MB/s
# by default, paid for by the server) and WebRTC (12-26 MB/s at 73-161 CPU s/GB). QUIC is
# not among them: it wins only where the TCP punch has failed or had its head start (a
# symmetric NAT on one side), so trying the punch again mostly fails again, at a STUN and a
# PIPE each time, and at 150-170 MB/s (7.7 CPU s/GB) a 2 GB download is over in 13 s.
SLOW_PATHS = frozenset({"relay", "webrtc"})

# dial(holder) -> Stream, for the punch, QUIC, WebRTC and relay rungs (they signal to
# holder.address)
PeerDialer = Callable[["Holder"], Awaitable[Stream]]


@dataclass(frozen=True, slots=True)
class Source:
    """One holder to try: `connect()` opens a Stream to it (TCP, WebRTC, relay)."""

    label: str
    connect: Callable[[], Awaitable[Stream]]
    peer_id: bytes | None = None  # the holder's peer id, checked in the handshake
    # The fast rungs alone (direct TCP, the TCP punch), tried again while a download runs
    # over a slow path (SLOW_PATHS); None when the holder has none to try.
    upgrade: Callable[[], Awaitable[Stream]] | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """One place that has (some of) the content, and what we know about reaching it."""

    peer_id: bytes
    address: str | None = None  # name@domain, for signalling through the server
    direct: tuple[str, ...] = ()  # HOST:PORT it advertises for direct TCP
    nat: bool = False  # it says it is behind NAT: start WebRTC at once


class TcpRefused(StreamBroken):
    """No advertised address took the connection, and at least one refused it at once:
    that host is up and nothing listened on the port then (a node starting again)."""


def tcp_dialer(addresses: Sequence[str]) -> Callable[[], Awaitable[Stream]]:
    """Try each advertised HOST:PORT in turn; the first that answers wins."""
    addrs = list(dict.fromkeys(addresses))[:MAX_ADDRESSES_PER_HOLDER]

    async def dial() -> Stream:
        errors: list[str] = []
        refused = False
        for a in addrs:
            try:
                host, port = parse_hostport(a)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            try:
                return await connect_tcp(host, port, timeout=CONNECT_TIMEOUT)
            except StreamBroken as exc:
                errors.append(str(exc))
                # connect_tcp raises from None: the OSError is still its context.
                refused = refused or isinstance(exc.__context__, ConnectionRefusedError)
        raise (TcpRefused if refused else StreamBroken)("; ".join(errors)
                                                       or "no address to try")

    return dial


@dataclass
class ConnectionLadder:
    """Builds Sources whose connect() climbs TCP → TCP punch → QUIC → WebRTC → relay.

    `punch_timeout`, `quic_timeout`, `webrtc_timeout` and `relay_timeout` are the longest
    the punch, QUIC, WebRTC and relay dialers may take (their own limits; a held offer to an
    offline NATed holder waits the whole answer time). `budget` is then the longest one
    `dial` can take: whoever bounds a Source's connect() (the Downloader's
    `connect_timeout`) must allow at least that, or the relay rung, which starts only when
    the others have failed, is never reached.
    """

    webrtc: PeerDialer | None = None
    relay: PeerDialer | None = None
    punch: PeerDialer | None = None
    quic: PeerDialer | None = None
    webrtc_delay: float = WEBRTC_DELAY
    punch_timeout: float = PUNCH_BUDGET  # overlay.transports.punch.PunchSettings.budget
    quic_timeout: float = QUIC_BUDGET  # overlay.transports.quic.QuicSettings.budget
    punch_head_start: float = PUNCH_HEAD_START
    webrtc_timeout: float = 40.0  # WebRtcSettings: answer_timeout + connect_timeout
    relay_timeout: float = 40.0  # overlay.transports.relay.DEFAULT_TIMEOUT
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        """Seconds one dial may take when every rung runs to its own timeout."""
        tcp = CONNECT_TIMEOUT * MAX_ADDRESSES_PER_HOLDER
        punch = self.punch_timeout if self.punch is not None else 0.0
        quic = self.quic_timeout if self.quic is not None else 0.0
        rtc = self.webrtc_delay + punch + quic + (self.webrtc_timeout
                                                  if self.webrtc is not None else 0.0)
        relay = self.relay_timeout if self.relay is not None else 0.0
        return max(tcp, rtc) + relay + 1.0  # and a second for the losers to close

    def source(self, holder: Holder) -> Source:
        async def connect() -> Stream:
            return await self.dial(holder)

        async def upgrade() -> Stream:
            return await self.dial_fast(holder)

        fast = bool(holder.direct) or (self.punch is not None and bool(holder.address))
        return Source(label=holder.peer_id.hex()[:16], connect=connect, peer_id=holder.peer_id,
                      upgrade=upgrade if fast else None)

    async def dial_fast(self, holder: Holder) -> Stream:
        """Direct TCP, and the TCP punch after the usual head start (at once for a holder
        behind NAT): a download on a slow path tries these again (`Source.upgrade`). No
        QUIC, WebRTC or relay: they are what it would leave."""
        errors: list[str] = []
        rungs: list[tuple[float, str, Callable[[], Awaitable[Stream]]]] = []
        if holder.direct:
            rungs.append((0.0, "tcp", tcp_dialer(holder.direct)))
        if self.punch is not None and holder.address:
            punch = self.punch
            rungs.append((self._head_start(holder), "tcp-punch", lambda: punch(holder)))
        stream = await _race(rungs, errors)
        if stream is None:
            raise StreamBroken("; ".join(errors) or "no fast way to reach this holder")
        self.counters[f"upgrade-{stream.path}"] = (
            self.counters.get(f"upgrade-{stream.path}", 0) + 1)
        return stream

    def _head_start(self, holder: Holder) -> float:
        """How long direct TCP runs alone before the other rungs start: none for a holder
        behind NAT or with no address to dial."""
        return 0.0 if holder.nat or not holder.direct else self.webrtc_delay

    async def dial(self, holder: Holder) -> Stream:
        errors: list[str] = []
        rungs: list[tuple[float, str, Callable[[], Awaitable[Stream]]]] = []
        refused: list[bool] = []
        if holder.direct:
            direct = tcp_dialer(holder.direct)
            rungs.append((0.0, "tcp", _noting_refused(direct, refused)))
        delay = self._head_start(holder)
        # Each rung past the punch starts when the one before it has failed or had its
        # time (`over`, `limit`): it would cost more CPU per byte than that one. The
        # punch's time, for QUIC, is its head start.
        over: asyncio.Event | None = None
        limit = 0.0
        if self.punch is not None and holder.address:
            punch, over = self.punch, asyncio.Event()
            limit = min(self.punch_timeout, self.punch_head_start)
            rungs.append((delay, "tcp-punch", _flagged(lambda: punch(holder), over)))
        if self.quic is not None and holder.address:
            quic, quic_over = self.quic, asyncio.Event()
            rungs.append((delay, "quic", _flagged(_gated(lambda: quic(holder), over, limit),
                                                  quic_over)))
            over, limit = quic_over, limit + self.quic_timeout
        if self.webrtc is not None and holder.address:
            rtc = self.webrtc
            rungs.append((delay, "webrtc", _gated(lambda: rtc(holder), over, limit)))
        stream = await _race(rungs, errors)
        if refused and (stream is None or stream.path in SLOW_PATHS):
            # Its address refused at once, and the other rungs took their time: a node that
            # was starting again (a retry that fired while its sender restarted) listens by
            # now, and the relay (slow, paid for by the server) or WebRTC (12-26 MB/s) would
            # carry the rest of the download (the Downloader moves it to TCP only when more
            # than 5 s of it are left). One more direct dial first (refused again: at once).
            try:
                again = await direct()
            except StreamError as exc:
                errors.append(f"tcp again: {exc}")
            else:
                if stream is not None:
                    errors.append(f"{stream.path}: left for tcp, dialled again")
                    await stream.aclose()
                stream = again
        if stream is None and self.relay is not None and holder.address:
            try:
                stream = await self.relay(holder)
            except (StreamError, OSError) as exc:
                errors.append(f"relay: {exc}")
        if stream is None:
            raise StreamBroken("; ".join(errors) or "no way to reach this holder")
        if errors:
            # The ladder's decision, when a rung failed before another won: why a holder
            # that advertises direct addresses was reached by the relay (or the punch).
            log.info("%s (%s) reached by %s after %s", holder.address or "a holder",
                     holder.peer_id.hex()[:16], stream.path, "; ".join(errors))
        self.counters[stream.path] = self.counters.get(stream.path, 0) + 1
        return stream


def _noting_refused(dial: Callable[[], Awaitable[Stream]], refused: list[bool]
                    ) -> Callable[[], Awaitable[Stream]]:
    """`dial`, appending to `refused` when it fails with TcpRefused."""
    async def noting() -> Stream:
        try:
            return await dial()
        except TcpRefused:
            refused.append(True)
            raise

    return noting


def _flagged(dial: Callable[[], Awaitable[Stream]], over: asyncio.Event
             ) -> Callable[[], Awaitable[Stream]]:
    """`dial`, setting `over` when it fails (when it works the race is over anyway)."""
    async def flagged() -> Stream:
        try:
            return await dial()
        except BaseException:
            over.set()
            raise

    return flagged


def _gated(dial: Callable[[], Awaitable[Stream]], gate: asyncio.Event | None,
           limit: float) -> Callable[[], Awaitable[Stream]]:
    """`dial` once `gate` is set (the rung before has failed; if it had worked the race
    would be over) or `limit` s have passed: QUIC costs more CPU per byte than a punched
    TCP stream and WebRTC far more than QUIC, so each starts only when the one before
    can't win."""
    async def gated() -> Stream:
        if gate is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await gate.wait()
        return await dial()

    return gated


async def _after(delay: float, dial: Callable[[], Awaitable[Stream]]) -> Stream:
    if delay:
        await asyncio.sleep(delay)
    return await dial()


async def _race(rungs: list[tuple[float, str, Callable[[], Awaitable[Stream]]]],
                errors: list[str]) -> Stream | None:
    """Start each rung after its delay; return the first stream, close any later winner."""
    if not rungs:
        return None
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(_after(d, f), name=f"dial-{n}"): n for d, n, f in rungs}
    winner: Stream | None = None
    pending = set(tasks)
    try:
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # In rung order, not the sets' (memory addresses): of two rungs done in the same
            # step the earlier one wins, and a simulation's trace is the same every run.
            for t in [t for t in tasks if t in done]:
                exc = t.exception()
                if exc is not None:
                    errors.append(f"{tasks[t]}: {exc}")
                elif winner is None:
                    winner = t.result()
                else:
                    await t.result().aclose()
    finally:
        left = [t for t in tasks if t in pending]
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left)  # raises only if *we* are cancelled
            for t in left:
                if not t.cancelled() and t.exception() is None:
                    await t.result().aclose()  # won while being cancelled: don't leak it
    return winner


def sender_addresses(msg: LocationMessage, fingered: Sequence[str]) -> list[str]:
    """The sender's addresses: what FINGER says now first, then the handle's hints."""
    hints = msg.handle.sender.addresses if msg.handle.sender else ()
    return [*fingered, *hints]


def holder_source(peer_id: bytes, addresses: Sequence[str]) -> Source:
    """A TCP-only Source (tests, and holders we know nothing else about)."""
    return ConnectionLadder().source(Holder(peer_id, direct=tuple(addresses)))
