"""The client side of a rendezvous connection, sans-I/O.

`ClientConnection` turns requests into frames and received bytes into `ServerMessage`s
(CHALLENGE, REPLY, DELIVER, PIPE). It tracks just enough state to refuse our own misuse:
requests other than AUTHORIZATION and QUIT only after the server accepted the
AUTHORIZATION. Anything malformed from the server raises RemoteProtocolError, after which
the adapter drops the connection (a server that garbles frames can't be trusted further).

`RelayHandshake` drives one relay connection up to the splice: CHALLENGE, AUTHORIZATION
with `relay`, then RELAY or RELAY-ACCEPT, until the OK reply that means "spliced". It
reads one frame at a time, because the bytes after that reply are the peer's raw stream
and must not be taken for frames; they are handed over as `rest`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from crypto.identity import DeviceIdentity
from rendezvous.errors import LocalProtocolError, RemoteProtocolError
from rendezvous.framing import DEFAULT_MAX_FRAME, PREFIX, FrameDecoder, encode_frame
from rendezvous.messages import (
    Authorization,
    Challenge,
    Quit,
    Relay,
    RelayAccept,
    Reply,
    Request,
    ServerMessage,
    decode_server_message,
    encode_request,
)


class ClientState(Enum):
    AWAITING_CHALLENGE = "awaiting-challenge"
    CHALLENGED = "challenged"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"


class ClientConnection:
    """Protocol state of one connection to a rendezvous server."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.state = ClientState.AWAITING_CHALLENGE
        self.challenge: Challenge | None = None
        self._decoder = FrameDecoder(max_frame)
        self._events: deque[ServerMessage] = deque()
        self._out: list[bytes] = []
        self._next_id = 1
        self._auth_id = 0

    def new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def authorize(self, identity: DeviceIdentity, address: str, *, invite: str | None = None,
                  register: bool = False, advertise: dict[str, Any] | None = None,
                  relay: bool = False) -> int:
        """Answer the current challenge; returns the request id of the AUTHORIZATION."""
        if self.state is not ClientState.CHALLENGED or self.challenge is None:
            raise LocalProtocolError(f"no challenge to answer (state {self.state.value})")
        req = Authorization.signed(self.new_id(), identity, self.challenge.domain,
                                   self.challenge.nonce, address, invite=invite,
                                   register=register, advertise=advertise, relay=relay)
        self._auth_id = req.id
        self.state = ClientState.AUTHENTICATING
        self._write(req)
        return req.id

    def send(self, request: Request) -> None:
        """Queue a request (its id from `new_id()`) for the transport."""
        if isinstance(request, Authorization):
            raise LocalProtocolError("use authorize() to answer a challenge")
        if not isinstance(request, Quit) and self.state is not ClientState.AUTHENTICATED:
            raise LocalProtocolError(f"{request.TAG} before authentication")
        self._write(request)

    def _write(self, request: Request) -> None:
        self._out.append(encode_frame(encode_request(request), self.max_frame))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server; raises RemoteProtocolError on anything malformed."""
        for frame in self._decoder.feed(data):
            msg = decode_server_message(frame, self.max_frame)
            if isinstance(msg, Challenge):
                self.challenge = msg
                if self.state is not ClientState.AUTHENTICATED:
                    self.state = ClientState.CHALLENGED
            elif isinstance(msg, Reply) and msg.id == self._auth_id and self._auth_id:
                self._auth_id = 0
                if msg.ok:
                    self.state = ClientState.AUTHENTICATED
            self._events.append(msg)

    def next_event(self) -> ServerMessage | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out


class RelayHandshake:
    """Client side of a relay connection until the splice (see the module docstring).

    Feed received bytes to `receive_data`, write `data_to_send()`; when `spliced` is True,
    `rest` holds bytes that already belong to the relayed stream. A refusal sets
    `refusal` to the server's (status, text); garbage from the server raises
    RemoteProtocolError.
    """

    def __init__(self, identity: DeviceIdentity, address: str,
                 request: Callable[[int], Relay | RelayAccept],
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._conn = ClientConnection(max_frame)
        self._identity = identity
        self._address = address
        self._request = request
        self._buf = bytearray()
        self._auth_id = 0
        self._relay_id = 0
        self.challenge: Challenge | None = None
        self.spliced = False
        self.refusal: tuple[int, str] | None = None
        self.rest = b""

    @property
    def finished(self) -> bool:
        return self.spliced or self.refusal is not None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the server, one whole frame at a time, until the splice."""
        if self.finished:
            raise LocalProtocolError("the relay handshake is over")
        self._buf += data
        while not self.finished and len(self._buf) >= PREFIX.size:
            (size,) = PREFIX.unpack_from(self._buf)
            if size > self._conn.max_frame:
                raise RemoteProtocolError(f"frame of {size} bytes over the limit")
            end = PREFIX.size + size
            if len(self._buf) < end:
                break
            self._conn.receive_data(bytes(self._buf[:end]))
            del self._buf[:end]
            while (msg := self._conn.next_event()) is not None:
                self._on_message(msg)
        if self.spliced:
            self.rest = bytes(self._buf)
            self._buf.clear()

    def _on_message(self, msg: ServerMessage) -> None:
        if isinstance(msg, Challenge):
            if self._auth_id == 0:
                self.challenge = msg
                self._auth_id = self._conn.authorize(self._identity, self._address,
                                                     relay=True)
        elif isinstance(msg, Reply) and msg.id in (self._auth_id, self._relay_id):
            if not msg.ok:
                self.refusal = (msg.status, msg.text)
            elif msg.id == self._relay_id:
                self.spliced = True
            else:
                req = self._request(self._conn.new_id())
                self._relay_id = req.id
                self._conn.send(req)
        # Anything else (a push) is not meant for a relay connection: ignore it.

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()
