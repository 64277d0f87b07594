"""A node stops on SIGTERM even when Python 3.11's `asyncio.wait_for` loses the cancel: it
hands back the awaited result (or raises the awaited error) instead of the CancelledError
when both land in one loop iteration. `RendezvousClient.start` and every request made
while the session reconnects wait that way, and the loops around them ran for ever once
the cancel that should have ended them was gone."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.app.home import NodeHome
from overlay.app.node import Node
from overlay.mail.delivery import Delivery
from rendezvous.backoff import Backoff
from rendezvous.client import RendezvousClient
from rendezvous.taskset import TaskSet

ME = DeviceIdentity.from_seed(b"n" * 32)


async def _ends(task: asyncio.Task[Any], what: str) -> None:
    tasks = TaskSet("test")
    try:
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, f"{what} went on after its cancel"
        assert task.cancelled()
    finally:
        task.cancel()  # a second cancel ends what the first did not
        await asyncio.wait({task})
        await tasks.aclose()


class _Refusals:
    """`loop.create_connection` to a server that is down: the first attempt's refusal is
    held until the test lets it land, later ones are refused at once."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.first: asyncio.Future[Any] | None = None

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.first is None:
            self.first = asyncio.get_running_loop().create_future()
            self.asked.set()
            return await self.first
        raise ConnectionRefusedError(111, "Connection refused")


async def test_a_node_waiting_for_its_server_stops_when_the_refusal_ate_the_cancel(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`peerpost node` started while its server is down, then SIGTERM: the signal cancels
    the starting task as the connection attempt is refused. wait_for raised the refusal
    instead of the cancel, the first login took it for one more failed attempt, and the
    node retried with backoff until it was killed."""
    loop = asyncio.get_running_loop()
    refusals = _Refusals()
    monkeypatch.setattr(loop, "create_connection", refusals.create_connection)
    node = Node.__new__(Node)
    node.home = NodeHome(tmp_path)  # where it says why it waits
    node.config = SimpleNamespace(server="127.0.0.1:9")  # type: ignore[assignment]
    node.rendezvous = RendezvousClient("127.0.0.1", 9, ME, "n@example.net", reconnect=True,
                                       request_timeout=5.0)

    async def nowhere_else(client: RendezvousClient) -> None:
        return None

    node._failover = SimpleNamespace(login_elsewhere=nowhere_else)  # type: ignore[assignment]
    starting = loop.create_task(node._first_login())
    async with asyncio.timeout(10):
        await refusals.asked.wait()
    assert refusals.first is not None
    refusals.first.set_exception(ConnectionRefusedError(111, "Connection refused"))
    starting.cancel()  # SIGTERM, in the iteration the refusal lands
    await _ends(starting, "the first login")


class _Unanswered:
    """A session whose server never answers (requests time out)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.transport = None

    def request(self, make: Any) -> tuple[Any, asyncio.Future[Any]]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[len(self.pending)] = fut
        return SimpleNamespace(id=len(self.pending) - 1, TAG="RETRIEVE"), fut


class _Reconnecting(RendezvousClient):
    """A client between sessions: requests wait for the next one (`wait_connected`)."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 9, ME, "n@example.net", reconnect=True,
                         request_timeout=0.3)
        self.waiting = asyncio.Event()

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.waiting.set()
        await super().wait_connected(timeout)


async def test_a_retry_loop_of_the_node_stops_when_a_reconnect_ate_the_cancel(
        tmp_path: Path) -> None:
    """The node stops (its tasks are cancelled) while an envelope it could not store is
    asked for again and the session comes back in that very iteration: wait_connected
    returned instead of the cancel, and the retry loop went on asking for ever, so the
    node's TaskGroup never finished closing."""
    client = _Reconnecting()
    delivery = Delivery(client, None, None, None, None, None,  # type: ignore[arg-type]
                        archive=tmp_path, on_pipe=lambda m: False,
                        on_relay=lambda i: None, withdraw=_nothing,
                        lookup_backoff=Backoff(0.01, 0.05), rng=random.Random(1))
    delivery._unstored.add(b"m" * 16)
    retrying = asyncio.get_running_loop().create_task(delivery.unstored())
    async with asyncio.timeout(10):
        await client.waiting.wait()
    client._proto = _Unanswered()  # type: ignore[assignment]
    client._connected.set()  # the session is back...
    retrying.cancel()  # ...in the iteration the node's stop cancels the loop
    await _ends(retrying, "the retry loop")


async def _nothing(content_id: bytes) -> None:
    return None
