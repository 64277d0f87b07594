"""The QUIC rung over IPv6 on loopback (::1); test_quic.py (and test_punch.py for the TCP
punch) has two endpoints meet there and carry bytes. Here: the certificate pin names the IPv6
peer; a dialler and a callee whose ports are of different families fail at once with the
reason and leave no socket or task behind, over QUIC and the TCP punch alike; a STUN host
name with an IPv6 address only gives an IPv6 port; IPv6 candidates are matched in the text
the kernel gives a packet's source."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.codec import packb
from overlay.transports.candidates import unroutable
from overlay.transports.punch import (
    PunchAnswer,
    PunchEndpoint,
    PunchError,
    PunchOffer,
    PunchSettings,
    decode_punch,
    encode_punch,
)
from overlay.transports.quic import (
    QuicAnswer,
    QuicEndpoint,
    QuicError,
    QuicOffer,
    QuicSettings,
    decode_quic,
    encode_quic,
)
from overlay.transports.quic_stream import QuicPinError, ThrowawayCertificate
from overlay.transports.signalling import MemoryPipe, PipeSender
from overlay.transports.stream import StreamBroken
from rendezvous.messages import PipeMessage
from rendezvous.stun import Address, serve_stun, serve_stun_tcp
from tests.overlay.signalled_pair import ALICE, BOB, wired
from tests.overlay.streams import receive_exactly
from tests.overlay.test_quic import (
    NEEDS_V6,
    SESSION,
    _loopback_pair,
    endpoints,
)

V6, V4 = "::1", "127.0.0.1"
BUDGET = 3.0

pytestmark = NEEDS_V6


def _sockets() -> int:
    """Sockets this process has open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return n


async def _settled(sockets: int, tasks: int) -> tuple[int, int]:
    """The open sockets and running tasks once both are back to `sockets` and `tasks`,
    else as they are after a second (a closed transport lets its socket go on the loop's
    next turn)."""
    deadline = time.monotonic() + 1.0
    while True:
        now = _sockets(), len(asyncio.all_tasks())
        if now <= (sockets, tasks) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.01)


async def test_a_certificate_other_than_the_signalled_one_is_refused_over_ipv6() -> None:
    other = ThrowawayCertificate.make().fingerprint
    with pytest.raises(QuicPinError, match=r"the QUIC peer at \[::1\]:\d+ has certificate"):
        async with asyncio.timeout(10):
            await _loopback_pair(fingerprint=other, host=V6)


@dataclass(frozen=True)
class Rung:
    """What the address-family tests need of a punching rung: its STUN server, an endpoint
    asking it, its error, the name of its port in messages and an answer payload."""

    port: str
    error: type[StreamBroken]
    stun: Callable[[str], Awaitable[tuple[Address, Callable[[], Awaitable[None]]]]]
    endpoint: Callable[[PipeSender, Address], Any]
    answer: Callable[[bytes, tuple[Address, ...]], bytes | None]  # to an offer, or None


async def _udp_stun(host: str) -> tuple[Address, Callable[[], Awaitable[None]]]:
    transport, address = await serve_stun(host, 0)

    async def close() -> None:
        transport.close()

    return address, close


async def _tcp_stun(host: str) -> tuple[Address, Callable[[], Awaitable[None]]]:
    server = await serve_stun_tcp(host, 0)
    return server.address, server.aclose


def _quic_answer(payload: bytes, candidates: tuple[Address, ...]) -> bytes | None:
    offer = decode_quic(payload)
    if not isinstance(offer, QuicOffer):
        return None
    return encode_quic(QuicAnswer(offer.session, candidates, "0" * 64))


def _punch_answer(payload: bytes, candidates: tuple[Address, ...]) -> bytes | None:
    offer = decode_punch(payload)
    if not isinstance(offer, PunchOffer):
        return None
    return encode_punch(PunchAnswer(offer.session, candidates, nominate=offer.nominate))


RUNGS = [
    pytest.param(Rung("UDP port", QuicError, _udp_stun,
                      lambda pipe, stun: QuicEndpoint(pipe, QuicSettings(stun, budget=BUDGET)),
                      _quic_answer), id="quic"),
    pytest.param(Rung("TCP port", PunchError, _tcp_stun,
                      lambda pipe, stun: PunchEndpoint(pipe,
                                                       PunchSettings(stun, budget=BUDGET)),
                      _punch_answer), id="tcp-punch"),
]


@asynccontextmanager
async def _two_families(rung: Rung, dialler: str, callee: str) -> AsyncIterator[tuple[Any, Any]]:
    """Alice asks a STUN on `dialler`'s family, Bob one on `callee`'s."""
    (alice_stun, close_a), (bob_stun, close_b) = await rung.stun(dialler), await rung.stun(callee)
    hub = MemoryPipe()
    try:
        async with wired(hub, rung.endpoint(hub.sender(*ALICE), alice_stun),
                         rung.endpoint(hub.sender(*BOB), bob_stun)) as pair:
            yield pair
    finally:
        await close_a()
        await close_b()


