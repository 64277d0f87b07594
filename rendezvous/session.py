"""The server side of one rendezvous connection, sans-I/O: bytes and the time in, events,
bytes out and the next deadline out (the shape of aioquic's connection).

`ServerConnection` takes received bytes and `now`, hands out events, and collects the
bytes to send; it never touches a socket or a clock. It owns:

- framing (length checked before buffering; a bad prefix is fatal: error frame + close),
- decoding into typed requests (a bad request gets a 400 reply with its id, if readable),
- the session state machine: nothing but AUTHORIZATION (and QUIT) before authentication,
- the challenge-response check (signature over domain, this connection's nonce, the
  client's nonce, the channel binding, address, key; the nonce is replaced after every
  attempt, so a signature can't be replayed), and the server's half: the domain key signs
  (domain, nonce, client nonce, binding, device key) into every reply to an
  AUTHORIZATION, accepted or refused,
- per-connection rate limits and the envelope / pipe payload size limits,
- keepalive: PING is answered "pong" in any state; a session whose AUTHORIZATION
  announced a PING interval closes (`Closing.abort`: the peer is gone, nothing waits for
  a flush) after `Limits.keepalive_timeout`, at least twice that interval, without a
  byte from the client, so its device goes offline as on a disconnect,
- server links (LINK instead of AUTHORIZATION, rendezvous/messages.py): the core hands
  out `LinkRequested`; the server looks the linking domain's key up and calls
  `finish_link`, which checks the signature and answers, signed like any handshake. A
  link session may send SEND, PIPE and RELAY (with `from`) and FINGER (with `asker`)
  only; a node's session may not use those fields,
- relay connections (AUTHORIZATION with `relay`, for an address of another domain too:
  the callee of a caller here joins at this server): they may send exactly one RELAY or
  RELAY-ACCEPT within `auth_timeout` of connecting, nothing else, and once the server has
  joined them to their peer (`splice()`) the core is out of the way: the adapter hands
  the raw bytes to the splice and must not feed them here.

What needs the account database (is this key bound to that address? store this SEND)
is the server's job: it receives `AuthRequested` / `RequestReceived` events and answers
with `accept_auth` / `reject_auth` / `reply`. Each misbehaviour bumps `bad_input`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from crypto.address import domain_of
from crypto.errors import VerificationError
from crypto.identity import peer_id_of, verify
from rendezvous.domainkey import DomainKey
from rendezvous.errors import LocalProtocolError, RemoteProtocolError
from rendezvous.framing import FrameDecoder, encode_frame
from rendezvous.limits import Limits, TokenBucket
from rendezvous.messages import (
    AUTH_CONTEXT,
    LINK_CONTEXT,
    SERVER_AUTH_CONTEXT,
    Authorization,
    Challenge,
    Deliver,
    Finger,
    Link,
    Ping,
    Pipe,
    PipeMessage,
    Quit,
    Relay,
    RelayAccept,
    RelayInvite,
    Reply,
    Request,
    Send,
    ServerMessage,
    auth_payload,
    decode_request,
    encode_server_message,
    link_payload,
    server_payload,
)
from rendezvous.records import Envelope
from rendezvous.status import Status


class SessionState(Enum):
    AWAITING_AUTH = "awaiting-auth"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"
    SPLICED = "spliced"  # a relay connection joined to its peer: raw bytes, no frames
    CLOSED = "closed"


_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.AWAITING_AUTH: frozenset({SessionState.AUTHENTICATING, SessionState.CLOSED}),
    SessionState.AUTHENTICATING: frozenset(
        {SessionState.AUTHENTICATED, SessionState.AWAITING_AUTH, SessionState.CLOSED}),
    SessionState.AUTHENTICATED: frozenset({SessionState.SPLICED, SessionState.CLOSED}),
    SessionState.SPLICED: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset({SessionState.CLOSED}),
}


@dataclass(frozen=True, slots=True)
class AuthRequested:
    """A correctly signed AUTHORIZATION; the server decides if the key may be `address`."""

    request: Authorization
    peer_id: bytes


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A valid request of an authenticated session, to be answered with `reply`."""

    request: Request


@dataclass(frozen=True, slots=True)
class Closing:
    """The session ends: send what is pending, then close the transport; with `abort`
    the peer is unreachable, so drop the transport at once (a TLS close would wait for
    its close_notify)."""

    reason: str
    abort: bool = False


