"""The client side of a rendezvous connection, sans-I/O.

`ClientConnection` turns requests into frames and received bytes into `ServerMessage`s
(CHALLENGE, REPLY, DELIVER, PIPE). It tracks just enough state to refuse our own misuse:
requests other than AUTHORIZATION and QUIT only after the server accepted the
AUTHORIZATION. Anything malformed from the server raises RemoteProtocolError, after which
the adapter drops the connection (a server that garbles frames can't be trusted further).

Both check the server's half of the handshake (rendezvous/messages.py): the reply to the
AUTHORIZATION must carry the domain key's signature over this connection (both nonces and
the channel binding `binding`), under `server_key` when one is pinned, else under the key
the CHALLENGE named (trust on first use; `server_key_seen` then holds it for pinning). If
it does not verify, the session is not accepted: `identity_error` is a
`ServerIdentityError` naming the expected and the seen fingerprints. A CHALLENGE that names
another key than the pinned one sets `identity_error` at once, and then nothing is signed
for that server (`authorize` and `link` refuse): it never sees our address, device key or
reachability hints, only the TCP and TLS handshakes.

Keepalive (when built with `keepalive_interval` and `keepalive_timeout` > 0): the
AUTHORIZATION announces the interval; once authenticated, `get_timer()` names the next
deadline and `handle_timer(now)` queues a PING after `keepalive_interval` s without
sending, or sets `dead` (the reason) after `keepalive_timeout` s without receiving a byte,
when the adapter must drop the connection and reconnect. Time comes in through
`receive_data(data, now)` and `data_to_send(now)`; the replies to our PINGs are consumed
here, whatever their status (an old server's 400 "unknown verb" proves it alive too).

A server linking to another domain's server (rendezvous/federation.py) answers the
CHALLENGE with `link(domain_key, own_domain)` instead of `authorize`; the reply must carry
the remote domain key's signature with our domain key in place of a device key, checked
under `server_key`, which for a link is always the key DNS publishes for that domain.

`RelayHandshake` drives one relay connection up to the splice: CHALLENGE, AUTHORIZATION
with `relay`, then RELAY or RELAY-ACCEPT, until the OK reply that means "spliced". It
reads one frame at a time, because the bytes after that reply are the peer's raw stream
and must not be taken for frames; they are handed over as `rest`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity, verify
from rendezvous.domainkey import DomainKey, fingerprint
from rendezvous.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from rendezvous.framing import DEFAULT_MAX_FRAME, PREFIX, FrameDecoder, encode_frame
from rendezvous.messages import (
    NONCE_LEN,
    SERVER_AUTH_CONTEXT,
    Authorization,
    Challenge,
    Link,
    Ping,
    Quit,
    Relay,
    RelayAccept,
    Reply,
    Request,
    ServerMessage,
    decode_server_message,
    encode_request,
    server_payload,
)


class ServerIdentityError(AuthenticationError):
    """The server did not prove the domain key pinned for it over this connection."""

    def __init__(self, expected: bytes | None, seen: bytes | None, why: str) -> None:
        exp = fingerprint(expected) if expected is not None else "none pinned yet"
        got = fingerprint(seen) if seen is not None else "none"
        super().__init__(0, f"the server's identity does not match the key pinned for it "
                            f"(expected {exp}, seen {got}): {why}")
        self.expected = expected
        self.seen = seen


class ClientState(Enum):
    AWAITING_CHALLENGE = "awaiting-challenge"
    CHALLENGED = "challenged"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"


class ClientConnection:
    """Protocol state of one connection to a rendezvous server."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, binding: bytes = b"",
                 server_key: bytes | None = None,
                 new_nonce: Callable[[], bytes] | None = None,
                 keepalive_interval: float = 0.0, keepalive_timeout: float = 0.0) -> None:
        if keepalive_interval < 0 or keepalive_timeout < 0 or (
                keepalive_interval > 0 and not 0 < keepalive_interval < keepalive_timeout):
            raise ValueError("keepalive: need 0 < interval < timeout (or both 0: off)")
        self.max_frame = max_frame
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._last_sent: float | None = None  # set at authentication, then by data_to_send
        self._last_recv: float | None = None
        self._pings: deque[int] = deque(maxlen=8)  # ids of our PINGs not yet answered
        self.dead: str | None = None  # why the server is taken for gone (keepalive)
        self.binding = binding
        self.server_key = server_key
        self.server_key_seen: bytes | None = None
        self.identity_error: ServerIdentityError | None = None
        self._new_nonce = new_nonce or (lambda: os.urandom(NONCE_LEN))
        # (challenge answered, client nonce, our device key) of the AUTHORIZATION in flight
        self._answered: tuple[Challenge, bytes, bytes] | None = None
        self.client_nonce = b""  # of our AUTHORIZATION: names this session to the server
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
                  relay: bool = False, vouch: bytes | None = None,
                  replaces: bytes | None = None) -> int:
        """Answer the current challenge; returns the request id of the AUTHORIZATION."""
        challenge = self._check_answerable()
        cnonce = self._new_nonce()
        keepalive_ms = 0 if relay else round(self.keepalive_interval * 1000)
        req = Authorization.signed(self.new_id(), identity, challenge.domain,
                                   challenge.nonce, address, client_nonce=cnonce,
                                   binding=self.binding, invite=invite, register=register,
                                   advertise=advertise, relay=relay, vouch=vouch,
                                   keepalive_ms=keepalive_ms, replaces=replaces)
        self._answered = (challenge, cnonce, identity.public.verify_key)
        self.client_nonce = cnonce
        self._auth_id = req.id
        self.state = ClientState.AUTHENTICATING
        self._write(req)
        return req.id

    def link(self, domain_key: DomainKey, own_domain: str) -> int:
        """Answer the current challenge as the server of `own_domain` (a server link);
        returns the request id of the LINK."""
        if self.server_key is None:
            raise LocalProtocolError("a link needs the remote domain's key from DNS")
        challenge = self._check_answerable()
        cnonce = self._new_nonce()
        req = Link.signed(self.new_id(), domain_key, own_domain, challenge.domain,
                          challenge.nonce, cnonce, self.binding)
        self._answered = (challenge, cnonce, domain_key.public)
        self._auth_id = req.id
        self.state = ClientState.AUTHENTICATING
        self._write(req)
        return req.id

    def _check_answerable(self) -> Challenge:
        """The challenge to answer; LocalProtocolError if none, or if it named another
        key than the pinned one."""
        if self.state is not ClientState.CHALLENGED or self.challenge is None:
            raise LocalProtocolError(f"no challenge to answer (state {self.state.value})")
        if self.server_key is not None and self.challenge.key != self.server_key:
            raise LocalProtocolError("the server showed another key than the pinned one: "
                                     "nothing is signed for it")
        return self.challenge

    def send(self, request: Request) -> None:
        """Queue a request (its id from `new_id()`) for the transport."""
        if isinstance(request, Authorization | Link):
            raise LocalProtocolError("use authorize() or link() to answer a challenge")
        if not isinstance(request, Quit) and self.state is not ClientState.AUTHENTICATED:
            raise LocalProtocolError(f"{request.TAG} before authentication")
        self._write(request)

    def _write(self, request: Request) -> None:
        self._out.append(encode_frame(encode_request(request), self.max_frame))

    def receive_data(self, data: bytes | bytearray | memoryview,
                     now: float | None = None) -> None:
        """Feed bytes from the server (received at `now`, for the keepalive); raises
        RemoteProtocolError on anything malformed."""
        if now is not None and data:
            self._last_recv = now
        for frame in self._decoder.feed(data):
            msg = decode_server_message(frame, self.max_frame)
            if isinstance(msg, Reply) and msg.id in self._pings:
                self._pings.remove(msg.id)
                continue
            if isinstance(msg, Challenge):
                self.challenge = msg
                if self.state is not ClientState.AUTHENTICATED:
                    self.state = ClientState.CHALLENGED
                    if self.server_key is not None and msg.key != self.server_key:
                        self.identity_error = ServerIdentityError(
                            self.server_key, msg.key, "the server presented another domain key")
            elif isinstance(msg, Reply) and msg.id == self._auth_id and self._auth_id:
                self._auth_id = 0
                self.identity_error = self._check_server(msg)
                if msg.ok and self.identity_error is None:
                    self.state = ClientState.AUTHENTICATED
                    if now is not None:
                        self._last_sent = self._last_recv = now
            self._events.append(msg)

    def _check_server(self, reply: Reply) -> ServerIdentityError | None:
        """The server's signature in its reply to our AUTHORIZATION: None if it proves
        the pinned key (or, none pinned, the CHALLENGE's) over this connection. A refusal
        without a signature is the server's word alone: not an identity error."""
        answered, self._answered = self._answered, None
        if answered is None:
            return ServerIdentityError(self.server_key, None, "no AUTHORIZATION was answered")
        challenge, cnonce, verify_key = answered
        seen = challenge.key
        if self.server_key is not None and seen != self.server_key:
            return ServerIdentityError(self.server_key, seen,
                                       "the server presented another domain key")
        sig = reply.body.get("server_sig")
        if sig is None and not reply.ok:
            return None
        if type(sig) is not bytes:
            return ServerIdentityError(self.server_key, seen,
                                       "the server did not sign its reply to AUTHORIZATION")
        try:
            verify(seen, SERVER_AUTH_CONTEXT,
                   server_payload(challenge.domain, challenge.nonce, cnonce, self.binding,
                                  verify_key), sig)
        except VerificationError:
            return ServerIdentityError(
                self.server_key, seen,
                "its signature does not cover this connection: the TLS certificate we see "
                "is not the server's (a proxy terminating TLS in between?) or the reply "
                "was replayed from another session")
        self.server_key_seen = seen
        return None

    def next_event(self) -> ServerMessage | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self, now: float | None = None) -> bytes:
        """The bytes to write (at `now`, for the keepalive)."""
        out = b"".join(self._out)
        self._out.clear()
        if out and now is not None and self._last_sent is not None:
            self._last_sent = now
        return out

    # --- keepalive ---------------------------------------------------------------------
    def _marks(self) -> tuple[float, float] | None:
        """(last sent, last received) while the keepalive runs, else None."""
        sent, recv = self._last_sent, self._last_recv
        if (self.keepalive_interval > 0 and self.state is ClientState.AUTHENTICATED
                and self.dead is None and sent is not None and recv is not None):
            return sent, recv
        return None

    def get_timer(self) -> float | None:
        """When `handle_timer` must next run (PING due, or the silence limit), or None."""
        marks = self._marks()
        if marks is None:
            return None
        sent, recv = marks
        return min(sent + self.keepalive_interval, recv + self.keepalive_timeout)

    def handle_timer(self, now: float) -> None:
        """Queue a PING if we have been silent, or set `dead` if the server has."""
        marks = self._marks()
        if marks is None:
            return
        sent, recv = marks
        if now >= recv + self.keepalive_timeout:
            self.dead = f"keepalive timeout: nothing from the server for {now - recv:.0f} s"
        elif now >= sent + self.keepalive_interval:
            ping = Ping(self.new_id())
            self._pings.append(ping.id)
            self._write(ping)
            self._last_sent = now

    def reading_paused(self, now: float) -> None:
        """The adapter is not reading (its consumer is behind): silence from the server
        is not the server's, so the receive limit starts again from `now`."""
        if self._last_recv is not None:
            self._last_recv = max(self._last_recv, now)


