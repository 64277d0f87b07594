"""TCP hole punching on loopback: two endpoints signalling through an in-process PIPE, each
learning its mapping from a real STUN-over-TCP service, meet in a simultaneous open.
(Through real NATs: tests/natlab/test_punch_nat.py.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from crypto.codec import packb, unpackb
from overlay.transports.punch import (
    NOMINATION,
    BadNomination,
    Nomination,
    PunchAnswer,
    PunchEndpoint,
    PunchError,
    PunchOffer,
    PunchPort,
    PunchSettings,
    PunchSignalError,
    decode_punch,
    encode_punch,
    simultaneous_open,
)
from overlay.transports.signalling import MemoryPipe
from overlay.transports.stream import Stream
from rendezvous.messages import PipeMessage
from rendezvous.stun import TcpMapping, query_tcp_mapping, reusable_socket, serve_stun_tcp
from rendezvous.taskset import TaskSet
from tests.overlay.signalled_pair import ALICE, BOB, wired
from tests.overlay.streams import check_stream, receive_exactly
from tests.overlay.test_quic import NEEDS_V6

SESSION = b"s" * 16


async def _request_reply(dialled: Stream, accepted: Stream) -> None:
    """Bytes pass both ways over the one connection both ends kept; then both close."""
    await dialled.send_all(b"request")
    assert await receive_exactly(accepted, 7) == b"request"
    await accepted.send_all(b"reply")
    assert await receive_exactly(dialled, 5) == b"reply"
    await dialled.aclose()
    await accepted.aclose()


@asynccontextmanager
async def pair(*, bob_stun: bool = True, budget: float = 3.0, host: str = "127.0.0.1"
               ) -> AsyncIterator[tuple[PunchEndpoint, PunchEndpoint]]:
    stun = await serve_stun_tcp(host, 0)
    hub = MemoryPipe()
    try:
        async with wired(hub, PunchEndpoint(hub.sender(*ALICE),
                                            PunchSettings(stun.address, budget=budget)),
                         PunchEndpoint(hub.sender(*BOB), PunchSettings(
                             stun.address if bob_stun else None, budget=budget))) as both:
            yield both
    finally:
        await stun.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=NEEDS_V6, id="ipv6")])
async def test_a_punched_stream_carries_bytes_both_ways_and_says_tcp_punch(host: str) -> None:
    async with pair(host=host) as (alice, bob):
        dialled = await alice.dial(*BOB)
        accepted = await asyncio.wait_for(bob.accept(), 5)
        assert dialled.path == accepted.path == "tcp-punch"
        for s in (dialled, accepted):  # the port and the peer of STUN's family
            assert (s.peer_address() or "").startswith("[::1]:" if ":" in host else host), s
        await _request_reply(dialled, accepted)
        assert alice.stats.dials == 1 and alice.stats.dial_failures == 0
        assert bob.stats.accepted == 1


async def test_punched_streams_pass_the_stream_conformance_suite() -> None:
    async with pair() as (alice, bob):
        async def make() -> tuple[Stream, Stream]:
            d = await alice.dial(*BOB)
            return d, await asyncio.wait_for(bob.accept(), 5)

        await check_stream(make)


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


# --- nomination: both ends keep the same connection -----------------------------------

def test_the_nomination_is_negotiated_and_messages_of_the_earlier_protocol_decode() -> None:
    offer = PunchOffer(SESSION, (("198.18.0.1", 4000),), nominate=True)
    assert decode_punch(encode_punch(offer)) == offer
    # A peer of the earlier protocol sends no "n": it neither nominates nor awaits one.
    earlier = packb({"t": "punch-answer", "s": SESSION, "c": ["198.18.0.1:4000"]})
    assert decode_punch(earlier) == PunchAnswer(SESSION, (("198.18.0.1", 4000),))
    # ... and reads ours as before: the same keys and values, "n" beside them.
    ours = unpackb(encode_punch(offer), max_bytes=1024)
    assert {k: v for k, v in ours.items() if k != "n"} == {
        "t": "punch-offer", "s": SESSION, "c": ["198.18.0.1:4000"]}
    assert encode_punch(PunchOffer(SESSION, (("198.18.0.1", 4000),))) == packb(
        {"s": SESSION, "c": ["198.18.0.1:4000"], "t": "punch-offer"})
    with pytest.raises(PunchSignalError):
        decode_punch(packb({"t": "punch-offer", "s": SESSION, "c": ["198.18.0.1:4000"],
                            "n": "yes"}))


PUBLIC = "127.0.0.2"  # both ends' "NAT", hairpinning: each also dials the other's local


def _port(local: str) -> PunchPort:
    """A punch port on `local` (a loopback address) whose public mapping is on PUBLIC: a
    listener on every address of the port, the connects from `local`."""
    listener = reusable_socket(socket.AF_INET, ("0.0.0.0", 0))
    port = listener.getsockname()[1]
    try:
        held = reusable_socket(socket.AF_INET, (local, port))  # the STUN connection's
    except OSError as exc:
        listener.close()
        pytest.skip(f"cannot bind {local}: {exc}")
    listener.listen(8)
    return PunchPort(TcpMapping((PUBLIC, port), (local, port), held), listener)


async def _pending(listener: socket.socket) -> None:
    """Until a connection waits in `listener`'s queue (nobody accepting on it yet)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(listener.fileno(), ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(listener.fileno())


