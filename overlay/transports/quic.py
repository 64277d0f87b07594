"""QUIC over a UDP hole punch: the rung between the TCP punch and WebRTC, signalled over PIPE.

    quic = QuicEndpoint(rendezvous_client, QuicSettings(stun=(server_host, stun_udp)))
    await quic.start()
    # the node's push loop:  if isinstance(push, PipeMessage): quic.feed(push)
    stream = await quic.dial("bob@example.net", bob_device)   # -> Stream, path "quic"
    incoming = await quic.accept()                             # -> Stream

The pairs a TCP punch can't join (one side behind a symmetric NAT) used to fall to WebRTC:
aiortc's pure-Python SCTP moved 26 MB/s at 73 CPU s/GB through the NAT lab's full-cone/
symmetric pair, where qh3 (a Rust QUIC core) over a simply punched UDP pair moved 168 MB/s at
7.7 CPU s/GB (quic_stream.py says what that rate needs).

Each side binds one UDP socket and asks its server's STUN (over UDP) from it which public
address its NAT gave it (`rendezvous.stun.query_on`). The dialer PIPEs a `QuicOffer` with its
candidates (the mapping, then its local address), the callee answers with its own and the
SHA-256 fingerprint of the certificate it will serve (`QuicAnswer`). Both then send probes,
`PROBE` followed by the session id, to the other's candidates (its local one only when both
have the same public address, as punch.py's rule) every `PROBE_INTERVAL`, and each adopts the
address the peer's first valid probe came from, answers that probe there at once and probes
it from then on: a symmetric NAT gives the packets to the peer another port than STUN saw,
and that port is only learnt this way (ICE's peer-reflexive candidate, RFC 8445 7.3.1.3).
A probe of another session, or from a host the peer did not name, is dropped and counted
(`bad_signals`). Then the device that sent the offer is QUIC client and transfer client, the
one that answered QUIC server and transfer server, as over the TCP punch; the client pins
the server's certificate to the fingerprint in the answer. The server goes on probing until
the client's Initial comes in (it holds the first MAX_EARLY datagrams for QUIC), so a lost
probe or a lost Initial costs a probe interval or a retransmission, not the dial.

The peer's candidates are IP literals only (candidates.py says which are used); offers are bounded
(`max_incoming`), answers are taken only from the device dialled, bad payloads are dropped and
counted. A node with QUIC turned off (`QuicSettings.enabled`) rejects offers at once (the
dialer goes on to WebRTC without waiting), as a node that knows no QUIC rung answers
`unsupported` (signalling.py); one of a release before that drops an unknown PIPE payload
without a word, so the dialer waits out `budget`.

The socket is a UDP port a firewall must let out (as WebRTC's are); nothing listens on a
fixed port. `QuicSettings.open_udp` makes it: `kernel_udp` on a node (qh3's batched transport
over a kernel socket), `loop_udp` in the simulator (the loop's `create_datagram_endpoint`,
which there is a port on a simulated host, in virtual time); the rest runs the same over
either. The port is IPv4 or IPv6, as the address of the server's STUN is (a host name is
resolved first), and so are the candidates: a callee declines an offer with none of its
family at once, naming both families, and one it can dial none of (an IPv6 link-local public
candidate) as soon as its port is ready, instead of answering; a dialler fails as soon as an
answer has none. An offer that does not decode is rejected with the reason (endpoint.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

from crypto.address import format_hostport
from crypto.codec import Fields, packb
from crypto.errors import DecodeError
from overlay.transports.candidates import (
    decode_candidates,
    family_of,
    no_common_family,
    nothing_to_dial,
    own_candidates,
    resolve,
    targets,
    undialable,
)
from overlay.transports.endpoint import SignalledEndpoint, Step
from overlay.transports.quic_stream import (
    QuicStream,
    ThrowawayCertificate,
    quic_configuration,
    udp_transport,
)
from overlay.transports.signalling import SESSION_LEN, PipeSender, Reject, decode_tagged
from overlay.transports.stream import Stream, StreamBroken
from rendezvous.messages import PipeMessage
from rendezvous.stun import Address, query_on

log = logging.getLogger(__name__)

QUIC_BUDGET = 4.0  # STUN, the PIPE round trip, the probes and the handshake: < 0.5 s at home
PROBE = b"\x00pp-quic"  # first byte 0: neither QUIC (fixed bit clear) nor a STUN reply
PROBE_INTERVAL = 0.02
MAX_EARLY = 8  # datagrams (the client's Initial) held until the prober hands over
_FINGERPRINT_LEN = 64  # SHA-256, hex


class QuicError(StreamBroken):
    """The QUIC rung failed; the text says at which step and why."""


class QuicSignalError(ValueError):
    """A PIPE payload is not a valid QUIC signal (the sender misbehaved)."""


@dataclass(frozen=True, slots=True)
class QuicOffer:
    """The dialer's candidates for a new QUIC session (the public mapping first)."""

    TAG: ClassVar[str] = "quic-offer"
    session: bytes
    candidates: tuple[Address, ...]

    def fields(self) -> dict[str, Any]:
        return {"s": self.session, "c": [format_hostport(*c) for c in self.candidates]}

    @classmethod
    def decode(cls, f: Fields) -> Self:
        return cls(f.bytes("s", size=SESSION_LEN), decode_candidates(f))


