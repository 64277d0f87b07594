"""`control_wire.call`, the one-request client `peerpost send` uses without an event loop,
gets what `ControlClient.call` gets from a real ControlServer: the result, the node's error
text, and the same errors when nothing listens or the node hangs up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crypto.codec import Fields
from overlay.app.control import ControlClient, ControlError, ControlServer, NodeNotRunning
from overlay.app.control_wire import call


async def _echo(a: Fields) -> Any:
    return {"got": a.str("text", max_len=100), "n": a.int("n", lo=0, hi=10, optional=True)}


async def _refuse(a: Fields) -> Any:
    raise ControlError("no message 'ab' in the inbox")


@contextlib.asynccontextmanager
async def _served(path: Path) -> AsyncIterator[None]:
    server = ControlServer(path, {"echo": _echo, "refuse": _refuse})
    await server.start()
    try:
        yield
    finally:
        await server.aclose()


async def _both(path: Path, op: str, **args: Any) -> tuple[Any, Any]:
    """(what ControlClient answers, what call answers); an error as its type and text."""
    async def by_client() -> Any:
        async with ControlClient(path) as c:
            return await c.call(op, **args)

    async def outcome(coro: Any) -> Any:
        try:
            return await coro
        except ControlError as exc:
            return type(exc), str(exc)
    return (await outcome(by_client()),
            await outcome(asyncio.to_thread(call, path, op, **args)))


@pytest.mark.parametrize(("op", "args"), [
    ("echo", {"text": "hello", "n": 3}),
    ("echo", {"text": "x" * 101}),  # refused by the handler's bounds
    ("refuse", {}),
    ("nope", {}),
])
async def test_same_answers_as_the_async_client(tmp_path: Path, op: str,
                                                args: dict[str, Any]) -> None:
    path = tmp_path / "control.sock"
    async with _served(path):
        by_client, by_call = await _both(path, op, **args)
    assert by_call == by_client
    if op == "echo" and args["text"] == "hello":
        assert by_call == {"got": "hello", "n": 3}


async def test_nothing_listening_is_node_not_running(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    by_client, by_call = await _both(path, "echo", text="x")
    assert by_call == by_client
    assert by_call[0] is NodeNotRunning and "is not running" in by_call[1]


async def test_a_node_that_hangs_up_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=str(path))
    async with server:
        by_client, by_call = await _both(path, "echo", text="x")
    assert by_call == by_client == (ControlError, "the node closed the control connection")