@pytest.mark.parametrize("rung", RUNGS)
@pytest.mark.parametrize(("dialler", "callee", "offered", "ours"), [
    pytest.param(V6, V4, "IPv6", "IPv4", id="ipv6-dialler-ipv4-callee"),
    pytest.param(V4, V6, "IPv4", "IPv6", id="ipv4-dialler-ipv6-callee"),
])
async def test_a_callee_of_the_other_family_declines_at_once(
        rung: Rung, dialler: str, callee: str, offered: str, ours: str) -> None:
    async with _two_families(rung, dialler, callee) as (alice, bob):
        sockets, tasks = _sockets(), len(asyncio.all_tasks())
        t0 = time.monotonic()
        with pytest.raises(rung.error) as caught:
            await alice.dial(*BOB)
        assert time.monotonic() - t0 < 0.5 * BUDGET
        assert str(caught.value) == (
            f"bob@x.net declined: the offer has {offered} candidates only and this node's "
            f"{rung.port} would be {ours}, as its server's STUN is")
        assert await _settled(sockets, tasks) == (sockets, tasks)
        assert alice.stats.dial_failures == 1
        assert (bob.stats.rejected, bob.stats.accept_failures, bob.stats.accepted) == (1, 0, 0)


@pytest.mark.parametrize("rung", RUNGS)
async def test_an_answer_of_the_other_family_fails_the_dial_at_once(rung: Rung) -> None:
    """A callee that answers anyway (a release before the check above) with IPv4
    candidates to an IPv6 offer: the dialler says so at once, not at its budget."""
    stun, close = await rung.stun(V6)
    hub = MemoryPipe()
    alice = rung.endpoint(hub.sender(*ALICE), stun)
    bob_pipe = hub.sender(*BOB)
    answering: list[asyncio.Task[None]] = []

    def answer_v4(msg: PipeMessage) -> None:
        answer = rung.answer(msg.payload, (("127.0.0.1", 9), ("10.0.0.2", 9)))
        if answer is not None:
            answering.append(asyncio.get_running_loop().create_task(
                bob_pipe.pipe(msg.sender, answer, device=msg.sender_device)))

    hub.attach(*ALICE, alice.feed)
    hub.attach(*BOB, answer_v4)
    await alice.start()
    try:
        sockets, tasks = _sockets(), len(asyncio.all_tasks())
        t0 = time.monotonic()
        with pytest.raises(rung.error, match=rf"^the peer's candidates are IPv4 only and our "
                                             rf"{rung.port} is IPv6: no address family in "
                                             r"common$"):
            await alice.dial(*BOB)
        assert time.monotonic() - t0 < 0.5 * BUDGET
        await asyncio.gather(*answering)
        assert await _settled(sockets, tasks) == (sockets, tasks)
    finally:
        await alice.aclose()
        await close()


async def test_a_stun_host_name_with_only_an_ipv6_address_gives_an_ipv6_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node set up with `--server NAME:PORT` asks STUN at that name; where the name has
    an AAAA record only, the UDP port must be an IPv6 one (the resolver is the only stand-in
    here: this host has no such name)."""
    transport, (host, port) = await serve_stun(V6, 0, rate=1000, burst=1000)
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def resolve(name: Any, *args: Any, **kw: Any) -> Any:
        if name == "stun6.example.net":
            return [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (host, port, 0, 0))]
        return await real(name, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    try:
        named = QuicSettings(("stun6.example.net", port), budget=BUDGET)
        async with endpoints(host=V6, bob=named) as (alice, bob):
            dialled = await alice.dial(*BOB)
            accepted = await asyncio.wait_for(bob.accept(), 5)
            try:
                assert (dialled.peer_address() or "").startswith("[::1]:")
                await accepted.send_all(b"named")
                assert await receive_exactly(dialled, 5) == b"named"
            finally:
                await dialled.aclose()
                await accepted.aclose()
    finally:
        transport.close()


@given(ip=st.ip_addresses(v=6).filter(lambda ip: unroutable(str(ip)) is None),
       port=st.integers(1, 65535), written=st.sampled_from(["exploded", "upper"]))
def test_ipv6_candidates_decode_to_the_text_the_kernel_names_a_source_in(
        ip: ipaddress.IPv6Address, port: int, written: str) -> None:
    """A peer may write an IPv6 candidate in any valid form; its probes come from the
    kernel's text (inet_ntop's: compressed, lowercase, an IPv4-mapped one dotted), so that
    is what the candidate must become. (test_candidates.py checks it against a socket.)"""
    text = ip.exploded if written == "exploded" else str(ip).upper()
    offer = decode_quic(packb({"t": "quic-offer", "s": SESSION, "c": [f"[{text}]:{port}"]}))
    assert isinstance(offer, QuicOffer)
    assert offer.candidates == ((socket.inet_ntop(socket.AF_INET6, ip.packed), port),)
