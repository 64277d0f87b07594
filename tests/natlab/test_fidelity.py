"""Fidelity at a small size: the simulator's completion times agree with real processes
on a real network shaped by `tc tbf` (the full-size run, which compares p50s within 15%,
is `python -m benchmarks fidelity`).

A 2 MB file from one sender to three recipients, 5 Mbit/s uplinks and 20 Mbit/s
downlinks, co-recipient sourcing off and on. Every recipient gets the file in both runs,
and the time until all three have it (p90 of three: the last) agrees within 25%. Not the
p50: the simulator shares a link equally between the flows on it, while three real TCP
flows on a drop-tail queue (this kernel has tbf and pfifo, no fair queueing) split the
sender's uplink unevenly over ten seconds: real runs gave [10.0, 7.6, 5.2] s and [7.0,
10.1, 3.7] s where the simulator gives about 10 s to each (measured when the lab still
queued the uplink in the sending host's own stack, where TCP Small Queues held back slow
flows; not measured again since, see tests/natlab/shaped.py). The last
completion, set by the sender's uplink, came out within 1% in those runs; over 20 MB
(160 s) the real flows even out and the p50s agree as well (the benchmark).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.natlab.shaped import compare, quantile, tc_missing

pytestmark = pytest.mark.netns

BOUND = 0.25


def test_simulated_completion_times_match_a_shaped_real_network(natlab_available: None,
                                                                 tmp_path: Path) -> None:
    missing = tc_missing()
    if missing is not None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must run the fidelity lab, but: {missing}")
        pytest.skip(missing)
    results = compare(3, 2_000_000, up_bit=5_000_000, down_bit=20_000_000,
                      modes=("off", "on"), root=tmp_path)
    for mode, r in results.items():
        assert len(r["real"]) == len(r["sim"]) == 3
        real, sim = quantile(r["real"], 0.9), quantile(r["sim"], 0.9)
        assert abs(sim - real) <= BOUND * real, (
            f"sourcing {mode}: real p90 {real:.2f} s, simulated {sim:.2f} s "
            f"(real {r['real']}, simulated {r['sim']})")
