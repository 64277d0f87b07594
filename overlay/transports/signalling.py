"""Signalling carried in rendezvous PIPE payloads: WebRTC's messages, and what every rung's
messages share.

Every rung that signals over PIPE (the TCP punch, QUIC, WebRTC, and any a later release
adds) opens with an offer by one convention: a msgpack map whose string tag "t" ends in
"-offer" (at most MAX_TAG characters) and whose "s" is the dial session, 16 bytes. A node
that gets such an offer of a rung it does not know answers it with `Unsupported` (tag
"unsupported", the session, and the offer's tag as "of"), and the dialler goes on to its
next rung at once instead of waiting out this one's budget (`UnknownOffers` sends it; each
rung's dial fails on it with "declined: the peer does not know ..."). Nothing else is ever
answered so: not an `unsupported`, not an answer, not a payload of another shape, so two
nodes cannot bounce replies off each other. An offer of a rung we know that does not decode
gets that rung's reject with the reason (endpoint.py); both kinds of reply, owed to
nobody, share one rate (`OfferReplies`).

Three messages, each naming a dial session (16 random bytes chosen by the dialer):
`Offer` and `Answer` carry an SDP (complete, with every ICE candidate: aiortc does not
trickle), `Reject` says why a peer won't answer. A PIPE payload is at most 16 KiB
(`rendezvous.limits.Limits.max_pipe_payload`); an aiortc data-channel SDP is about 0.5 KiB
plus about 0.1 KiB per candidate, so it is sent as text and deflated only when it would not
fit. Inflating is bounded, so a compressed bomb is just a bad message.

A node reads each PIPE payload once (`read_signal`: the msgpack map, bounded by MAX_SIGNAL,
and its tag) and hands the `PipeSignal` to the rung that owns the tag (`PipeSignal.route`),
which decodes its own fields from the map (`PipeSignal.decode`); an offer no rung owns goes
to `UnknownOffers`. The functions that take bytes (`decode_tagged`, `decode_unsupported`,
`offered`) read the payload the same way, for a single rung and for tests.

`MemoryPipe` connects signalling endpoints in one process (tests, benchmarks, the demo)
with the same `pipe()` call `RendezvousClient` offers.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, TypeVar

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from rendezvous.limits import SourceLimiter, TokenBucket
from rendezvous.messages import PipeMessage
from rendezvous.taskset import TaskSet

log = logging.getLogger(__name__)

MAX_SIGNAL = 16 * 1024
MAX_SDP = 64 * 1024  # after inflating
SESSION_LEN = 16
MAX_REASON = 200
MAX_TAG = 32
OFFER_SUFFIX = "-offer"
UNSUPPORTED_RATE = 10.0  # `unsupported` replies a second to one device, and as many at once
UNSUPPORTED_TOTAL_RATE = 50.0  # ... and to all of them together (a backstop)
UNSUPPORTED_SENDERS = 1024  # devices whose reply rate is kept (0.35 MB for 40-character addresses)

T = TypeVar("T")


class SignalError(ValueError):
    """A PIPE payload is not a valid WebRTC signal (the sender misbehaved)."""


class SignalTooLarge(ValueError):
    """Our own SDP does not fit one PIPE payload even deflated (too many candidates)."""


def _sdp_fields(sdp: str) -> dict[str, Any]:
    raw = sdp.encode()
    if len(raw) + 64 <= MAX_SIGNAL:
        return {"sdp": sdp}
    packed = zlib.compress(raw, 9)
    if len(packed) + 64 > MAX_SIGNAL:
        raise SignalTooLarge(f"SDP of {len(raw)} bytes does not fit a PIPE payload")
    return {"sdpz": packed}


def _sdp_of(f: Fields) -> str:
    if f.has("sdpz"):
        packed = f.bytes("sdpz", max_len=MAX_SIGNAL)
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(packed, MAX_SDP)
        except zlib.error as exc:
            raise DecodeError(f"sdpz does not inflate: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise DecodeError("sdpz inflates beyond the SDP limit or is truncated")
        try:
            sdp = raw.decode()
        except UnicodeDecodeError:
            raise DecodeError("sdpz is not UTF-8") from None
    else:
        sdp = f.str("sdp", max_len=MAX_SIGNAL)
    if not sdp.startswith("v=0"):
        raise DecodeError("sdp does not start with v=0")
    return sdp


@dataclass(frozen=True, slots=True)
class _Description:
    session: bytes
    sdp: str

    def fields(self) -> dict[str, Any]:
        return {"s": self.session, **_sdp_fields(self.sdp)}

    @classmethod
    def decode(cls, f: Fields) -> Self:
        return cls(f.bytes("s", size=SESSION_LEN), _sdp_of(f))


@dataclass(frozen=True, slots=True)
class Offer(_Description):
    """The dialer's SDP offer for a new session."""

    TAG: ClassVar[str] = "rtc-offer"


