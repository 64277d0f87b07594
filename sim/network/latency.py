"""Latency models: how long a packet takes between two hosts, one way, in seconds.

`FixedLatency` is a matrix with a default. `CoordinateLatency` places each host on a plane
(distance = propagation delay) plus a per-host access delay and optional random jitter, a
simple Vivaldi-like picture of the Internet. Stream transports keep their own ordering, so
jitter reorders only datagrams.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Protocol

from sim.network.host import Host


class LatencyModel(Protocol):
    """What the network asks of a latency model."""

    def place(self, host: Host) -> None:
        """Called once when `host` joins the network."""

    def one_way(self, a: Host, b: Host) -> float:
        """One-way delay from `a` to `b` for the packet being sent now."""
        ...


class FixedLatency:
    """A default one-way delay, overridden for some pairs of host names (both directions)."""

    def __init__(self, default: float = 0.01,
                 pairs: Mapping[tuple[str, str], float] | None = None) -> None:
        if default < 0:
            raise ValueError("latency must be >= 0")
        self.default = default
        self._pairs: dict[tuple[str, str], float] = {}
        for (a, b), v in (pairs or {}).items():
            self.set(a, b, v)

    def set(self, a: str, b: str, seconds: float) -> None:
        """Set the one-way delay between hosts named `a` and `b`."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._pairs[(a, b)] = seconds
        self._pairs[(b, a)] = seconds

    def place(self, host: Host) -> None:
        """Nothing to place: the matrix is by name."""

    def one_way(self, a: Host, b: Host) -> float:
        """The pair's delay, or the default."""
        if not self._pairs:
            return self.default
        return self._pairs.get((a.name, b.name), self.default)


class CoordinateLatency:
    """Hosts at random points of a square `spread` seconds wide, plus access delay and jitter.

    one_way(a, b) = distance(a, b) + access(a) + access(b) + uniform(0, jitter).
    """

    def __init__(self, rng: random.Random, *, spread: float = 0.1,
                 access: tuple[float, float] = (0.001, 0.01), jitter: float = 0.0) -> None:
        self._rng = rng
        self.spread = spread
        self.access = access
        self.jitter = jitter
        self._where: dict[int, tuple[float, float, float]] = {}

    def place(self, host: Host) -> None:
        """Draw the host's coordinates and access delay."""
        r = self._rng
        self._where[host.index] = (r.uniform(0, self.spread), r.uniform(0, self.spread),
                                   r.uniform(*self.access))

    def one_way(self, a: Host, b: Host) -> float:
        """Distance plus both access delays plus jitter."""
        xa, ya, da = self._where[a.index]
        xb, yb, db = self._where[b.index]
        d = math.hypot(xa - xb, ya - yb) + da + db
        if self.jitter:
            d += self._rng.uniform(0.0, self.jitter)
        return d


_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class PairwiseRtt:
    """Each pair of hosts gets its own round-trip time, uniform in `rtt` (seconds), the same
    both ways and for the whole run; one way is half of it.

    Drawn from a hash of (seed, pair) rather than stored, so 10,000 hosts cost no memory.
    """

    def __init__(self, seed: int, rtt: tuple[float, float] = (0.020, 0.200)) -> None:
        if not 0 <= rtt[0] <= rtt[1]:
            raise ValueError("rtt must be [low, high] with 0 <= low <= high")
        self._seed = _mix(seed & _MASK)
        self.rtt = rtt

    def place(self, host: Host) -> None:
        """Nothing to place: delays come from the pair."""

    def one_way(self, a: Host, b: Host) -> float:
        """Half the pair's round-trip time."""
        i, j = (a.index, b.index) if a.index < b.index else (b.index, a.index)
        u = _mix(self._seed ^ (i << 32) ^ j) / 2.0**64
        lo, hi = self.rtt
        return (lo + (hi - lo) * u) / 2
