"""Tier (a): the sans-I/O cores wired back to back in memory, with a hand-driven clock."""

from __future__ import annotations

import itertools
import struct

from crypto.codec import packb
from rendezvous.client_core import ClientConnection, ClientState
from rendezvous.framing import encode_frame
from rendezvous.limits import Limits
from rendezvous.messages import (
    Challenge,
    Deliver,
    Finger,
    Pipe,
    Reply,
    Send,
    SendItem,
    ServerMessage,
    encode_request,
)
from rendezvous.records import Envelope
from rendezvous.session import (
    AuthRequested,
    Closing,
    Event,
    RequestReceived,
    ServerConnection,
    SessionState,
)
from rendezvous.status import Status

from .conftest import DOMAIN, ident

PEER = bytes(20)
MID = bytes(16)


class Pair:
    """A ServerConnection and a ClientConnection joined by in-memory byte transfer."""

    def __init__(self, limits: Limits | None = None, now: float = 100.0) -> None:
        counter = itertools.count()
        self.now = now
        self.server = ServerConnection(DOMAIN, limits or Limits(), now,
                                       lambda: next(counter).to_bytes(32, "big"))
        self.client = ClientConnection()
        self.transfer()

    def transfer(self) -> tuple[list[Event], list[ServerMessage]]:
        """Move bytes both ways until quiet; return what each side produced."""
        events: list[Event] = []
        msgs: list[ServerMessage] = []
        while True:
            to_client = self.server.data_to_send()
            if to_client:
                self.client.receive_data(to_client)
            to_server = self.client.data_to_send()
            if to_server:
                self.server.receive_data(to_server, self.now)
            while (ev := self.server.next_event()) is not None:
                events.append(ev)
            while (m := self.client.next_event()) is not None:
                msgs.append(m)
            if not to_client and not to_server:
                return events, msgs

    def raw(self, data: bytes) -> tuple[list[Event], list[ServerMessage]]:
        self.server.receive_data(data, self.now)
        return self.transfer()

    def login(self, n: int = 1, address: str = "alice@example.net") -> None:
        self.client.authorize(ident(n), address)
        events, _ = self.transfer()
        (ev,) = events
        assert isinstance(ev, AuthRequested)
        self.server.accept_auth(ev.request.id, address, ev.request.verify_key)
        self.transfer()


def replies(msgs: list[ServerMessage]) -> list[Reply]:
    return [m for m in msgs if isinstance(m, Reply)]


def test_challenge_then_auth_then_requests_flow() -> None:
    p = Pair()
    before_login = p.client.state  # read apart: mypy keeps a narrowed attribute across login()
    assert before_login is ClientState.CHALLENGED
    p.login()
    assert p.server.state is SessionState.AUTHENTICATED
    assert p.client.state is ClientState.AUTHENTICATED
    assert p.server.peer_id == ident(1).peer_id
    rid = p.client.new_id()
    p.client.send(Finger(rid, "bob@example.net"))
    events, _ = p.transfer()
    assert events == [RequestReceived(Finger(rid, "bob@example.net"))]
    p.server.reply(rid, Status.NOT_FOUND, "no such address: bob@example.net")
    _, msgs = p.transfer()
    assert replies(msgs) == [Reply(rid, 404, "no such address: bob@example.net", {})]


def test_pushes_reach_the_client() -> None:
    p = Pair()
    p.login()
    env = Envelope(MID, "bob@example.net", "alice@example.net", PEER, 0, b"sealed", 5.0)
    p.server.deliver(env)
    _, msgs = p.transfer()
    assert msgs == [Deliver(env)]


def test_nothing_but_authorization_before_auth() -> None:
    p = Pair()
    body = encode_request(Send(7, MID, 0, (SendItem("bob@example.net", PEER, b"x"),)))
    events, msgs = p.raw(encode_frame(body))
    assert events == []
    (r,) = replies(msgs)
    assert (r.id, r.status) == (7, Status.UNAUTHORIZED)
    assert r.text == "authenticate first (SEND before AUTHORIZATION)"
    assert p.server.bad_input == 1


def test_a_bad_signature_is_refused_and_the_nonce_changes() -> None:
    p = Pair()
    first = p.server.nonce
    p.client.challenge = Challenge(DOMAIN, b"\x99" * 32)  # sign the wrong nonce
    p.client.authorize(ident(1), "alice@example.net")
    events, msgs = p.transfer()
    assert events == []
    (r,) = replies(msgs)
    assert r.status == Status.UNAUTHORIZED and "bad signature" in r.text
    assert p.server.nonce != first
    assert isinstance(msgs[-1], Challenge) and msgs[-1].nonce == p.server.nonce


