"""The ladder's TCP-punch rung, with stand-in rungs: the punch goes before WebRTC, and
WebRTC starts as soon as the punch has failed (or has had its whole budget)."""

from __future__ import annotations

import asyncio
import time

from overlay.transports.ladder import ConnectionLadder, Holder
from tests.overlay.test_ladder import PEER, FakeStream, rung

NATED = Holder(PEER, "bob@x.net", nat=True)


async def test_the_punch_wins_and_webrtc_never_starts() -> None:
    made: list[FakeStream] = []
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=0.05),
                              webrtc=rung("webrtc", made=made), relay=rung("relay"))
    s = await ladder.dial(NATED)
    assert s.path == "tcp-punch" and made == []
    assert ladder.counters == {"tcp-punch": 1}


async def test_webrtc_starts_as_soon_as_the_punch_fails() -> None:
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=0.05, fail=True),
                              webrtc=rung("webrtc"), punch_timeout=5.0)
    t0 = time.monotonic()
    s = await ladder.dial(NATED)
    assert s.path == "webrtc"
    assert time.monotonic() - t0 < 1.0  # not the punch's whole budget


async def test_webrtc_starts_when_a_slow_punch_has_had_its_budget() -> None:
    made: list[FakeStream] = []
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=30.0),
                              webrtc=rung("webrtc", made=made), punch_timeout=0.2)
    t0 = time.monotonic()
    s = await asyncio.wait_for(ladder.dial(NATED), 5)
    assert s.path == "webrtc" and time.monotonic() - t0 >= 0.2


async def test_the_relay_when_punch_and_webrtc_both_fail() -> None:
    ladder = ConnectionLadder(punch=rung("tcp-punch", fail=True),
                              webrtc=rung("webrtc", fail=True), relay=rung("relay"))
    s = await ladder.dial(NATED)
    assert s.path == "relay"


def test_the_budget_counts_the_punch_before_webrtc() -> None:
    without = ConnectionLadder(webrtc=rung("webrtc"), webrtc_timeout=100.0)
    ladder = ConnectionLadder(webrtc=rung("webrtc"), punch=rung("tcp-punch"),
                              webrtc_timeout=100.0, punch_timeout=3.0)
    assert ladder.budget == without.budget + 3.0
