"""The connection ladder's race, with stand-in rungs (this tests one layer's logic; the
real transports are proven by their own suites and the end-to-end tests)."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable

import pytest

from overlay.transports.ladder import ConnectionLadder, Holder
from overlay.transports.stream import Stream, StreamBroken
from overlay.transports.tcp import TcpServer


class FakeStream:
    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    # The rest of `Stream`: the ladder only dials and closes.
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("the ladder sends nothing")

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        raise AssertionError("the ladder receives nothing")

    async def send_eof(self) -> None:
        raise AssertionError("the ladder sends nothing")

    def peer_address(self) -> str | None:
        return None


def rung(path: str, *, delay: float = 0.0, fail: bool = False,
         made: list[FakeStream] | None = None) -> Callable[[Holder], Awaitable[FakeStream]]:
    async def dial(holder: Holder) -> FakeStream:
        await asyncio.sleep(delay)
        if fail:
            raise StreamBroken(f"{path} refused")
        s = FakeStream(path)
        if made is not None:
            made.append(s)
        return s

    return dial


PEER = b"p" * 20


async def test_direct_tcp_wins_when_it_works() -> None:
    async def serve(stream: Stream) -> None:
        await stream.aclose()

    server = TcpServer(serve)
    host, port = await server.start("127.0.0.1", 0)
    try:
        made: list[FakeStream] = []
        ladder = ConnectionLadder(webrtc=rung("webrtc", made=made), webrtc_delay=0.2)
        s = await ladder.dial(Holder(PEER, "bob@x.net", (f"{host}:{port}",)))
        assert s.path == "tcp"
        await s.aclose()
        assert made == []  # WebRTC never started: TCP won inside the head start
    finally:
        await server.aclose()


async def test_webrtc_when_tcp_fails_and_relay_last() -> None:
    dead = ("127.0.0.1:1",)  # nothing listens on port 1
    ladder = ConnectionLadder(webrtc=rung("webrtc"), relay=rung("relay"), webrtc_delay=0.01)
    s = await ladder.dial(Holder(PEER, "bob@x.net", dead))
    assert s.path == "webrtc"
    ladder = ConnectionLadder(webrtc=rung("webrtc", fail=True), relay=rung("relay"))
    s = await ladder.dial(Holder(PEER, "bob@x.net", dead))
    assert s.path == "relay"
    assert ladder.counters == {"relay": 1}


async def test_a_holder_that_refused_then_listens_is_dialled_again_before_the_relay() -> None:
    """A retry that fires while its sender's node starts again: the advertised port refuses
    at once, the other rungs take their time, and by then the node listens. Without one
    more direct dial the relay carried the rest of the download."""
    async def serve(stream: Stream) -> None:
        await stream.aclose()

    with socket.socket() as probe:  # a free port, nothing listening on it yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = TcpServer(serve)
    relayed: list[FakeStream] = []

    async def slow_webrtc(holder: Holder) -> FakeStream:
        await server.start("127.0.0.1", port)  # the node is up while WebRTC fails
        await asyncio.sleep(0.05)
        raise StreamBroken("webrtc: no answer")

    try:
        ladder = ConnectionLadder(webrtc=slow_webrtc, relay=rung("relay", made=relayed),
                                  webrtc_delay=0.01)
        s = await ladder.dial(Holder(PEER, "bob@x.net", (f"127.0.0.1:{port}",)))
        assert s.path == "tcp" and relayed == []
        await s.aclose()
        # Refused again: the relay, as before (the dial again took no time).
        await server.aclose()
        server = TcpServer(serve)
        s = await ladder.dial(Holder(PEER, "bob@x.net", ("127.0.0.1:1",)))
        assert s.path == "relay"
    finally:
        await server.aclose()


async def test_a_holder_that_refused_then_listens_is_not_left_on_webrtc() -> None:
    """The same retry, where the node came up in time to answer WebRTC's offer: WebRTC
    connected, and carried the rest of the download at a fraction of TCP's rate (a full
    test run's retry came over it). The direct address is dialled again, and WebRTC's
    stream closed."""
    async def serve(stream: Stream) -> None:
        await stream.aclose()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = TcpServer(serve)
    made: list[FakeStream] = []

    async def answered_webrtc(holder: Holder) -> FakeStream:
        await server.start("127.0.0.1", port)  # the node is up and answers the offer
        return await rung("webrtc", made=made)(holder)

    try:
        ladder = ConnectionLadder(webrtc=answered_webrtc, webrtc_delay=0.01)
        s = await ladder.dial(Holder(PEER, "bob@x.net", (f"127.0.0.1:{port}",)))
        assert s.path == "tcp"
        assert [m.closed for m in made] == [True]
        assert ladder.counters == {"tcp": 1}
        await s.aclose()
    finally:
        await server.aclose()
    # Refused again: WebRTC stays.
    ladder = ConnectionLadder(webrtc=rung("webrtc"), webrtc_delay=0.01)
    s = await ladder.dial(Holder(PEER, "bob@x.net", ("127.0.0.1:1",)))
    assert s.path == "webrtc"


async def test_a_nated_holder_gets_webrtc_at_once() -> None:
    made: list[FakeStream] = []
    ladder = ConnectionLadder(webrtc=rung("webrtc", delay=0.05, made=made),
                              webrtc_delay=10.0)
    # No direct address: WebRTC is the only rung and starts without waiting for TCP.
    s = await asyncio.wait_for(ladder.dial(Holder(PEER, "bob@x.net", (), nat=True)), 2)
    assert s.path == "webrtc"


async def test_every_rung_failing_says_why() -> None:
    ladder = ConnectionLadder(webrtc=rung("webrtc", fail=True), relay=rung("relay", fail=True))
    with pytest.raises(StreamBroken) as err:
        await ladder.dial(Holder(PEER, "bob@x.net", ("127.0.0.1:1",)))
    text = str(err.value)
    assert "tcp:" in text and "webrtc: webrtc refused" in text and "relay: relay refused" in text


async def test_no_address_to_signal_to_means_tcp_only() -> None:
    made: list[FakeStream] = []
    ladder = ConnectionLadder(webrtc=rung("webrtc", made=made), relay=rung("relay", made=made))
    with pytest.raises(StreamBroken):
        await ladder.dial(Holder(PEER, None, ("127.0.0.1:1",)))
    assert made == []


async def test_the_budget_lets_a_slow_webrtc_failure_reach_the_relay() -> None:
    # WebRTC takes its whole (scaled-down) timeout to fail, as ICE between two symmetric
    # NATs does; a caller bounding dial() by `budget` still sees the relay win.
    ladder = ConnectionLadder(webrtc=rung("webrtc", delay=0.3, fail=True),
                              relay=rung("relay", delay=0.1), webrtc_delay=0.0,
                              webrtc_timeout=0.3, relay_timeout=0.1)
    assert ladder.budget >= 0.3 + 0.1
    async with asyncio.timeout(ladder.budget):
        s = await ladder.dial(Holder(PEER, "bob@x.net", (), nat=True))
    assert s.path == "relay"
    # Without a relay rung the budget is the longer of TCP's and WebRTC's.
    assert ConnectionLadder(webrtc=rung("webrtc"), webrtc_timeout=100.0).budget >= 100.0


async def test_of_rungs_done_in_the_same_step_the_earlier_wins() -> None:
    from overlay.transports.ladder import _race

    async def ok(path: str, made: list[FakeStream]) -> FakeStream:
        s = FakeStream(path)
        made.append(s)
        return s

    async def refused(path: str) -> FakeStream:
        raise StreamBroken(f"{path} refused")

    # Set order follows memory addresses, so a winner picked from a set changes between
    # runs; 50 races make that show.
    for _ in range(50):
        made: list[FakeStream] = []
        errors: list[str] = []
        rungs: list[tuple[float, str, Callable[[], Awaitable[Stream]]]] = [
            (0.0, "a", functools.partial(refused, "a")),
            (0.0, "b", functools.partial(refused, "b")),
            (0.0, "c", functools.partial(ok, "c", made)),
            (0.0, "d", functools.partial(ok, "d", made))]
        won = await _race(rungs, errors)
        assert won is not None and won.path == "c"
        assert errors == ["a: a refused", "b: b refused"]
        assert [s.path for s in made if s.closed] == ["d"]
