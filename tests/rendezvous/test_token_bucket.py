"""A token bucket's debt can always be waited out, on any clock: a debt of float rounding
is no debt (the relay's splice once re-checked it at the same virtual instant forever)."""

from __future__ import annotations

import random

from rendezvous.limits import MIN_WAIT, TokenBucket


def test_waiting_the_returned_delay_always_clears_the_debt() -> None:
    rng = random.Random(1)
    bucket = TokenBucket(875_000.0, 100_000, 150.0)
    now = 150.0
    for _ in range(20_000):
        wait = bucket.spend(rng.randrange(1, 70_000), now)
        for _ in range(3):  # a wait leaves at most rounding behind
            if wait == 0:
                break
            assert now + wait > now, "a wait too short to move the clock"
            now += wait
            wait = bucket.spend(0, now)
        assert wait == 0


def test_the_long_run_rate_still_holds() -> None:
    bucket = TokenBucket(1000.0, 1000, 0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.spend(500, now)
    assert 49.0 - MIN_WAIT <= now <= 49.0 + 1e-6  # 50,000 bytes at 1,000/s after 1,000 free
