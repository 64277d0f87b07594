"""A node killed (-9) while a CLI call waits on its control socket, with the request not
yet read: the kernel resets the connection (ECONNRESET), and the CLI says the node closed
the control connection, as for a clean close, instead of printing a traceback.

Found by the chaos soak (`python -m benchmarks soak --harsh`): `peerpost send` printed
`ConnectionResetError: [Errno 104] Connection reset by peer` with its traceback when the
sender's node was killed during the send.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from overlay.app.control import ControlClient, ControlError
from overlay.app.control_wire import CLOSED_TEXT, call


def _reset_after_request(path: Path) -> threading.Thread:
    """Accept one connection, wait until the request is there, close without reading it:
    what a killed node's socket does."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1, socket.MSG_PEEK)  # the request arrived, and stays unread

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _outcome(fn: Callable[[], object]) -> tuple[type, str]:
    try:
        fn()
    except ControlError as exc:
        return type(exc), str(exc)
    except OSError as exc:
        return type(exc), str(exc)
    raise AssertionError("the call returned")


def test_call_reset_by_a_killed_node_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    t = _reset_after_request(path)
    got = _outcome(lambda: call(path, "send", path="/x", to=["bob@example.net"]))
    t.join(10)
    assert got == (ControlError, CLOSED_TEXT)


def test_async_client_reset_by_a_killed_node_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    t = _reset_after_request(path)

    async def ask() -> None:
        async with ControlClient(path) as c:
            await c.call("send", path="/x", to=["bob@example.net"])

    got = _outcome(lambda: asyncio.run(ask()))
    t.join(10)
    assert got == (ControlError, CLOSED_TEXT)
