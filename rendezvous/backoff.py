"""Exponential backoff with a cap and optional jitter, for every retry loop in the project.

Its callers: a client reconnecting to its server (0.1 s doubling to 30 s, jitter
0.5-1.0), a node waiting for its server at start (1 s doubling to 60 s), a client or node
trying again a server that did not prove the pinned key (30 s doubling to 300 s, jitter
0.8-1.0) and a download retried when no source is reachable (5 s doubling to 300 s, jitter
0.8-1.0). Jitter keeps
many clients cut off at the same moment from coming back at the same moment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """`delay(attempt)`: `base * 2**(attempt-1)`, at most `cap`, times a factor drawn
    uniformly from [`jitter`, 1.0] (1.0 when `jitter` is 1: no jitter)."""

    base: float
    cap: float
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap > 0):
            raise ValueError("backoff needs a positive base and cap")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter is a fraction in [0, 1]")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `attempt` + 1 (the first retry is 1)."""
        exponent = min(max(0, attempt - 1), 64)
        raw = min(self.cap, self.base * 2.0 ** exponent)
        if self.jitter >= 1.0:
            return raw
        r = (rng or random).random()
        return raw * (self.jitter + (1.0 - self.jitter) * r)
