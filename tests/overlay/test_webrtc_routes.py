"""`unroutable`: the answering end declines a WebRTC offer only when it has a route to none
of the offer's candidates. These are the cases where it must not decline (one that could
connect would be lost to the relay); the decline itself, across address families, is in
tests/natlab/test_dual_stack.py, which needs namespaces without a default route."""

from __future__ import annotations

import re

from aiortc import RTCConfiguration, RTCPeerConnection

from overlay.transports.webrtc import unroutable


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
