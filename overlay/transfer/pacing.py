"""How hard to drive one source: its measured rate, its request window, its stall deadline.

Sans-I/O: every method takes `now`. The downloader keeps one `SourcePace` per source.

- Rate: an exponentially weighted average of delivered bytes over time, with time constant
  `tau`, measured only while requests are outstanding (idle time says nothing about the
  source's speed).
- Window (GETs outstanding): `max(min_window, rate * target_latency / chunk_size)`,
  bounded by `max_window` (libtorrent sizes its request queue the same way, with 3 s).
  It starts at `min_window` and grows by one per delivered chunk while the window was
  full, as TCP's slow start does, so a new source doubles per round trip instead of
  receiving a burst of requests it may not be able to serve. While the window itself
  limits the rate, the rate says "more" whenever a round trip is under `target_latency`.
- Stall: a source is stalled when no reply came for `stall_chunks` chunk-times at its own
  measured rate (at least `min_stall`, at most `max_stall`); before the first chunk, the
  fixed `max_stall`. A fast source that stops is so dropped in seconds, not after 30 s, and
  a slow but steady one is never mistaken for a stalled one.
"""

from __future__ import annotations

import math


class SourcePace:
    """Rate, window and stall deadline of one source."""

    def __init__(
        self, chunk_size: int, *, min_window: int = 2, max_window: int = 32,
        target_latency: float = 1.0, min_stall: float = 2.0, max_stall: float = 30.0,
        stall_chunks: float = 8.0, tau: float = 1.0,
    ) -> None:
        if not 1 <= min_window <= max_window:
            raise ValueError("need 1 <= min_window <= max_window")
        if chunk_size <= 0 or target_latency <= 0 or tau <= 0:
            raise ValueError("chunk_size, target_latency and tau must be positive")
        self.chunk_size = chunk_size
        self.min_window = min_window
        self.max_window = max_window
        self.target_latency = target_latency
        self.min_stall = min(min_stall, max_stall)
        self.max_stall = max_stall
        self.stall_chunks = stall_chunks
        self.tau = tau
        self.rate: float | None = None  # bytes per second, None before the first chunk
        self.window = min_window
        self._since: float | None = None  # start of the current busy interval's last sample
        self.last_progress: float | None = None

    def target(self) -> int:
        """The window the measured rate asks for (min_window while unknown)."""
        if self.rate is None:
            return self.min_window
        want = math.ceil(self.rate * self.target_latency / self.chunk_size)
        return max(self.min_window, min(self.max_window, want))

    def busy(self, now: float) -> None:
        """Requests are outstanding (again): measure from here."""
        if self._since is None:
            self._since = now
            self.last_progress = now

    def idle(self) -> None:
        """Nothing is outstanding: the gap until the next request is not the source's."""
        self._since = None

    def delivered(self, nbytes: int, now: float, *, window_was_full: bool) -> None:
        """A chunk of `nbytes` arrived."""
        if self._since is not None:
            dt = max(now - self._since, 1e-6)
            inst = nbytes / dt
            if self.rate is None:
                self.rate = inst
            else:
                alpha = 1.0 - math.exp(-dt / self.tau)
                self.rate += alpha * (inst - self.rate)
        self._since = now
        self.last_progress = now
        target = self.target()
        if window_was_full and self.window < target:
            self.window += 1  # slow start: one more per chunk delivered while limited
        elif self.window > target:
            self.window = target

    def replied(self, now: float) -> None:
        """Some other reply (an error for one chunk) came: the source is alive."""
        if self._since is not None:
            self.last_progress = now

    def trickled(self, now: float) -> None:
        """Bytes of a chunk are still coming in: slow is not stalled. (A holder sharing a
        thin uplink with many requesters may take minutes over one 1 MiB chunk; judging
        it by whole chunks alone would drop every such source before any chunk lands.)"""
        if self._since is not None:
            self.last_progress = now

    def stall_after(self) -> float:
        """Seconds without a reply, while requests are outstanding, that count as a stall."""
        if self.rate is None or self.rate <= 0:
            return self.max_stall
        per_chunk = self.chunk_size / self.rate
        return min(self.max_stall, max(self.min_stall, self.stall_chunks * per_chunk))

    def deadline(self) -> float | None:
        """When the source counts as stalled (None: nothing outstanding)."""
        if self._since is None or self.last_progress is None:
            return None
        return self.last_progress + self.stall_after()
