"""WebRTC signalling messages carried in rendezvous PIPE payloads.

Three messages, each naming a dial session (16 random bytes chosen by the dialer):
`Offer` and `Answer` carry an SDP (complete, with every ICE candidate: aiortc does not
trickle), `Reject` says why a peer won't answer. A PIPE payload is at most 16 KiB
(`rendezvous.limits.Limits.max_pipe_payload`); an aiortc data-channel SDP is about 0.5 KiB
plus about 0.1 KiB per candidate, so it is sent as text and deflated only when it would not
fit. Inflating is bounded, so a compressed bomb is just a bad message.

`MemoryPipe` connects signalling endpoints in one process (tests, benchmarks, the demo)
with the same `pipe()` call `RendezvousClient` offers.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, TypeVar

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from rendezvous.messages import PipeMessage

MAX_SIGNAL = 16 * 1024
MAX_SDP = 64 * 1024  # after inflating
SESSION_LEN = 16
MAX_REASON = 200


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
        tag = Fields(unpackb(payload, max_bytes=MAX_SIGNAL), "signal").str("t", max_len=32)
    except DecodeError:
        return None
    return tag if tag in SIGNALS else None


def decode_signal(payload: bytes) -> Signal:
    """Check one PIPE payload into a signal; SignalError says what is wrong."""
    try:
        f = Fields(unpackb(payload, max_bytes=MAX_SIGNAL), "signal")
        decode = SIGNALS.get(f.str("t", max_len=32))
        if decode is None:
            raise SignalError("not a WebRTC signal")
        return decode(f)
    except DecodeError as exc:
        raise SignalError(str(exc)) from None


T = TypeVar("T")


def decode_tagged(payload: bytes, table: Mapping[str, Callable[[Fields], T]], what: str,
                  error: type[ValueError]) -> T | None:
    """The signal of `table` a PIPE payload carries, chosen by its tag "t": None if the
    payload names no tag of `table` (another rung's, route it elsewhere), `error` if it is
    one but malformed. (The TCP punch's and QUIC's signals; WebRTC's are `decode_signal`.)"""
    try:
        f = Fields(unpackb(payload, max_bytes=MAX_SIGNAL), what)
        decode = table.get(f.str("t", max_len=32))
    except DecodeError:
        return None
    if decode is None:
        return None
    try:
        return decode(f)
    except DecodeError as exc:
        raise error(str(exc)) from None


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
