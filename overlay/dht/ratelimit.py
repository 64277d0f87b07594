"""Requests the DHT answers per source: its rates for `rendezvous.limits.SourceLimiter`.

A source over its rate gets no reply (the datagram is counted and dropped). A source is an
IPv4 address or an IPv6 /64 (`rendezvous.limits.source_key`), so fresh addresses from one
/64 share one bucket instead of bringing a fresh burst each.
"""

from __future__ import annotations

from rendezvous.limits import SourceLimiter

# A lookup asks each node once or twice; a node behind one address running a few lookups
# at once, or a household behind one NAT (or on one IPv6 /64), stays well under this.
SOURCE_RATE = 50.0     # requests per second per source...
SOURCE_BURST = 200.0   # ...with this burst
MAX_SOURCES = 10_000   # about 1.5 MB of buckets


def dht_source_limiter(rate: float = SOURCE_RATE, burst: float = SOURCE_BURST,
                       max_sources: int = MAX_SOURCES) -> SourceLimiter:
    """The DHT's per-source limiter, with its defaults."""
    return SourceLimiter(rate, burst, max_sources)
