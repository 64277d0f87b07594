"""A connection whose protocol can't be built or set up (a bug: an attribute added to
`_Connection` without its slot) is logged and counted, and the server serves on: on the
default loop and on uvloop, which stops accepting altogether when a factory raises."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import uvloop

from rendezvous import server as server_module
from rendezvous.client import RendezvousClient

from .conftest import ident, port_of, running_server

ALICE = ident(1)


def _break_connections(monkeypatch: pytest.MonkeyPatch, stage: str, times: int) -> None:
    """The next `times` connections fail as a slot left out would make them: when the
    protocol is built ("build") or when the connection is set up ("set up")."""
    build = server_module._Connection.__init__
    attach = server_module.RendezvousServer._attach
    left = [times]

    def init(self: server_module._Connection, server: server_module.RendezvousServer) -> None:
        build(self, server)
        if stage == "build" and left[0]:
            left[0] -= 1
            self.added_without_a_slot = True  # type: ignore[attr-defined]

    def attach_(self: server_module.RendezvousServer, conn: server_module._Connection) -> None:
        if stage == "set up" and left[0]:
            left[0] -= 1
            conn.added_without_a_slot = True  # type: ignore[attr-defined]
        attach(self, conn)

    monkeypatch.setattr(server_module._Connection, "__init__", init)
    monkeypatch.setattr(server_module.RendezvousServer, "_attach", attach_)


async def _failures_then_a_login(tmp_path: Path) -> tuple[list[logging.LogRecord], int]:
    """Two broken connections, then a real client's login; the error log lines and the
    server's count of failed connections."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = seen.append  # type: ignore[method-assign,assignment]
    server_module.log.addHandler(handler)
    try:
        async with running_server(tmp_path) as server:
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                # Closed at once, not left hanging with nobody serving it.
                assert await asyncio.wait_for(reader.read(), 5.0) == b""
                writer.close()
            alice = RendezvousClient("127.0.0.1", port_of(server), ALICE,
                                     "alice@example.net", register=True, request_timeout=5.0)
            async with asyncio.timeout(10.0):
                await alice.start()
                assert alice.connected
                await alice.aclose()
            failed = server.snapshot()["connections_failed"]
    finally:
        server_module.log.removeHandler(handler)
    return seen, failed


@pytest.mark.parametrize("stage", ["build", "set up"])
async def test_a_connection_that_fails_is_logged_and_the_next_one_is_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    # An earlier test's logging setup (a dictConfig) may have disabled the logger.
    monkeypatch.setattr(server_module.log, "disabled", False)
    _break_connections(monkeypatch, stage, 2)
    seen, failed = await _failures_then_a_login(tmp_path)
    assert failed == 2
    # The same error twice: logged once, with what failed and its traceback.
    (line,) = [r for r in seen if "conn.failed" in r.getMessage()]
    assert stage in line.getMessage()
    assert "added_without_a_slot" in line.getMessage()
    assert line.exc_info is not None and line.exc_info[0] is AttributeError


def test_a_factory_failure_does_not_stop_uvloop_accepting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.log, "disabled", False)
    _break_connections(monkeypatch, "build", 2)
    seen, failed = uvloop.run(_failures_then_a_login(tmp_path))
    assert failed == 2
    assert len([r for r in seen if "conn.failed" in r.getMessage()]) == 1
