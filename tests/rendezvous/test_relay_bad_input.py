"""Bad relay input gets a clear error reply and never a crash: a RELAY-ACCEPT for a
session that does not exist (or was offered to someone else), malformed RELAY frames,
relay verbs on the wrong kind of connection, and a relay connection that never says what
it is for. (A PIPE to an address that is neither online nor held is refused with "has no
device online": tests/rendezvous/test_server.py::test_pipe_relays_holds_and_refuses.)"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.codec import packb
from overlay.transports.relay import RelayError, relay_accept, relay_dial
from rendezvous.client import RendezvousClient
from rendezvous.errors import RemoteProtocolError
from rendezvous.limits import Limits
from rendezvous.messages import (
    Challenge,
    Relay,
    RelayAccept,
    RelayInvite,
    decode_request,
    decode_server_message,
)
from rendezvous.status import Status
from tests.overlay.test_relay_stream import ALICE, BOB, relay_setup

from .conftest import RawSession, ident

CAROL = ident(45)


async def test_accepting_a_session_that_does_not_exist(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as (server, _):
        host, port = server.address or ("", 0)
        ghost = RelayInvite("alice@example.net", ALICE.peer_id, bytes(16))
        with pytest.raises(RelayError) as err:
            await relay_accept(host, port, BOB, "bob@example.net", ghost)
        assert err.value.status == Status.NOT_FOUND
        assert err.value.text == (f"no relay session {bytes(16).hex()}: it expired, was "
                                  "taken, or was never offered")


async def test_a_session_offered_to_bob_cannot_be_taken_by_carol(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as (server, pair):
        host, port = server.address or ("", 0)
        async with asyncio.timeout(10):
            async with RendezvousClient(host, port, CAROL, "carol@example.net",
                                        register=True):
                dial = asyncio.create_task(relay_dial(
                    host, port, ALICE, "alice@example.net", "bob@example.net", BOB.peer_id,
                    timeout=10))
                invite = await pair.next_invite()
                with pytest.raises(RelayError, match=re.escape(
                        f"relay session {invite.session.hex()} was offered to another "
                        "device")) as err:
                    await relay_accept(host, port, CAROL, "carol@example.net", invite)
                assert err.value.status == Status.FORBIDDEN
                # Still Bob's to take.
                b = await relay_accept(host, port, BOB, "bob@example.net", invite)
                a = await dial
                await a.send_all(b"still private")
                assert await b.receive_some() == b"still private"
                await a.aclose()
                await b.aclose()


async def test_malformed_and_misplaced_relay_requests_get_clear_replies(
        tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as (server, _):
        port = (server.address or ("", 0))[1]
        relay = await RawSession.open(port)
        assert (await relay.auth(ALICE, "alice@example.net", relay=True)).ok
        bad = [
            ({"t": "RELAY", "id": 5, "to": "bob@example.net", "device": BOB.peer_id,
              "session": b"abc"}, "request.session: expected 16 bytes, got 3"),
            ({"t": "RELAY", "id": 6, "to": "bob@example.net", "session": os.urandom(16)},
             "request: missing field 'device'"),
            ({"t": "RELAY-ACCEPT", "id": 7, "session": "nope"},
             "request.session: expected bytes, got str"),
            ({"t": "FINGER", "id": 8, "address": "bob@example.net"},
             "FINGER on a relay connection: it may only send RELAY or RELAY-ACCEPT"),
        ]
        for body, text in bad:
            await relay.frame(packb(body))
            reply = await relay.reply()
            assert (reply.id, reply.status, reply.text) == (body["id"], 400, text)
        # After all that, the connection still serves its one relay request...
        reply = await relay.request(RelayAccept(9, bytes(16)))
        assert reply.status == Status.NOT_FOUND
        # ...and only one.
        reply = await relay.request(RelayAccept(10, bytes(16)))
        assert (reply.status, reply.text) == (400, "one RELAY or RELAY-ACCEPT per relay "
                                                   "connection")
        await relay.close()

        control = await RawSession.open(port)
        assert (await control.auth(CAROL, "carol@example.net", register=True)).ok
        reply = await control.request(Relay(3, "bob@example.net", BOB.peer_id, os.urandom(16)))
        assert (reply.status, reply.text) == (
            400, "RELAY needs its own connection, authorized with relay=true")
        await control.close()

        signup = await RawSession.open(port)
        reply = await signup.auth(ident(46), "dave@example.net", register=True, relay=True)
        assert (reply.status, reply.text) == (
            400, "a relay connection can't register, use an invite or advertise")
        await signup.close()
        assert server.bad_input >= 7
        assert server.snapshot()["relay_pending"] == 0


async def test_a_relay_connection_that_never_asks_is_closed(tmp_path: Path) -> None:
    async with relay_setup(tmp_path, Limits(auth_timeout=0.5)) as (server, _):
        port = (server.address or ("", 0))[1]
        idle = await RawSession.open(port)
        assert (await idle.auth(ALICE, "alice@example.net", relay=True)).ok
        assert await idle.closed_by_server(within=5)
        # A relay connection never made its device "online" on its own behalf.
        assert server.is_online(ALICE.peer_id)  # (Alice's control session is)
        assert server.snapshot()["connections"] == 2


_values = st.none() | st.booleans() | st.integers(-5, 2**64 - 1) | st.text(max_size=20) \
    | st.binary(max_size=40) | st.lists(st.binary(max_size=20), max_size=3)


@settings(max_examples=300)
@given(st.sampled_from(["RELAY", "RELAY-ACCEPT"]), st.integers(-5, 2**64 - 1) | st.text(max_size=3),
       st.dictionaries(st.sampled_from(["to", "device", "session"]), _values, max_size=3))
def test_relay_request_garbage_is_refused_not_crashed(tag: str, rid: object,
                                                      fields: dict[str, object]) -> None:
    try:
        req = decode_request(packb({"t": tag, "id": rid, **fields}), 1 << 16)
    except RemoteProtocolError as exc:
        assert exc.text and exc.status == Status.BAD_REQUEST
        return
    assert isinstance(req, Relay | RelayAccept) and len(req.session) == 16


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["from", "from_device", "session", "stun", "dht",
                                        "domain", "nonce"]), _values, max_size=7),
       st.sampled_from(["RELAY-INVITE", "CHALLENGE"]))
def test_relay_invite_and_challenge_garbage_from_a_server_is_refused(
        fields: dict[str, object], tag: str) -> None:
    try:
        msg = decode_server_message(packb({"t": tag, **fields}), 1 << 16)
    except RemoteProtocolError:
        return
    if isinstance(msg, RelayInvite):
        assert len(msg.session) == 16 and len(msg.sender_device) == 20
    else:
        assert isinstance(msg, Challenge)
        assert all(1 <= p <= 65535 for p in msg.services().values())
