"""Requests answered per source IP: a token bucket each, in a bounded table.

A source over its rate gets no reply (the datagram is counted and dropped). The table
keeps the `max_sources` most recently heard sources; the least recently heard one makes
way for a new one, so a flood from many (spoofed) addresses costs memory up to the bound
and at worst hands an evicted source a fresh burst.
"""

from __future__ import annotations

from collections import OrderedDict

from rendezvous.limits import TokenBucket

# A lookup asks each node once or twice; a node behind one address running a few lookups
# at once, or a household behind one NAT, stays well under this.
SOURCE_RATE = 50.0     # requests per second per source IP...
SOURCE_BURST = 200.0   # ...with this burst
MAX_SOURCES = 10_000   # about 1.5 MB of buckets


class SourceLimiter:
    """`allow(ip, now)`: whether to answer one more request from `ip`."""

    def __init__(self, rate: float = SOURCE_RATE, burst: float = SOURCE_BURST,
                 max_sources: int = MAX_SOURCES) -> None:
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, now: float) -> bool:
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(ip)
        return bucket.take(1.0, now)