@pytest.mark.parametrize("first", ["answerer", "dialer", "neither"])
async def test_each_end_holds_several_connections_and_both_keep_the_nominated_one(
        first: str) -> None:
    # Each end dials the other's public and local address and listens on every address of
    # its port: each connect lands on the other's listener, and each end holds several
    # connections (those it made, those it took), more when one end started first.
    # Whichever comes first where, both must keep the connection the dialer wrote on.
    dialer, answerer = _port("127.0.0.10"), _port("127.0.0.20")
    try:
        async def run(me: PunchPort, peer: PunchPort, role: Nomination) -> Stream:
            return await simultaneous_open(me, peer.candidates, nomination=role)

        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            if first == "dialer":
                d = tg.create_task(run(dialer, answerer, Nomination.SEND))
                await _pending(answerer.listener)  # its connects are in
            a = tg.create_task(run(answerer, dialer, Nomination.AWAIT))
            if first == "answerer":
                await _pending(dialer.listener)
            if first != "dialer":
                d = tg.create_task(run(dialer, answerer, Nomination.SEND))
        sd, sa = d.result(), a.result()
        await _request_reply(sd, sa)
    finally:
        dialer.close()
        answerer.close()


async def _connection_to(listener: socket.socket) -> socket.socket:
    """A connection from a port of its own to `listener` (a peer's NAT giving its SYN a
    port STUN did not see), taken on the far end only when the punch accepts."""
    loop = asyncio.get_running_loop()
    sock = reusable_socket(socket.AF_INET, ("127.0.0.1", 0))
    await loop.sock_connect(sock, ("127.0.0.1", listener.getsockname()[1]))
    return sock


async def _eof(sock: socket.socket) -> bool:
    """Did the far end close `sock` (EOF or reset), reading what came first?"""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1024):
            pass
    except ConnectionResetError:
        pass
    return True


@asynccontextmanager
async def scripted_dialer() -> AsyncIterator[tuple[PunchPort, socket.socket]]:
    """The answerer's port, and the listener of a dialer the test plays by hand."""
    stun = await serve_stun_tcp("127.0.0.1", 0)
    mapping = await query_tcp_mapping(stun.address)
    port = PunchPort.ready(mapping)
    peer = reusable_socket(socket.AF_INET, ("127.0.0.1", 0))
    peer.listen(8)
    try:
        yield port, peer
    finally:
        peer.close()
        port.close()
        await stun.aclose()


async def test_garbage_instead_of_the_nomination_drops_that_connection_only() -> None:
    loop = asyncio.get_running_loop()
    session = bytes(range(16))
    async with scripted_dialer() as (port, peer), asyncio.timeout(5):
        garbage = await _connection_to(port.listener)  # in the answerer's queue first
        stranger = await _connection_to(port.listener)  # knows the protocol, not the session
        bad: list[PunchError] = []
        try:
            async with asyncio.TaskGroup() as tg:
                answering = tg.create_task(simultaneous_open(
                    port, (peer.getsockname(),), nomination=Nomination.AWAIT,
                    on_bad=bad.append, session=session))
                nominated, _ = await loop.sock_accept(peer)  # the answerer's connect
                await loop.sock_sendall(garbage, b"GET / HTTP/1.1\r\n")
                assert await _eof(garbage)  # dropped, not taken
                await loop.sock_sendall(stranger, NOMINATION + bytes(16))
                assert await _eof(stranger)
                assert not answering.done()
                assert [type(e) for e in bad] == [BadNomination] * 2
                assert all("instead of the nomination" in str(e) for e in bad)
                # The transfer handshake follows the marker at once: none of it is lost.
                await loop.sock_sendall(nominated, NOMINATION + session + b"hello")
            stream = answering.result()
            assert await receive_exactly(stream, 5) == b"hello"
            await stream.send_all(b"world")
            assert await loop.sock_recv(nominated, 5) == b"world"
            await stream.aclose()
            nominated.close()
        finally:
            garbage.close()
            stranger.close()