@dataclass(frozen=True, slots=True)
class Answer(_Description):
    """The callee's SDP answer to an offer of the same session."""

    TAG: ClassVar[str] = "rtc-answer"


@dataclass(frozen=True, slots=True)
class Reject:
    """The callee won't take this session; `reason` is shown to the dialer's user."""

    TAG: ClassVar[str] = "rtc-reject"
    session: bytes
    reason: str

    def fields(self) -> dict[str, Any]:
        return {"s": self.session, "why": self.reason[:MAX_REASON]}

    @classmethod
    def decode(cls, f: Fields) -> Self:
        return cls(f.bytes("s", size=SESSION_LEN), f.str("why", max_len=MAX_REASON))


Signal = Offer | Answer | Reject

SIGNALS: dict[str, Callable[[Fields], Signal]] = {
    Offer.TAG: Offer.decode,
    Answer.TAG: Answer.decode,
    Reject.TAG: Reject.decode,
}


def encode_signal(sig: Signal) -> bytes:
    """The PIPE payload for `sig` (SignalTooLarge if it can't fit)."""
    body = sig.fields()
    body["t"] = sig.TAG
    data = packb(body)
    if len(data) > MAX_SIGNAL:
        raise SignalTooLarge(f"{sig.TAG} is {len(data)} bytes, over {MAX_SIGNAL}")
    return data


def signal_tag(payload: bytes) -> str | None:
    """The tag of a PIPE payload if it is a msgpack map naming a WebRTC signal, else None."""
    try:
        tag = Fields(unpackb(payload, max_bytes=MAX_SIGNAL), "signal").str("t", max_len=MAX_TAG)
    except DecodeError:
        return None
    return tag if tag in SIGNALS else None


def decode_signal(payload: bytes) -> Signal:
    """Check one PIPE payload into a signal; SignalError says what is wrong."""
    try:
        f = Fields(unpackb(payload, max_bytes=MAX_SIGNAL), "signal")
        decode = SIGNALS.get(f.str("t", max_len=MAX_TAG))
        if decode is None:
            raise SignalError("not a WebRTC signal")
        return decode(f)
    except DecodeError as exc:
        raise SignalError(str(exc)) from None


def _is_offer_tag(tag: str) -> bool:
    return len(tag) > len(OFFER_SUFFIX) and tag.endswith(OFFER_SUFFIX)


@dataclass(frozen=True, slots=True)
class Unsupported:
    """The reply to an offer of a rung the callee does not know: `offer` is its tag. Any
    rung's dial fails on it at once with `reason` (see the module docstring)."""

    TAG: ClassVar[str] = "unsupported"
    session: bytes
    offer: str

    @property
    def reason(self) -> str:
        return f"the peer does not know {self.offer}"

    def fields(self) -> dict[str, Any]:
        return {"s": self.session, "of": self.offer}

    @classmethod
    def decode(cls, f: Fields) -> Self:
        offer = f.str("of", max_len=MAX_TAG)
        if not _is_offer_tag(offer):
            raise DecodeError(f"unsupported.of: {offer!r} is not an offer's tag")
        return cls(f.bytes("s", size=SESSION_LEN), offer)


def encode_unsupported(sig: Unsupported) -> bytes:
    """The PIPE payload for `sig`."""
    return packb({**sig.fields(), "t": sig.TAG})


