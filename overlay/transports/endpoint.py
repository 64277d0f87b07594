"""What an endpoint signalled over PIPE does whatever connection it makes.

The WebRTC endpoint and the TCP punch endpoint both trade an offer and an answer (or a
reject) over PIPE, keyed by a dial session the dialer draws. `SignalledEndpoint` keeps
their common part: the dials waiting for a reply (a reply counts only from the device that
was dialled), offers seen recently (PIPE may repeat one across a reconnect: a repeat is
dropped before its fields are decoded), the admission of an offer (closed, not accepted,
busy), the bounded backlog of accepted streams, the counters and the closing. A subclass
makes the connection: `_answer` for an admitted offer, `_reject` to say no, and its own
`dial`.

An offer that does not decode (a malformed field, a candidate that means nothing, an SDP
that is not one) is rejected at once with the reason, when its session can be read, so the
dialler fails this rung at once instead of waiting out its budget. Those rejects are owed
to nobody, and a flood of bad offers must not spend our PIPE rate: they go at the rate of
`replies` (an `OfferReplies`, which a node shares with its `UnknownOffers`). Nothing but an
offer is ever answered so.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from crypto.codec import Fields
from overlay.transports.signalling import (
    SESSION_LEN,
    OfferReplies,
    PipeSender,
    PipeSignal,
    Reject,
    Unsupported,
    read_signal,
)
from overlay.transports.stream import Stream, StreamBroken, StreamClosed
from rendezvous.messages import PipeMessage
from rendezvous.taskset import TaskSet

RECENT_SESSIONS = 1024  # offers remembered to drop PIPE's repeats

class Signal(Protocol):
    """What every offer, answer and reject names: the dial session."""

    @property
    def session(self) -> bytes: ...


class Port(Protocol):
    """The local end a punch made ready (a socket and its NAT mapping); closed after use."""

    def close(self) -> None: ...


Offer = TypeVar("Offer", bound=Signal)
Reply = TypeVar("Reply", bound=Signal)
P = TypeVar("P", bound=Port)


@dataclass(slots=True)
class Step:
    """Where a dial or an answer is, named in the error when its budget runs out."""

    now: str = "STUN"


class EndpointLimits(Protocol):
    """The settings the common part reads (at each use: a node may replace them)."""

    @property
    def max_incoming(self) -> int: ...

    @property
    def max_dials(self) -> int: ...


@dataclass(slots=True)
class EndpointStats:
    """Counters a node shows in `status`."""

    dials: int = 0
    dial_failures: int = 0
    accepted: int = 0
    accept_failures: int = 0
    rejected: int = 0
    bad_signals: int = 0
    candidates_dropped: int = 0  # WebRTC: ICE candidates of an SDP over its cap, left out
    # Offers that did not decode (counted in bad_signals too): rejected with the reason,
    # or left unanswered, over the reply rate or with no session to name.
    bad_offers_rejected: int = 0
    bad_offers_unanswered: int = 0


@dataclass(slots=True)
class PendingDial(Generic[Reply]):
    """A dial waiting for the callee's answer, reject or `unsupported`."""

    address: str
    device: bytes
    reply: asyncio.Future[Reply | Unsupported]