def test_a_replayed_authorization_fails_on_another_connection() -> None:
    a = Pair()
    a.client.authorize(ident(1), "alice@example.net")
    stolen = a.client.data_to_send()
    a.server.receive_data(stolen, a.now)
    assert isinstance(a.server.next_event(), AuthRequested)
    b = Pair()
    b.server._new_nonce = lambda: b"\x42" * 32  # a different nonce, as in real life
    b.server._challenge()
    events, msgs = b.raw(stolen)
    assert events == []
    assert replies(msgs)[0].status == Status.UNAUTHORIZED
    # ...and on the same connection once the nonce has been used.
    a.server.reject_auth(1, Status.UNAUTHORIZED, "no")
    events, msgs = a.raw(stolen)
    assert events == [] and replies(msgs)[-1].status == Status.UNAUTHORIZED


def test_wrong_domain_is_forbidden() -> None:
    p = Pair()
    p.client.authorize(ident(1), "alice@other.org")
    events, msgs = p.transfer()
    assert events == []
    r = replies(msgs)[0]
    assert r.status == Status.FORBIDDEN and "not served here" in r.text


def test_too_many_failed_authorizations_close_the_session() -> None:
    p = Pair(Limits(auth_attempts=2))
    for _ in range(2):
        p.client.challenge = Challenge(DOMAIN, b"\x01" * 32)
        p.client.state = ClientState.CHALLENGED
        p.client.authorize(ident(1), "alice@example.net")
        events, _ = p.transfer()
    assert events == [Closing("too many failed authorizations")]
    assert p.server.closed


def test_frame_length_over_the_limit_closes_with_an_error() -> None:
    p = Pair(Limits(max_frame=1000))
    events, msgs = p.raw(struct.pack(">I", 5000))
    assert events == [Closing("framing: frame of 5000 bytes over the limit 1000")]
    assert replies(msgs)[0].status == Status.TOO_LARGE


def test_truncated_frame_then_eof_closes_and_yields_nothing() -> None:
    p = Pair()
    body = encode_request(Send(1, MID, 0, (SendItem("bob@example.net", PEER, b"x"),)))
    p.server.receive_data(encode_frame(body)[:-3], p.now)
    assert p.server.next_event() is None
    p.server.receive_eof()
    assert p.server.next_event() == Closing("peer closed mid-frame")


def test_half_a_frame_times_out() -> None:
    p = Pair(Limits(partial_frame_timeout=10, auth_timeout=1000))
    p.server.receive_data(b"\x00\x00\x01\x00abc", p.now)
    assert p.server.get_timer() == p.now + 10
    p.server.handle_timer(p.now + 10)
    assert p.server.next_event() == Closing("incomplete frame timeout")


def test_authentication_deadline() -> None:
    p = Pair(Limits(auth_timeout=30))
    assert p.server.get_timer() == p.now + 30
    p.server.handle_timer(p.now + 29)
    assert not p.server.closed
    p.server.handle_timer(p.now + 30)
    assert p.server.next_event() == Closing("authentication timeout")
    p2 = Pair(Limits(auth_timeout=30))
    p2.login()
    assert p2.server.get_timer() is None


def test_unknown_verb_gets_400_with_its_id() -> None:
    p = Pair()
    p.login()
    _, msgs = p.raw(encode_frame(packb({"t": "STEAL", "id": 77})))
    (r,) = replies(msgs)
    assert (r.id, r.status, r.text) == (77, 400, "unknown verb 'STEAL'")


def test_oversize_envelope_and_pipe_payload_get_413() -> None:
    p = Pair(Limits(max_envelope=100, max_pipe_payload=50))
    p.login()
    send = Send(5, MID, 0, (SendItem("bob@example.net", PEER, b"x" * 101),))
    pipe = Pipe(6, "bob@example.net", b"y" * 51)
    events, msgs = p.raw(encode_frame(encode_request(send)) + encode_frame(encode_request(pipe)))
    assert events == []
    r1, r2 = replies(msgs)
    assert (r1.id, r1.status, r1.text) == (5, 413, "envelope too large: 101 bytes, limit 100")
    assert (r2.id, r2.status) == (6, 413) and "51 bytes" in r2.text


def test_request_rate_limit() -> None:
    p = Pair(Limits(request_rate=10, request_burst=5))
    p.login()  # uses one token
    frames = b"".join(encode_frame(encode_request(Finger(i, "bob@example.net")))
                      for i in range(10, 20))
    events, msgs = p.raw(frames)
    assert len(events) == 4
    limited = replies(msgs)
    assert len(limited) == 6 and all(r.status == Status.RATE_LIMITED for r in limited)
    p.now += 1.0  # ten more tokens
    events, _ = p.raw(encode_frame(encode_request(Finger(30, "bob@example.net"))))
    assert len(events) == 1