@dataclass(frozen=True, slots=True)
class PipeSignal:
    """One PIPE payload read once (`read_signal`): a msgpack map with a text tag "t" of at
    most MAX_TAG characters. The rung its tag names decodes the rest (`decode`)."""

    tag: str
    body: dict[str, Any]

    @property
    def route(self) -> str | None:
        """The tag of the rung this belongs to: an `unsupported` reply's offer ("of"), else
        the tag itself; None for an `unsupported` naming no tag at all."""
        if self.tag != Unsupported.TAG:
            return self.tag
        of = self.body.get("of")
        return of if isinstance(of, str) and len(of) <= MAX_TAG else None

    def decode(self, table: Mapping[str, Callable[[Fields], T]], what: str,
               error: type[ValueError]) -> T | None:
        """The signal of `table` this is, chosen by its tag: None if the tag is none of
        `table`'s (another rung's), `error` if it is one but malformed. `what` names the
        rung in the error's text."""
        decode = table.get(self.tag)
        if decode is None:
            return None
        try:
            return decode(Fields(self.body, what))
        except DecodeError as exc:
            raise error(str(exc)) from None

    def unsupported(self, offer: str) -> Unsupported | None:
        """The `unsupported` reply to an offer tagged `offer` this is: None if it is none,
        or the reply to another rung's offer (route it elsewhere); SignalError if it is one
        but malformed."""
        if self.tag != Unsupported.TAG or self.route != offer:
            return None
        try:
            return Unsupported.decode(Fields(self.body, "unsupported"))
        except DecodeError as exc:
            raise SignalError(str(exc)) from None

    def offer(self) -> tuple[str, bytes] | None:
        """The tag and session of an offer by the convention of the module docstring,
        whichever rung's; None for anything else."""
        session = self.body.get("s")
        if (_is_offer_tag(self.tag) and isinstance(session, bytes)
                and len(session) == SESSION_LEN):
            return self.tag, session
        return None


def read_signal(payload: bytes) -> PipeSignal | None:
    """The tagged map a PIPE payload carries; None if it carries none (not msgpack, over
    MAX_SIGNAL, not a map, or no text tag of at most MAX_TAG characters): not signalling."""
    try:
        body = unpackb(payload, max_bytes=MAX_SIGNAL)
        tag = Fields(body, "signal").str("t", max_len=MAX_TAG)
    except DecodeError:
        return None
    return PipeSignal(tag, body)


def decode_unsupported(payload: bytes, offer: str) -> Unsupported | None:
    """`PipeSignal.unsupported` of a PIPE payload (None if it is no tagged map)."""
    sig = read_signal(payload)
    return None if sig is None else sig.unsupported(offer)


def offered(payload: bytes) -> tuple[str, bytes] | None:
    """`PipeSignal.offer` of a PIPE payload (None if it is no tagged map)."""
    sig = read_signal(payload)
    return None if sig is None else sig.offer()


class OfferReplies:
    """The rate of the replies a node owes nobody: `unsupported` to an offer no rung takes,
    and a rung's reject of an offer it can't read. Each sending device gets at most `rate`
    a second (and as many at once), and all of them together at most `total_rate`: a flood
    of junk offers must not spend our own PIPE rate at the server, and one peer's flood
    must not use up the replies another peer's dialler is waiting for. The buckets of the
    `max_senders` devices heard most recently are kept (one evicted by a flood from many
    senders comes back with a fresh burst, which the total still bounds). A node's rungs
    and its `UnknownOffers` share one."""

    def __init__(self, rate: float = UNSUPPORTED_RATE,
                 total_rate: float = UNSUPPORTED_TOTAL_RATE,
                 max_senders: int = UNSUPPORTED_SENDERS) -> None:
        self.total_rate = total_rate
        self.senders = SourceLimiter(rate, rate, max_senders)
        self._total: TokenBucket | None = None  # made at the first offer, on the loop's clock

    def spend(self, msg: PipeMessage) -> str | None:
        """Take one reply to `msg`'s sending device from both buckets: None if it may go,
        else why not, "limited" (the sender over its rate) or "limited-all" (everyone)."""
        now = asyncio.get_running_loop().time()
        if self._total is None:
            self._total = TokenBucket(self.total_rate, self.total_rate, now)
        if not self.senders.allow_key(f"{msg.sender} {msg.sender_device.hex()}", now):
            return "limited"
        if not self._total.take(1, now):
            return "limited-all"
        return None


