"""`SleepWatch`: the host slept between two looks when CLOCK_BOOTTIME got ahead of
CLOCK_MONOTONIC (the time spent suspended) by more than the gap."""

from __future__ import annotations

import time

import pytest

from overlay.transports.wake import WAKE_GAP, SleepWatch, time_asleep


def test_a_wake_is_told_once_with_the_time_asleep() -> None:
    asleep = [12.0]  # slept before this process started: not a wake it must act on
    watch = SleepWatch(lambda: asleep[0])
    assert watch.slept() == 0.0
    asleep[0] += 600.0  # the lid was closed ten minutes
    assert watch.slept() == 600.0
    assert watch.slept() == 0.0  # told once


def test_short_gaps_are_not_a_wake() -> None:
    asleep = [0.0]
    watch = SleepWatch(lambda: asleep[0])
    for _ in range(10):  # jitter between the two clock reads, however often it comes
        asleep[0] += WAKE_GAP / 4
        assert watch.slept() == 0.0


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux only")
def test_the_kernel_clocks_of_a_running_process_show_no_sleep() -> None:
    watch = SleepWatch()
    assert time_asleep() >= -0.01
    time.sleep(0.05)
    assert watch.slept() == 0.0
