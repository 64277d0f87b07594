"""Churn: session and downtime lengths drawn from distributions, and hosts going down and up.

Measured peer-to-peer sessions are heavy-tailed: Trautwein et al., "Design and evaluation of
IPFS" (SIGCOMM 2022), report 87.6% of sessions shorter than 8 hours and 2.5% longer than
24 hours. `ipfs_sessions()` is the Weibull distribution through those two points
(shape 0.518, scale 1.93 h, median about 57 min).

`Churn` owns one timer per host (no tasks): `start()` schedules the first change, each change
takes the host offline (`Host.go_offline`: its connections reset, datagrams to it vanish) or
online again and schedules the next; `stop()` cancels them. `on_change(host, online)` lets a
scenario restart the host's software when it comes back.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from sim.network.host import Host

HOUR = 3600.0


class Distribution(Protocol):
    """A distribution of durations in seconds."""

    def sample(self, rng: random.Random) -> float:
        """One draw."""
        ...


@dataclass(frozen=True, slots=True)
class Fixed:
    """Always `seconds`."""

    seconds: float

    def sample(self, rng: random.Random) -> float:
        """`seconds`."""
        return self.seconds


@dataclass(frozen=True, slots=True)
class Exponential:
    """Memoryless sessions with the given mean."""

    mean: float

    def sample(self, rng: random.Random) -> float:
        """One exponential draw."""
        return rng.expovariate(1.0 / self.mean)


@dataclass(frozen=True, slots=True)
class Weibull:
    """Weibull(scale, shape); shape < 1 gives a heavy tail."""

    scale: float
    shape: float

    def sample(self, rng: random.Random) -> float:
        """One Weibull draw."""
        return rng.weibullvariate(self.scale, self.shape)

    def cdf(self, x: float) -> float:
        """P(duration <= x)."""
        return 1.0 - math.exp(-((x / self.scale) ** self.shape)) if x > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LogNormal:
    """exp(Normal(mu, sigma)) seconds."""

    mu: float
    sigma: float

    def sample(self, rng: random.Random) -> float:
        """One log-normal draw."""
        return rng.lognormvariate(self.mu, self.sigma)


def ipfs_sessions() -> Weibull:
    """Weibull through P(S < 8 h) = 0.876 and P(S > 24 h) = 0.025 (IPFS, SIGCOMM 2022)."""
    a = -math.log(1 - 0.876)  # (8h / scale) ** shape
    b = -math.log(0.025)  # (24h / scale) ** shape
    shape = math.log(b / a) / math.log(3.0)
    scale = 8 * HOUR / a ** (1 / shape)
    return Weibull(scale=scale, shape=shape)


class Churn:
    """Takes `hosts` down and up: online for a `sessions` draw, offline for a `downtimes` one."""

    def __init__(self, hosts: Iterable[Host], *, sessions: Distribution,
                 downtimes: Distribution, rng: random.Random,
                 on_change: Callable[[Host, bool], None] | None = None) -> None:
        self.hosts = list(hosts)
        self.sessions = sessions
        self.downtimes = downtimes
        self._rng = rng
        self._on_change = on_change
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self.changes = 0

    def start(self) -> None:
        """Schedule each host's first change from its current state."""
        for host in self.hosts:
            self._schedule(host)

    def stop(self) -> None:
        """Cancel all pending changes; hosts stay as they are."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _schedule(self, host: Host) -> None:
        dist = self.sessions if host.online else self.downtimes
        loop = host.network.loop
        self._timers[host.index] = loop.call_later(dist.sample(self._rng), self._flip, host,
                                                   context=host.context)

    def _flip(self, host: Host) -> None:
        if host.online:
            host.go_offline()
        else:
            host.go_online()
        self.changes += 1
        self._schedule(host)
        if self._on_change is not None:
            self._on_change(host, host.online)
