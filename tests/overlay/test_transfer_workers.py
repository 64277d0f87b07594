"""Tier (a): the WorkQueue that files and seals chunks off the loop, in batches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from overlay.transfer.workers import WorkQueue

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
