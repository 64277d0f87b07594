"""WebRTC signalling: the PIPE codec, and how dial/accept behave when things go wrong."""

from __future__ import annotations

import asyncio
import os
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.codec import packb
from overlay.transports.signalling import (
    MAX_SIGNAL,
    Answer,
    Offer,
    PipeSender,
    Reject,
    SignalError,
    SignalTooLarge,
    decode_signal,
    encode_signal,
    signal_tag,
)
from overlay.transports.stream import Stream, StreamClosed
from overlay.transports.webrtc import (
    Negotiation,
    UnusableDescription,
    WebRtcConnectError,
    WebRtcEndpoint,
    WebRtcSettings,
)
from overlay.transports.webrtc_stream import WebRtcStream
from rendezvous.client import RendezvousClient
from rendezvous.messages import PipeMessage
from tests.overlay.streams import receive_exactly, receive_to_eof
from tests.overlay.webrtc_pairs import ALICE, BOB, BOB_DEV, pipe_message, webrtc_pair
from tests.rendezvous.conftest import DOMAIN, ident, running_server

_sdp = st.text(max_size=3000).map(lambda t: "v=0\r\n" + t)


@given(session=st.binary(min_size=16, max_size=16), sdp=_sdp,
       kind=st.sampled_from([Offer, Answer]))
def test_descriptions_round_trip(session: bytes, sdp: str, kind: type[Offer]) -> None:
    payload = encode_signal(kind(session, sdp))
    assert len(payload) <= MAX_SIGNAL
    assert decode_signal(payload) == kind(session, sdp)
    assert signal_tag(payload) == kind.TAG


def test_large_sdp_is_deflated_and_hopeless_one_refused() -> None:
    big = "v=0\r\n" + "a=candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host\r\n" * 600
    payload = encode_signal(Offer(b"s" * 16, big))
    assert len(big) > MAX_SIGNAL >= len(payload)
    assert decode_signal(payload) == Offer(b"s" * 16, big)
    with pytest.raises(SignalTooLarge):
        encode_signal(Offer(b"s" * 16, "v=0\r\n" + os.urandom(20000).hex()))


def test_deflate_bomb_and_bad_fields_are_signal_errors() -> None:
    bomb = zlib.compress(b"v=0" + b" " * 10_000_000, 9)
    cases = [
        packb({"t": "rtc-offer", "s": b"x" * 16, "sdpz": bomb}),
        packb({"t": "rtc-offer", "s": b"x" * 16, "sdpz": b"not zlib"}),
        packb({"t": "rtc-offer", "s": b"short", "sdp": "v=0"}),
        packb({"t": "rtc-answer", "s": b"x" * 16, "sdp": "no version line"}),
        packb({"t": "rtc-reject", "s": b"x" * 16, "why": "x" * 1000}),
        packb({"t": "rtc-offer", "s": b"x" * 16}),
    ]
    for payload in cases:
        with pytest.raises(SignalError):
            decode_signal(payload)
    assert len(bomb) < MAX_SIGNAL


@given(st.binary(max_size=200) | st.dictionaries(
    st.sampled_from(["t", "s", "sdp", "sdpz", "why"]),
    st.sampled_from(["rtc-offer", "rtc-answer", "rtc-reject"]) | st.binary(max_size=20)
    | st.text(max_size=20) | st.integers(-(2**63), 2**64 - 1)).map(packb))
@settings(max_examples=300)
def test_any_payload_decodes_or_is_a_signal_error(payload: bytes) -> None:
    try:
        decode_signal(payload)
    except SignalError:
        pass


async def test_feed_routes_only_webrtc_signals() -> None:
    async with webrtc_pair() as pair:
        assert pair.alice.feed(pipe_message(b"relay bytes, not msgpack")) is False
        assert pair.alice.feed(pipe_message(packb({"t": "relay-open"}))) is False
        assert pair.alice.feed(pipe_message(packb({"t": "rtc-offer", "s": 5}))) is True
        assert pair.alice.feed(pipe_message(encode_signal(Answer(b"?" * 16, "v=0")))) is True
        assert pair.alice.stats.bad_signals == 2


async def test_declined_dial_says_why() -> None:
    async with webrtc_pair(bob_accept_from=lambda address, device: address != ALICE) as pair:
        with pytest.raises(WebRtcConnectError, match=r"bob@example\.net declined: not accepted"):
            await pair.alice.dial(BOB, BOB_DEV)
        assert pair.bob.stats.rejected == 1


async def test_busy_callee_rejects_beyond_its_backlog() -> None:
    async with webrtc_pair(WebRtcSettings(max_incoming=1)) as pair:
        first = await pair.alice.dial(BOB, BOB_DEV)
        with pytest.raises(WebRtcConnectError, match="declined: busy"):
            await pair.alice.dial(BOB, BOB_DEV)
        accepted = await pair.bob.accept()
        await first.aclose()
        await accepted.aclose()


