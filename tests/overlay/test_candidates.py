"""The candidates the TCP punch and QUIC trade (overlay/transports/candidates.py), in both
codecs alike: an address that means nothing to another host (link-local, zoned, unspecified,
multicast, reserved) is dropped when a peer names it as a local candidate, so that peer still
gets through, and makes the signal invalid as its public one, with the reason, but for a
link-local one without a zone (what STUN sees of a node on its server's link), which is
dialled from a link-local address alone; a loopback candidate is dialled only from loopback;
a candidate comes back in the text a socket gives the source of a packet."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.address import format_hostport
from crypto.codec import packb
from overlay.transports.candidates import (
    candidate,
    nothing_to_dial,
    own_candidates,
    targets,
)
from overlay.transports.punch import PunchReject, PunchSignalError, decode_punch, encode_punch
from overlay.transports.quic import QuicReject, QuicSignalError, decode_quic, encode_quic
from overlay.transports.signalling import MemoryPipe
from rendezvous.stun import Address
from tests.overlay.signalled_pair import BOB
from tests.overlay.streams import receive_exactly
from tests.overlay.test_punch import pair
from tests.overlay.test_quic import NEEDS_V6, SESSION, endpoints

# What means nothing off the sender's host or link, written out here as networks (the code
# asks ipaddress's is_* properties): an IPv4-mapped IPv6 address is judged as its IPv4 one.
NOWHERE = [ipaddress.ip_network(n) for n in (
    "fe80::/10", "ff00::/8", "::/128",
    "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "0.0.0.0/8")]

CODECS = [
    pytest.param("quic-offer", decode_quic, QuicSignalError, {}, id="quic-offer"),
    pytest.param("quic-answer", decode_quic, QuicSignalError, {"fp": "0" * 64},
                 id="quic-answer"),
    pytest.param("punch-offer", decode_punch, PunchSignalError, {}, id="punch-offer"),
    pytest.param("punch-answer", decode_punch, PunchSignalError, {}, id="punch-answer"),
]
PUBLIC = "198.51.100.7:4000"


def _means_nothing_elsewhere(text: str) -> bool:
    if "%" in text:
        return True  # a zone names an interface of the sender's
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in NOWHERE)


def _on_a_link(text: str) -> bool:
    """Link-local without a zone: a public candidate STUN gave a node on its server's link."""
    if "%" in text:
        return False
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in ipaddress.ip_network("169.254.0.0/16" if ip.version == 4 else "fe80::/10")


# Any address, now and then with a zone; link-local and the other special ranges are drawn
# often by Hypothesis's ip_addresses.
hosts = st.ip_addresses().map(str) | st.builds(
    lambda ip, zone: f"{ip}%{zone}", st.ip_addresses(v=6), st.sampled_from(["eth0", "lo", "3"]))


@pytest.mark.parametrize(("tag", "decode", "error", "extra"), CODECS)
@given(host=hosts, port=st.integers(1, 65535))
def test_a_local_candidate_that_means_nothing_elsewhere_is_dropped_the_rest_kept(
        tag: str, decode: Callable[[bytes], Any], error: type[Exception],
        extra: dict[str, Any], host: str, port: int) -> None:
    sig = decode(packb({"t": tag, "s": SESSION, "c": [PUBLIC, format_hostport(host, port)],
                        **extra}))
    if _means_nothing_elsewhere(host):
        assert sig.candidates == (("198.51.100.7", 4000),)
    else:
        assert sig.candidates == (("198.51.100.7", 4000), candidate(format_hostport(host, port)))


@pytest.mark.parametrize(("tag", "decode", "error", "extra"), CODECS)
@given(host=hosts, port=st.integers(1, 65535))
def test_a_public_candidate_that_means_nothing_elsewhere_refuses_the_signal(
        tag: str, decode: Callable[[bytes], Any], error: type[Exception],
        extra: dict[str, Any], host: str, port: int) -> None:
    text = format_hostport(host, port)
    payload = packb({"t": tag, "s": SESSION, "c": [text, PUBLIC], **extra})
    if not _means_nothing_elsewhere(host) or _on_a_link(host):
        assert decode(payload).candidates[0] == candidate(text)
        return
    with pytest.raises(error) as caught:
        decode(payload)
    assert f"the public candidate {text!r} " in str(caught.value)


