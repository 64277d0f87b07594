"""The sans-I/O transfer connection: handshake, framing, control-frame encryption.

Shaped like h11's `Connection`: `receive_data(bytes)` (b"" for EOF), `next_event()`,
`send(message)`, `data_to_send()`. No sockets, no clock, no tasks.

Wire format. During the handshake each message is `u32 length || body` (crypto.handshake).
Afterwards every frame is

    u32 frame_len || u32 header_len || AEAD(header) || payload

where the header is an encrypted msgpack message (frames.py) and `payload` is empty except
for CHUNK, whose payload is the sealed chunk itself (already AEAD-sealed under the content
key, so not encrypted twice). Lengths are checked before a frame is buffered: at most
`MAX_HEADER` plus the largest payload this side accepts (0 for the holder).
"""

from __future__ import annotations

import collections
import mmap
from dataclasses import dataclass
from enum import Enum, auto

from crypto.errors import CryptoError
from crypto.handshake import (
    MAX_MESSAGE_LEN,
    HandshakeInitiator,
    HandshakeResponder,
    SessionCipher,
)
from crypto.identity import DeviceIdentity, PublicIdentity
from overlay.content.diskio import direct_buffer
from overlay.transfer.errors import LocalProtocolError, RemoteProtocolError
from overlay.transfer.frames import (
    MAX_HEADER,
    MAX_PAYLOAD,
    REPLIES,
    REQUESTS,
    Chunk,
    Message,
    decode_header,
    encode_header,
)

_U32 = 4
SPARE_PAYLOADS = 4


class Role(Enum):
    INITIATOR = auto()  # connects, requests chunks
    RESPONDER = auto()  # accepts, serves chunks


class State(Enum):
    HANDSHAKE = auto()
    OPEN = auto()
    CLOSED = auto()  # the peer sent EOF
    FAILED = auto()  # a fatal protocol error; nothing more is read or sent


_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.HANDSHAKE, "authenticated"): State.OPEN,
    (State.HANDSHAKE, "fail"): State.FAILED,
    (State.HANDSHAKE, "eof"): State.CLOSED,
    (State.OPEN, "fail"): State.FAILED,
    (State.OPEN, "eof"): State.CLOSED,
}


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer is authenticated; `transcript` is what capability proofs bind to."""

    peer: PublicIdentity
    transcript: bytes


@dataclass(frozen=True, slots=True)
class BadMessage:
    """An authentic frame that is not a valid message: answer with an error, carry on."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """A fatal violation (bad framing, failed handshake, tampered frame): close. `cut`: no
    violation, the connection ended in the middle of a frame (the peer timed out its send
    or went away), which is told apart so nobody reads it as misbehaviour."""

    reason: str
    cut: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer sent EOF."""


Event = HandshakeComplete | BadMessage | ConnectionFailed | ConnectionClosed | Message


class _Piece(Enum):
    LENGTH = auto()  # u32 frame length
    BODY = auto()  # a handshake message
    HLEN = auto()  # u32 header length
    HEADER = auto()  # the encrypted control header
    PAYLOAD = auto()  # a CHUNK's sealed chunk