async def test_an_answerer_never_nominated_closes_every_connection_it_held() -> None:
    loop = asyncio.get_running_loop()
    async with scripted_dialer() as (port, peer):
        taken = await _connection_to(port.listener)
        made: list[socket.socket] = []

        async def dialer_by_hand() -> None:
            sock, _ = await loop.sock_accept(peer)
            made.append(sock)
            await loop.sock_sendall(sock, NOMINATION[:3])  # part of it, then silence

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(dialer_by_hand())
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await simultaneous_open(port, (peer.getsockname(),),
                                                nomination=Nomination.AWAIT)
            async with asyncio.timeout(5):
                assert await _eof(taken)
                assert await _eof(made[0])
        finally:
            for sock in [taken, *made]:
                sock.close()


def _earlier_protocol(hub: MemoryPipe, me: tuple[str, bytes], stun: tuple[str, int],
                      tasks: TaskSet) -> asyncio.Queue[Stream]:
    """A device of the earlier protocol attached to `hub`: it answers offers without
    "n", and keeps its first connection; the queue gets its streams."""
    streams: asyncio.Queue[Stream] = asyncio.Queue()

    async def answer(msg: PipeMessage, offer: PunchOffer) -> None:
        port = PunchPort.ready(await query_tcp_mapping(stun))
        try:
            await hub.sender(*me).pipe(msg.sender, encode_punch(
                PunchAnswer(offer.session, port.candidates)), device=msg.sender_device)
            streams.put_nowait(await simultaneous_open(port, offer.candidates))
        finally:
            port.close()

    def feed(msg: PipeMessage) -> None:
        sig = decode_punch(msg.payload)
        if isinstance(sig, PunchOffer):  # its decoder never read "n"
            tasks.spawn(answer(msg, sig))

    hub.attach(*me, feed)
    return streams


async def test_a_new_dialer_and_an_answerer_of_the_earlier_protocol_share_a_stream() -> None:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    hub = MemoryPipe()
    alice = PunchEndpoint(hub.sender(*ALICE), PunchSettings(stun.address))
    hub.attach(*ALICE, alice.feed)
    tasks = TaskSet("earlier bob")
    bobs = _earlier_protocol(hub, BOB, stun.address, tasks)
    await alice.start()
    try:
        dialled = await alice.dial(*BOB)
        accepted = await asyncio.wait_for(bobs.get(), 5)
        await _request_reply(dialled, accepted)  # no marker before it: bob expects none
    finally:
        await tasks.aclose()
        await alice.aclose()
        await stun.aclose()


async def test_a_dialer_of_the_earlier_protocol_and_a_new_answerer_share_a_stream() -> None:
    stun = await serve_stun_tcp("127.0.0.1", 0)
    hub = MemoryPipe()
    bob = PunchEndpoint(hub.sender(*BOB), PunchSettings(stun.address))
    hub.attach(*BOB, bob.feed)
    answers: asyncio.Queue[bytes] = asyncio.Queue()
    hub.attach(*ALICE, lambda msg: answers.put_nowait(msg.payload))
    await bob.start()
    port = PunchPort.ready(await query_tcp_mapping(stun.address))
    try:
        await hub.sender(*ALICE).pipe(BOB[0], encode_punch(
            PunchOffer(SESSION, port.candidates)), device=BOB[1])
        payload = await asyncio.wait_for(answers.get(), 5)
        assert "n" not in unpackb(payload, max_bytes=1024)  # awaits no marker from alice
        answer = decode_punch(payload)
        assert isinstance(answer, PunchAnswer) and not answer.nominate
        async with asyncio.timeout(5):
            dialled = await simultaneous_open(port, answer.candidates)
            accepted = await bob.accept()
        await _request_reply(dialled, accepted)
    finally:
        port.close()
        await bob.aclose()
        await stun.aclose()
