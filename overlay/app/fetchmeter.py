"""`FetchMeter`: counts what the download queue's fetcher does, for `--metrics`.

It wraps the fetcher and counts each attempt's outcome (complete, retry, failed,
cancelled) and the bytes each source delivered, by path (tcp, tcp-punch, quic, webrtc, relay): an
attempt's bytes count while it runs (its live source views, `Activity.attempt`) and are
kept once it ends, so the byte counter only grows. It imports nothing of Prometheus, so
the node always has one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator

from crypto.location import LocationMessage
from overlay.mail.downloads import Activity, Fetcher, RetryLater, SourceView
from overlay.mail.inbox import InboxEntry

OUTCOMES = ("complete", "retry", "failed", "cancelled")
PATHS = ("tcp", "tcp-punch", "quic", "webrtc", "relay")


class FetchMeter:
    """A `Fetcher` that counts what the one it wraps does (see the module docstring)."""

    def __init__(self, inner: Fetcher) -> None:
        self.inner = inner
        self.outcomes: Counter[str] = Counter({o: 0 for o in OUTCOMES})
        self.bytes_done: Counter[str] = Counter({p: 0 for p in PATHS})
        # running attempts: activity -> its source views as they were when it started
        self._live: dict[int, tuple[Activity, dict[tuple[str, str], SourceView]]] = {}

    async def __call__(self, entry: InboxEntry, msg: LocationMessage, act: Activity,
                       progress: Callable[[int], None]) -> str:
        key = id(act)
        self._live[key] = (act, act.attempt)
        outcome = "failed"
        try:
            path = await self.inner(entry, msg, act, progress)
            outcome = "complete"
            return path
        except RetryLater:
            outcome = "retry"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.outcomes[outcome] += 1
            _, before = self._live.pop(key)
            if act.attempt is not before:
                for src in act.attempt.values():
                    self.bytes_done[src.path] += src.bytes

    def _running(self) -> Iterator[SourceView]:
        for act, before in self._live.values():
            if act.attempt is not before:
                yield from act.attempt.values()

    def bytes_by_path(self) -> Counter[str]:
        out = Counter(self.bytes_done)
        for src in self._running():
            out[src.path] += src.bytes
        return out

    def sources_by_path(self) -> Counter[str]:
        out: Counter[str] = Counter({p: 0 for p in PATHS})
        for src in self._running():
            if not src.banned and not src.left:
                out[src.path] += 1
        return out

    @property
    def running(self) -> int:
        return len(self._live)
