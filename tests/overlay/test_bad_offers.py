"""A callee that can't use an offer says so at once: each rung's reject names what is wrong,
so the dialler fails that rung at once instead of waiting out its budget; the rejects are
bounded per sender and in total, nothing but an offer is answered, and a repeated offer is
dropped before it is decoded again."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from crypto.codec import Fields, packb, unpackb
from overlay.transports import candidates, signalling
from overlay.transports import punch as punch_module
from overlay.transports import quic as quic_module
from overlay.transports.endpoint import SignalledEndpoint
from overlay.transports.punch import PunchEndpoint, PunchError, PunchOffer, PunchSettings
from overlay.transports.quic import QuicEndpoint, QuicError, QuicOffer, QuicSettings
from overlay.transports.signalling import UNSUPPORTED_RATE, MemoryPipe, Offer, PipeSender
from overlay.transports.stream import StreamBroken
from overlay.transports.webrtc import WebRtcConnectError, WebRtcEndpoint, WebRtcSettings
from rendezvous.client import PipeMessage
from rendezvous.stun import serve_stun, serve_stun_tcp
from tests.overlay.signalled_pair import ALICE, BOB, wired
from tests.overlay.test_quic import NEEDS_V6
from tests.overlay.test_unsupported import Inbox, node_and_alice, pipe_to_a_node

SESSION = b"s" * 16
Rung = PunchEndpoint | QuicEndpoint | WebRtcEndpoint


class Tampering:
    """ALICE's PIPE, which rewrites her offers' `field` to `value` on the way (a peer whose
    offer is invalid, or one whose candidates we can't use)."""

    def __init__(self, hub: MemoryPipe, field: str, value: object) -> None:
        self._inner = hub.sender(*ALICE)
        self._field, self._value = field, value

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        body = unpackb(payload, max_bytes=1 << 16)
        if str(body["t"]).endswith("-offer"):
            body.pop("sdpz", None)
            body[self._field] = self._value
            payload = packb(body)
        await self._inner.pipe(to, payload, device=device, hold=hold)


@asynccontextmanager
async def stun_servers(host: str = "127.0.0.1") -> AsyncIterator[tuple[Any, Any]]:
    """STUN over TCP (the punch's) and over UDP (QUIC's) on `host`."""
    tcp = await serve_stun_tcp(host, 0)
    transport, udp = await serve_stun(host, 0, rate=1000, burst=1000)
    try:
        yield tcp.address, udp
    finally:
        transport.close()
        await tcp.aclose()


def _make(kind: str, pipe: PipeSender, stun: tuple[Any, Any]) -> Rung:
    if kind == "punch":
        return PunchEndpoint(pipe, PunchSettings(stun[0]))
    if kind == "quic":
        return QuicEndpoint(pipe, QuicSettings(stun[1]))
    return WebRtcEndpoint(pipe, WebRtcSettings())


ERRORS: dict[str, type[StreamBroken]] = {
    "punch": PunchError, "quic": QuicError, "webrtc": WebRtcConnectError}
BUDGETS = {"punch": PunchSettings().budget, "quic": QuicSettings().budget,
           "webrtc": WebRtcSettings().answer_timeout}


async def _dial_rejected(kind: str, field: str, value: object, host: str = "127.0.0.1"
                         ) -> tuple[str, float, Rung, Rung]:
    """ALICE dials BOB over `kind` with her offer's `field` set to `value`: the error, the
    time it took, and both endpoints (closed)."""
    hub = MemoryPipe()
    async with stun_servers(host) as stun, wired(
            hub, _make(kind, Tampering(hub, field, value), stun),
            _make(kind, hub.sender(*BOB), stun)) as (alice, bob):
        t0 = time.monotonic()
        with pytest.raises(ERRORS[kind]) as caught:
            await alice.dial(*BOB)
        return str(caught.value), time.monotonic() - t0, alice, bob


@pytest.mark.parametrize("kind, field, value, reason", [
    ("punch", "c", ["[fe80::1%eth0]:4000"],
     "the public candidate '[fe80::1%eth0]:4000' has a zone (%eth0, an interface of the "
     "sender's)"),
    ("punch", "n", "yes", "punch.n: expected true/false, got str"),
    ("quic", "c", ["224.0.0.1:4000", "10.0.0.5:4000"],
     "the public candidate '224.0.0.1:4000' is multicast"),
    ("quic", "c", ["0.0.0.0:4000"], "the public candidate '0.0.0.0:4000' is unspecified"),
    ("webrtc", "sdp", "o=- 1 1 IN IP4 0.0.0.0", "sdp does not start with v=0"),
])
async def test_an_invalid_offer_is_rejected_and_the_dial_fails_at_once(
        kind: str, field: str, value: object, reason: str) -> None:
    error, elapsed, alice, bob = await _dial_rejected(kind, field, value)
    assert error.startswith(f"{BOB[0]} declined: invalid offer: {reason}"), error
    assert elapsed < BUDGETS[kind] / 5, f"{elapsed:.2f} s of a {BUDGETS[kind]} s budget"
    assert bob.stats.bad_signals == bob.stats.bad_offers_rejected == 1
    assert bob.stats.accepted == bob.stats.accept_failures == 0
    assert alice.stats.dial_failures == 1 and alice.stats.bad_signals == 0


async def test_a_public_candidate_of_the_other_family_is_declined_not_answered() -> None:
    """An IPv6 public candidate beside an IPv4 local one, to an IPv4 port: the local one is
    dialled only behind the same public address, so nothing is left to dial."""
    error, elapsed, _, bob = await _dial_rejected(
        "quic", "c", ["[2001:db8::5]:4000", "127.0.0.1:4000"])
    assert error == (f"{BOB[0]} declined: the peer's public candidate [2001:db8::5]:4000 is "
                     "IPv6 and our UDP port is IPv4")
    assert elapsed < BUDGETS["quic"] / 5
    assert bob.stats.rejected == 1 and bob.stats.accept_failures == 0


@NEEDS_V6
@pytest.mark.parametrize("kind, port", [("punch", "TCP port"), ("quic", "UDP port")])
async def test_an_ipv6_link_local_public_candidate_is_declined_not_answered(
        kind: str, port: str) -> None:
    """Such an offer decodes (a node on its server's link), but neither rung can dial it
    yet: the callee said nothing until now, having answered and then found nothing to
    connect to, and the dialler waited out its budget."""
    error, elapsed, alice, bob = await _dial_rejected(kind, "c", ["[fe80::1]:4000"],
                                                      host="::1")
    assert alice.stats.dial_failures == 1
    assert error == (f"{BOB[0]} declined: the peer's public candidate [fe80::1]:4000 is IPv6 "
                     f"link-local: dialling it needs a zone (an interface of ours), which "
                     f"our {port} does not carry")
    assert elapsed < BUDGETS[kind] / 5, f"{elapsed:.2f} s of a {BUDGETS[kind]} s budget"
    assert bob.stats.rejected == 1 and bob.stats.accept_failures == 0


# --- what gets a reject, and how many -------------------------------------------------

def _offer(kind: str, session: bytes, **bad: object) -> bytes:
    """A `kind` offer of `session` (valid unless `bad` replaces fields)."""
    bodies: dict[str, dict[str, object]] = {
        "punch": {"t": "punch-offer", "c": ["203.0.113.5:4000"], "n": True},
        "quic": {"t": "quic-offer", "c": ["203.0.113.5:4000"]},
        "webrtc": {"t": "rtc-offer", "sdp": "v=0\r\n"},
    }
    return packb({**bodies[kind], "s": session, **bad})


BAD: dict[str, dict[str, object]] = {
    "punch": {"c": ["224.0.0.1:4000"]}, "quic": {"c": ["example.net:4000"]},
    "webrtc": {"sdp": "x"}}


@asynccontextmanager
async def callee(kind: str, hub: MemoryPipe) -> AsyncIterator[Rung]:
    """BOB's `kind` endpoint on `hub`, its STUN a closed port (nothing is answered in
    full)."""
    bob = _make(kind, hub.sender(*BOB), (("127.0.0.1", 9), ("127.0.0.1", 9)))
    hub.attach(*BOB, bob.feed)
    await bob.start()
    try:
        yield bob
    finally:
        await bob.aclose()


REJECT = {"punch": "punch-reject", "quic": "quic-reject", "webrtc": "rtc-reject"}
BURST = int(UNSUPPORTED_RATE)  # replies a sender may have at once


@contextmanager
def one_instant(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The loop's clock held still while a flood is fed in one turn (no await between the
    offers), so its buckets refill nothing meanwhile however long the feeding takes: beside
    two CPU hogs it took long enough for 14 and 20 rejects where the burst is 10."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    with monkeypatch.context() as m:
        m.setattr(loop, "time", lambda: now)
        yield


@pytest.mark.parametrize("kind", ["punch", "quic", "webrtc"])
async def test_a_flood_of_invalid_offers_gets_at_most_the_bucket(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = MemoryPipe()
    alice = Inbox()
    hub.attach(*ALICE, alice.feed)
    async with callee(kind, hub) as bob:
        with one_instant(monkeypatch):
            for i in range(100):
                assert bob.feed(PipeMessage(*ALICE, _offer(kind, i.to_bytes(16, "big"),
                                                           **BAD[kind])))
        rejected = bob.stats.bad_offers_rejected
        assert rejected == BURST
        assert bob.stats.bad_offers_unanswered == 100 - rejected
        replies = await alice.wait_for(rejected, REJECT[kind])
        assert [unpackb(r.payload, max_bytes=1024)["s"] for r in replies] == [
            i.to_bytes(16, "big") for i in range(rejected)]
        assert len(alice.got) == rejected


@pytest.mark.parametrize("kind", ["punch", "quic", "webrtc"])
async def test_nothing_but_an_offer_is_rejected(kind: str) -> None:
    """Malformed replies of the rung are counted, never answered (two nodes can't bounce
    rejects off each other), nor is an offer with no session to name."""
    tags = {"punch": ("punch-answer", "punch-reject"), "quic": ("quic-answer", "quic-reject"),
            "webrtc": ("rtc-answer", "rtc-reject")}[kind]
    offer_tag = REJECT[kind].replace("-reject", "-offer")
    not_offers = [
        *(packb({"t": t, "s": SESSION, "c": ["224.0.0.1:1"], "why": 5}) for t in tags),
        packb({"t": "unsupported", "s": b"short", "of": offer_tag}),
        _offer(kind, b"short", **BAD[kind]),  # no session to name in a reject
        packb({"t": offer_tag}),
    ]
    hub = MemoryPipe()
    alice = Inbox()
    hub.attach(*ALICE, alice.feed)
    async with callee(kind, hub) as bob:
        for payload in not_offers:
            assert bob.feed(PipeMessage(*ALICE, payload)), payload
        assert bob.stats.bad_signals == len(not_offers)
        assert bob.stats.bad_offers_unanswered == 2
        # An invalid offer after them: its reject is the first message that comes back.
        assert bob.feed(PipeMessage(*ALICE, _offer(kind, SESSION, **BAD[kind])))
        (reply,) = await alice.wait_for(1)
        assert unpackb(reply.payload, max_bytes=1024)["t"] == REJECT[kind]
        assert bob.stats.bad_offers_rejected == 1


def _counted(monkeypatch: pytest.MonkeyPatch, table: Mapping[str, Callable[[Fields], Any]],
             tag: str) -> list[int]:
    """Count the decodes of `tag` through `table` (a rung's SIGNALS)."""
    calls = [0]
    real = table[tag]

    def decode(f: Fields) -> Any:
        calls[0] += 1
        return real(f)

    monkeypatch.setitem(cast(dict[str, Any], table), tag, decode)
    return calls


@pytest.mark.parametrize("kind", ["punch", "quic", "webrtc"])
async def test_a_repeated_offer_is_dropped_before_it_is_decoded(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIPE may repeat an offer across a reconnect: the repeat was decoded in full
    (ipaddress twice for each candidate, most of its cost) before it was found to be one."""
    tables: dict[str, tuple[Mapping[str, Callable[[Fields], Any]], str]] = {
        "punch": (punch_module._SIGNALS, PunchOffer.TAG),
        "quic": (quic_module._SIGNALS, QuicOffer.TAG),
        "webrtc": (signalling.SIGNALS, Offer.TAG)}
    table, tag = tables[kind]
    decodes = _counted(monkeypatch, table, tag)
    parses = [0]

    def parse(text: str) -> Any:
        parses[0] += 1
        return ipaddress.ip_address(text)

    monkeypatch.setattr(candidates, "ipaddress", SimpleNamespace(
        ip_address=parse, IPv4Address=ipaddress.IPv4Address,
        IPv6Address=ipaddress.IPv6Address))
    hub = MemoryPipe()
    alice = Inbox()
    hub.attach(*ALICE, alice.feed)
    async with callee(kind, hub) as bob:
        bob.settings = replace(bob.settings, max_incoming=0)  # a valid offer: "busy"
        for bad in (False, True):  # a valid offer, then an invalid one, each sent twice
            session = bytes([bad]) * 16
            offer = _offer(kind, session, **(BAD[kind] if bad else {}))
            for _ in range(2):
                assert bob.feed(PipeMessage(*ALICE, offer))
        assert decodes[0] == 2, decodes  # each candidate parsed once, each offer decoded once
        assert parses[0] == {"punch": 2, "quic": 2, "webrtc": 0}[kind]
        replies = await alice.wait_for(2, REJECT[kind])
        assert [unpackb(r.payload, max_bytes=1024)["why"] for r in replies] == [
            "busy", f"invalid offer: {_why(kind)}"]
        assert bob.stats.rejected == bob.stats.bad_offers_rejected == 1


def _why(kind: str) -> str:
    return {"punch": "the public candidate '224.0.0.1:4000' is multicast",
            "quic": "candidate 'example.net:4000' is not an IP address",
            "webrtc": "sdp does not start with v=0"}[kind]


# --- a node ------------------------------------------------------------------------------

async def test_a_node_rejects_bad_offers_of_every_rung_within_one_reply_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rungs and the 'unsupported' replies share one rate per sender: a flood of bad
    offers spread over the three rungs gets no more than one rung's flood would."""
    async with node_and_alice() as (links, alice):
        with one_instant(monkeypatch):
            for i in range(30):
                for kind in ("punch", "quic", "webrtc"):
                    links.feed(PipeMessage(*ALICE, _offer(kind, bytes([i]) * 16,
                                                          **BAD[kind])))
            links.feed(PipeMessage(*ALICE, packb({"t": "zz-offer", "s": SESSION})))
        rungs: list[SignalledEndpoint[Any, Any]] = [links.punch, links.quic, links.rtc]
        rejected = sum(r.stats.bad_offers_rejected for r in rungs)
        assert rejected == BURST
        assert sum(r.stats.bad_offers_unanswered for r in rungs) == 90 - rejected
        assert links.unknown.counters == {"limited": 1}
        await alice.wait_for(rejected)
        assert len(alice.got) == rejected


@pytest.mark.slow
async def test_a_node_rejects_a_bad_quic_offer_through_the_server(tmp_path: Path) -> None:
    rejected = (r"bad QUIC offer from zed@example\.net, rejected: the public candidate "
                r"'\[ff02::1\]:4000' is multicast")
    reply, log, got = await pipe_to_a_node(tmp_path, packb(
        {"t": "quic-offer", "s": SESSION, "c": ["[ff02::1]:4000"]}), rejected)
    assert reply == {"t": "quic-reject", "s": SESSION,
                     "why": "invalid offer: the public candidate '[ff02::1]:4000' is multicast"}
    assert re.search(rejected, log), log
    assert got[("peerpost_node_bad_offers_total",
                (("event", "rejected"), ("rung", "quic")))] == 1
