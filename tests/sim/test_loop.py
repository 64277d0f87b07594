"""The virtual-time loop: asyncio's timing primitives run in virtual time, fast."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sim.loop import SimDeadlock
from sim.network.host import NoHostError
from sim.simulation import Simulation


def test_an_hour_of_sleep_takes_no_wall_time(sim: Simulation) -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - t0

    wall = time.perf_counter()
    assert sim.run(main()) == pytest.approx(3600.0)
    assert time.perf_counter() - wall < 0.5
    assert sim.now == pytest.approx(3600.0)


def test_timeouts_wait_for_call_later_and_taskgroups(sim: Simulation) -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []
        loop.call_later(5, lambda: seen.append(("call_later", loop.time())))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.sleep(10)
        seen.append(("timeout", loop.time()))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 1)
        seen.append(("wait_for", loop.time()))

        async def nap(s: float) -> None:
            await asyncio.sleep(s)
            seen.append((f"nap{s:g}", loop.time()))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(nap(7))
            tg.create_task(nap(4))
        return seen

    assert sim.run(main()) == [("timeout", 2.0), ("wait_for", 3.0), ("call_later", 5.0),
                               ("nap4", 7.0), ("nap7", 10.0)]


def test_to_thread_runs_inline_without_virtual_time(sim: Simulation) -> None:
    async def main() -> tuple[int, float, bool]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        main_thread = threading.get_ident()
        value, tid = await asyncio.to_thread(lambda: (sum(range(1000)), threading.get_ident()))
        return value, loop.time() - t0, tid == main_thread

    assert sim.run(main()) == (499500, 0.0, True)


def test_executor_exceptions_reach_the_caller(sim: Simulation) -> None:
    def boom() -> None:
        raise ValueError("bad chunk")

    async def main() -> None:
        await asyncio.get_running_loop().run_in_executor(None, boom)

    with pytest.raises(ValueError, match="bad chunk"):
        sim.run(main())


def test_sockets_outside_a_host_are_refused_with_a_clear_error(sim: Simulation) -> None:
    async def main() -> None:
        await asyncio.open_connection("10.0.0.1", 80)

    with pytest.raises(NoHostError, match="not running as a simulated host"):
        sim.run(main())


def test_deadlock_is_reported_with_each_hosts_waits(sim: Simulation) -> None:
    a = sim.add_host("alice")
    b = sim.add_host("bob")

    async def wait_for_bob(event: asyncio.Event) -> None:
        await event.wait()

    async def read_forever() -> None:
        server = await asyncio.start_server(lambda r, w: None, None, 0)
        async with server:
            reader, _ = await asyncio.open_connection(b.address, server.sockets[0].getsockname()[1])
            await reader.read(1)

    async def main() -> None:
        event = asyncio.Event()
        t1 = a.create_task(wait_for_bob(event), name="waiter")
        t2 = b.create_task(read_forever(), name="reader")
        await asyncio.gather(t1, t2)

    with pytest.raises(SimDeadlock) as info:
        sim.run(main())
    waits = info.value.waits
    assert set(waits) == {"alice", "bob", "(no host)"}
    assert any("wait_for_bob" in w and "Event.wait" in w for w in waits["alice"])
    assert any("read_forever" in w and "StreamReader" in w for w in waits["bob"])
    assert "every task waits" in str(info.value)


def test_run_timeout_is_virtual() -> None:
    with Simulation(seed=3) as sim:
        with pytest.raises(TimeoutError):
            sim.run(asyncio.sleep(100), timeout=30)
        assert sim.now == pytest.approx(30.0)
