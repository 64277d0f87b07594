"""An offer of a rung the callee does not know is answered 'unsupported', and each of
today's diallers fails on that answer at once instead of waiting out its budget: a node of
this release dialled by one of a later release, with a rung it lacks, costs no waiting."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.codec import packb, unpackb
from crypto.identity import DeviceIdentity, PublicIdentity
from overlay.app.lab import LocalNetwork
from overlay.app.links import PeerLinks
from overlay.transfer.server import TransferServer
from overlay.transports.punch import PunchEndpoint, PunchError, PunchSettings
from overlay.transports.quic import QuicEndpoint, QuicError, QuicSettings
from overlay.transports.signalling import (
    MemoryPipe,
    UnknownOffers,
    Unsupported,
    encode_unsupported,
    offered,
)
from overlay.transports.stream import StreamBroken
from overlay.transports.webrtc import WebRtcConnectError, WebRtcEndpoint, WebRtcSettings
from rendezvous.client import PipeMessage, RendezvousClient
from rendezvous.stun import serve_stun, serve_stun_tcp
from tests.overlay.test_metrics_units import fetch, metrics_url, samples

ALICE, BOB = ("alice@x.net", b"a" * 20), ("bob@x.net", b"b" * 20)
SESSION = b"s" * 16
KNOWN = {"punch-offer", "quic-offer", "rtc-offer"}


class Inbox:
    """The PIPE messages a device got, and a wait for the n-th."""

    def __init__(self) -> None:
        self.got: list[PipeMessage] = []
        self._changed = asyncio.Event()

    def feed(self, msg: PipeMessage) -> bool:
        self.got.append(msg)
        self._changed.set()
        return True

    async def wait_for(self, n: int, of: str | None = None) -> list[PipeMessage]:
        """The first `n` messages (of tag `of`), once they are in."""
        def mine() -> list[PipeMessage]:
            return [m for m in self.got
                    if of is None or _tag(m.payload) == of]

        async with asyncio.timeout(5):
            while len(mine()) < n:
                self._changed.clear()
                await self._changed.wait()
        return mine()


def _tag(payload: bytes) -> object:
    try:
        body = unpackb(payload, max_bytes=1 << 16)
    except ValueError:
        return None
    return body.get("t") if isinstance(body, dict) else None


@asynccontextmanager
async def callee_without_rungs() -> AsyncIterator[tuple[MemoryPipe, UnknownOffers, Inbox]]:
    """BOB knows no rung (only answers 'unsupported'); what comes back to ALICE is kept."""
    hub = MemoryPipe()
    bob = UnknownOffers(hub.sender(*BOB))
    hub.attach(*BOB, bob.feed)
    alice = Inbox()
    hub.attach(*ALICE, alice.feed)
    try:
        yield hub, bob, alice
    finally:
        await bob.aclose()


def _from_alice(payload: bytes) -> PipeMessage:
    return PipeMessage(ALICE[0], ALICE[1], payload)


async def test_an_unknown_offer_gets_one_reply_with_its_session_and_tag() -> None:
    async with callee_without_rungs() as (hub, bob, alice):
        offer = packb({"t": "zz-offer", "s": SESSION, "c": ["203.0.113.5:4000"], "v": 2})
        await hub.sender(*ALICE).pipe(BOB[0], offer, device=BOB[1])
        (reply,) = await alice.wait_for(1)
        assert (reply.sender, reply.sender_device) == BOB
        assert unpackb(reply.payload, max_bytes=1024) == {"t": "unsupported", "s": SESSION,
                                                          "of": "zz-offer"}
        assert bob.counters == {"answered": 1}


async def test_nothing_but_an_offer_is_answered() -> None:
    not_offers = [
        encode_unsupported(Unsupported(SESSION, "zz-offer")),  # never answer a reply
        packb({"t": "unsupported", "s": SESSION, "of": "unsupported"}),
        packb({"t": "zz-answer", "s": SESSION}),
        packb({"t": "zz-reject", "s": SESSION, "why": "busy"}),
        packb([b"zz-offer", SESSION]),  # not a map
        packb("zz-offer"),
        b"\xc1 not msgpack",
        packb({"t": "zz-offer"}),  # no session
        packb({"t": "zz-offer", "s": b"short"}),
        packb({"t": "zz-offer", "s": "s" * 16}),
        packb({"t": "-offer", "s": SESSION}),
        packb({"t": 7, "s": SESSION}),
        packb({"t": "z" * 40 + "-offer", "s": SESSION}),
    ]
    async with callee_without_rungs() as (_, bob, alice):
        for payload in not_offers:
            assert bob.feed(_from_alice(payload)) is False, payload
        # An offer after them: its reply is the first one that comes back.
        assert bob.feed(_from_alice(packb({"t": "zz-offer", "s": SESSION}))) is True
        (reply,) = await alice.wait_for(1)
        assert unpackb(reply.payload, max_bytes=1024)["of"] == "zz-offer"
        assert bob.counters == {"answered": 1}


async def test_a_flood_of_offers_gets_at_most_the_bucket() -> None:
    async with callee_without_rungs() as (_, bob, alice):
        for i in range(100):
            assert bob.feed(_from_alice(packb({"t": "zz-offer",
                                               "s": i.to_bytes(16, "big")}))) is True
        answered = bob.counters["answered"]
        assert 10 <= answered <= 11  # the burst, and what refilled while the loop fed
        assert bob.counters["limited"] == 100 - answered
        replies = await alice.wait_for(answered)
        assert [unpackb(r.payload, max_bytes=1024)["s"] for r in replies] == [
            i.to_bytes(16, "big") for i in range(answered)]


async def test_one_peers_flood_does_not_cost_another_peer_its_reply() -> None:
    """ALICE floods junk offers; CAROL's one unknown offer, after them, still gets its
    'unsupported' (the reply rate was shared by all peers, and ALICE's flood used it up)."""
    carol = ("carol@y.net", b"c" * 20)
    async with callee_without_rungs() as (hub, bob, _):
        carols = Inbox()
        hub.attach(*carol, carols.feed)
        for i in range(100):
            bob.feed(_from_alice(packb({"t": "zz-offer", "s": i.to_bytes(16, "big")})))
        assert bob.feed(PipeMessage(*carol, packb({"t": "yy-offer", "s": SESSION}))) is True
        (reply,) = await carols.wait_for(1)
        assert unpackb(reply.payload, max_bytes=1024) == {"t": "unsupported", "s": SESSION,
                                                          "of": "yy-offer"}
        assert bob.counters["limited"] >= 89 and "limited-all" not in bob.counters


async def test_offers_from_many_senders_are_bounded_in_replies_and_memory() -> None:
    """5,000 senders with one offer each (a hostile domain can name any number): the
    senders' table stays at its bound and the replies at the total's burst."""
    hub = MemoryPipe()
    bob = UnknownOffers(hub.sender(*BOB), rate=10, total_rate=50, max_senders=256)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        for i in range(5000):
            sender = PipeMessage(f"u{i}@evil.example", i.to_bytes(20, "big"),
                                 packb({"t": "zz-offer", "s": SESSION}))
            assert bob.feed(sender) is True
        fed_for = loop.time() - started
        assert len(bob.senders) == 256
        answered = bob.counters["answered"]
        # The burst, and what the total's 50 a second refilled while the loop fed: a few
        # on an idle machine (30 ms), more on a loaded one, never one per sender.
        assert 50 <= answered <= 50 + int(50 * fed_for), fed_for
        assert bob.counters["limited-all"] == 5000 - answered
    finally:
        await bob.aclose()


# --- each of today's diallers --------------------------------------------------------

Dialler = PunchEndpoint | QuicEndpoint | WebRtcEndpoint


async def _declined_at_once(make: Callable[[MemoryPipe], Dialler], error: type[StreamBroken],
                            tag: str, budget: float) -> None:
    """ALICE's endpoint dials BOB, who knows no rung: the dial fails with the reason well
    within its budget, and the reply is nothing worse than a failed dial."""
    async with callee_without_rungs() as (hub, bob, _):
        alice = make(hub)
        hub.attach(*ALICE, alice.feed)
        await alice.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(error) as caught:
                await alice.dial(*BOB)
            elapsed = time.monotonic() - t0
        finally:
            await alice.aclose()
    assert str(caught.value) == f"{BOB[0]} declined: the peer does not know {tag}"
    assert elapsed < budget / 3, f"{elapsed:.2f} s of a {budget} s budget"
    assert alice.stats.dial_failures == 1 and alice.stats.bad_signals == 0
    assert bob.counters == {"answered": 1}


async def test_a_tcp_punch_fails_at_once_on_unsupported() -> None:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    try:
        await _declined_at_once(
            lambda hub: PunchEndpoint(hub.sender(*ALICE), PunchSettings(stun.address)),
            PunchError, "punch-offer", PunchSettings().budget)
    finally:
        await stun.aclose()


async def test_a_quic_dial_fails_at_once_on_unsupported() -> None:
    transport, stun = await serve_stun("127.0.0.1", 0, rate=1000, burst=1000)
    try:
        await _declined_at_once(
            lambda hub: QuicEndpoint(hub.sender(*ALICE), QuicSettings(stun)),
            QuicError, "quic-offer", QuicSettings().budget)
    finally:
        transport.close()


async def test_a_webrtc_dial_fails_at_once_on_unsupported() -> None:
    await _declined_at_once(
        lambda hub: WebRtcEndpoint(hub.sender(*ALICE), WebRtcSettings()),
        WebRtcConnectError, "rtc-offer", WebRtcSettings().answer_timeout)


async def test_an_unsupported_nobody_waits_on_is_dropped_and_counted() -> None:
    transport, stun = await serve_stun("127.0.0.1", 0)
    hub = MemoryPipe()
    punch = PunchEndpoint(hub.sender(*ALICE), PunchSettings(("127.0.0.1", 9)))
    quic = QuicEndpoint(hub.sender(*ALICE), QuicSettings(stun))
    unknown = UnknownOffers(hub.sender(*ALICE))
    await punch.start()
    await quic.start()
    try:
        async with WebRtcEndpoint(hub.sender(*ALICE), WebRtcSettings()) as rtc:
            for ep, tag in ((punch, "punch-offer"), (quic, "quic-offer"), (rtc, "rtc-offer")):
                stray = _from_alice(encode_unsupported(Unsupported(SESSION, tag)))
                assert [e.feed(stray) for e in (punch, quic, rtc)] == [
                    e is ep for e in (punch, quic, rtc)]
                # malformed, but naming this rung's offer: this rung's bad signal
                bad = _from_alice(packb({"t": "unsupported", "s": b"short", "of": tag}))
                assert ep.feed(bad) is True
                assert ep.stats.bad_signals == 2
            # naming an offer nobody here makes: nobody's, and never answered
            other = _from_alice(encode_unsupported(Unsupported(SESSION, "zz-offer")))
            assert not any(e.feed(other) for e in (punch, quic, rtc, unknown))
            assert unknown.counters == {}
    finally:
        await punch.aclose()
        await quic.aclose()
        await unknown.aclose()
        transport.close()


# --- any payload into a node's feed --------------------------------------------------

class _NoServer:
    """What PeerLinks reads of a RendezvousClient, with PIPE through a MemoryPipe and a
    server that runs no STUN (the punch and QUIC decline, WebRTC answers with host
    candidates only)."""

    host, port, tls, server_key = "127.0.0.1", 0, None, None
    server_info: dict[str, Any] = {}

    def __init__(self, hub: MemoryPipe) -> None:
        self.pipe = hub.sender(*BOB).pipe


@asynccontextmanager
async def node_and_alice() -> AsyncIterator[tuple[PeerLinks, Inbox]]:
    """BOB's punch, QUIC and WebRTC rungs and 'unsupported' replies as a node wires them,
    behind a server with no STUN, started (closed after use), and what BOB PIPEs back to
    ALICE."""
    hub = MemoryPipe()
    links = PeerLinks(DeviceIdentity.from_seed(b"\x02" * 32), BOB[0], ("127.0.0.1", 0),
                      cast(RendezvousClient, _NoServer(hub)), cast(TransferServer, None),
                      WebRtcEndpoint)
    alice = Inbox()
    hub.attach(*ALICE, alice.feed)
    await links.start()
    try:
        yield links, alice
    finally:
        await links.aclose()


_tags = st.sampled_from([*sorted(KNOWN), "zz-offer", "unsupported", "rtc-answer",
                         "quic-reject", "-offer", "zz-answer"])
_values = (_tags | st.binary(min_size=16, max_size=16) | st.binary(max_size=20)
           | st.text(max_size=20) | st.integers(-(2**63), 2**64 - 1)
           | st.lists(st.text(max_size=30), max_size=5) | _tags.map(lambda t: [t]))
_fields = st.dictionaries(st.sampled_from(["t", "s", "of", "c", "sdp", "why", "fp"]), _values)
# Offer-shaped maps, of known rungs and others, with whatever else they carry.
_offers = st.builds(lambda t, s, rest: {**rest, "t": t, "s": s},
                    _tags | st.text(max_size=12).map(lambda t: t + "-offer"),
                    st.binary(min_size=16, max_size=16) | st.binary(max_size=17), _fields)
_payloads = st.one_of(_offers.map(packb), st.binary(max_size=64), _fields.map(packb))


@given(st.lists(_payloads, min_size=1, max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_payload_is_claimed_answered_or_dropped(payloads: list[bytes]) -> None:
    asyncio.run(_feed_a_node(payloads))


async def _feed_a_node(payloads: list[bytes]) -> None:
    async with node_and_alice() as (links, alice):
        expected = 0
        for payload in payloads:
            claimed = links.feed(_from_alice(payload))  # never raises
            offer = offered(payload)
            if offer is not None:
                assert claimed, payload  # an offer is always someone's
                expected += offer[0] not in KNOWN  # answered 'unsupported'
        assert links.unknown.counters["answered"] == expected
        assert len(await alice.wait_for(expected, "unsupported")) == expected


async def test_a_node_reads_each_pipe_payload_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of PIPE message is unpacked once on its way through PeerLinks.feed, and
    still reaches the rung it belongs to (each used to be unpacked by every rung in turn,
    and again as an `unsupported`: up to six times for a WebRTC offer)."""
    import overlay.transports.signalling as signalling

    real, reads = unpackb, [0]  # the function signalling imported

    def counted(data: bytes, *, max_bytes: int) -> Any:
        reads[0] += 1
        return real(data, max_bytes=max_bytes)

    monkeypatch.setattr(signalling, "unpackb", counted)
    async with node_and_alice() as (links, alice):
        sdp = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
        for tag, body in (("rtc-answer", {"sdp": sdp}), ("quic-reject", {"why": "no"}),
                          ("punch-answer", {"c": ["203.0.113.5:4000"]}),
                          ("unsupported", {"of": "rtc-offer"}), ("zz-offer", {}),
                          ("relay-open", {})):
            reads[0] = 0
            claimed = links.feed(_from_alice(packb({"t": tag, "s": SESSION, **body})))
            assert (reads[0], claimed) == (1, tag != "relay-open"), tag
        # the stray replies were each their own rung's bad signal
        assert [links.rtc.stats.bad_signals, links.quic.stats.bad_signals,
                links.punch.stats.bad_signals] == [2, 1, 1]
        assert len(await alice.wait_for(1, "unsupported")) == 1  # the zz-offer's


# --- a real node behind a real server ------------------------------------------------

async def pipe_to_a_node(tmp_path: Path, payload: bytes, logs: str
                         ) -> tuple[dict[str, Any], str, dict[Any, float]]:
    """A real server and node (bob, with metrics); a raw client, zed@example.net, PIPEs
    `payload` to bob's device and gets bob's first PIPE back: its payload (unpacked), and
    bob's log, once it has a line matching `logs`, and metrics after it. Bob is still
    running at the end."""
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        bob = net.add_node("bob", extra=["--metrics", "127.0.0.1:0"])
        net.start_node(bob)
        host, port = net.server_addr or ("", 0)
        async with RendezvousClient(host, port, DeviceIdentity.generate(),
                                    "zed@example.net", register=True, reconnect=False,
                                    tls=net.tls) as zed:
            (dev,) = (await zed.finger(bob.address)).devices
            bob_device = PublicIdentity(dev.verify_key).peer_id
            await zed.pipe(bob.address, payload, device=bob_device)
            async with asyncio.timeout(20):
                reply = await anext(p async for p in zed.pushes()
                                    if isinstance(p, PipeMessage))
            assert (reply.sender, reply.sender_device) == (bob.address, bob_device)
        assert bob.proc is not None
        # Bob logs before he replies, but his lines reach the log file through this
        # process's reader thread, which a loaded machine may run after the reply came.
        await asyncio.to_thread(bob.proc.lines.wait_for, re.compile(logs), 20, "bob's log")
        log = bob.proc.log()
        got = samples(fetch(metrics_url(log) + "/metrics")[1])
        assert bob.proc.alive()
        return unpackb(reply.payload, max_bytes=1024), log, got


@pytest.mark.slow
async def test_a_node_answers_an_unknown_offer_through_the_server(tmp_path: Path) -> None:
    answered = r"a zz-offer from zed@example\.net answered 'unsupported'"
    reply, log, got = await pipe_to_a_node(tmp_path, packb(
        {"t": "zz-offer", "s": SESSION, "c": ["203.0.113.5:4000"]}), answered)
    assert reply == {"t": "unsupported", "s": SESSION, "of": "zz-offer"}
    assert re.search(answered, log), log
    assert got[("peerpost_node_unknown_offers_total", (("event", "answered"),))] == 1