@dataclass(frozen=True, slots=True)
class LinkRequested:
    """A LINK: the server looks up `request.domain`'s key and calls `finish_link`."""

    request: Link
    nonce: bytes  # the CHALLENGE nonce it answers


Event = AuthRequested | RequestReceived | Closing | LinkRequested


class ServerConnection:
    """Protocol state of one client connection on the server."""

    __slots__ = ("_attempt", "_auth_attempts", "_auth_deadline", "_decoder", "_events",
                 "_keepalive_asked", "_last_recv", "_new_nonce", "_out", "_partial_since",
                 "_pipe_bytes", "_relay_asked", "_requests", "_services", "address",
                 "bad_input", "binding", "close_reason", "domain", "domain_key", "in_flight",
                 "keepalive_timeout", "limits", "link_domain", "nonce", "peer_id", "relay",
                 "state", "verify_key")

    def __init__(self, domain: str, limits: Limits, now: float,
                 new_nonce: Callable[[], bytes],
                 services: Mapping[str, int] | None = None, *,
                 domain_key: DomainKey | None = None, binding: bytes = b"") -> None:
        """`binding`: SHA-256 of the server's TLS certificate, b"" on plaintext;
        `domain_key`: signs the server's half (a throwaway key when None: tests)."""
        self.domain = domain
        self.domain_key = domain_key or DomainKey.generate()
        self.binding = binding
        # (server nonce, client nonce, device key) of the AUTHORIZATION being answered
        self._attempt: tuple[bytes, bytes, bytes] | None = None
        self._services = dict(services or {})
        self.relay = False          # authorized as a relay connection
        self.link_domain: str | None = None  # a server link, authorized for this domain
        self._relay_asked = False   # its one RELAY / RELAY-ACCEPT has arrived
        self.limits = limits
        self.state = SessionState.AWAITING_AUTH
        self.address: str | None = None
        self.peer_id: bytes | None = None
        self.verify_key: bytes | None = None
        self.bad_input = 0
        self.in_flight = 0
        self.close_reason: str | None = None
        self._new_nonce = new_nonce
        self._decoder = FrameDecoder(limits.max_frame)
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._requests = TokenBucket(limits.request_rate, limits.request_burst, now)
        self._pipe_bytes = TokenBucket(limits.pipe_bytes_rate,
                                       max(limits.pipe_bytes_rate, limits.max_pipe_payload), now)
        self._auth_attempts = 0
        self._auth_deadline = now + limits.auth_timeout
        self._partial_since: float | None = None
        self._last_recv = now              # when the client last sent us any byte
        self._keepalive_asked = 0          # the PING interval (ms) its AUTHORIZATION named
        self.keepalive_timeout: float | None = None  # set once such a session is accepted
        self.nonce = b""
        self._challenge()

    # --- state ---------------------------------------------------------------------
    def _to(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise LocalProtocolError(f"session cannot go from {self.state.value} to {state.value}")
        self.state = state

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def close(self, reason: str, *, abort: bool = False) -> None:
        """End the session (idempotent); a Closing event tells the adapter."""
        if self.state is not SessionState.CLOSED:
            self._to(SessionState.CLOSED)
            self.close_reason = reason
            self._events.append(Closing(reason, abort))

    # --- input ---------------------------------------------------------------------
    def splice(self) -> None:
        """The server joined this relay connection to its peer: from now on, raw bytes."""
        if not self.relay:
            raise LocalProtocolError("only a relay connection can be spliced")
        self._to(SessionState.SPLICED)

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes from the transport; problems become replies, counters or a close."""
        if self.closed:
            return
        if self.state is SessionState.SPLICED:
            raise LocalProtocolError("a spliced connection's bytes belong to the splice")
        self._last_recv = now
        try:
            frames = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self.bad_input += 1
            self._send(Reply(0, exc.status, exc.text))
            self.close(f"framing: {exc.text}")
            return
        for frame in frames:
            if self.closed:
                return
            self._receive_frame(frame, now)
        if self._decoder.pending:
            if self._partial_since is None:
                self._partial_since = now
        else:
            self._partial_since = None

    def receive_eof(self) -> None:
        """The peer closed its side; an incomplete frame is dropped (and counted)."""
        if self._decoder.pending and not self.closed:
            self.bad_input += 1
            self.close("peer closed mid-frame")
        self.close("peer closed")

    def _receive_frame(self, frame: bytes, now: float) -> None:
        try:
            req = decode_request(frame, self.limits.max_frame)
            self._check_request(req, now)
        except RemoteProtocolError as exc:
            self.bad_input += 1
            self._send(Reply(exc.request_id, exc.status, exc.text))
            return
        if isinstance(req, Ping):
            self._send(Reply(req.id, Status.OK, "pong"))
        elif isinstance(req, Quit):
            self._send(Reply(req.id, Status.OK, "bye"))
            self.close("quit")
        elif isinstance(req, Authorization):
            self._authorize(req)
        elif isinstance(req, Link):
            self._link(req)
        else:
            self.in_flight += 1
            self._events.append(RequestReceived(req))

    def _check_request(self, req: Request, now: float) -> None:
        """Policy that needs no database: state, rate and size limits."""
        # A server link answers to its domain's rate (Limits.link_rate, applied by the
        # server per linking domain), not to one device connection's.
        if self.link_domain is None and not self._requests.take(1, now):
            raise RemoteProtocolError("too many requests on this connection",
                                      Status.RATE_LIMITED, request_id=req.id)
        if isinstance(req, Quit | Ping):
            return
        if isinstance(req, Authorization | Link):
            if self.state is not SessionState.AWAITING_AUTH:
                raise RemoteProtocolError(
                    "already authenticated" if self.state is SessionState.AUTHENTICATED
                    else "an AUTHORIZATION is already being checked", request_id=req.id)
            return
        if self.state is not SessionState.AUTHENTICATED:
            raise RemoteProtocolError(f"authenticate first ({req.TAG} before AUTHORIZATION)",
                                      Status.UNAUTHORIZED, request_id=req.id)
        if self.link_domain is not None:
            if isinstance(req, Send) and req.sender is None:
                raise RemoteProtocolError("a SEND over a server link names its sender (from)",
                                          request_id=req.id)
            if isinstance(req, Finger) and req.asker is None:
                raise RemoteProtocolError("a FINGER over a server link names its asker",
                                          request_id=req.id)
            if isinstance(req, Pipe | Relay) and req.sender is None:
                raise RemoteProtocolError(
                    f"a {req.TAG} over a server link names its sender (from, from_device)",
                    request_id=req.id)
            if not isinstance(req, Send | Finger | Pipe | Relay):
                raise RemoteProtocolError(f"{req.TAG} is not carried over a server link",
                                          request_id=req.id)
            if isinstance(req, Relay):
                return  # an invitation only: the splice is at the caller's server
        elif (isinstance(req, Send | Pipe | Relay) and req.sender is not None) or (
                isinstance(req, Finger) and req.asker is not None):
            raise RemoteProtocolError(f"{req.TAG} from/asker is for server links only",
                                      Status.FORBIDDEN, request_id=req.id)
        is_relay_verb = isinstance(req, Relay | RelayAccept)
        if self.relay:
            if not is_relay_verb:
                raise RemoteProtocolError(
                    f"{req.TAG} on a relay connection: it may only send RELAY or "
                    "RELAY-ACCEPT", request_id=req.id)
            if self._relay_asked:
                raise RemoteProtocolError("one RELAY or RELAY-ACCEPT per relay connection",
                                          request_id=req.id)
            self._relay_asked = True
            return
        if is_relay_verb:
            # Bulk bytes on the control session would hold up PIPE and DELIVER behind them.
            raise RemoteProtocolError(
                f"{req.TAG} needs its own connection, authorized with relay=true",
                request_id=req.id)
        lim = self.limits
        if isinstance(req, Send):
            if len(req.items) > lim.max_items_per_send:
                raise RemoteProtocolError(
                    f"{len(req.items)} recipients in one SEND, limit {lim.max_items_per_send}",
                    Status.TOO_LARGE, request_id=req.id)
            for item in req.items:
                if len(item.blob) > lim.max_envelope:
                    raise RemoteProtocolError(
                        f"envelope too large: {len(item.blob)} bytes, limit {lim.max_envelope}",
                        Status.TOO_LARGE, request_id=req.id)
        elif isinstance(req, Pipe):
            if len(req.payload) > lim.max_pipe_payload:
                raise RemoteProtocolError(
                    f"pipe payload too large: {len(req.payload)} bytes, "
                    f"limit {lim.max_pipe_payload}", Status.TOO_LARGE, request_id=req.id)
            if req.hold_ms > lim.max_pipe_hold * 1000:
                raise RemoteProtocolError(
                    f"hold of {req.hold_ms / 1000:g} s over the limit {lim.max_pipe_hold:g} s",
                    request_id=req.id)
            if not self._pipe_bytes.take(len(req.payload), now):
                raise RemoteProtocolError("pipe byte rate exceeded on this connection",
                                          Status.RATE_LIMITED, request_id=req.id)

    def _authorize(self, req: Authorization) -> None:
        nonce = self.nonce
        self._auth_attempts += 1
        self._to(SessionState.AUTHENTICATING)
        # The server signs its answer, refusal included: a client behind a proxy that
        # terminates TLS then learns that its channel is not the server's.
        self._attempt = (nonce, req.client_nonce, req.verify_key)
        self._keepalive_asked = req.keepalive_ms
        try:
            # A device of another domain may open a relay connection here: it can only
            # RELAY-ACCEPT a session offered to its key (server.py).
            if domain_of(req.address) != self.domain and not req.relay:
                raise RemoteProtocolError(
                    f"address {req.address} is not served here (domain {self.domain})",
                    Status.FORBIDDEN)
            try:
                verify(req.verify_key, AUTH_CONTEXT,
                       auth_payload(self.domain, nonce, req.client_nonce, self.binding,
                                    req.address, req.verify_key),
                       req.signature)
            except VerificationError:
                raise RemoteProtocolError(
                    "bad signature: it does not sign this connection's challenge and TLS "
                    "channel with that key (stale, replayed, or a proxy terminating TLS "
                    "in between?)", Status.UNAUTHORIZED) from None
        except RemoteProtocolError as exc:
            self.bad_input += 1
            self.reject_auth(req.id, exc.status, exc.text)
            return
        if req.relay and (req.register or req.invite is not None or req.advertise is not None):
            self.bad_input += 1
            self.reject_auth(req.id, Status.BAD_REQUEST,
                             "a relay connection can't register, use an invite or advertise")
            return
        self._events.append(AuthRequested(req, peer_id_of(req.verify_key)))

    def _link(self, req: Link) -> None:
        self._auth_attempts += 1
        self._to(SessionState.AUTHENTICATING)
        self._attempt = (self.nonce, req.client_nonce, b"")
        if req.domain == self.domain:
            self.bad_input += 1
            self.reject_auth(req.id, Status.FORBIDDEN, f"{req.domain} can't link to itself")
            return
        self._events.append(LinkRequested(req, self.nonce))

    def finish_link(self, req: Link, nonce: bytes, key: bytes | None,
                    refusal: tuple[Status, str] | None = None) -> bool:
        """Answer a LinkRequested: `key` is the linking domain's key from DNS (None with
        the `refusal` when it could not be had or the domain is refused). True if linked."""
        if self.state is not SessionState.AUTHENTICATING:
            return False
        if key is not None and refusal is None:
            self._attempt = (nonce, req.client_nonce, key)
            try:
                verify(key, LINK_CONTEXT, link_payload(self.domain, nonce, req.client_nonce,
                                                       self.binding, req.domain),
                       req.signature)
            except VerificationError:
                refusal = (Status.UNAUTHORIZED,
                           f"LINK signature does not verify under the domain key of "
                           f"{req.domain} published in DNS (a wrong key, a replay, or a proxy "
                           "terminating TLS in between?)")
        if refusal is not None or key is None:
            self.bad_input += 1
            status, text = refusal or (Status.UNAUTHORIZED, "no key")
            self.reject_auth(req.id, status, text)
            return False
        self._to(SessionState.AUTHENTICATED)
        self.link_domain = req.domain
        self._send(Reply(req.id, Status.OK, "linked",
                         self._server_signed({"domain": self.domain})))
        return True

    # --- answers from the server -------------------------------------------------------
    def accept_auth(self, request_id: int, address: str, verify_key: bytes,
                    body: dict[str, Any] | None = None, *, relay: bool = False) -> None:
        """The store agreed: the session is now `address` on device `verify_key`."""
        if self.state is SessionState.CLOSED:
            return
        self._to(SessionState.AUTHENTICATED)
        self.relay = relay
        self.address = address
        self.verify_key = verify_key
        self.peer_id = peer_id_of(verify_key)
        if not relay and self._keepalive_asked and self.limits.keepalive_timeout > 0:
            self.keepalive_timeout = max(self.limits.keepalive_timeout,
                                         2 * self._keepalive_asked / 1000)
        self._send(Reply(request_id, Status.OK, "authenticated",
                         self._server_signed(body or {})))

    def reject_auth(self, request_id: int, status: Status, text: str) -> None:
        """Refuse an AUTHORIZATION; after `auth_attempts` failures the connection closes."""
        if self.state is SessionState.CLOSED:
            return
        self._send(Reply(request_id, status, text, self._server_signed({})))
        if self._auth_attempts >= self.limits.auth_attempts:
            self.close("too many failed authorizations")
            return
        self._to(SessionState.AWAITING_AUTH)
        self._challenge()

    def reply(self, request_id: int, status: Status = Status.OK, text: str | None = None,
              body: dict[str, Any] | None = None) -> None:
        """Answer a RequestReceived."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.state not in (SessionState.CLOSED, SessionState.SPLICED):
            self._send(Reply(request_id, status, text or status.text, body or {}))

    def deliver(self, envelope: Envelope) -> None:
        """Push an envelope to this (authenticated) device."""
        self._push(Deliver(envelope))

    def pipe(self, message: PipeMessage) -> None:
        """Push a PIPE payload to this (authenticated) device."""
        self._push(message)

    def relay_invite(self, invite: RelayInvite) -> None:
        """Push a relay invitation to this (authenticated) device."""
        self._push(invite)

    def _push(self, msg: ServerMessage) -> None:
        if self.state is SessionState.CLOSED:
            return
        if self.state is not SessionState.AUTHENTICATED:
            raise LocalProtocolError("pushes go only to authenticated sessions")
        self._send(msg)

    def _server_signed(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` plus the domain key's `server_sig` over this AUTHORIZATION."""
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return body
        nonce, client_nonce, verify_key = attempt
        sig = self.domain_key.sign(SERVER_AUTH_CONTEXT, server_payload(
            self.domain, nonce, client_nonce, self.binding, verify_key))
        return {**body, "server_sig": sig}

    def _challenge(self) -> None:
        # A fresh nonce per attempt: a signature over an old one never verifies again.
        self.nonce = self._new_nonce()
        self._send(Challenge(self.domain, self.nonce, self._services.get("stun"),
                             self._services.get("dht"), self.domain_key.public,
                             self._services.get("stun_tcp")))

    def _send(self, msg: ServerMessage) -> None:
        self._out.append(encode_frame(encode_server_message(msg), 1 << 31))

    # --- output and time ------------------------------------------------------------
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Everything queued for the transport since the last call."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` must next run (auth deadline, half-received frame, the
        keepalive's silence limit), or None."""
        if self.closed or self.state is SessionState.SPLICED:
            return None
        deadlines = []
        if self._awaiting_first_step():
            deadlines.append(self._auth_deadline)
        if self._partial_since is not None:
            deadlines.append(self._partial_since + self.limits.partial_frame_timeout)
        if self.keepalive_timeout is not None and self.state is SessionState.AUTHENTICATED:
            deadlines.append(self._last_recv + self.keepalive_timeout)
        return min(deadlines) if deadlines else None

    def _awaiting_first_step(self) -> bool:
        # Not yet authenticated, or a relay connection that hasn't said what it is for.
        return (self.state is not SessionState.AUTHENTICATED
                or (self.relay and not self._relay_asked))

    def handle_timer(self, now: float) -> None:
        if self.closed or self.state is SessionState.SPLICED:
            return
        if self._awaiting_first_step() and now >= self._auth_deadline:
            self.close("no RELAY request in time" if self.relay else "authentication timeout")
        elif (self._partial_since is not None
              and now >= self._partial_since + self.limits.partial_frame_timeout):
            self.bad_input += 1
            self.close("incomplete frame timeout")
        elif (self.keepalive_timeout is not None and self.state is SessionState.AUTHENTICATED
              and now >= self._last_recv + self.keepalive_timeout):
            if self.in_flight >= self.limits.max_in_flight:
                # The adapter stopped reading until requests finish: the silence is ours.
                self._last_recv = now
                return
            self.close(f"keepalive timeout: nothing from the client for "
                       f"{now - self._last_recv:.0f} s", abort=True)