class SignalledEndpoint(Generic[Offer, Reply]):
    """The common part of a PIPE-signalled endpoint (see the module docstring)."""

    NAME: ClassVar[str]  # in messages: "WebRTC", "TCP punch"
    OFFER_TAG: ClassVar[str]  # its offer's tag: an `Unsupported` naming it is a reply
    # Its signals by tag, what their decode errors name them, and the error a malformed
    # one raises.
    SIGNALS: ClassVar[Mapping[str, Callable[[Fields], Signal]]]
    WHAT: ClassVar[str]
    SIGNAL_ERROR: ClassVar[type[ValueError]]
    TASKS: ClassVar[str]  # the prefix of its task names
    TOO_MANY_DIALS: ClassVar[str]  # the refusal when `max_dials` are in progress

    settings: EndpointLimits

    def __init__(self, pipe: PipeSender, *,
                 accept_from: Callable[[str, bytes], bool] | None, tasks: str,
                 logger: logging.Logger) -> None:
        self.stats = EndpointStats()
        self._pipe = pipe
        self._accept_from = accept_from
        self._dials: dict[bytes, PendingDial[Reply]] = {}
        self._tasks = TaskSet(tasks, logger=logger)
        self._incoming = 0
        self._backlog: asyncio.Queue[Stream | None] | None = None
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.replies = OfferReplies()  # the rate of rejects of bad offers (a node shares one)
        self._closed = False
        self._log = logger

    # --- lifecycle -------------------------------------------------------------------
    def _open_backlog(self) -> None:
        self._backlog = asyncio.Queue(maxsize=self.settings.max_incoming)

    async def _close_common(self) -> None:
        """Cancel the dials waiting for a reply, end the answers, close the streams nobody
        accepted yet and wake `accept()` waiters."""
        for d in self._dials.values():
            if not d.reply.done():
                d.reply.cancel()
        await self._tasks.aclose()
        if self._backlog is not None:
            while not self._backlog.empty():
                stream = self._backlog.get_nowait()
                if stream is not None:
                    await stream.aclose()
            self._backlog.put_nowait(None)

    # --- signalling in ---------------------------------------------------------------
    def feed(self, msg: PipeMessage) -> bool:
        """Handle one PIPE push. False if it is not this rung's signal (route it elsewhere).
        A node reads each payload once and calls `take` on the rung its tag names."""
        sig = read_signal(msg.payload)
        return sig is not None and self.take(msg, sig)

    def take(self, msg: PipeMessage, sig: PipeSignal) -> bool:
        """`feed` for a payload already read: a signal of `SIGNALS` or an `Unsupported`
        naming our offer (a reply, as a Reject) is handled (True); a malformed one is
        dropped and counted (True), and rejected if it is an offer; anything else is False
        (another rung's)."""
        if sig.tag == self.OFFER_TAG:
            self._take_offer(msg, sig)
            return True
        try:
            got: Signal | None = sig.decode(self.SIGNALS, self.WHAT, self.SIGNAL_ERROR)
            if got is None:
                got = sig.unsupported(self.OFFER_TAG)
        except ValueError as exc:
            self.stats.bad_signals += 1
            self._log.info("bad %s signal from %s: %s", self.NAME, msg.sender, exc)
            return True
        if got is None:
            return False
        self._on_reply(msg, got.session, cast(Reply | Unsupported, got))
        return True

    def _take_offer(self, msg: PipeMessage, sig: PipeSignal) -> None:
        """An offer: a repeat is dropped before it is decoded (most of the cost), a bad one
        rejected at once (see the module docstring), a good one admitted or declined."""
        readable = sig.offer()  # its session, if that much is well formed
        if readable is not None and not self._first_time(msg, readable[1]):
            return  # PIPE may repeat one across a reconnect
        try:
            offer = sig.decode(self.SIGNALS, self.WHAT, self.SIGNAL_ERROR)
        except ValueError as exc:
            self.stats.bad_signals += 1
            self._bad_offer(msg, None if readable is None else readable[1], str(exc))
            return
        if offer is not None:  # always, for OFFER_TAG's decoder
            self._on_offer(msg, offer.session, cast(Offer, offer))

    def _first_time(self, msg: PipeMessage, session: bytes) -> bool:
        """Whether this session of `msg`'s device is new; remembered from now on."""
        key = msg.sender_device + session
        if key in self._recent:
            return False
        self._recent[key] = None
        if len(self._recent) > RECENT_SESSIONS:
            self._recent.popitem(last=False)
        return True

    def _bad_offer(self, msg: PipeMessage, session: bytes | None, why: str) -> None:
        """Reject an offer that did not decode, at the rate `replies` allows; the reason
        names what is wrong with the offer (the sender's own data), nothing of ours."""
        unanswered = ("no session to name" if session is None else "closing" if self._closed
                      else self.replies.spend(msg))
        if unanswered is not None or session is None:
            self.stats.bad_offers_unanswered += 1  # a flood's: counted, logged at debug
            self._log.log(logging.INFO if session is None else logging.DEBUG,
                          "bad %s offer from %s, not answered (%s): %s", self.NAME,
                          msg.sender, unanswered, why)
            return
        self.stats.bad_offers_rejected += 1
        self._log.info("bad %s offer from %s, rejected: %s", self.NAME, msg.sender, why)
        self._tasks.spawn(self._reject(msg, session, f"invalid offer: {why}"),
                          name=f"{self.TASKS} reject {msg.sender}")

    async def _send_reject(self, msg: PipeMessage, payload: bytes) -> None:
        """Send a reject's `payload` back to `msg`'s device (a courtesy: if it does not
        arrive, the dialer times out)."""
        try:
            await self._pipe.pipe(msg.sender, payload, device=msg.sender_device)
        except Exception as exc:
            self._log.info("could not send a %s reject to %s: %s", self.NAME, msg.sender,
                           exc)

    def _on_reply(self, msg: PipeMessage, session: bytes,
                  reply: Reply | Unsupported) -> None:
        dial = self._dials.get(session)
        if dial is None or dial.address != msg.sender or dial.device != msg.sender_device:
            self.stats.bad_signals += 1  # late, duplicate, or not from the device we dialled
        elif not dial.reply.done():
            dial.reply.set_result(reply)

    def _refusal(self, msg: PipeMessage) -> str | None:
        """Why an offer from `msg`'s device is not answered now, or None."""
        if self._closed or self._backlog is None:
            return "not accepting"
        if self._accept_from is not None and not self._accept_from(msg.sender,
                                                                    msg.sender_device):
            return "not accepted"
        if self._incoming + self._backlog.qsize() >= self.settings.max_incoming:
            return "busy"
        return None

    def _on_offer(self, msg: PipeMessage, session: bytes, offer: Offer) -> None:
        reason = self._refusal(msg)
        if reason is None:
            self._incoming += 1
            self._tasks.spawn(self._answering(msg, offer),
                              name=f"{self.TASKS} answer {msg.sender}")
            return
        self.stats.rejected += 1
        self._log.info("%s offer from %s declined: %s", self.NAME, msg.sender, reason)
        if not self._closed:
            self._tasks.spawn(self._reject(msg, session, reason),
                              name=f"{self.TASKS} reject {msg.sender}")

    async def _declined(self, msg: PipeMessage, session: bytes, why: str | None) -> bool:
        """Decline an admitted offer at once if there is a reason `why` (counted, logged
        and sent back, as a refusal is); False if there is none."""
        if why is None:
            return False
        self.stats.rejected += 1
        self._log.info("%s offer from %s declined: %s", self.NAME, msg.sender, why)
        await self._reject(msg, session, why)
        return True

    async def _answering(self, msg: PipeMessage, offer: Offer) -> None:
        try:
            await self._answer(msg, offer)
        finally:
            self._incoming -= 1

    def _answer(self, msg: PipeMessage, offer: Offer) -> Coroutine[Any, Any, None]:
        """Answer an admitted offer and hand the stream to `_hand_over`; never raises."""
        raise NotImplementedError

    def _reject(self, msg: PipeMessage, session: bytes,
                reason: str) -> Coroutine[Any, Any, None]:
        """Tell the dialer why not (a courtesy: its dial times out otherwise)."""
        raise NotImplementedError

    # --- a punch: port, signal, connect, within a budget ------------------------------
    async def _answer_punch(self, msg: PipeMessage, session: bytes, budget: float,
                            open_port: Callable[[], Awaitable[P]],
                            unusable: Callable[[P], str | None],
                            answer: Callable[[P], bytes],
                            connect: Callable[[P, Step], Awaitable[Stream]],
                            error: type[StreamBroken]) -> None:
        """`_answer` of a punching rung: a port, our `answer` payload back to the dialer,
        the connection (`connect` may name finer steps), the stream to `_hand_over`, all
        within `budget`; but a reject instead of the answer when `unusable` says why the
        port can use none of the offer's candidates (the dialler would wait out its budget
        for a connect that never comes). A failure is counted and logged, never raised."""
        port: P | None = None
        stream: Stream | None = None
        handed = False
        step = Step()
        try:
            async with asyncio.timeout(budget):
                port = await open_port()
                if await self._declined(msg, session, unusable(port)):
                    return
                step.now = "the answer"
                await self._pipe.pipe(msg.sender, answer(port), device=msg.sender_device)
                step.now = "the connect"
                stream = await connect(port, step)
            if not self._hand_over(stream):
                raise error("accept backlog full")
            handed = True
        except Exception as exc:  # one failed answer must not end the node
            self.stats.accept_failures += 1
            why = f"{step.now} took over {budget} s" if isinstance(exc, TimeoutError) \
                else str(exc)
            self._log.info("%s from %s failed: %s", self.NAME, msg.sender, why)
        finally:
            if stream is not None and not handed:
                await stream.aclose()
            if port is not None:
                port.close()

    async def _dial_punch(self, address: str, device: bytes, budget: float,
                          open_port: Callable[[bytes], Awaitable[P]],
                          offer: Callable[[bytes, P], bytes],
                          connect: Callable[[P, Reply, bytes, Step], Awaitable[Stream]],
                          error: type[StreamBroken]) -> Stream:
        """`dial` of a punching rung: a port, our `offer` payload (for a fresh session),
        the callee's answer (a Reject is `error` with its reason), the connection, all
        within `budget`; `error` says which step failed or ran out of time."""
        if (busy := self._cannot_dial()) is not None:
            raise error(busy)
        session = os.urandom(SESSION_LEN)
        dial = self._dialling(session, address, device)
        port: P | None = None
        ok = False
        step = Step()
        try:
            async with asyncio.timeout(budget):
                port = await open_port(session)
                step.now = "the offer"
                try:
                    await self._pipe.pipe(address, offer(session, port), device=device)
                except Exception as exc:  # RendezvousError: offline, unknown, ...
                    raise error(f"could not send the offer to {address}: {exc}") from None
                step.now = "an answer"
                reply = await dial.reply
                if isinstance(reply, Reject | Unsupported):
                    raise error(f"{address} declined: {reply.reason}")
                step.now = "a connection"
                stream = await connect(port, reply, session, step)
            ok = True
            return stream
        except TimeoutError:
            raise error(f"no {self.NAME} to {address} within {budget} s (waiting for "
                        f"{step.now})") from None
        except asyncio.CancelledError:
            if self._closed:
                raise StreamClosed(f"{self.NAME} endpoint closed during the dial") from None
            raise
        finally:
            self._dial_ended(session, ok)
            if port is not None:
                port.close()

    # --- accepting -------------------------------------------------------------------
    def _hand_over(self, stream: Stream) -> bool:
        """Queue an answered stream for `accept()`; False if the backlog is full."""
        if self._backlog is None or self._backlog.full():
            return False
        self._backlog.put_nowait(stream)
        self.stats.accepted += 1
        return True

    async def accept(self) -> Stream:
        """The next incoming stream; StreamClosed once the endpoint is closed."""
        if self._backlog is None:
            raise StreamClosed("endpoint not started")
        stream = await self._backlog.get()
        if stream is None:
            self._backlog.put_nowait(None)
            raise StreamClosed(f"{self.NAME} endpoint closed")
        return stream

    # --- dialing ---------------------------------------------------------------------
    def _dialling(self, session: bytes, address: str, device: bytes) -> PendingDial[Reply]:
        """Register a dial (the subclass has checked `_can_dial`); it must `_dial_ended`."""
        self.stats.dials += 1
        dial: PendingDial[Reply] = PendingDial(address, device,
                                               asyncio.get_running_loop().create_future())
        self._dials[session] = dial
        return dial

    def _dial_ended(self, session: bytes, ok: bool) -> None:
        self._dials.pop(session, None)
        if not ok:
            self.stats.dial_failures += 1

    def _cannot_dial(self) -> str | None:
        """Why no dial may start now, or None; raises StreamClosed if not running."""
        if self._closed or self._backlog is None:
            raise StreamClosed(f"{self.NAME} endpoint is not running")
        if len(self._dials) >= self.settings.max_dials:
            return self.TOO_MANY_DIALS
        return None
