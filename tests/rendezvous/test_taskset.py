"""TaskSet (the one nursery every owner uses) and Backoff (the one retry policy shape)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from rendezvous.backoff import Backoff
from rendezvous.taskset import TaskSet, TaskSetClosed


async def test_a_full_set_refuses_and_a_closed_set_raises() -> None:
    tasks = TaskSet("t", limit=2)
    gate = asyncio.Event()
    assert tasks.spawn(gate.wait()) is not None
    assert tasks.spawn(gate.wait()) is not None
    assert tasks.full and tasks.spawn(gate.wait()) is None  # refused, and never awaited
    gate.set()
    await tasks.wait()
    assert len(tasks) == 0 and not tasks.full
    await tasks.aclose()

    async def never() -> None:
        raise AssertionError("a closed set must not run a child")

    with pytest.raises(TaskSetClosed):
        tasks.spawn(never())


async def test_aclose_cancels_and_awaits_every_child() -> None:
    tasks = TaskSet("t")
    ended: list[str] = []

    async def child(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    for n in "abc":
        tasks.spawn(child(n), name=n)
    await asyncio.sleep(0)
    await tasks.aclose()
    assert sorted(ended) == ["a", "b", "c"] and len(tasks) == 0


async def test_a_failing_child_is_logged_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("owner")
    survivor = asyncio.Event()

    async def bad() -> None:
        raise RuntimeError("boom")

    async def good() -> None:
        await asyncio.sleep(0.01)
        survivor.set()

    with caplog.at_level(logging.ERROR, logger="peerpost.tasks"):
        tasks.spawn(bad(), name="bad-child")
        tasks.spawn(good())
        async with asyncio.timeout(5):
            await survivor.wait()
    assert "owner: task bad-child failed" in caplog.text and "boom" in caplog.text
    await tasks.aclose()


async def test_keys_name_one_child_each() -> None:
    tasks = TaskSet("t")
    first = tasks.spawn(asyncio.sleep(3600), key=b"m1")
    assert first is not None and b"m1" in tasks and tasks.get(b"m1") is first
    assert tasks.spawn(asyncio.sleep(3600), key=b"m1") is None  # one per key
    assert tasks.cancel(b"m1") and not tasks.cancel(b"other")
    await asyncio.wait([first])
    assert b"m1" not in tasks
    await tasks.aclose()


def test_backoff_doubles_up_to_its_cap_with_jitter_inside_its_band() -> None:
    plain = Backoff(1.0, 60.0)
    assert [plain.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert plain.delay(0) == 1.0 and plain.delay(10_000) == 60.0
    jittered = Backoff(5.0, 300.0, jitter=0.8)
    rng = random.Random(1)
    for n in range(1, 20):
        raw = min(300.0, 5.0 * 2 ** (n - 1))
        assert 0.8 * raw <= jittered.delay(n, rng) <= raw
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(1, 2, jitter=1.5)


async def test_aclose_finishes_closing_then_passes_on_the_callers_own_cancel() -> None:
    """The task closing a set is itself cancelled meanwhile (its own owner stops): every
    child still ends before `aclose()` returns, and then the caller's CancelledError goes
    on; `aclose()` used to eat it and the caller carried on as if nothing had happened."""
    tasks = TaskSet("t")
    cleaning = asyncio.Event()
    cleaned = asyncio.Event()
    release = asyncio.Event()
    after: list[str] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # e.g. a socket flushing its last bytes
            cleaned.set()
            raise

    async def quick() -> None:
        await asyncio.sleep(3600)

    tasks.spawn(slow_to_stop(), name="slow")
    tasks.spawn(quick(), name="quick")
    await asyncio.sleep(0)

    async def owner() -> None:
        await tasks.aclose()
        after.append("carried on")

    closing = asyncio.get_running_loop().create_task(owner())
    async with asyncio.timeout(5):
        await cleaning.wait()
    closing.cancel()
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(5):
        await asyncio.wait([closing])
    assert closing.cancelled(), f"the owner's cancel was lost: {after}"
    assert cleaned.is_set() and len(tasks) == 0, "aclose returned before its children ended"


async def test_aclose_under_a_timeout_still_raises_timeout() -> None:
    """`asyncio.timeout` around `aclose()` sees its own cancel come back as TimeoutError."""
    tasks = TaskSet("t")
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()

    tasks.spawn(slow_to_stop())
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.2, release.set)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await tasks.aclose()
    assert len(tasks) == 0