@pytest.mark.parametrize(("text", "why"), [
    ("[fe80::1%eth0]:9", "has a zone (%eth0, an interface of the sender's)"),
    ("0.0.0.0:9", "is unspecified (in 0.0.0.0/8, or ::): a connect takes it for its own host"),
    ("[::ffff:0.0.0.0]:9", "is unspecified"),
    ("[ff02::1]:9", "is multicast"),
    ("255.255.255.255:9", "is reserved or broadcast"),
])
def test_the_refusal_says_which_candidate_and_why(text: str, why: str) -> None:
    with pytest.raises(PunchSignalError) as caught:
        decode_punch(packb({"t": "punch-offer", "s": SESSION, "c": [text]}))
    assert f"the public candidate {text!r} {why}" in str(caught.value)


def test_our_own_link_local_address_is_not_offered() -> None:
    assert own_candidates(("203.0.113.5", 4000), ("fe80::1%eth0", 4000)) == (
        ("203.0.113.5", 4000),)
    assert own_candidates(("203.0.113.5", 4000), ("10.0.0.2", 4000)) == (
        ("203.0.113.5", 4000), ("10.0.0.2", 4000))


@pytest.mark.parametrize(("ours", "theirs", "dialled"), [
    ("198.51.100.1", (("127.0.0.1", 22),), []),  # our own host's services, from afar
    ("198.51.100.1", (("::ffff:127.0.0.1", 22),), []),
    ("198.51.100.1", (("203.0.113.9", 4000), ("127.0.0.1", 22)), [("203.0.113.9", 4000)]),
    ("127.0.0.1", (("127.0.0.1", 22),), [("127.0.0.1", 22)]),  # both on one host
])
def test_a_loopback_candidate_is_dialled_only_from_loopback(
        ours: str, theirs: tuple[Address, ...], dialled: list[Address]) -> None:
    family = socket.AF_INET6 if ":" in theirs[0][0] else socket.AF_INET
    assert targets(ours, theirs, family) == dialled
    if not dialled:
        assert nothing_to_dial(theirs, family, "TCP port").endswith(
            "reach it from its own host only, and ours are not on loopback")


@pytest.mark.parametrize(("ours", "theirs", "dialled"), [
    # Both on their servers' links (IPv4 link-local, no DHCP): dialled, as the pair connects.
    ("169.254.7.1", (("169.254.9.2", 4000),), [("169.254.9.2", 4000)]),
    ("::ffff:169.254.7.1", (("::ffff:169.254.9.2", 4000),), [("::ffff:169.254.9.2", 4000)]),
    # We are not on a link with our server: its link is not ours to aim at.
    ("198.51.100.1", (("169.254.9.2", 4000),), []),
    # IPv6 link-local would need a zone of ours, which our ports don't carry.
    ("fe80::1", (("fe80::2", 4000),), []),
    # A link-local public candidate does not stop a routable one of ours being dialled.
    ("169.254.7.1", (("203.0.113.9", 4000),), [("203.0.113.9", 4000)]),
    # Never the cloud metadata service, nor the /24s no host on a link may pick.
    ("169.254.7.1", (("169.254.169.254", 80),), []),
    ("::ffff:169.254.7.1", (("::ffff:169.254.169.254", 80),), []),
    ("169.254.7.1", (("169.254.0.9", 4000),), []),
    ("169.254.7.1", (("169.254.255.9", 4000),), []),
])
def test_a_link_local_public_candidate_is_dialled_only_on_a_link(
        ours: str, theirs: tuple[Address, ...], dialled: list[Address]) -> None:
    family = socket.AF_INET6 if ":" in theirs[0][0] else socket.AF_INET
    assert targets(ours, theirs, family) == dialled