class TransferConnection:
    """One end of a transfer session, as a state machine over bytes."""

    def __init__(
        self, role: Role, identity: DeviceIdentity, *, expected_peer: bytes | None = None,
        max_payload: int | None = None, ephemeral_seed: bytes | None = None,
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.peer: PublicIdentity | None = None
        self.transcript: bytes | None = None
        self._cipher: SessionCipher | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._out: list[bytes | bytearray | memoryview] = []
        # Incoming bytes are cut into pieces of a known size (see _Piece), gathered by
        # reference and joined once: one copy per piece, no zero-filled buffers.
        self._piece = _Piece.LENGTH
        self._need = _U32
        self._parts: list[memoryview] = []
        self._got = 0
        # A CHUNK payload is copied straight from the received bytes into its own buffer,
        # which then travels on uncopied: to the verifier, the opener and the disk.
        self._payload: bytearray | memoryview | None = None
        self._payload_view: memoryview | None = None
        self._spare: list[bytearray | memoryview] = []  # recycled payload buffers
        self._spare_max = SPARE_PAYLOADS
        self._payload_lead: int | None = None  # see align_payloads
        self._frame_len = 0
        self._payload_len = 0
        self._header = b""
        if max_payload is None:
            max_payload = MAX_PAYLOAD if role is Role.INITIATOR else 0
        self._max_payload = max_payload
        self._initiator: HandshakeInitiator | None = None
        self._responder: HandshakeResponder | None = None
        self._hello_seen = False
        if role is Role.INITIATOR:
            self._initiator = HandshakeInitiator(
                identity, expected_peer=expected_peer, ephemeral_seed=ephemeral_seed
            )
            self._emit_raw(self._initiator.hello())
        else:
            self._responder = HandshakeResponder(identity, ephemeral_seed=ephemeral_seed)
        self._may_receive = REPLIES if role is Role.INITIATOR else REQUESTS
        self._may_send = REQUESTS if role is Role.INITIATOR else REPLIES

    def _go(self, what: str) -> None:
        nxt = _TRANSITIONS.get((self.state, what))
        if nxt is None:
            raise LocalProtocolError(f"no transition {what!r} from {self.state.name}")
        self.state = nxt

    def limit_payload(self, max_payload: int) -> None:
        """Accept CHUNK payloads of at most this many bytes from now on (once the chunk size
        is known, there is no reason to buffer 16 MiB frames)."""
        self._max_payload = min(max_payload, MAX_PAYLOAD)

    def align_payloads(self, lead: int, spare: int = SPARE_PAYLOADS) -> None:
        """Receive each CHUNK payload from now on into page-aligned memory of its own, its
        first `lead` bytes just before a page boundary: a sealed chunk whose ciphertext
        follows a `lead`-byte nonce then has that ciphertext on a page, where it can be
        opened in place and the plaintext written to the disk with O_DIRECT as it lies.

        `spare`: how many recycled payloads to keep for later chunks, at most. A receiver
        that holds up to N chunks between arrival and `recycle` keeps N: with fewer kept,
        a burst of recycled buffers is dropped and the next burst of arrivals gets fresh
        ones, each faulted in and zeroed on the loop thread (a 2 MiB huge page took
        ~1.2 ms; 21 of 512 chunks of a 1 GiB download got one with 4 kept)."""
        if not 0 <= lead < mmap.PAGESIZE:
            raise LocalProtocolError(f"a payload lead of {lead} bytes is not within a page")
        self._payload_lead = lead
        self._spare_max = max(spare, 0)

    # --- output -----------------------------------------------------------------------
    def _emit_raw(self, body: bytes) -> None:
        self._out.append(len(body).to_bytes(_U32, "big") + body)

    def send(self, msg: Message) -> None:
        """Queue a message. Raises LocalProtocolError before the handshake or for a message
        this role doesn't send."""
        if self.state is not State.OPEN or self._cipher is None:
            raise LocalProtocolError(f"cannot send in state {self.state.name}")
        if not isinstance(msg, self._may_send):
            raise LocalProtocolError(f"{self.role.name} does not send {type(msg).__name__}")
        try:
            header = self._cipher.encrypt(encode_header(msg))
        except CryptoError as exc:
            raise LocalProtocolError(str(exc)) from None
        payload_len = len(msg.data) if isinstance(msg, Chunk) else 0
        self._out.append(
            (_U32 + len(header) + payload_len).to_bytes(_U32, "big")
            + len(header).to_bytes(_U32, "big") + header
        )
        if payload_len and isinstance(msg, Chunk):
            self._out.append(msg.data)

    @property
    def has_output(self) -> bool:
        """Whether anything is queued for the wire."""
        return bool(self._out)

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued for the wire, in order; payloads are passed through uncopied."""
        out, self._out = self._out, []
        return out

    # --- input ------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; b"" means EOF. Never raises on bad input: a violation
        becomes a ConnectionFailed (or BadMessage) event."""
        if self.state in (State.CLOSED, State.FAILED):
            return
        if not data:
            if self._got or self._piece is not _Piece.LENGTH:
                self._fail("connection closed in the middle of a frame", cut=True)
            else:
                self._go("eof")
                self._events.append(ConnectionClosed())
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # we keep views into it; the caller may reuse its buffer
        try:
            self._parse(memoryview(data))
        except RemoteProtocolError as exc:
            self._fail(str(exc))

    def _fail(self, reason: str, *, cut: bool = False) -> None:
        if self.state not in (State.CLOSED, State.FAILED):
            self._go("fail")
            self._parts.clear()
            self._payload = self._payload_view = None
            self._events.append(ConnectionFailed(reason, cut))

    def _frame_limit(self) -> int:
        if self.state is State.HANDSHAKE:
            return MAX_MESSAGE_LEN
        return _U32 + MAX_HEADER + SessionCipher.overhead + self._max_payload

    def _parse(self, view: memoryview) -> None:
        while view and self.state in (State.HANDSHAKE, State.OPEN):
            k = min(len(view), self._need - self._got)
            if self._payload_view is not None:
                self._payload_view[self._got : self._got + k] = view[:k]
                view = view[k:]
                self._payload_got(k)
                continue
            self._parts.append(view[:k])
            self._got += k
            view = view[k:]
            if self._got < self._need:
                return
            piece = b"".join(self._parts)
            self._parts.clear()
            self._got = 0
            self._advance(piece)

    def recycle(self, payload: bytearray | memoryview) -> None:
        """Hand back a CHUNK payload that nothing holds any more: a later payload of the
        same length is received into it instead of a fresh zeroed megabyte (which cost a
        third of a millisecond per chunk in page faults and zeroing, on the loop thread)."""
        if len(self._spare) < self._spare_max:
            self._spare.append(payload)

    def _new_payload(self, n: int) -> bytearray | memoryview:
        for i, buf in enumerate(self._spare):
            if len(buf) == n:
                return self._spare.pop(i)  # every byte is overwritten before delivery
        if self._payload_lead is None:
            return bytearray(n)
        return direct_buffer(n, self._payload_lead)

    def payload_space(self) -> memoryview | None:
        """Where the rest of the CHUNK payload being received goes, or None outside one.

        A transport that can read into a buffer fills (a prefix of) it and reports with
        `payload_received`: the payload then never exists anywhere else in user space."""
        if self._payload_view is None or self.state is not State.OPEN:
            return None
        return self._payload_view[self._got : self._need]

    def payload_received(self, n: int) -> None:
        """`n` bytes were written at the start of `payload_space()`."""
        if self._payload_view is None or not 0 < n <= self._need - self._got:
            raise LocalProtocolError(f"{n} payload bytes do not fit the payload space")
        self._payload_got(n)

    def _payload_got(self, n: int) -> None:
        self._got += n
        if self._got < self._need:
            return
        payload = self._payload if self._payload is not None else bytearray()
        self._payload = self._payload_view = None
        self._got = 0
        self._expect(_Piece.LENGTH, _U32)
        header, self._header = self._header, b""
        self._deliver(header, payload)

    def _expect(self, piece: _Piece, n: int) -> None:
        self._piece, self._need = piece, n

    def _advance(self, piece: bytes) -> None:
        """One piece of a frame is complete; check it and say what comes next."""
        kind = self._piece
        if kind is _Piece.LENGTH:
            n = int.from_bytes(piece, "big")
            if n > self._frame_limit():
                raise RemoteProtocolError(f"frame of {n} bytes over the limit "
                                          f"{self._frame_limit()}")
            if self.state is State.HANDSHAKE:
                if n == 0:
                    raise RemoteProtocolError("empty handshake message")
                self._expect(_Piece.BODY, n)
            elif n <= _U32:
                raise RemoteProtocolError("frame too short")
            else:
                self._frame_len = n
                self._expect(_Piece.HLEN, _U32)
        elif kind is _Piece.BODY:
            self._expect(_Piece.LENGTH, _U32)
            self._handle_handshake(piece)
        elif kind is _Piece.HLEN:
            hlen = int.from_bytes(piece, "big")
            if not 0 < hlen <= min(self._frame_len - _U32, MAX_HEADER + SessionCipher.overhead):
                raise RemoteProtocolError(f"header length {hlen} does not fit the frame")
            self._payload_len = self._frame_len - _U32 - hlen
            if self._payload_len > self._max_payload:
                raise RemoteProtocolError(f"payload of {self._payload_len} bytes over the "
                                          f"limit {self._max_payload}")
            self._expect(_Piece.HEADER, hlen)
        elif kind is _Piece.HEADER:
            if self._cipher is None:
                raise LocalProtocolError("no session cipher after the handshake")
            try:
                header = self._cipher.decrypt(piece)
            except CryptoError as exc:
                raise RemoteProtocolError(str(exc)) from None
            if self._payload_len:
                self._header = header
                self._expect(_Piece.PAYLOAD, self._payload_len)
                self._payload = self._new_payload(self._payload_len)
                self._payload_view = memoryview(self._payload)
            else:
                self._expect(_Piece.LENGTH, _U32)
                self._deliver(header, b"")
        else:  # pragma: no cover - payloads are gathered in _parse
            raise LocalProtocolError("payload bytes reached the piece parser")

    def _deliver(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        try:
            msg = decode_header(header, payload)
        except CryptoError as exc:  # DecodeError: authentic but malformed, stream in sync
            self._events.append(BadMessage(str(exc)))
            return
        if not isinstance(msg, self._may_receive):
            self._events.append(BadMessage(f"{type(msg).__name__} is not sent by this peer"))
            return
        self._events.append(msg)

    def _handle_handshake(self, body: bytes) -> None:
        try:
            if self._initiator is not None:
                self._emit_raw(self._initiator.receive_response(body))
                result = self._initiator.result
            elif self._responder is not None and not self._hello_seen:
                self._emit_raw(self._responder.receive_hello(body))
                self._hello_seen = True
                return
            elif self._responder is not None:
                result = self._responder.receive_finish(body)
            else:  # pragma: no cover - one of the two always exists
                raise LocalProtocolError("no handshake role")
        except CryptoError as exc:
            raise RemoteProtocolError(f"handshake failed: {exc}") from None
        self._cipher = result.cipher()
        self.peer = result.peer
        self.transcript = result.transcript
        self._go("authenticated")
        self._events.append(HandshakeComplete(result.peer, result.transcript))
