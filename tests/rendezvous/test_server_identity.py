"""The server's half of the handshake, on the sans-I/O cores: the domain key signs both
nonces and the channel binding, so a reply recorded in one session, a login signature
from another, or a different channel (a proxy's certificate) never verifies."""

from __future__ import annotations

import itertools

import pytest

from rendezvous.client_core import ClientConnection, ClientState, RelayHandshake
from rendezvous.domainkey import DomainKey, fingerprint
from rendezvous.errors import LocalProtocolError
from rendezvous.framing import encode_frame
from rendezvous.limits import Limits
from rendezvous.messages import (
    Authorization,
    Relay,
    Reply,
    encode_request,
    encode_server_message,
)
from rendezvous.session import AuthRequested, ServerConnection
from rendezvous.status import Status

from .conftest import DOMAIN, ident

KEY = DomainKey.from_seed(b"\x11" * 32)
OTHER = DomainKey.from_seed(b"\x22" * 32)
BINDING = bytes(range(32))


def server(key: DomainKey = KEY, binding: bytes = BINDING, first: int = 0) -> ServerConnection:
    counter = itertools.count(first)
    return ServerConnection(DOMAIN, Limits(), 0.0, lambda: next(counter).to_bytes(32, "big"),
                            domain_key=key, binding=binding)


def run(srv: ServerConnection, cli: ClientConnection, accept: bool = True) -> list[Reply]:
    """Move bytes until quiet, accepting AUTHORIZATIONs; the client's replies."""
    replies: list[Reply] = []
    while True:
        out = srv.data_to_send()
        if out:
            cli.receive_data(out)
        up = cli.data_to_send()
        if up:
            srv.receive_data(up, 0.0)
        while (ev := srv.next_event()) is not None:
            if isinstance(ev, AuthRequested):
                if accept:
                    srv.accept_auth(ev.request.id, ev.request.address, ev.request.verify_key)
                else:
                    srv.reject_auth(ev.request.id, Status.FORBIDDEN, "no")
        while (m := cli.next_event()) is not None:
            if isinstance(m, Reply):
                replies.append(m)
        if not out and not up:
            return replies


def login(srv: ServerConnection, cli: ClientConnection, n: int = 1) -> Reply:
    run(srv, cli)
    cli.authorize(ident(n), "alice@example.net")
    (reply,) = run(srv, cli)
    return reply


def test_the_pinned_key_signs_and_the_session_is_accepted() -> None:
    cli = ClientConnection(binding=BINDING, server_key=KEY.public)
    reply = login(server(), cli)
    assert reply.ok and "server_sig" in reply.body
    assert cli.identity_error is None and cli.state is ClientState.AUTHENTICATED
    assert cli.server_key_seen == KEY.public


def test_first_use_trusts_the_key_shown_and_reports_it() -> None:
    cli = ClientConnection(binding=BINDING)
    login(server(), cli)
    assert cli.state is ClientState.AUTHENTICATED and cli.server_key_seen == KEY.public


def test_another_domain_key_is_refused_naming_both_fingerprints() -> None:
    cli = ClientConnection(binding=BINDING, server_key=KEY.public)
    run(server(OTHER), cli)  # its CHALLENGE names OTHER
    err = cli.identity_error
    assert err is not None and cli.state is not ClientState.AUTHENTICATED
    assert "does not match the key pinned for it" in err.text
    assert fingerprint(KEY.public) in err.text and fingerprint(OTHER.public) in err.text
    # Nothing is signed for it: it never sees our address, device key or hints.
    with pytest.raises(LocalProtocolError, match="nothing is signed"):
        cli.authorize(ident(1), "alice@example.net")
    assert cli.data_to_send() == b""


def test_another_channel_fails_both_signatures() -> None:
    # A proxy terminating TLS: the client sees the proxy's certificate, the server its own.
    cli = ClientConnection(binding=bytes(32), server_key=KEY.public)
    reply = login(server(), cli)
    assert reply.status == Status.UNAUTHORIZED and "bad signature" in reply.text
    assert cli.state is not ClientState.AUTHENTICATED
    assert cli.identity_error is not None and "proxy terminating TLS" in cli.identity_error.text
    # And were the device's signature let through, the server's would not verify.
    cli2 = ClientConnection(binding=bytes(32), server_key=KEY.public)
    srv = server(binding=bytes(32))
    run(srv, cli2)
    cli2.authorize(ident(1), "alice@example.net")
    srv.receive_data(cli2.data_to_send(), 0.0)
    ev = srv.next_event()
    assert isinstance(ev, AuthRequested)
    srv.binding = BINDING  # the server signs over its own certificate
    srv.accept_auth(ev.request.id, ev.request.address, ev.request.verify_key)
    cli2.receive_data(srv.data_to_send())
    err = cli2.identity_error
    assert err is not None and cli2.state is not ClientState.AUTHENTICATED
    assert "proxy terminating TLS" in err.text