@dataclass(frozen=True, slots=True)
class QuicAnswer:
    """The callee's candidates and its certificate's SHA-256 (hex), for the same session."""

    TAG: ClassVar[str] = "quic-answer"
    session: bytes
    candidates: tuple[Address, ...]
    fingerprint: str

    def fields(self) -> dict[str, Any]:
        return {"s": self.session, "c": [format_hostport(*c) for c in self.candidates],
                "fp": self.fingerprint}

    @classmethod
    def decode(cls, f: Fields) -> Self:
        fp = f.str("fp", max_len=_FINGERPRINT_LEN, min_len=_FINGERPRINT_LEN)
        if any(ch not in "0123456789abcdef" for ch in fp):
            raise DecodeError("fingerprint is not lowercase hex")
        return cls(f.bytes("s", size=SESSION_LEN), decode_candidates(f), fp)


@dataclass(frozen=True, slots=True)
class QuicReject(Reject):
    """The callee won't take this session; `reason` is shown to the dialer's user."""

    TAG: ClassVar[str] = "quic-reject"


QuicSignal = QuicOffer | QuicAnswer | QuicReject

_SIGNALS: dict[str, Callable[[Fields], QuicSignal]] = {
    QuicOffer.TAG: QuicOffer.decode,
    QuicAnswer.TAG: QuicAnswer.decode,
    QuicReject.TAG: QuicReject.decode,
}


def encode_quic(sig: QuicSignal) -> bytes:
    """The PIPE payload for `sig`."""
    return packb({**sig.fields(), "t": sig.TAG})


def decode_quic(payload: bytes) -> QuicSignal | None:
    """The QUIC signal in a PIPE payload; None if it is not one (route it elsewhere),
    QuicSignalError if it is one but malformed."""
    return decode_tagged(payload, _SIGNALS, "quic", QuicSignalError)


