"""TCP hole punching: a plain TCP stream between two NATed devices, signalled over PIPE.

    punch = PunchEndpoint(rendezvous_client, PunchSettings(stun=(server_host, stun_tcp)))
    await punch.start()
    # the node's push loop:  if isinstance(push, PipeMessage): punch.feed(push)
    stream = await punch.dial("bob@example.net", bob_device)   # -> Stream, path "tcp-punch"
    incoming = await punch.accept()                             # -> Stream

Each side connects to its server's STUN over TCP (`rendezvous.stun.query_tcp_mapping`)
from a socket bound with SO_REUSEADDR and SO_REUSEPORT, and learns the public address its
NAT gave that local port. It keeps that connection open while it punches: it holds the
NAT's mapping, and it listens on the same port (`PunchPort`). The dialer PIPEs a
`PunchOffer` with its candidates (the mapping, and its local address), the callee answers
with its own (`PunchAnswer`) and starts connecting at once; the dialer starts when the
answer is in. Both connect from the port STUN saw to the other's mapping: the first SYN out
opens its NAT for the other's, which then passes, and the two meet in a TCP simultaneous
open. A SYN that arrives before ours went out and is let in (a NAT that lets it, or no
NAT) is taken by the listener instead of being reset. A refused or unreachable attempt is
made again after a short backoff until `budget` runs out.

This works when both NATs map endpoint-independently (one public port for every
destination, as Linux masquerade does while the port is free). A symmetric NAT gives the
punch another port than STUN saw, the SYNs meet no mapping, and `dial` fails within
`budget` with a `PunchError` (a StreamBroken), so the ladder goes on to WebRTC.

Both ends must end up on the SAME connection, and more than one may connect: when both
NATs give each destination a new public port but let any inbound SYN through to a mapping,
each end's connect lands on the other's listener (from a port STUN did not see) and each
end holds two connections, its connect and its accept; a local address and a hairpinned
public mapping can both connect too. Were each end to keep its own first, the two could
keep different ones and the transfer handshake would run over mismatched streams. So the
dialer's pick decides (ICE's nomination, RFC 8445 8.1.1): the dialer keeps its first
connection, writes `NOMINATION` and the punch session's id on it before handing it up and
closes the others; the answerer keeps every connection it gets, accepted or connected (at
most `MAX_HELD`), until one of them delivers that marker, keeps that one and closes the
rest. A connection that closes or sends anything else is dropped; the answerer reads
exactly the marker's length, so the transfer handshake's first bytes, which follow at
once, stay in the stream. The session id in the marker, known only to the two ends and
their servers, keeps another host at one of the peer's addresses from nominating its own.
Nomination is negotiated, since a peer of the earlier protocol neither writes nor expects
the marker: the offer says the dialer will nominate, the answer that the answerer awaits
it (`nominate`), and the marker is used only when both say so; otherwise each end keeps
its first connection as before (`Nomination.NONE`).

Which end runs the transfer client does not depend on who connected (in a simultaneous
open both did): the device that sent the offer gets the stream from `dial` and is the
client, the one that answered gets it from `accept` and serves. The stream is then a
`TcpStream` like direct TCP's, and the transfer handshake runs over it unchanged.

The peer's candidates are only dialled, never resolved (IP literals only, at most
MAX_CANDIDATES); its local address only when both ends have the same public address (one
home behind one NAT), so a peer can't aim our connects into our own LAN (candidates.py has
the rules, shared with QUIC). The port is IPv4 or IPv6, as the address of the server's STUN
is: a callee declines an offer with no candidate of its family at once, before it opens a
socket, naming both families, and one it can dial none of (an IPv6 link-local public
candidate) as soon as its port is ready, instead of answering; a dialler fails as soon as
an answer has none. An offer that does not decode is rejected with the reason
(endpoint.py). Incoming
offers are bounded (`max_incoming`), answers are taken only from the device dialled, bad
payloads and connections that send something other than the marker are dropped and counted
(`bad_signals`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

from crypto.address import format_hostport
from crypto.codec import Fields, packb
from overlay.transports.candidates import (
    MAX_CANDIDATES,
    decode_candidates,
    no_common_family,
    nothing_to_dial,
    own_candidates,
    targets,
    undialable,
)
from overlay.transports.endpoint import SignalledEndpoint, Step
from overlay.transports.signalling import SESSION_LEN, PipeSender, Reject, decode_tagged
from overlay.transports.stream import Stream, StreamBroken
from overlay.transports.tcp import DirectTcpProtocol, TcpStream
from rendezvous.backoff import Backoff
from rendezvous.messages import PipeMessage
from rendezvous.stun import (
    Address,
    SocketMaker,
    StunDecodeError,
    TcpMapping,
    query_tcp_mapping,
    reusable_socket,
)

log = logging.getLogger(__name__)

PUNCH_BUDGET = 3.0  # STUN, the PIPE round trip and the connects, on a home line: < 0.5 s
RETRY = Backoff(base=0.02, cap=0.25, jitter=0.5)  # after a refused or unreachable connect
NOMINATION = b"pp-punch"  # the dialer's first bytes on the connection both ends keep
MAX_HELD = 2 * MAX_CANDIDATES  # connections the answerer holds until one is nominated


class PunchError(StreamBroken):
    """A TCP punch failed; the text says at which step and why."""


class BadNomination(PunchError):
    """A punched connection sent something other than NOMINATION first (it is dropped)."""


class PunchSignalError(ValueError):
    """A PIPE payload is not a valid punch signal (the sender misbehaved)."""


@dataclass(frozen=True, slots=True)
class _Candidates:
    session: bytes
    candidates: tuple[Address, ...]  # the public mapping first, then the local address
    # Sent as "n" only when true: a peer of the earlier protocol ignores a field it does
    # not know, and its messages, without "n", decode as False.
    nominate: bool = False

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"s": self.session,
                               "c": [format_hostport(*c) for c in self.candidates]}
        if self.nominate:
            out["n"] = True
        return out

    @classmethod
    def decode(cls, f: Fields) -> Self:
        return cls(f.bytes("s", size=SESSION_LEN), decode_candidates(f),
                   bool(f.bool("n", optional=True)))


@dataclass(frozen=True, slots=True)
class PunchOffer(_Candidates):
    """The dialer's candidates for a new punch session; `nominate`: the dialer will write
    NOMINATION on the connection it keeps, if the answer says it awaits it."""

    TAG: ClassVar[str] = "punch-offer"


@dataclass(frozen=True, slots=True)
class PunchAnswer(_Candidates):
    """The callee's candidates for the session of the same id; it is already dialling.
    `nominate`: the callee keeps the connection NOMINATION arrives on (said only to an
    offer that said it nominates)."""

    TAG: ClassVar[str] = "punch-answer"


@dataclass(frozen=True, slots=True)
class PunchReject(Reject):
    """The callee won't punch this session; `reason` is shown to the dialer's user."""

    TAG: ClassVar[str] = "punch-reject"


PunchSignal = PunchOffer | PunchAnswer | PunchReject

_SIGNALS: dict[str, Callable[[Fields], PunchSignal]] = {
    PunchOffer.TAG: PunchOffer.decode,
    PunchAnswer.TAG: PunchAnswer.decode,
    PunchReject.TAG: PunchReject.decode,
}


def encode_punch(sig: PunchSignal) -> bytes:
    """The PIPE payload for `sig`."""
    return packb({**sig.fields(), "t": sig.TAG})


def decode_punch(payload: bytes) -> PunchSignal | None:
    """The punch signal in a PIPE payload; None if it is not one (route it elsewhere),
    PunchSignalError if it is one but malformed."""
    return decode_tagged(payload, _SIGNALS, "punch", PunchSignalError)


class PunchedTcpStream(TcpStream):
    """A TcpStream that came through a hole punch (shown as "tcp-punch" in inbox sources)."""

    path = "tcp-punch"


async def _connect_from(local: Address, peer: Address, family: int,
                        make_socket: SocketMaker, rng: random.Random | None) -> socket.socket:
    """Connect from `local` to `peer` until it works (the caller bounds the time): a
    refusal (the peer's SYN was not out yet) or an ICMP error is retried after RETRY
    (its jitter drawn from `rng`, else from the `random` module)."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        sock = make_socket(family, local)
        try:
            await loop.sock_connect(sock, peer)
            return sock
        except OSError as exc:
            sock.close()
            attempt += 1
            log.debug("punch %s -> %s: %s", local, peer, exc)
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(RETRY.delay(attempt, rng))


async def _accept_from(listener: socket.socket, hosts: set[str]) -> socket.socket:
    """The first connection `listener` takes from one of `hosts`; others are closed."""
    loop = asyncio.get_running_loop()
    while True:
        conn, addr = await loop.sock_accept(listener)
        if str(addr[0]) in hosts:
            return conn
        conn.close()


@dataclass(slots=True)
class PunchPort:
    """One local port readied for a punch: the STUN connection that holds its NAT mapping,
    and a listener on it that takes the peer's SYN when it comes in before ours went out
    (a NAT that lets it in, or no NAT) instead of answering it with a reset."""

    mapping: TcpMapping
    listener: socket.socket
    make_socket: SocketMaker = reusable_socket  # for the connects from the port

    @classmethod
    def ready(cls, mapping: TcpMapping,
              make_socket: SocketMaker = reusable_socket) -> PunchPort:
        listener = make_socket(mapping.sock.family, mapping.local)
        try:
            listener.listen(4)
        except BaseException:
            listener.close()
            raise
        return cls(mapping, listener, make_socket)

    @property
    def candidates(self) -> tuple[Address, ...]:
        """Ours: the public mapping, then the local address (for a peer behind our NAT)."""
        return own_candidates(self.mapping.mapped, self.mapping.local)

    def close(self) -> None:
        self.listener.close()
        self.mapping.close()


class Nomination(enum.Enum):
    """Which of the connections a simultaneous open makes an end keeps."""

    NONE = "none"  # a peer of the earlier protocol: each end keeps its first
    SEND = "send"  # the dialer: keeps its first and writes NOMINATION on it
    AWAIT = "await"  # the answerer: keeps the one NOMINATION arrives on


def _peer(sock: socket.socket) -> str:
    try:
        return format_hostport(*sock.getpeername()[:2])
    except OSError:
        return "a closed connection"


async def _nominated(conn: socket.socket, marker: bytes) -> socket.socket:
    """`conn` once `marker` has come in on it, not a byte more read; PunchError if it
    closes first or sends anything else, OSError if it breaks."""
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < len(marker):
        chunk = await loop.sock_recv(conn, len(marker) - len(got))
        if not chunk:
            raise PunchError(f"closed after {len(got)} of the nomination's "
                             f"{len(marker)} bytes")
        got += chunk
        if not marker.startswith(got):
            raise BadNomination(f"sent {got[:len(NOMINATION)]!r}... instead of the "
                                "nomination")
    return conn


async def simultaneous_open(port: PunchPort, theirs: tuple[Address, ...], *,
                            nomination: Nomination = Nomination.NONE,
                            rng: random.Random | None = None,
                            on_bad: Callable[[PunchError], None] | None = None,
                            session: bytes = b"") -> PunchedTcpStream:
    """Dial each of the peer's usable candidates from `port` at once, and take its
    connections on the port's listener. Which connection wins depends on `nomination`
    (see the module docstring): the first (of several at once, the first in candidate
    order), written NOMINATION on with `SEND`; with `AWAIT` the one NOMINATION arrives
    on. The others are closed. Runs until cancelled (bound it). `rng` draws the retry
    jitter (a simulation's repeatable run); `on_bad` hears of a connection that sent
    something other than NOMINATION (it is dropped). The marker is NOMINATION followed
    by `session`, the punch session's id, which only the two ends (and their servers)
    know: another host at one of the peer's candidate addresses cannot nominate its own
    connection."""
    marker = NOMINATION + session
    mapping = port.mapping
    family = mapping.sock.family
    dial = targets(mapping.mapped[0], theirs, family)
    if not dial:
        raise PunchError(nothing_to_dial(theirs, family, "TCP port"))
    local = mapping.local  # the address and port STUN saw us come from
    hosts = {t[0] for t in dial}
    awaiting = nomination is Nomination.AWAIT
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_connect_from(local, t, family, port.make_socket, rng),
                              name=f"punch {format_hostport(*t)}")
             for t in dial]
    accepting = loop.create_task(_accept_from(port.listener, hosts), name="punch accept")
    tasks.append(accepting)
    held: dict[asyncio.Task[socket.socket], socket.socket] = {}  # AWAIT: read for the mark
    sock: socket.socket | None = None
    try:
        while sock is None:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in [t for t in tasks if t in done]:  # in candidate order, not set order
                tasks.remove(t)
                if (conn := held.pop(t, None)) is not None:  # its first bytes are in
                    why = t.exception()
                    if why is None and sock is None:
                        sock = conn
                        continue
                    peer = _peer(conn)
                    conn.close()
                    if isinstance(why, BadNomination):
                        log.info("punch: dropped %s: %s", peer, why)
                        if on_bad is not None:
                            on_bad(why)
                    elif why is not None:  # the dialer closed one it did not pick
                        log.debug("punch: dropped %s: %s", peer, why)
                    continue
                try:
                    won = t.result()
                except OSError as exc:  # binding the port again failed
                    raise PunchError(f"cannot dial from {format_hostport(*local)}: {exc}") from None
                if t is accepting and awaiting:  # the dialer's pick may come in next
                    accepting = loop.create_task(_accept_from(port.listener, hosts),
                                                 name="punch accept")
                    tasks.append(accepting)
                if awaiting and sock is None and len(held) < MAX_HELD:
                    mark = loop.create_task(_nominated(won, marker),
                                           name="punch nomination")
                    held[mark] = won
                    tasks.append(mark)
                elif not awaiting and sock is None:
                    sock = won
                else:
                    won.close()
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
            for t in tasks:
                if (conn := held.pop(t, None)) is not None:
                    conn.close()  # waiting for a nomination that never came
                elif not t.cancelled() and t.exception() is None:
                    t.result().close()  # connected while being cancelled: don't leak it
    try:
        if nomination is Nomination.SEND:
            await loop.sock_sendall(sock, marker)
        _, proto = await loop.create_connection(DirectTcpProtocol, sock=sock)
    except OSError as exc:
        peer = _peer(sock)
        sock.close()
        raise PunchError(f"the punched connection to {peer} broke: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return PunchedTcpStream(proto)


@dataclass(frozen=True, slots=True)
class PunchSettings:
    """Where the server's STUN over TCP is, how long a punch may take, how many at once,
    and how its sockets are made (the kernel's; the simulator passes its network's)."""

    stun: Address | None = None
    budget: float = PUNCH_BUDGET  # from dial() to a stream, every step included
    max_dials: int = 32
    max_incoming: int = 16
    make_socket: SocketMaker = reusable_socket


class PunchEndpoint(SignalledEndpoint[PunchOffer, PunchAnswer | PunchReject]):
    """Dials and accepts punched TCP streams for one device (see the module docstring)."""

    NAME = "TCP punch"
    OFFER_TAG = PunchOffer.TAG
    SIGNALS = _SIGNALS
    WHAT = "punch"
    SIGNAL_ERROR = PunchSignalError
    TASKS = "punch"
    TOO_MANY_DIALS = "too many TCP punches in progress"

    def __init__(self, pipe: PipeSender, settings: PunchSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None,
                 rng: random.Random | None = None) -> None:
        """`rng`, when given, draws the connects' retry jitter (a simulation's repeatable
        run), else the `random` module does."""
        super().__init__(pipe, accept_from=accept_from, tasks="tcp-punch", logger=log)
        self.settings: PunchSettings = settings or PunchSettings()
        self._rng = rng

    async def start(self) -> None:
        self._open_backlog()

    async def aclose(self) -> None:
        """Stop answering, cancel punches, close streams nobody accepted yet."""
        if self._closed:
            return
        self._closed = True
        await self._close_common()

    # --- signalling in ---------------------------------------------------------------
    def _refusal(self, msg: PipeMessage) -> str | None:
        if not self._closed and self._backlog is not None and self.settings.stun is None:
            return "no STUN over TCP at our server"
        return super()._refusal(msg)

    def _bad_nomination(self, exc: PunchError) -> None:
        self.stats.bad_signals += 1

    async def _reject(self, msg: PipeMessage, session: bytes, reason: str) -> None:
        await self._send_reject(msg, encode_punch(PunchReject(session, reason)))

    async def _port(self) -> PunchPort:
        stun = self.settings.stun
        if stun is None:
            raise PunchError("our server runs no STUN over TCP")
        try:
            mapping = await query_tcp_mapping(stun, timeout=self.settings.budget,
                                              make_socket=self.settings.make_socket)
        except (OSError, StunDecodeError) as exc:
            raise PunchError(f"STUN over TCP at {format_hostport(*stun)}: {exc}") from None
        try:
            return PunchPort.ready(mapping, self.settings.make_socket)
        except OSError as exc:
            mapping.close()
            raise PunchError(f"cannot listen on {format_hostport(*mapping.local)}: {exc}") from None

    # --- accepting -------------------------------------------------------------------
    async def _answer(self, msg: PipeMessage, offer: PunchOffer) -> None:
        # Our port is of our STUN's family (its connection holds the NAT's mapping): say
        # so at once, not after a STUN query and an answer the dialer could not use.
        if await self._declined(msg, offer.session, await no_common_family(
                self.settings.stun, offer.candidates, "TCP port")):
            return

        async def connect(port: PunchPort, step: Step) -> Stream:
            return await simultaneous_open(
                port, offer.candidates, rng=self._rng, on_bad=self._bad_nomination,
                nomination=Nomination.AWAIT if offer.nominate else Nomination.NONE,
                session=offer.session)

        await self._answer_punch(
            msg, offer.session, self.settings.budget, self._port,
            lambda port: undialable(port.mapping.mapped[0], offer.candidates,
                                    port.mapping.sock.family, "TCP port"),
            lambda port: encode_punch(PunchAnswer(offer.session, port.candidates,
                                                  nominate=offer.nominate)),
            connect, PunchError)

    # --- dialing ---------------------------------------------------------------------
    async def dial(self, address: str, device: bytes) -> Stream:
        """A punched stream to `device` of `address` within `budget`; PunchError says why
        not."""
        async def open_port(session: bytes) -> PunchPort:
            return await self._port()

        async def connect(port: PunchPort, reply: PunchAnswer | PunchReject, session: bytes,
                          step: Step) -> Stream:
            answer = cast(PunchAnswer, reply)  # _dial_punch raised on a reject
            return await simultaneous_open(
                port, answer.candidates, rng=self._rng,
                nomination=Nomination.SEND if answer.nominate else Nomination.NONE,
                session=session)

        return await self._dial_punch(
            address, device, self.settings.budget, open_port,
            lambda session, port: encode_punch(PunchOffer(session, port.candidates,
                                                          nominate=True)),
            connect, PunchError)