@pytest.mark.parametrize(("tag", "decode", "error", "extra"), CODECS)
def test_a_link_local_public_candidate_is_kept_and_a_failure_says_why(
        tag: str, decode: Callable[[bytes], Any], error: type[Exception],
        extra: dict[str, Any]) -> None:
    """What STUN sees of a node on its server's link is its public candidate: the signal
    is valid (it was refused as the peer's fault, so the dialler waited out its budget)."""
    for text, host in (("169.254.9.2:4000", "169.254.9.2"), ("[fe80::2]:4000", "fe80::2")):
        sig = decode(packb({"t": tag, "s": SESSION, "c": [text, "10.0.0.2:4000"], **extra}))
        assert sig.candidates == ((host, 4000), ("10.0.0.2", 4000))
    v4 = (("169.254.9.2", 4000),)
    assert nothing_to_dial(v4, socket.AF_INET, "UDP port") == (
        "the peer's public candidate 169.254.9.2:4000 is link-local, on its server's link, "
        "and ours is not: this node's server is not on a link with it")
    # The same host (its loopback local candidate left out): the link-local one is why.
    v6 = (("fe80::2", 4000), ("::1", 4000))
    assert targets("fe80::2", v6, socket.AF_INET6) == []
    assert nothing_to_dial(v6, socket.AF_INET6, "TCP port") == (
        "the peer's public candidate [fe80::2]:4000 is IPv6 link-local: dialling it needs a "
        "zone (an interface of ours), which our TCP port does not carry")


@NEEDS_V6
def test_an_ipv4_mapped_candidate_is_the_text_a_dual_stack_socket_gives_its_source() -> None:
    """A node on a dual-stack socket sees an IPv4 peer as ::ffff:a.b.c.d (inet_ntop);
    Python 3.11's ipaddress writes ::ffff:7f00:1, which would match no probe."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as six, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four:
        six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        six.bind(("::", 0))
        four.bind(("127.0.0.1", 0))
        four.sendto(b"probe", ("127.0.0.1", six.getsockname()[1]))
        six.settimeout(5)
        _, source = six.recvfrom(16)
        port = four.getsockname()[1]
    assert candidate(f"[::ffff:7f00:1]:{port}") == (source[0], source[1]) \
        == ("::ffff:127.0.0.1", port)


def _with_a_link_local_candidate(payload: bytes) -> bytes:
    """`payload` (a punch or QUIC offer or answer) naming one more local candidate, a
    zoned link-local one, as a peer on a LAN with IPv6 might."""
    zoned = ("fe80::1%lo", 9)
    punch = decode_punch(payload)
    if punch is not None and not isinstance(punch, PunchReject):
        return encode_punch(dataclasses.replace(punch, candidates=(*punch.candidates, zoned)))
    quic = decode_quic(payload)
    if quic is not None and not isinstance(quic, QuicReject):
        return encode_quic(dataclasses.replace(quic, candidates=(*quic.candidates, zoned)))
    return payload


class LinkLocalHub(MemoryPipe):
    """A PIPE hub whose every offer and answer names a zoned link-local candidate too."""

    def deliver(self, sender: tuple[str, bytes], to: str, device: bytes | None,
                payload: bytes) -> None:
        super().deliver(sender, to, device, _with_a_link_local_candidate(payload))


@NEEDS_V6
@pytest.mark.parametrize("rung", ["tcp-punch", "quic"])
async def test_a_peer_naming_a_link_local_candidate_still_gets_through(
        rung: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.overlay.test_punch.MemoryPipe", LinkLocalHub)
    monkeypatch.setattr("tests.overlay.test_quic.MemoryPipe", LinkLocalHub)
    both = pair(host="::1") if rung == "tcp-punch" else endpoints(host="::1")
    async with both as (alice, bob):
        dialled = await alice.dial(*BOB)
        accepted = await asyncio.wait_for(bob.accept(), 5)
        try:
            assert dialled.path == accepted.path == rung
            await dialled.send_all(b"over ::1")
            assert await receive_exactly(accepted, 8) == b"over ::1"
        finally:
            await dialled.aclose()
            await accepted.aclose()
        assert alice.stats.bad_signals == bob.stats.bad_signals == 0
