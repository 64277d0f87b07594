"""Notice that the host slept (a laptop's lid closed and opened again).

asyncio's clock, CLOCK_MONOTONIC, stands still while the host is suspended; CLOCK_BOOTTIME
goes on. After ten minutes asleep, every timer of the node (the rendezvous keepalive's
PING after 20 s of silence, its 45 s limit) takes it that no time passed, while the
server closed the session long ago and the home NAT forgot its mapping: mail waited for
the next PING to fail. The difference BOOTTIME - MONOTONIC is the time spent suspended
since boot (`time_asleep`); when it grew by more than `WAKE_GAP` between two looks, the
host slept in between (`SleepWatch.slept`). A process stopped with SIGSTOP is no sleep:
both clocks go on.

The clock pair comes in as a function, so a test can put the host to sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Two clock readings are microseconds apart; a suspend and resume takes seconds at the
# least. Shorter naps are not worth a new login: the keepalive has slack for them.
WAKE_GAP = 3.0


def time_asleep() -> float:
    """Seconds the host has spent suspended since it booted (0 where unknown)."""
    boot = getattr(time, "CLOCK_BOOTTIME", None)
    if boot is None:  # not Linux: no sleep is seen
        return 0.0
    return time.clock_gettime(boot) - time.clock_gettime(time.CLOCK_MONOTONIC)


class SleepWatch:
    """Tells, at each `slept()`, how long the host slept since the previous look."""

    def __init__(self, asleep: Callable[[], float] = time_asleep, *,
                 gap: float = WAKE_GAP) -> None:
        self._asleep = asleep
        self.gap = gap
        self._seen = asleep()

    def slept(self) -> float:
        """Seconds asleep since the last call if over `gap`, else 0."""
        now = self._asleep()
        slept, self._seen = now - self._seen, now
        return slept if slept > self.gap else 0.0