def test_a_recorded_server_reply_replayed_into_another_session_fails() -> None:
    first = ClientConnection(binding=BINDING, server_key=KEY.public)
    recorded = login(server(), first)
    assert recorded.ok
    # Another session: a fresh server nonce (and client nonce); an attacker who answers
    # with the recorded reply (same request id) can't make the client accept it.
    srv2 = server(first=1000)
    victim = ClientConnection(binding=BINDING, server_key=KEY.public)
    victim.receive_data(srv2.data_to_send())  # the CHALLENGE
    while victim.next_event() is not None:
        pass
    victim.authorize(ident(1), "alice@example.net")
    victim.receive_data(encode_frame(encode_server_message(recorded), 1 << 20))
    err = victim.identity_error
    assert err is not None and victim.state is not ClientState.AUTHENTICATED
    assert "replayed" in err.text


def test_a_login_signature_from_one_session_is_refused_in_another() -> None:
    cli = ClientConnection(binding=BINDING, server_key=KEY.public)
    srv1 = server()
    run(srv1, cli)
    cli.authorize(ident(1), "alice@example.net")
    frame = cli.data_to_send()
    srv2 = server(first=1000)
    srv2.data_to_send()
    srv2.receive_data(frame, 0.0)
    assert srv2.next_event() is None
    out = srv2.data_to_send()
    probe = ClientConnection()
    probe.receive_data(out)
    replies = []
    while (m := probe.next_event()) is not None:
        if isinstance(m, Reply):
            replies.append(m)
    (reply,) = replies
    assert reply.status == Status.UNAUTHORIZED and "bad signature" in reply.text
    assert srv2.bad_input == 1


def test_a_refusal_is_signed_too_and_checked() -> None:
    cli = ClientConnection(binding=BINDING, server_key=KEY.public)
    srv = server()
    run(srv, cli, accept=False)
    cli.authorize(ident(1), "alice@example.net")
    (reply,) = run(srv, cli, accept=False)
    assert reply.status == Status.FORBIDDEN and "server_sig" in reply.body
    assert cli.identity_error is None  # a genuine refusal by the pinned server


def test_the_relay_handshake_checks_the_server_too() -> None:
    srv = server(OTHER)
    hs = RelayHandshake(ident(1), "alice@example.net",
                        lambda rid: Relay(rid, "bob@example.net", bytes(20), bytes(16)),
                        server_key=KEY.public)
    hs.set_binding(BINDING)
    hs.receive_data(srv.data_to_send())
    assert hs.finished and not hs.spliced and hs.identity_error is not None
    assert hs.refusal is not None and "does not match the key pinned" in hs.refusal[1]
    assert hs.data_to_send() == b""  # neither AUTHORIZATION nor RELAY to an unproven server


def test_a_proxy_relaying_the_real_challenge_is_caught_at_the_reply() -> None:
    # The key named is the pinned one, so the AUTHORIZATION goes out (bound to the proxy's
    # channel: useless elsewhere); the reply can't prove the key over that channel.
    srv = server(binding=bytes(32))  # the device's signature let through, as above
    hs = RelayHandshake(ident(1), "alice@example.net",
                        lambda rid: Relay(rid, "bob@example.net", bytes(20), bytes(16)),
                        server_key=KEY.public)
    hs.set_binding(bytes(32))
    hs.receive_data(srv.data_to_send())
    srv.receive_data(hs.data_to_send(), 0.0)
    (ev,) = [srv.next_event()]
    assert isinstance(ev, AuthRequested)
    srv.binding = BINDING  # the server signs over its own certificate
    srv.accept_auth(ev.request.id, ev.request.address, ev.request.verify_key, relay=True)
    hs.receive_data(srv.data_to_send())
    assert hs.finished and not hs.spliced and hs.identity_error is not None
    assert hs.refusal is not None and "proxy terminating TLS" in hs.refusal[1]
    assert hs.data_to_send() == b""  # no RELAY went out to an unproven server


def test_authorization_without_a_client_nonce_is_malformed() -> None:
    srv = server()
    srv.data_to_send()
    bad = Authorization(1, "alice@example.net", ident(1).public.verify_key, bytes(64))
    srv.receive_data(encode_frame(encode_request(bad), 1 << 20), 0.0)
    probe = ClientConnection()
    probe.receive_data(srv.data_to_send())
    msgs = [m for m in iter(probe.next_event, None) if isinstance(m, Reply)]
    assert msgs[0].status == Status.BAD_REQUEST and "cnonce" in msgs[0].text


@pytest.mark.parametrize("binding", [b"", BINDING])
def test_both_bindings_work_when_both_ends_agree(binding: bytes) -> None:
    cli = ClientConnection(binding=binding, server_key=KEY.public)
    assert login(server(binding=binding), cli).ok
    assert cli.state is ClientState.AUTHENTICATED