class Prober(asyncio.DatagramProtocol):
    """The UDP socket's protocol until QUIC takes it over: STUN replies go to `replies`,
    the first probe of `session` from one of `hosts` sets `adopted` to its source and is
    answered there; other datagrams from the peer's hosts (the client's Initial)
    are held for the QUIC server, at most MAX_EARLY. Probes of another session are counted
    (`on_bad`)."""

    def __init__(self, on_bad: Callable[[], None] | None = None) -> None:
        self.replies: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue(maxsize=16)
        self.session = b""
        self.hosts: set[str] = set()
        self.adopted: Address | None = None
        self.early: collections.deque[tuple[bytes, Address]] = collections.deque(
            maxlen=MAX_EARLY)
        self.wake = asyncio.Event()  # a probe adopted, or an early datagram came
        self._on_bad = on_bad
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def expect(self, session: bytes, hosts: set[str] | None = None) -> None:
        """Take probes of `session` from now on (once the peer's candidates are known, only
        from `hosts`): the dialer's peer may probe before its answer is in."""
        self.session = session
        if hosts is not None:
            self.hosts = hosts

    def probe(self, to: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(PROBE + self.session, to)

    def datagrams_received(self, data: list[bytes], addr: tuple[Any, ...]) -> None:
        for d in data:
            self.datagram_received(d, addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        src: Address = (str(addr[0]), int(addr[1]))
        if data.startswith(PROBE):
            if not self.session:
                return  # we have not offered or answered yet
            if data[len(PROBE):] != self.session or (self.hosts and src[0] not in self.hosts):
                if self._on_bad is not None:
                    self._on_bad()
                return
            if self.adopted is None:  # answered once, so the peer hears us from where it
                self.adopted = src  # reached us (more would echo back and forth)
                self.probe(src)
                self.wake.set()
            return
        if not self.session:
            if not self.replies.full():
                self.replies.put_nowait((data, src))
            return
        if src[0] in self.hosts or src == self.adopted:
            self.early.append((data, src))
            self.wake.set()

    def error_received(self, exc: Exception) -> None:
        log.debug("quic probe: %s", exc)


@dataclass(slots=True)
class QuicPort:
    """One UDP socket readied for a QUIC punch: its transport, the prober on it, and the
    public address STUN saw."""

    transport: asyncio.DatagramTransport
    prober: Prober
    mapped: Address
    local: Address
    handed: bool = False  # a QuicStream owns the transport now

    @property
    def candidates(self) -> tuple[Address, ...]:
        return own_candidates(self.mapped, self.local)

    def close(self) -> None:
        if not self.handed:
            self.transport.close()


async def meet(port: QuicPort, session: bytes, theirs: tuple[Address, ...], *,
               server: bool) -> tuple[Address, list[bytes]]:
    """Probe the peer's usable candidates until its first valid probe names its address
    (runs until then: bound it). A server goes on until the client's first datagram
    from there. The address, and (server) the datagrams to hand to QUIC."""
    family = family_of(port.local[0])
    to = targets(port.mapped[0], theirs, family)
    if not to:
        raise QuicError(nothing_to_dial(theirs, family, "UDP port"))
    prober = port.prober
    prober.expect(session, {t[0] for t in to})
    while True:
        adopted = prober.adopted
        if adopted is not None:
            early = [d for d, src in prober.early if src == adopted]
            if not server or early:
                if not server:  # the server too should hear us from here, and soon
                    prober.probe(adopted)
                return adopted, early
        prober.wake.clear()
        for t in dict.fromkeys([*to, *([adopted] if adopted else [])]):
            prober.probe(t)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_INTERVAL):
                await prober.wake.wait()


# A UDP port of the family given, on any local address, delivering to the protocol given;
# OSError if none can be bound.
UdpOpener = Callable[[asyncio.DatagramProtocol, int], Awaitable[asyncio.DatagramTransport]]


def _any_address(family: int) -> Address:
    return ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)


async def kernel_udp(protocol: asyncio.DatagramProtocol, family: int
                     ) -> asyncio.DatagramTransport:
    """A kernel UDP socket under qh3's batched transport (recvmmsg, GSO): a node's."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(_any_address(family))
    except OSError:
        sock.close()
        raise
    return await udp_transport(sock, protocol)


async def loop_udp(protocol: asyncio.DatagramProtocol, family: int
                   ) -> asyncio.DatagramTransport:
    """A UDP endpoint from the running loop's `create_datagram_endpoint`: the simulator's
    (a port on the simulated host the caller runs as). One datagram per call each way."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol,
                                                       local_addr=_any_address(family))
    return transport


@dataclass(frozen=True, slots=True)
class QuicSettings:
    """Where the server's STUN (UDP) is, how long a QUIC dial may take, how many at once,
    whether this node takes part (off: offers are rejected at once), and how its UDP
    ports are made."""

    stun: Address | None = None
    budget: float = QUIC_BUDGET  # from dial() to a stream, every step included
    max_dials: int = 32
    max_incoming: int = 16
    enabled: bool = True
    open_udp: UdpOpener = kernel_udp


