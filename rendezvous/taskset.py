"""The tasks one object owns: bounded, a failed child logged, `aclose()` cancels and awaits.

A server's connection handlers, an endpoint's negotiations, a directory's announces and a
queue's downloads are children whose number grows with outside input, and each must end
with its owner. `asyncio.TaskGroup` fits a fixed set of children that fail together; here
one child's failure is logged and the others carry on, the set has a limit, and a child
can be found and cancelled by key (a download by its message id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable, Iterable, Iterator
from typing import Any

log = logging.getLogger("peerpost.tasks")


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task was cancelled although no await raised it.

    Python 3.11's `asyncio.wait_for` returns the awaited result (or raises its error)
    instead of the caller's CancelledError when both land in one loop iteration, and so
    does everything built on it (dnspython's resolver, `RendezvousClient.start` and its
    requests while reconnecting). The cancel is lost but `Task.cancelling()` still counts
    it: a loop that runs until cancelled calls this once per round, or it goes on for ever
    and the `aclose()` waiting for it never returns."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_ended(tasks: Iterable[asyncio.Task[Any]]) -> asyncio.CancelledError | None:
    """Wait until every one of `tasks` has ended, even if the calling task is cancelled
    meanwhile (their cleanup is not cut short); that cancel is returned, for the caller to
    raise once it has finished closing. Never raises a task's own error or cancel."""
    pending = set(tasks)
    cancelled: asyncio.CancelledError | None = None
    while pending:
        try:
            # asyncio.wait raises only the caller's own cancel, never a task's.
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    return cancelled


class TaskSetClosed(RuntimeError):
    """`spawn` after `aclose`: the owner is shutting down."""


class TaskSet:
    """Children of one owner. `limit` bounds how many run at once (None: no bound)."""

    def __init__(self, name: str, *, limit: int | None = None,
                 logger: logging.Logger | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("a task set's limit is at least 1")
        self.name = name
        self.limit = limit
        self._log = logger or log
        self._tasks: dict[asyncio.Task[Any], Hashable | None] = {}
        self._by_key: dict[Hashable, asyncio.Task[Any]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self._tasks) >= self.limit

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, key: Hashable) -> asyncio.Task[Any] | None:
        """The running child spawned with `key`, if any."""
        return self._by_key.get(key)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None,
              key: Hashable | None = None) -> asyncio.Task[Any] | None:
        """Run `coro` as a child. Returns None, and closes `coro` unrun, when the set is
        full or a child with `key` already runs; raises TaskSetClosed after `aclose`."""
        if self._closed:
            coro.close()
            raise TaskSetClosed(f"{self.name}: closed")
        if self.full or (key is not None and key in self._by_key):
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = key
        if key is not None:
            self._by_key[key] = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task not in self._tasks:
            return
        key = self._tasks.pop(task)
        if key is not None and self._by_key.get(key) is task:
            del self._by_key[key]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("%s: task %s failed", self.name, task.get_name(),
                            exc_info=(type(exc), exc, exc.__traceback__))

    def cancel(self, key: Hashable) -> bool:
        """Cancel the child spawned with `key`; False if none runs."""
        task = self._by_key.get(key)
        if task is None:
            return False
        task.cancel()
        return True

    async def wait(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every child present now has ended, or `timeout` seconds passed."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def aclose(self) -> None:
        """Refuse new children, cancel every child and wait for all of them to end.

        If the task calling this is cancelled meanwhile, the children are still awaited
        (their cleanup is not cut short), and then that CancelledError is raised: the caller's
        owner is stopping it, and the caller must not carry on as if `aclose()` had just
        returned (an `asyncio.timeout` around it raises TimeoutError as it should)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        cancelled = await wait_ended(tasks)
        for task in tasks:  # their done callbacks may not have run yet
            self._done(task)
        if cancelled is not None:
            raise cancelled

    async def __aenter__(self) -> TaskSet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
