"""`unroutable`: the answering end declines a WebRTC offer only when it has a route to none
of the offer's candidates. These are the cases where it must not decline (one that could
connect would be lost to the relay); the decline itself, across address families, is in
tests/natlab/test_dual_stack.py, which needs namespaces without a default route. And an
offer with hundreds of candidates costs no more route checks than the cap."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from overlay.transports import webrtc
from overlay.transports.signalling import (
    Answer,
    MemoryPipe,
    Offer,
    Reject,
    Signal,
    decode_signal,
    encode_signal,
)
from overlay.transports.webrtc import (
    MAX_ICE_CANDIDATES,
    WebRtcEndpoint,
    WebRtcSettings,
    cap_candidates,
    unroutable,
)


async def _offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.createDataChannel("peerpost", negotiated=True, id=0)
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def _with_hosts(offer: str, *hosts: str) -> str:
    """`offer` with its candidate lines replaced by one host candidate per address."""
    kept = [line for line in offer.splitlines() if not line.startswith("a=candidate:")]
    at = next(i for i, line in enumerate(kept) if line.startswith("a=end-of-candidates")
              or line.startswith("a=ice-ufrag"))
    lines = [f"a=candidate:{n} 1 udp 2130706431 {host} 4{n:04d} typ host"
             for n, host in enumerate(hosts, 1)]
    return "\r\n".join([*kept[:at], *lines, *kept[at:]]) + "\r\n"


async def test_an_offer_is_declined_only_when_no_candidate_has_a_route() -> None:
    offer = await _offer()
    assert re.search(r"^a=candidate:", offer, re.M), offer
    assert await unroutable(offer) is None  # our own addresses
    assert await unroutable(_with_hosts(offer, "127.0.0.1")) is None
    assert await unroutable(_with_hosts(offer, "::1")) is None
    # An mDNS name can't be judged here: ICE resolves it, so the offer is answered.
    assert await unroutable(_with_hosts(offer, "1f4712db-ea17-4bcf-a596-105139dfd8bf.local")
                            ) is None
    assert await unroutable(_with_hosts(offer)) is None  # nothing to judge by
    assert await unroutable("not an SDP") is None  # `_check_offer` refuses it


# --- an offer with more candidates than are considered ------------------------------

ALICE, BOB = ("alice@x.net", b"a" * 20), ("bob@x.net", b"b" * 20)


def test_the_candidates_over_the_cap_are_left_out_reflexive_ones_kept_first() -> None:
    hosts = [f"a=candidate:{n} 1 udp 2130706431 10.1.{n // 250}.{n % 250} 5{n:04d} typ host"
             for n in range(40)]
    srflx = ["a=candidate:s1 1 udp 1694498815 198.51.100.7 61000 typ srflx raddr 10.1.0.0 "
             "rport 50000"]
    sdp = "\r\n".join(["v=0", "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", *hosts,
                       *srflx, "a=end-of-candidates", ""])
    capped, dropped = cap_candidates(sdp, 32)
    lines = capped.split("\r\n")
    assert dropped == 9
    assert [x for x in lines if x.startswith("a=candidate:")] == [*hosts[:31], *srflx]
    assert lines[:2] == ["v=0", "m=application 9 UDP/DTLS/SCTP webrtc-datachannel"]
    assert lines[-2:] == ["a=end-of-candidates", ""]
    assert cap_candidates(sdp, 41) == (sdp, 0)


async def _offer_to_bob(offer_sdp: str, settings: WebRtcSettings
                        ) -> tuple[Signal, WebRtcEndpoint]:
    """BOB's endpoint (aiortc) gets `offer_sdp` from ALICE; its first reply."""
    hub = MemoryPipe()
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    hub.attach(*ALICE, lambda m: replies.put_nowait(m.payload))
    bob = WebRtcEndpoint(hub.sender(*BOB), settings)
    hub.attach(*BOB, bob.feed)
    async with bob:
        await hub.sender(*ALICE).pipe(BOB[0], encode_signal(Offer(b"s" * 16, offer_sdp)),
                                      device=BOB[1])
        async with asyncio.timeout(10):
            return decode_signal(await replies.get()), bob


async def test_a_500_candidate_offer_costs_at_most_the_cap_of_route_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """500 candidates none of which this host can reach (the route check says so): 32
    checks, not 500, and the dialler gets the decline naming the 32."""
    checked: list[str] = []

    async def no_route(host: str, port: int) -> str | None:
        checked.append(host)
        return None

    monkeypatch.setattr(webrtc, "route_ip", no_route)
    hosts = [f"198.18.{n // 250}.{n % 250 + 1}" for n in range(500)]
    reply, bob = await _offer_to_bob(_with_hosts(await _offer(), *hosts), WebRtcSettings())
    assert sorted(checked) == sorted(hosts[:MAX_ICE_CANDIDATES])
    assert isinstance(reply, Reject)
    assert reply.reason.startswith("no route from this host to any of the offer's "
                                   "candidates (198.18.0.1, ")
    assert bob.stats.candidates_dropped == 500 - MAX_ICE_CANDIDATES


async def test_a_500_candidate_offer_with_a_route_is_answered() -> None:
    """The same offer with candidates this host reaches (loopback): answered, with the real
    route check, and the answer is an SDP aiortc made from the first 32."""
    hosts = [f"127.0.{n // 250}.{n % 250 + 1}" for n in range(500)]
    reply, bob = await _offer_to_bob(_with_hosts(await _offer(), *hosts),
                                      WebRtcSettings(connect_timeout=0.5))
    assert isinstance(reply, Answer) and reply.sdp.startswith("v=0")
    assert bob.stats.candidates_dropped == 500 - MAX_ICE_CANDIDATES
