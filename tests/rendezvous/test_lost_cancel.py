"""Loops that run until cancelled end even when Python 3.11's `asyncio.wait_for` loses the
cancel: it hands back the awaited result instead of the CancelledError when both land in
one loop iteration. The cancel is still counted (`Task.cancelling()`), and
`raise_if_cancelled()` turns it back into a CancelledError at the loop's next round."""

from __future__ import annotations

import asyncio
from typing import Any

from rendezvous.instances import PgInstanceBus
from rendezvous.taskset import TaskSet, raise_if_cancelled
from tests.rendezvous.test_instances import FakeHost


async def test_wait_for_loses_a_cancel_that_lands_with_its_result() -> None:
    """The Python behaviour every fix here rests on (3.11; 3.12 reworked wait_for)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[int] = loop.create_future()
    seen: list[str] = []

    async def waiter() -> None:
        got = await asyncio.wait_for(answer, 10)
        seen.append(f"got {got}")
        try:
            raise_if_cancelled()
        except asyncio.CancelledError:
            seen.append("cancel counted")
            raise

    task = loop.create_task(waiter())
    await asyncio.sleep(0)
    answer.set_result(1)
    task.cancel()  # the same iteration as the answer
    await asyncio.wait([task])
    assert task.cancelled()
    assert seen == ["got 1", "cancel counted"]


class _AnswersAsClosed:
    """The bus's LISTEN connection, but the first `SELECT 1` of a heartbeat waits until
    the test answers it; later ones answer at once."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.asked = asyncio.Event()
        self.answer: asyncio.Future[int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def fetchval(self, query: str, *args: Any) -> Any:
        if self.answer is None:
            self.answer = asyncio.get_running_loop().create_future()
            self.asked.set()
            return self.answer
        return self._inner.fetchval(query, *args)


async def test_an_instance_bus_closes_when_its_heartbeat_wait_ate_the_cancel(
        pg_url: str) -> None:
    """`serve --store postgresql://...` on SIGTERM: the bus's aclose cancels the heartbeat
    while its `SELECT 1` (under asyncio.wait_for) answers in the same iteration. The
    heartbeat loop went on for ever and the server never finished stopping."""
    import asyncpg  # pg_url has checked it is there

    from rendezvous.pg_schema import migrate

    conn = await asyncpg.connect(pg_url)
    await migrate(conn)
    await conn.close()
    bus = PgInstanceBus(pg_url, heartbeat=0.05)
    await bus.start(FakeHost(), ("127.0.0.1", 1001))
    listener = _AnswersAsClosed(bus._listener)
    bus._listener = listener
    async with asyncio.timeout(10):
        await listener.asked.wait()  # the heartbeat waits for its SELECT 1
    tasks = TaskSet("test")
    assert listener.answer is not None
    listener.answer.set_result(1)
    closing = tasks.spawn(bus.aclose())  # its cancel lands with the answer
    assert closing is not None
    try:
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert closing in done, "the bus did not close: its heartbeat goes on"
    finally:
        for task in bus._tasks:  # a second cancel ends what the first did not
            task.cancel()
        await tasks.aclose()