class QuicEndpoint(SignalledEndpoint[QuicOffer, QuicAnswer | QuicReject]):
    """Dials and accepts QUIC streams over punched UDP for one device (see the module
    docstring)."""

    NAME = "QUIC"
    OFFER_TAG = QuicOffer.TAG
    SIGNALS = _SIGNALS
    WHAT = "quic"
    SIGNAL_ERROR = QuicSignalError
    TASKS = "quic"
    TOO_MANY_DIALS = "too many QUIC dials in progress"

    def __init__(self, pipe: PipeSender, settings: QuicSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None) -> None:
        super().__init__(pipe, accept_from=accept_from, tasks="quic", logger=log)
        self.settings: QuicSettings = settings or QuicSettings()
        self._certificate: ThrowawayCertificate | None = None

    async def start(self) -> None:
        self._open_backlog()

    async def aclose(self) -> None:
        """Stop answering, cancel dials, close streams nobody accepted yet."""
        if self._closed:
            return
        self._closed = True
        await self._close_common()

    # --- signalling in ---------------------------------------------------------------
    def _refusal(self, msg: PipeMessage) -> str | None:
        if not self._closed and self._backlog is not None:
            if not self.settings.enabled:
                return "QUIC is turned off"
            if self.settings.stun is None:
                return "no STUN at our server"
        return super()._refusal(msg)

    def _bad_probe(self) -> None:
        self.stats.bad_signals += 1

    async def _reject(self, msg: PipeMessage, session: bytes, reason: str) -> None:
        await self._send_reject(msg, encode_quic(QuicReject(session, reason)))

    async def _port(self) -> QuicPort:
        named = self.settings.stun
        if named is None:
            raise QuicError("our server runs no STUN")
        try:
            stun = await resolve(named)
        except OSError as exc:
            raise QuicError(f"STUN at {format_hostport(*named)}: {exc}") from None
        family = family_of(stun[0])
        prober = Prober(self._bad_probe)
        try:
            transport = await self.settings.open_udp(prober, family)
        except OSError as exc:
            raise QuicError(f"cannot bind a UDP socket: {exc}") from None
        try:
            mapped = await query_on(transport, prober.replies, stun,
                                    timeout=self.settings.budget)
        except (OSError, TimeoutError) as exc:
            transport.close()
            raise QuicError(f"STUN at {format_hostport(*stun)}: {exc}") from None
        except BaseException:
            transport.close()
            raise
        name = transport.get_extra_info("sockname")
        host = str(name[0])
        if host in ("0.0.0.0", "::"):  # bound to any address: the one that reaches STUN
            host = _local_host(stun)
        return QuicPort(transport, prober, mapped, (host, int(name[1])))

    # --- accepting -------------------------------------------------------------------
    async def _answer(self, msg: PipeMessage, offer: QuicOffer) -> None:
        # Our port would be of our STUN's family (one socket, one family): say so at once,
        # not after a STUN query and an answer the dialer could not use.
        if await self._declined(msg, offer.session, await no_common_family(
                self.settings.stun, offer.candidates, "UDP port")):
            return
        if self._certificate is None:
            self._certificate = ThrowawayCertificate.make()
        cert = self._certificate

        async def open_port() -> QuicPort:
            port = await self._port()
            port.prober.expect(offer.session)  # the dialer probes once it has our answer
            return port

        async def connect(port: QuicPort, step: Step) -> Stream:
            step.now = "a probe and the client's first packet"
            peer, early = await meet(port, offer.session, offer.candidates, server=True)
            step.now = "the QUIC handshake"
            port.handed = True
            return await QuicStream.open(
                port.transport, peer, quic_configuration(is_client=False, certificate=cert),
                early=early)

        await self._answer_punch(
            msg, offer.session, self.settings.budget, open_port,
            lambda port: undialable(port.mapped[0], offer.candidates,
                                    family_of(port.local[0]), "UDP port"),
            lambda port: encode_quic(QuicAnswer(offer.session, port.candidates,
                                                cert.fingerprint)),
            connect, QuicError)

    # --- dialing ---------------------------------------------------------------------
    async def dial(self, address: str, device: bytes) -> Stream:
        """A QUIC stream to `device` of `address` within `budget`; QuicError says why not."""
        if not self.settings.enabled:
            raise QuicError("QUIC is turned off")

        async def open_port(session: bytes) -> QuicPort:
            port = await self._port()
            port.prober.expect(session)  # the callee may probe before its answer is in
            return port

        async def connect(port: QuicPort, reply: QuicAnswer | QuicReject, session: bytes,
                          step: Step) -> Stream:
            answer = cast(QuicAnswer, reply)  # _dial_punch raised on a reject
            step.now = "a probe from the peer"
            peer, _ = await meet(port, session, answer.candidates, server=False)
            step.now = "the QUIC handshake"
            port.handed = True
            return await QuicStream.open(port.transport, peer,
                                         quic_configuration(is_client=True),
                                         fingerprint=answer.fingerprint)

        return await self._dial_punch(
            address, device, self.settings.budget, open_port,
            lambda session, port: encode_quic(QuicOffer(session, port.candidates)),
            connect, QuicError)


def _local_host(toward: Address) -> str:
    """Our address on the route to `toward` (a connected UDP socket sends nothing)."""
    family = family_of(toward[0])
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(toward)
            return str(s.getsockname()[0])
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"