@dataclass
class _Silent:
    """Swallows every PIPE: the callee never hears of us."""

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        return None


async def test_unanswered_dial_times_out_with_a_clear_error() -> None:
    async with webrtc_pair(WebRtcSettings(answer_timeout=0.3),
                           alice_pipe=lambda p: _Silent()) as pair:
        with pytest.raises(WebRtcConnectError, match=r"did not answer within 0\.3 s"):
            await pair.alice.dial(BOB, BOB_DEV)
        assert pair.alice.stats.dial_failures == 1


@dataclass
class _Blackhole:
    """Rewrites every candidate in an SDP to a UDP port where nobody answers."""

    inner: PipeSender
    port: int

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        sig = decode_signal(payload)
        if isinstance(sig, Offer | Answer):
            sdp = re.sub(r"(a=candidate:\S+ \d \S+ \d+ )\S+ \d+",
                         rf"\g<1>127.0.0.1 {self.port}", sig.sdp)
            payload = encode_signal(type(sig)(sig.session, sdp))
        await self.inner.pipe(to, payload, device=device, hold=hold)


async def test_ice_failure_ends_at_our_timeout_not_aiortcs() -> None:
    loop = asyncio.get_running_loop()
    hole, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                  local_addr=("127.0.0.1", 0))
    port = hole.get_extra_info("sockname")[1]
    try:
        # Both ways, or the side whose candidates survive is found as peer-reflexive.
        async with webrtc_pair(WebRtcSettings(connect_timeout=1.5),
                               alice_pipe=lambda p: _Blackhole(p, port),
                               bob_pipe=lambda p: _Blackhole(p, port)) as pair:
            started = loop.time()
            with pytest.raises(WebRtcConnectError,
                               match=r"no WebRTC connection to bob@example.net within 1.5 s "
                                     r"\(ICE checking"):
                await pair.alice.dial(BOB, BOB_DEV)
            assert loop.time() - started < 30  # aiortc's own failure would take ~64 s
    finally:
        hole.close()


@dataclass
class _Impostor:
    """Before bob's answer, mallory (another device) answers the same session."""

    inner: PipeSender
    hub_feed: list[WebRtcEndpoint]

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        sig = decode_signal(payload)
        if isinstance(sig, Answer):
            fake = Answer(sig.session, "v=0\r\nmallory")
            self.hub_feed[0].feed(PipeMessage(BOB, b"\x66" * 20, encode_signal(fake)))
            self.hub_feed[0].feed(PipeMessage("mallory@example.net", BOB_DEV,
                                              encode_signal(Reject(sig.session, "go away"))))
        await self.inner.pipe(to, payload, device=device, hold=hold)


async def test_answers_from_other_devices_are_ignored() -> None:
    alice_box: list[WebRtcEndpoint] = []
    async with webrtc_pair(bob_pipe=lambda p: _Impostor(p, alice_box)) as pair:
        alice_box.append(pair.alice)
        a, b = await pair.make_pair()
        await a.send_all(b"still bob")
        assert await receive_exactly(b, 9) == b"still bob"
        assert pair.alice.stats.bad_signals == 2
        await a.aclose()
        await b.aclose()


async def test_closing_the_endpoint_ends_accept_and_unaccepted_streams() -> None:
    async with webrtc_pair() as pair:
        a = await pair.alice.dial(BOB, BOB_DEV)
        waiter = asyncio.create_task(pair.bob.accept())
        accepted = await waiter
        pending_dial = await pair.alice.dial(BOB, BOB_DEV)  # sits in bob's backlog
        await pair.bob.aclose()
        with pytest.raises(StreamClosed):
            await pair.bob.accept()
        async with asyncio.timeout(10):
            assert await receive_to_eof(pending_dial) == b""  # bob closed it for us
        await a.aclose()
        await accepted.aclose()
        await pending_dial.aclose()


async def _push_loop(client: RendezvousClient, endpoint: WebRtcEndpoint) -> None:
    async for push in client.pushes():
        if isinstance(push, PipeMessage):
            endpoint.feed(push)


