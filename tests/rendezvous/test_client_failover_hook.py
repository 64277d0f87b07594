"""A client that fails over to another server of its domain tells `on_failover`; a hook
that raises (a node's full disk refusing config.json) is logged, and the session it
reached stays up and reconnects as before. It failed the start, or ended the reconnect
loop for good: the client never reconnected again."""

from __future__ import annotations

import errno
import logging
import socket

import pytest

from rendezvous.client import RendezvousClient
from rendezvous.server import RendezvousServer

from .conftest import ident, port_of


async def test_a_failover_hook_that_raises_is_logged_and_the_session_goes_on(
        server: RendezvousServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    with socket.socket() as s:  # the configured server: down
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    heard: list[tuple[str, int]] = []

    async def alternates() -> list[tuple[str, int]]:
        return [("127.0.0.1", port_of(server))]

    def on_failover(host: str, port: int) -> None:
        heard.append((host, port))
        raise OSError(errno.ENOSPC, "No space left on device")

    async with RendezvousClient("127.0.0.1", port_of(server), ident(1), "alice@example.net",
                                register=True, request_timeout=5.0, alternates=alternates,
                                on_failover=on_failover) as rc:
        rc.port = down  # as if the server it was set up with had gone away
        rc.relogin("the test")  # the reconnect fails over to the alternate
        assert (await rc.finger("alice@example.net")).devices
        assert heard == [("127.0.0.1", port_of(server))] and rc.failovers == 1
        rc.relogin("the test, again")  # the reconnect loop runs on
        assert (await rc.finger("alice@example.net")).devices
        assert rc.reconnects == 2
    assert "event=client.on_failover_failed address=alice@example.net " \
           "error=\"[Errno 28] No space left on device\"" in caplog.text
    assert "Traceback" not in caplog.text
