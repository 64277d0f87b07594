"""The WebRTC data channel passes the same Stream conformance suite as direct TCP."""

from __future__ import annotations

import uvloop

from overlay.transports.webrtc import WebRtcSettings
from overlay.transports.webrtc_stream import ChannelTuning
from tests.overlay.streams import check_stream, receive_exactly
from tests.overlay.webrtc_pairs import webrtc_pair


async def _run_suite(settings: WebRtcSettings | None = None) -> None:
    async with webrtc_pair(settings) as pair:
        await check_stream(pair.make_pair)
        assert pair.alice.stats.dials == pair.bob.stats.accepted


def test_webrtc_conforms_on_uvloop() -> None:
    uvloop.run(_run_suite())


async def test_webrtc_conforms_with_small_messages_and_window() -> None:
    """Odd tuning on the default loop: flow control still holds at tiny sizes."""
    await _run_suite(WebRtcSettings(tuning=ChannelTuning(
        message_size=1024, high_water=4096, low_water=1024, window=64 * 1024)))


async def test_stream_reports_path_and_peer() -> None:
    async with webrtc_pair() as pair:
        a, b = await pair.make_pair()
        try:
            assert a.path == b.path == "webrtc"
            assert a.peer_address() is not None and ":" in (a.peer_address() or "")
            await a.send_all(b"ping")
            assert await receive_exactly(b, 4) == b"ping"
        finally:
            await a.aclose()
            await b.aclose()


async def test_a_stun_server_on_ipv6_leaves_the_host_candidates_to_connect() -> None:
    """A node whose server is on IPv6 hands WebRTC an IPv6 STUN address, which aiortc 1.16
    can't take ('malformed uri' for every offer); the channel still opens on the host
    candidates."""
    settings = WebRtcSettings(stun=[("::1", 3478)])
    async with webrtc_pair(settings) as pair:
        a, b = await pair.make_pair()
        try:
            await a.send_all(b"ping")
            assert await receive_exactly(b, 4) == b"ping"
        finally:
            await a.aclose()
            await b.aclose()
    assert settings.rtc_configuration().iceServers == []
