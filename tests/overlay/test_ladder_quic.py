"""The ladder's QUIC rung, with stand-in rungs: QUIC starts once the TCP punch has failed
(or has had its budget) and WebRTC once QUIC has; each costs more CPU per byte than the one
before it."""

from __future__ import annotations

import asyncio
import time

from overlay.transports.ladder import ConnectionLadder, Holder
from tests.overlay.test_ladder import PEER, FakeStream, rung

NATED = Holder(PEER, "bob@x.net", nat=True)


async def test_quic_starts_when_the_punch_fails_and_webrtc_never_does() -> None:
    made: list[FakeStream] = []
    quic_made: list[FakeStream] = []
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=0.05, fail=True),
                              quic=rung("quic", made=quic_made),
                              webrtc=rung("webrtc", made=made, delay=0.5), punch_timeout=5.0)
    t0 = time.monotonic()
    s = await ladder.dial(NATED)
    assert s.path == "quic" and time.monotonic() - t0 < 1.0
    assert made == [] and len(quic_made) == 1
    assert ladder.counters == {"quic": 1}


async def test_quic_waits_for_a_punch_that_may_still_win() -> None:
    quic_made: list[FakeStream] = []
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=0.2),
                              quic=rung("quic", made=quic_made), punch_timeout=5.0)
    s = await ladder.dial(NATED)
    assert s.path == "tcp-punch" and quic_made == []


async def test_quic_does_not_wait_out_a_punch_that_hangs() -> None:
    # A symmetric NAT drops the punch's SYNs: the punch would run its whole budget.
    ladder = ConnectionLadder(punch=rung("tcp-punch", delay=30), quic=rung("quic"),
                              punch_timeout=3.0, punch_head_start=0.3)
    t0 = time.monotonic()
    s = await asyncio.wait_for(ladder.dial(NATED), 5)
    assert s.path == "quic" and 0.3 <= time.monotonic() - t0 < 1.5


async def test_webrtc_starts_as_soon_as_quic_fails() -> None:
    ladder = ConnectionLadder(punch=rung("tcp-punch", fail=True),
                              quic=rung("quic", delay=0.05, fail=True),
                              webrtc=rung("webrtc"), punch_timeout=5.0, quic_timeout=5.0)
    t0 = time.monotonic()
    s = await ladder.dial(NATED)
    assert s.path == "webrtc" and time.monotonic() - t0 < 1.0  # no rung's whole budget


async def test_webrtc_starts_when_a_slow_quic_has_had_its_budget() -> None:
    ladder = ConnectionLadder(punch=rung("tcp-punch", fail=True), quic=rung("quic", delay=30),
                              webrtc=rung("webrtc"), punch_timeout=0.1, quic_timeout=0.2)
    t0 = time.monotonic()
    s = await asyncio.wait_for(ladder.dial(NATED), 5)
    assert s.path == "webrtc" and time.monotonic() - t0 >= 0.2


def test_the_budget_counts_quic_between_the_punch_and_webrtc() -> None:
    without = ConnectionLadder(webrtc=rung("webrtc"), punch=rung("tcp-punch"),
                               webrtc_timeout=100.0, punch_timeout=3.0)
    ladder = ConnectionLadder(webrtc=rung("webrtc"), punch=rung("tcp-punch"),
                              quic=rung("quic"), webrtc_timeout=100.0, punch_timeout=3.0,
                              quic_timeout=4.0)
    assert ladder.budget == without.budget + 4.0
