"""Blocking per-chunk work (read + seal, verify + open + write) off the loop, in batches.

`asyncio.to_thread` per chunk costs a future, an executor hand-off and a loop wake-up each
way for every chunk, and on a busy two-core machine every one of those wake-ups is a
context switch and a wait for the GIL. A `WorkQueue` instead lets each of its `workers`
executor calls take job after job until none is left, so a thread with work keeps going,
and reports back in batches: the first result after a drain schedules the next drain on
the loop (`call_soon_threadsafe`), later ones join it. Receiving 1 GiB this way the
receiving node made 1.6 context switches per chunk instead of 9.5.

It goes through `loop.run_in_executor`, so a loop that runs executor work inline (the
simulator's) does each job at once, as it did with `to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

# Longest a thread started by `start` waits for the others to start (a thread the system
# would not start ends the wait at once; this only bounds a start that is slow).
START_WAIT = 1.0

J = TypeVar("J")
R = TypeVar("R")


class WorkQueue(Generic[J, R]):
    """Runs `work(job)` on up to `workers` threads; `on_done([(job, result, error)])` on the
    loop, in the order the jobs finished, `error` set (and `result` None) where it raised.

    `pending` counts jobs submitted and not yet reported; `changed()` waits for the next
    report. Submit from the loop thread only."""

    def __init__(self, work: Callable[[J], R],
                 on_done: Callable[[list[tuple[J, R | None, BaseException | None]]], None],
                 *, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._work = work
        self._on_done = on_done
        self._workers = workers
        self._name = name
        self._jobs: queue.SimpleQueue[J] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[tuple[J, R | None, BaseException | None]] = []  # under _lock
        self._drain_due = False  # under _lock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._executor: ThreadPoolExecutor | None = None
        self._started = False  # `start` ran since the executor was made
        # `start`'s first thread is starting the others: jobs wait for it, so that the
        # executor is not asked for a thread on the loop meanwhile. Set on the loop, cleared
        # by that thread.
        self._starting = False
        self._running: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Event()
        self.pending = 0

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
        return loop

    def start(self) -> None:
        """Start the `workers` threads now, idle. Otherwise the executor starts each inside
        the `submit` that first needs it, and the loop waits until the new thread runs: on
        a session's first GETs, with the first sealer already working and both cores busy,
        that held the loop (and the replies and chunks it had to send) 1-7 ms a thread.
        Here the loop waits for the first thread only, which starts the others; jobs
        submitted meanwhile wait for them. The threads stay until `aclose`, as they do
        after any job. An executor that runs work inline (the simulator's loop) starts
        none. Once per queue; from the loop thread."""
        loop = self._bind()
        if self._started or self._running:  # threads in use are started already
            return
        self._started = self._starting = True
        try:
            fut = loop.run_in_executor(self._executor, self._start_others)
        except BaseException:
            self._starting = False
            raise
        self._running.add(fut)
        fut.add_done_callback(self._ended)

    def _start_others(self) -> None:
        """The first thread's first call (`start`): start the other threads, then take jobs
        as `_run` does."""
        executor, loop = self._executor, self._loop  # `aclose` waits for this call
        inline = threading.get_ident() == self._loop_thread
        try:
            if not inline and executor is not None and self._workers > 1:
                # Each holds its thread until all have one, so that the executor, asked
                # again, starts another thread instead of handing the call to one just idle.
                gate = threading.Barrier(self._workers - 1)
                try:
                    for _ in range(self._workers - 1):
                        executor.submit(_wait_at, gate)
                except RuntimeError:  # no thread could be started: jobs start one as before
                    gate.abort()
        finally:
            self._starting = False
            if not inline and loop is not None:  # jobs that came meanwhile go to them too
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self._spawn_queued)
        self._run()

    def submit(self, job: J) -> None:
        self._bind()
        self.pending += 1
        self._jobs.put(job)
        self._spawn()

    def _spawn(self) -> None:
        if (self._loop is None or self._starting or len(self._running) >= self._workers
                or self._jobs.empty()):
            return
        fut = self._loop.run_in_executor(self._executor, self._run)
        self._running.add(fut)
        fut.add_done_callback(self._ended)

    def _spawn_queued(self) -> None:
        """A call for each job queued, up to `workers` calls running."""
        for _ in range(min(self._jobs.qsize(), self._workers)):
            self._spawn()

    def _ended(self, fut: asyncio.Future[None]) -> None:
        self._running.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:  # pragma: no cover - a bug
            raise fut.exception()  # type: ignore[misc]
        # A job submitted while this call was finding the queue empty: nobody took it.
        self._spawn()

    def _run(self) -> None:
        """One executor call: jobs until the queue is empty."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                out: tuple[J, R | None, BaseException | None] = (job, self._work(job), None)
            except Exception as exc:  # the loop decides what it means
                out = (job, None, exc)
            with self._lock:
                self._done.append(out)
                if self._drain_due:
                    continue
                self._drain_due = True
            loop = self._loop
            if loop is None:
                continue
            if threading.get_ident() == self._loop_thread:  # an executor that runs inline
                loop.call_soon(self._drain)
                continue
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._drain_due = False
        if not done:
            return
        self.pending -= len(done)
        # Wake every waiter once: they wait on the current Event, which is then replaced.
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_done(done)

    async def changed(self) -> None:
        """Until the next batch of results has been reported."""
        await self._changed.wait()

    async def aclose(self) -> None:
        """Let the running calls finish what was submitted (a few chunks), report it, and
        stop the threads."""
        while self._running:
            await asyncio.wait(list(self._running))
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._started = False
        self._loop = None


def _wait_at(gate: threading.Barrier) -> None:
    with contextlib.suppress(threading.BrokenBarrierError):
        gate.wait(START_WAIT)