@pytest.fixture
async def rendezvous(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    async with running_server(tmp_path) as server:
        assert server.address is not None
        yield server.address


async def test_offer_and_answer_through_a_real_rendezvous_server(
        rendezvous: tuple[str, int]) -> None:
    host, port = rendezvous
    a_id, b_id = ident(1), ident(2)
    data = os.urandom(3 << 20)
    async with RendezvousClient(host, port, a_id, f"alice@{DOMAIN}", register=True) as ca, \
            RendezvousClient(host, port, b_id, f"bob@{DOMAIN}", register=True) as cb, \
            WebRtcEndpoint(ca) as ea, WebRtcEndpoint(cb) as eb, asyncio.TaskGroup() as tg:
        feeders = [tg.create_task(_push_loop(ca, ea)), tg.create_task(_push_loop(cb, eb))]
        a = await ea.dial(f"bob@{DOMAIN}", b_id.peer_id)
        b = await eb.accept()
        assert isinstance(b, WebRtcStream)
        assert (b.remote_address, b.remote_device) == (f"alice@{DOMAIN}", a_id.peer_id)
        await a.send_all(data)
        await a.send_eof()
        async with asyncio.timeout(30):
            assert await receive_to_eof(b) == data
        await b.aclose()
        await a.aclose()
        for f in feeders:
            f.cancel()


@dataclass
class _GarbleOffers:
    """Rewrites the SDP inside alice's offers into nonsense, while `on` is set."""

    inner: PipeSender
    on: bool = True

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        sig = decode_signal(payload)
        if self.on and isinstance(sig, Offer):
            payload = encode_signal(Offer(sig.session, "v=0\r\nthis is not an offer\r\n"))
        await self.inner.pipe(to, payload, device=device, hold=hold)


async def test_a_malformed_sdp_is_refused_with_the_reason_and_nothing_breaks() -> None:
    garbler: list[_GarbleOffers] = []

    def wrap(p: PipeSender) -> _GarbleOffers:
        garbler.append(_GarbleOffers(p))
        return garbler[0]

    async with webrtc_pair(alice_pipe=wrap) as pair:
        with pytest.raises(WebRtcConnectError, match="declined: offer SDP not understood"):
            await pair.alice.dial(BOB, BOB_DEV)
        assert pair.bob.stats.bad_signals == 1
        # Bob's endpoint is unharmed: the next, honest offer connects.
        garbler[0].on = False
        a, b = await pair.make_pair()
        await a.send_all(b"fine")
        assert await receive_exactly(b, 4) == b"fine"
        await a.aclose()
        await b.aclose()


class _StuckNegotiation:
    """A channel that never opens; the endpoint's aclose calls log "released" and set
    `released`."""

    def __init__(self, log: list[str], sdp: str, released: asyncio.Event) -> None:
        self._log = log
        self.sdp = sdp
        self.released = released

    async def complete(self, answer: str) -> None:
        if answer != "v=0 answer":
            raise UnusableDescription("not our answer")
        self._log.append("complete")

    async def opened(self) -> Stream:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def describe(self) -> str:
        return "stuck on purpose"

    async def aclose(self) -> None:
        self._log.append("released")
        self.released.set()


class _StuckChannels:
    """A `ChannelFactory` without aiortc: the signalling runs, no channel ever opens."""

    def __init__(self, answer_sdp: str = "v=0 answer") -> None:
        self.log: list[str] = []
        self.answer_sdp = answer_sdp
        self.released = asyncio.Event()

    async def start(self) -> None:
        self.log.append("start")

    async def aclose(self) -> None:
        self.log.append("aclose")

    async def offer(self, session: bytes, address: str, device: bytes) -> Negotiation:
        self.log.append(f"offer to {address}")
        return _StuckNegotiation(self.log, "v=0 offer", self.released)

    async def answer(self, session: bytes, offer: str, address: str,
                     device: bytes) -> Negotiation:
        self.log.append(f"answer {offer!r} from {address}")
        return _StuckNegotiation(self.log, self.answer_sdp, self.released)


async def test_the_signalling_drives_any_channel_factory_and_bounds_its_open() -> None:
    made: list[_StuckChannels] = []

    def channels(settings: WebRtcSettings) -> _StuckChannels:
        made.append(_StuckChannels())
        return made[-1]

    async with webrtc_pair(WebRtcSettings(connect_timeout=0.2), channels=channels) as pair:
        alice, bob = made
        with pytest.raises(WebRtcConnectError, match=r"no WebRTC connection to bob@example\.net "
                           r"within 0\.2 s \(stuck on purpose\)"):
            await pair.alice.dial(BOB, BOB_DEV)
        try:  # bob's answer task gives up too (its own 0.2 s)
            await asyncio.wait_for(bob.released.wait(), 10)
        except TimeoutError:
            raise AssertionError(f"bob's answer still waits: {bob.log}") from None
        assert alice.log == ["start", "offer to bob@example.net", "complete", "released"]
        assert bob.log == ["start", "answer 'v=0 offer' from alice@example.net", "released"]
        assert pair.alice.stats.dial_failures == 1 and pair.bob.stats.accept_failures == 1
    assert alice.log[-1] == bob.log[-1] == "aclose"


async def test_an_answer_the_factory_cannot_use_is_a_counted_bad_signal() -> None:
    made: list[_StuckChannels] = []

    def channels(settings: WebRtcSettings) -> _StuckChannels:
        made.append(_StuckChannels(answer_sdp="v=0 garbage"))
        return made[-1]

    async with webrtc_pair(channels=channels) as pair:
        with pytest.raises(WebRtcConnectError,
                           match=r"unusable answer from bob@example\.net: not our answer"):
            await pair.alice.dial(BOB, BOB_DEV)
        assert pair.alice.stats.bad_signals == 1 and made[0].log[-1] == "released"
