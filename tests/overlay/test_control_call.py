"""`control_wire.call`, the one-request client `peerpost send` uses without an event loop,
gets what `ControlClient.call` gets from a real ControlServer: the result, the node's error
text, and the same errors when nothing listens or the node hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crypto.codec import Fields
from overlay.app.control import ControlClient, ControlError, ControlServer, NodeNotRunning
from overlay.app.control_wire import CLOSED_TEXT, call, frame


async def _echo(a: Fields) -> Any:
    return {"got": a.str("text", max_len=100), "n": a.int("n", lo=0, hi=10, optional=True)}


async def _refuse(a: Fields) -> Any:
    raise ControlError("no message 'ab' in the inbox")


async def _damaged(a: Fields) -> Any:
    raise sqlite3.DatabaseError("database disk image is malformed")  # as a bad page reads


@contextlib.asynccontextmanager
async def _served(path: Path) -> AsyncIterator[None]:
    server = ControlServer(path, {"echo": _echo, "refuse": _refuse, "damaged": _damaged})
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


async def test_a_caller_that_leaves_before_its_answer_is_no_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Ctrl-C on `peerpost fetch --wait` closes the socket while the node is answering:
    # nothing is logged as an error, and the next caller is served.
    path = tmp_path / "control.sock"
    asked, answer = asyncio.Event(), asyncio.Event()

    async def slow(a: Fields) -> Any:
        asked.set()
        await answer.wait()
        return {"text": "x" * 200_000}  # more than the socket takes before the peer is gone

    server = ControlServer(path, {"slow": slow, "echo": _echo})
    await server.start()
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
        writer.write(frame({"op": "slow", "args": {}}))
        await writer.drain()
        await asyncio.wait_for(asked.wait(), 10)
        writer.close()
        await writer.wait_closed()
        answer.set()
        async with ControlClient(path) as c:
            assert await c.call("echo", text="still here") == {"got": "still here", "n": None}
        handlers = {t for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "") == "ControlServer._serve"}
        if handlers:  # both connections' handlers end (the first's answer meets no caller)
            _, running = await asyncio.wait(handlers, timeout=10)
            assert not running, "a control connection's handler still runs"
    finally:
        await server.aclose()
    assert loop_errors == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_damaged_database_says_what_to_do_not_internal_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with _served(path):
        by_client, by_call = await _both(path, "damaged")
    assert by_client == by_call == (ControlError, (
        "a database of this node is damaged (database disk image is malformed): stop the "
        "node and start it again; it checks its files at start and says what to do"))


async def test_a_call_running_when_the_node_stops_ends_before_its_database_closes(
        tmp_path: Path) -> None:
    """The node stops its control socket, then closes its databases. A call still running
    (`fetch --wait`'s progress call waits up to 200 ms) is ended with its connection, so its
    caller hears that the node closed the connection, not "a database of this node is
    damaged (Cannot operate on a closed database.)" (seen in a loaded test run)."""
    path = tmp_path / "control.sock"
    db = sqlite3.connect(tmp_path / "node.db")
    asked, go = asyncio.Event(), asyncio.Event()

    async def progress(a: Fields) -> Any:
        asked.set()
        await go.wait()
        return db.execute("SELECT 1").fetchone()[0]

    server = ControlServer(path, {"progress": progress})
    await server.start()
    async with ControlClient(path) as c:
        waiting = asyncio.create_task(c.call("progress"))
        await asyncio.wait_for(asked.wait(), 10)
        await server.aclose()
        db.close()
        go.set()
        with pytest.raises(ControlError) as err:
            await asyncio.wait_for(waiting, 10)
    assert str(err.value) == CLOSED_TEXT
    assert not path.exists()