class RelayHandshake:
    """Client side of a relay connection until the splice (see the module docstring).

    Feed received bytes to `receive_data`, write `data_to_send()`; when `spliced` is True,
    `rest` holds bytes that already belong to the relayed stream. A refusal sets
    `refusal` to the server's (status, text); a server that does not prove its key sets
    `identity_error` (and `refusal` to (0, its text)); garbage from the server raises
    RemoteProtocolError. `binding` must be set (`set_binding`) before the first byte.
    """

    def __init__(self, identity: DeviceIdentity, address: str,
                 request: Callable[[int], Relay | RelayAccept],
                 max_frame: int = DEFAULT_MAX_FRAME, *, binding: bytes = b"",
                 server_key: bytes | None = None) -> None:
        self._conn = ClientConnection(max_frame, binding=binding, server_key=server_key)
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

    @property
    def identity_error(self) -> ServerIdentityError | None:
        return self._conn.identity_error

    def set_binding(self, binding: bytes) -> None:
        """The channel binding of the connection (known once TLS is up)."""
        self._conn.binding = binding

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
                if (err := self._conn.identity_error) is not None:
                    self.refusal = (0, err.text)  # nothing signed for a server we won't accept
                    return
                self._auth_id = self._conn.authorize(self._identity, self._address,
                                                     relay=True)
        elif isinstance(msg, Reply) and msg.id in (self._auth_id, self._relay_id):
            if msg.id == self._auth_id and (err := self._conn.identity_error) is not None:
                self.refusal = (0, err.text)
            elif not msg.ok:
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