class UnknownOffers:
    """Answers each offer no rung of ours claimed with `Unsupported`, PIPEd back to the
    device that sent it (see the module docstring), at the rate `replies` allows (made of
    `rate`, `total_rate` and `max_senders` unless given); the rest are dropped.
    `counters`: "answered", "limited" (the sender over its rate), "limited-all" (all
    senders together over the total)."""

    def __init__(self, pipe: PipeSender, *, rate: float = UNSUPPORTED_RATE,
                 total_rate: float = UNSUPPORTED_TOTAL_RATE,
                 max_senders: int = UNSUPPORTED_SENDERS,
                 replies: OfferReplies | None = None) -> None:
        self.counters: Counter[str] = Counter()
        self._pipe = pipe
        self.replies = replies or OfferReplies(rate, total_rate, max_senders)
        # Each send is bounded by the client's request timeout; this bounds how many wait.
        self._tasks = TaskSet("unsupported", limit=max(1, int(2 * self.replies.total_rate)),
                              logger=log)

    @property
    def senders(self) -> SourceLimiter:
        """The reply buckets of the devices heard most recently."""
        return self.replies.senders

    def feed(self, msg: PipeMessage) -> bool:
        """Answer `msg` if it is an offer by the convention (True, also when it is over the
        rate or we are closing); False for anything else."""
        sig = read_signal(msg.payload)
        return sig is not None and self.take(msg, sig)

    def take(self, msg: PipeMessage, sig: PipeSignal) -> bool:
        """`feed` for a payload already read: answer `sig` if it is an offer."""
        offer = sig.offer()
        if offer is None:
            return False
        if self._tasks.closed:
            return True
        tag, session = offer
        if (limited := self.replies.spend(msg)) is not None:
            self.counters[limited] += 1
            return True
        if self._tasks.spawn(self._reply(msg, Unsupported(session, tag)),
                             name=f"unsupported {msg.sender}") is None:
            self.counters["limited-all"] += 1
            return True
        self.counters["answered"] += 1
        log.info("a %s from %s answered 'unsupported': no rung of ours takes it", tag,
                 msg.sender)
        return True

    async def _reply(self, msg: PipeMessage, sig: Unsupported) -> None:
        try:
            await self._pipe.pipe(msg.sender, encode_unsupported(sig),
                                  device=msg.sender_device)
        except Exception as exc:  # a courtesy: without it the dialler waits out its budget
            log.info("could not send 'unsupported' to %s: %s", msg.sender, exc)

    async def aclose(self) -> None:
        """Stop answering; cancel the replies still being sent."""
        await self._tasks.aclose()



def decode_tagged(payload: bytes, table: Mapping[str, Callable[[Fields], T]], what: str,
                  error: type[ValueError]) -> T | None:
    """`PipeSignal.decode` of a PIPE payload: None if it names no tag of `table` (another
    rung's, route it elsewhere), `error` if it is one but malformed. (The TCP punch's and
    QUIC's signals; WebRTC's are `decode_signal`.)"""
    sig = read_signal(payload)
    return None if sig is None else sig.decode(table, what, error)


class PipeSender(Protocol):
    """What signalling needs from a rendezvous session: `RendezvousClient.pipe`."""

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None: ...


class MemoryPipe:
    """In-process PIPE between named devices: `pipe()` calls the target's `feed()` at once."""

    def __init__(self) -> None:
        self._devices: dict[tuple[str, bytes], Callable[[PipeMessage], object]] = {}

    def sender(self, address: str, device: bytes) -> PipeSender:
        """The `pipe()` a device uses (the hub stamps it as the sender, as a server would)."""
        return _MemoryPipeSender(self, address, device)

    def attach(self, address: str, device: bytes, feed: Callable[[PipeMessage], object]) -> None:
        """Deliver PIPE payloads for (address, device) to `feed`."""
        self._devices[(address, device)] = feed

    def deliver(self, sender: tuple[str, bytes], to: str, device: bytes | None,
                payload: bytes) -> None:
        if len(payload) > MAX_SIGNAL:
            raise ValueError(f"PIPE payload of {len(payload)} bytes is over the limit")
        for (addr, dev), feed in list(self._devices.items()):
            if addr == to and (device is None or dev == device):
                feed(PipeMessage(sender[0], sender[1], payload))


@dataclass(frozen=True, slots=True)
class _MemoryPipeSender:
    hub: MemoryPipe
    address: str
    device: bytes

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        self.hub.deliver((self.address, self.device), to, device, payload)
