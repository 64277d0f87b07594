"""A token bucket for the serving side's `--max-upload-rate`, sans-I/O (time comes in)."""

from __future__ import annotations


class TokenBucket:
    """`rate` bytes per second with bursts of up to `burst` bytes.

    `reserve(n, now)` takes n bytes' worth of tokens, going into debt if need be, and says
    how long to wait before sending them; so a large chunk is never starved by small ones
    and the long-run rate holds exactly.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def reserve(self, n: int, now: float) -> float:
        """Seconds to wait before sending `n` bytes (0.0 if they may go now)."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
