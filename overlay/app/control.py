"""The local control socket: how `peerpost send/inbox/fetch/...` talk to the running daemon.

A Unix socket in the home folder, mode 0600 inside a 0700 folder, so only the owner can
drive the node. Frames are a 4-byte big-endian length plus msgpack, as on the rendezvous
wire. A request is `{"op": NAME, "args": {...}}`; the reply is `{"ok": true, "result": ...}`
or `{"ok": false, "error": TEXT}`. Operations are looked up in an explicit table handed in by
the node: never a name taken from the wire. The frames and errors are in
overlay.app.control_wire, shared with its one-request client that needs no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from crypto.codec import Fields
from crypto.errors import DecodeError
from overlay.app.control_wire import (
    CLOSED_TEXT,
    MAX_CONTROL_FRAME,
    ControlError,
    NodeNotRunning,
    body_length,
    decode_body,
    not_running,
    request,
    result,
)
from overlay.app.control_wire import frame as _frame
from rendezvous.errors import is_disk_full
from rendezvous.framing import PREFIX

__all__ = ["MAX_CONTROL_FRAME", "ControlClient", "ControlError", "ControlServer",
           "NodeNotRunning", "Operation"]

log = logging.getLogger("peerpost.control")

Operation = Callable[[Fields], Awaitable[Any]]


async def _read_frame(reader: asyncio.StreamReader, op: str | None = None) -> Any:
    """A request (no `op`), or the answer to `op` (decode_body)."""
    n = body_length(await reader.readexactly(PREFIX.size))
    return decode_body(await reader.readexactly(n), op)


async def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path`."""
    try:
        async with asyncio.timeout(2.0):
            _, writer = await asyncio.open_unix_connection(str(path))
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return True


class ControlServer:
    """Serves the operations table on the home folder's Unix socket."""

    def __init__(self, path: Path, operations: Mapping[str, Operation]) -> None:
        self.path = path
        self._ops = dict(operations)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # one per open connection
        self._closing = False

    async def start(self) -> None:
        """Listen on the socket; a socket left by a killed daemon is replaced, one that
        another process still answers on is not (ControlError)."""
        if self.path.exists():
            if await _answers(self.path):
                raise ControlError(f"another peerpost node serves {self.path}; stop it first")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # stale: nothing listens on it
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def aclose(self) -> None:
        """Stop listening and end every connection's handler before returning: the node
        closes its databases next, and a call still running (`fetch --wait`'s progress
        holds one up to 200 ms) would read a closed one. Its caller sees the connection
        close, as when the node stops between two calls."""
        self._closing = True
        if self._server is not None:
            self._server.close()
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if self._closing:  # accepted as the server closed: not served
                return
            while True:
                try:
                    req = Fields(await _read_frame(reader), "control request")
                    op = req.str("op", min_len=1, max_len=64)
                    args = req.map("args", optional=True) or Fields({}, "args")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except DecodeError as exc:
                    writer.write(_frame({"ok": False, "error": f"bad request: {exc}"}))
                    return
                handler = self._ops.get(op)
                if handler is None:
                    reply = {"ok": False, "error": f"unknown operation {op!r}"}
                else:
                    try:
                        reply = {"ok": True, "result": await handler(args)}
                    except Exception as exc:
                        reply = {"ok": False, "error": _error_text(op, exc)}
                try:
                    frame = _frame(reply)
                except ValueError as exc:  # a reply over the frame limit
                    frame = _frame({"ok": False, "error": f"reply too large: {exc}"})
                writer.write(frame)
                try:
                    await writer.drain()
                except ConnectionError:
                    return  # the caller left before its answer (Ctrl-C on `fetch --wait`)
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()


def _error_text(op: str, exc: Exception) -> str:
    """The caller's error for an op that raised `exc`; a bug is logged with its traceback
    and must not take the daemon down."""
    if is_disk_full(exc):  # node.db or the content store: nothing was changed
        log.error("control op %s: the disk is full (%s)", op, exc)
        return f"this node's disk is full ({exc}): free some space and try again"
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.OperationalError | sqlite3.ProgrammingError):  # closed: a bug
        log.error("control op %s: a database of this node is damaged (%s)", op, exc)
        return (f"a database of this node is damaged ({exc}): stop the node and start it "
                "again; it checks its files at start and says what to do")
    if isinstance(exc, ControlError | DecodeError | ValueError | OSError):
        return str(exc)
    log.exception("control op %s failed", op, exc_info=exc)
    return f"internal error: {exc!r}"


class ControlClient:
    """One connection to the daemon's control socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise not_running(self.path) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def call(self, op: str, **args: Any) -> Any:
        if self._reader is None or self._writer is None:
            raise ControlError("control client is not connected")
        try:
            self._writer.write(request(op, args))
            await self._writer.drain()
            reply = await _read_frame(self._reader, op)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            raise ControlError(CLOSED_TEXT) from None
        return result(reply, op)
