"""Tier (a): the WorkQueue that files and seals chunks off the loop, in batches."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from overlay.transfer.workers import WorkQueue

T = TypeVar("T")
Done = list[tuple[int, int | None, BaseException | None]]


async def test_results_come_back_in_batches_errors_included() -> None:
    gate = threading.Event()
    batches: list[Done] = []

    def work(n: int) -> int:
        gate.wait(5)
        if n == 3:
            raise ValueError("three")
        return n * n

    q: WorkQueue[int, int] = WorkQueue(work, batches.append, workers=1, name="t")
    for n in range(6):
        q.submit(n)
    assert q.pending == 6
    gate.set()
    async with asyncio.timeout(5):
        while q.pending:
            await q.changed()
    got = [item for batch in batches for item in batch]
    assert [(j, r) for j, r, _ in got] == [(0, 0), (1, 1), (2, 4), (3, None), (4, 16), (5, 25)]
    [err] = [e for _, _, e in got if e is not None]
    assert isinstance(err, ValueError) and str(err) == "three"
    # One worker that never ran dry: far fewer reports than jobs.
    assert len(batches) < 6
    await q.aclose()


async def test_at_most_workers_threads_and_aclose_reports_what_was_running() -> None:
    started = threading.Semaphore(0)
    gate = threading.Event()
    running: set[str] = set()
    most = [0]
    lock = threading.Lock()
    done: Done = []

    def work(n: int) -> int:
        with lock:
            running.add(threading.current_thread().name)
            most[0] = max(most[0], len(running))
        started.release()
        gate.wait(5)
        with lock:
            running.discard(threading.current_thread().name)
        return n

    q: WorkQueue[int, int] = WorkQueue(work, done.extend, workers=2, name="t")
    for n in range(5):
        q.submit(n)
    for _ in range(2):
        assert await asyncio.to_thread(started.acquire, True, 5)
    gate.set()
    await q.aclose()
    assert sorted(j for j, _, _ in done) == [0, 1, 2, 3, 4]
    assert most[0] == 2 and q.pending == 0


async def test_a_job_submitted_as_the_worker_runs_dry_is_not_lost() -> None:
    done: Done = []
    q: WorkQueue[int, int] = WorkQueue(lambda n: n, done.extend, workers=1, name="t")
    async with asyncio.timeout(5):
        for n in range(200):
            q.submit(n)
            if n % 7 == 0:
                await asyncio.sleep(0)
        while q.pending:
            await q.changed()
    assert sorted(j for j, _, _ in done) == list(range(200))
    await q.aclose()


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkQueue(lambda n: n, lambda d: None, workers=0, name="t")


def _threads(prefix: str) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(prefix + "_")}


async def test_start_runs_every_worker_and_the_loop_waits_for_one_start_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    real_start = threading.Thread.start
    on_loop: list[str] = []  # warm-t threads started on the loop's thread
    elsewhere: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("warm-t_"):
            (on_loop if threading.get_ident() == loop_thread else elsewhere).append(
                thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    started = threading.Semaphore(0)
    gate = threading.Event()
    done: Done = []
    running, most, lock = [0], [0], threading.Lock()

    def work(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started.release()
        gate.wait(5)
        with lock:
            running[0] -= 1
        return n

    q: WorkQueue[int, int] = WorkQueue(work, done.extend, workers=3, name="warm-t")
    q.start()
    assert on_loop == ["warm-t_0"]  # the first starts the other two
    q.start()  # once per queue
    for n in range(5):  # at once: the other two may not have started yet
        q.submit(n)
    for _ in range(3):  # three jobs at once: three threads
        assert await asyncio.to_thread(started.acquire, True, 5)
    gate.set()
    async with asyncio.timeout(5):
        while q.pending:
            await q.changed()
    assert sorted(j for j, _, _ in done) == [0, 1, 2, 3, 4] and most[0] == 3
    assert on_loop == ["warm-t_0"]  # no submit started one on the loop
    assert sorted(elsewhere) == ["warm-t_1", "warm-t_2"]
    await q.aclose()


class _InlineLoop(asyncio.SelectorEventLoop):
    """A loop that runs executor work at once on the loop's thread, as the simulator's."""

    def run_in_executor(self, executor: object, func: Callable[..., T],
                        *args: object) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.create_future()
        fut.set_result(func(*args))
        return fut


def test_start_on_a_loop_that_runs_work_inline_starts_no_thread() -> None:
    async def main() -> list[int]:
        done: Done = []
        q: WorkQueue[int, int] = WorkQueue(lambda n: n + 1, done.extend, workers=2,
                                           name="inline-t")
        q.start()
        assert not _threads("inline-t")
        q.submit(1)
        while q.pending:
            await q.changed()
        await q.aclose()
        return [r for _, r, _ in done if r is not None]

    with asyncio.Runner(loop_factory=_InlineLoop) as runner:
        assert runner.run(main()) == [2]


async def test_start_of_one_worker_then_jobs() -> None:
    done: Done = []
    q: WorkQueue[int, int] = WorkQueue(lambda n: -n, done.extend, workers=1, name="one-t")
    q.start()
    for n in range(3):
        q.submit(n)
    async with asyncio.timeout(5):
        while q.pending:
            await q.changed()
    assert sorted(r for _, r, _ in done if r is not None) == [-2, -1, 0]
    await q.aclose()
