"""Shared fixtures for the simulator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sim.network.latency import FixedLatency
from sim.simulation import Simulation


@pytest.fixture
def sim() -> Iterator[Simulation]:
    """A seeded simulation with 10 ms one-way latency; callback errors fail the test."""
    s = Simulation(seed=1, latency=FixedLatency(0.010))
    try:
        yield s
        assert not s.errors, s.errors
    finally:
        s.close()
