"""The client's reconnect loop outlives a round that fails: a server error at a later login
(5xx) is waited out as an unreachable server is, and an unexpected error in a round is
logged with its traceback. Either one ended the loop: the client stayed offline for good
(refused with the 500, or silently but for a never-retrieved task exception)."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from rendezvous.client import RendezvousClient
from rendezvous.errors import ConnectionLostError
from rendezvous.server import RendezvousServer

from .conftest import ident, port_of


async def test_a_server_error_at_a_later_login_is_tried_again(
        server: RendezvousServer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    real = server.store.authenticate
    failing = [True]

    async def authenticate(*args: Any, **kw: Any) -> Any:
        if failing[0]:
            raise RuntimeError("the test fails the store")
        return await real(*args, **kw)

    async with RendezvousClient("127.0.0.1", port_of(server), ident(1), "alice@example.net",
                                register=True, request_timeout=3.0) as rc:
        monkeypatch.setattr(server.store, "authenticate", authenticate)
        rc.relogin("the test")
        with pytest.raises(Exception, match="not connected"):
            await rc.wait_connected(1.0)
        assert rc.refused is None
        failing[0] = False
        rc.retry_now()
        assert (await rc.finger("alice@example.net")).devices
        assert rc.reconnects == 1
    assert ("event=client.reconnect_failed address=alice@example.net "
            "text=\"server error while authenticating\"") in caplog.text
    assert "client.reauth_refused" not in caplog.text


async def test_an_unexpected_error_in_a_reconnect_round_is_logged_and_the_loop_goes_on(
        server: RendezvousServer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    async with RendezvousClient("127.0.0.1", port_of(server), ident(1), "alice@example.net",
                                register=True, request_timeout=3.0) as rc:
        real = rc._connect_once
        rounds = [0]

        async def connect_once() -> None:
            rounds[0] += 1
            if rounds[0] == 1:
                raise ValueError("the test breaks one round")
            await real()

        monkeypatch.setattr(rc, "_connect_once", connect_once)
        rc.relogin("the test")
        assert (await rc.finger("alice@example.net")).devices
        assert rounds[0] == 2 and rc.reconnects == 1
    assert "event=client.reconnect_failed address=alice@example.net attempt=1" in caplog.text
    assert "ValueError: the test breaks one round" in caplog.text


async def test_a_connect_that_times_out_says_it_timed_out() -> None:
    # A listener whose queue is full drops the SYN, as a firewall does: asyncio's connect
    # timeout raises TimeoutError(), which has no text. The node's log and `peerpost info`
    # said "cannot connect to 127.0.0.1:P: " and nothing after it.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # fills the queue
            client = RendezvousClient("127.0.0.1", port, ident(1), "alice@example.net",
                                      request_timeout=0.5, reconnect=False)
            with pytest.raises(ConnectionLostError) as caught:
                async with client:
                    pass
    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: timed out"
