"""TCP hole punching on loopback: two endpoints signalling through an in-process PIPE, each
learning its mapping from a real STUN-over-TCP service, meet in a simultaneous open.
(Through real NATs: tests/natlab/test_punch_nat.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from crypto.codec import packb
from overlay.transports.punch import (
    PunchAnswer,
    PunchEndpoint,
    PunchError,
    PunchOffer,
    PunchSettings,
    PunchSignalError,
    decode_punch,
    encode_punch,
)
from overlay.transports.signalling import MemoryPipe
from rendezvous.messages import PipeMessage
from rendezvous.stun import serve_stun_tcp
from tests.overlay.streams import check_stream, receive_exactly

ALICE, BOB = ("alice@x.net", b"a" * 20), ("bob@x.net", b"b" * 20)
SESSION = b"s" * 16


@asynccontextmanager
async def pair(*, bob_stun: bool = True, budget: float = 3.0
               ) -> AsyncIterator[tuple[PunchEndpoint, PunchEndpoint]]:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    hub = MemoryPipe()
    alice = PunchEndpoint(hub.sender(*ALICE), PunchSettings(stun.address, budget=budget))
    bob = PunchEndpoint(hub.sender(*BOB),
                        PunchSettings(stun.address if bob_stun else None, budget=budget))
    hub.attach(*ALICE, alice.feed)
    hub.attach(*BOB, bob.feed)
    await alice.start()
    await bob.start()
    try:
        yield alice, bob
    finally:
        await alice.aclose()
        await bob.aclose()
        await stun.aclose()


async def test_a_punched_stream_carries_bytes_both_ways_and_says_tcp_punch() -> None:
    async with pair() as (alice, bob):
        dialled = await alice.dial(*BOB)
        accepted = await asyncio.wait_for(bob.accept(), 5)
        assert dialled.path == accepted.path == "tcp-punch"
        await dialled.send_all(b"request")
        assert await receive_exactly(accepted, 7) == b"request"
        await accepted.send_all(b"reply")
        assert await receive_exactly(dialled, 5) == b"reply"
        await dialled.aclose()
        await accepted.aclose()
        assert alice.stats.dials == 1 and alice.stats.dial_failures == 0
        assert bob.stats.accepted == 1


async def test_punched_streams_pass_the_stream_conformance_suite() -> None:
    async with pair() as (alice, bob):
        async def make() -> tuple[object, object]:
            d = await alice.dial(*BOB)
            return d, await asyncio.wait_for(bob.accept(), 5)

        await check_stream(make)  # type: ignore[arg-type]


async def test_a_callee_without_stun_over_tcp_declines_at_once() -> None:
    async with pair(bob_stun=False) as (alice, _):
        t0 = time.monotonic()
        with pytest.raises(PunchError, match="declined: no STUN over TCP at our server"):
            await alice.dial(*BOB)
        assert time.monotonic() - t0 < 1.0


async def test_a_silent_callee_fails_the_punch_within_the_budget() -> None:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    hub = MemoryPipe()  # nobody is attached for bob: the offer goes nowhere
    alice = PunchEndpoint(hub.sender(*ALICE), PunchSettings(stun.address, budget=0.5))
    await alice.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PunchError, match=r"within 0.5 s \(waiting for an answer\)"):
            await alice.dial(*BOB)
        assert time.monotonic() - t0 < 1.5
        assert alice.stats.dial_failures == 1
    finally:
        await alice.aclose()
        await stun.aclose()


class ForgingPipe:
    """A PIPE whose "callee" answers every offer with candidates nobody listens on."""

    def __init__(self) -> None:
        self.dialer: PunchEndpoint | None = None

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        offer = decode_punch(payload)
        assert isinstance(offer, PunchOffer) and self.dialer is not None
        answer = PunchAnswer(offer.session, (("127.0.0.1", 1),))  # port 1: refused
        asyncio.get_running_loop().call_soon(
            self.dialer.feed, PipeMessage(BOB[0], BOB[1], encode_punch(answer)))


async def test_candidates_nobody_answers_on_fail_within_the_budget() -> None:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    pipe = ForgingPipe()
    alice = pipe.dialer = PunchEndpoint(pipe, PunchSettings(stun.address, budget=0.8))
    await alice.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PunchError, match=r"within 0.8 s \(waiting for a connection\)"):
            await alice.dial(*BOB)
        assert time.monotonic() - t0 < 2.0
    finally:
        await alice.aclose()
        await stun.aclose()


async def test_answers_only_from_the_device_dialled_and_bad_signals_are_counted() -> None:
    async with pair(budget=0.5) as (alice, _):
        bob_answers = PunchAnswer(SESSION, (("127.0.0.1", 9),))
        assert alice.feed(PipeMessage("mallory@x.net", b"m" * 20, encode_punch(bob_answers)))
        assert alice.feed(PipeMessage(*BOB, packb({"t": "punch-offer", "s": SESSION})))
        assert not alice.feed(PipeMessage(*BOB, packb({"t": "rtc-offer"})))
        assert alice.stats.bad_signals == 2


@pytest.mark.parametrize("candidates", [
    ["bob.example:4000"],  # a name would make us resolve what a peer chose
    ["127.0.0.1:0"],
    [],
    ["127.0.0.1:1"] * 5,
    ["127.0.0.1"],
])
def test_offers_with_unusable_candidates_are_refused(candidates: list[str]) -> None:
    with pytest.raises(PunchSignalError):
        decode_punch(packb({"t": "punch-offer", "s": SESSION, "c": candidates}))


def test_signals_round_trip() -> None:
    offer = PunchOffer(SESSION, (("198.18.0.1", 4000), ("::1", 5)))
    assert decode_punch(encode_punch(offer)) == offer
    assert decode_punch(b"\x93\x01\x02\x03") is None
