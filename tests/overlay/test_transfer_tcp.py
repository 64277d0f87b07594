"""Direct TCP passes the Stream conformance suite, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncGenerator
from typing import Any

import pytest
import uvloop

from overlay.transports.stream import Stream, StreamBroken, StreamClosed
from overlay.transports.tcp import (
    PULL_READ,
    UNACKED_LIMIT,
    TcpStream,
    connect_tcp,
    serve_tcp,
)
from tests.overlay.streams import MakePair, check_stream


async def _tcp_pairs() -> AsyncGenerator[MakePair, None]:
    accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
    closed = asyncio.Event()

    async def handler(stream: TcpStream) -> None:
        await accepted.put(stream)
        await closed.wait()  # the test owns the stream; keep the handler alive until teardown

    server = await serve_tcp(handler, "127.0.0.1", 0)
    assert server.address is not None
    host, port = server.address

    async def make_pair() -> tuple[Stream, Stream]:
        client = await connect_tcp(host, port, timeout=5)
        return client, await accepted.get()

    try:
        yield make_pair
    finally:
        closed.set()
        await server.aclose()


async def _run_suite() -> None:
    gen = _tcp_pairs()
    make_pair = await anext(gen)
    try:
        await check_stream(make_pair)
    finally:
        await gen.aclose()


async def test_tcp_conforms() -> None:
    await _run_suite()


def test_tcp_conforms_on_uvloop() -> None:
    uvloop.run(_run_suite())


async def test_connect_refused_is_a_stream_error() -> None:
    server = await serve_tcp(lambda s: asyncio.sleep(0), "127.0.0.1", 0)
    assert server.address is not None
    port = server.address[1]
    await server.aclose()
    with pytest.raises(StreamBroken, match="cannot connect"):
        await connect_tcp("127.0.0.1", port, timeout=5)


async def _receive_into_mixed(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(3 << 20)
    gen = _tcp_pairs()
    make_pair = await anext(gen)
    try:
        client, server = await make_pair()
        assert isinstance(client, TcpStream) and isinstance(server, TcpStream)

        async def send() -> None:
            view = memoryview(data)
            while view:
                n = rng.randint(1, 300_000)
                await server.send_all(view[:n])
                view = view[n:]
            await server.send_eof()

        got = bytearray()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            while True:
                if rng.random() < 0.3:
                    part = await client.receive_some(rng.randint(1, 70_000))
                    if not part:
                        break
                    got += part
                else:
                    buf = bytearray(rng.randint(1, 1_200_000))
                    n = await client.receive_into(memoryview(buf), fill=rng.random() < 0.5)
                    if not n:
                        break
                    got += buf[:n]
        assert got == data
        assert client.bytes_received() == len(data)
        assert await client.receive_into(memoryview(bytearray(10))) == 0  # EOF stays EOF
        with pytest.raises(ValueError):
            await client.receive_into(memoryview(bytearray()))
        await client.aclose()
        with pytest.raises(StreamClosed):
            await client.receive_into(memoryview(bytearray(10)))
    finally:
        await gen.aclose()


@pytest.mark.parametrize("seed", range(3))
async def test_receive_into_and_receive_some_interleave(seed: int) -> None:
    await _receive_into_mixed(seed)


@pytest.mark.parametrize("seed", range(3))
def test_receive_into_reads_straight_into_the_buffer_on_uvloop(seed: int) -> None:
    """uvloop takes the buffered-protocol path only for a protocol that is not an
    asyncio.Protocol: the same bytes either way, in pull mode, whatever the buffer sizes."""
    uvloop.run(_receive_into_mixed(seed))


async def _fill_cut_by_a_deadline(seed: int) -> None:
    """A receive waiting to fill its buffer whose deadline expires with part of it there
    (a slow chunk) loses nothing: the bytes come next, in order, and were counted as they
    arrived (the downloader's stall timer takes them for a trickle)."""
    rng = random.Random(seed)
    first, rest = rng.randbytes(5000), rng.randbytes(2 << 20)
    gen = _tcp_pairs()
    make_pair = await anext(gen)
    try:
        client, server = await make_pair()
        assert isinstance(client, TcpStream)
        await server.send_all(first)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.receive_into(memoryview(bytearray(1 << 20)), fill=True)
        assert client.bytes_received() == len(first)

        async def send() -> None:
            await server.send_all(rest)
            await server.send_eof()

        sizes = []
        got = bytearray()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            while True:
                buf = bytearray(600_000)
                n = await client.receive_into(memoryview(buf), fill=True)
                if not n:
                    break
                sizes.append(n)
                got += buf[:n]
        assert got == first + rest
        # What the cut receive had comes back at once, as do the bytes of a scratch read
        # after a full buffer; else each buffer comes back full, until the stream ends.
        assert sizes[0] == len(first)
        assert all(n == 600_000 or n <= PULL_READ for n in sizes[1:-1])
        assert sizes.count(600_000) >= 2
        assert client.bytes_received() == len(first) + len(rest)
        await client.aclose()
    finally:
        await gen.aclose()


@pytest.mark.parametrize("seed", range(2))
async def test_a_fill_cut_by_a_deadline_loses_nothing(seed: int) -> None:
    await _fill_cut_by_a_deadline(seed)


def test_a_fill_cut_by_a_deadline_loses_nothing_on_uvloop() -> None:
    uvloop.run(_fill_cut_by_a_deadline(7))


async def _send_many_in_order() -> None:
    gen = _tcp_pairs()
    make_pair = await anext(gen)
    try:
        a, b = await make_pair()
        assert isinstance(a, TcpStream)
        big = random.Random(3).randbytes(3 << 20)  # more than the write buffer's high water
        bufs: list[bytes | bytearray | memoryview] = [b"head", bytearray(big),
                                                      memoryview(b"tail")]
        send = asyncio.create_task(a.send_many(bufs))
        got = bytearray()
        async with asyncio.timeout(10):
            while len(got) < len(big) + 8:
                got += await b.receive_some(1 << 20)
            await send
        assert bytes(got) == b"head" + big + b"tail"
        await a.aclose()
        with pytest.raises(StreamClosed):
            await a.send_many([b"x"])
    finally:
        await gen.aclose()


async def test_send_many_sends_every_buffer_in_order() -> None:
    await _send_many_in_order()


def test_send_many_sends_every_buffer_in_order_on_uvloop() -> None:
    uvloop.run(_send_many_in_order())


async def test_server_bounds_its_connections_and_cancels_handlers_on_close() -> None:
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def handler(stream: TcpStream) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    server = await serve_tcp(handler, "127.0.0.1", 0, max_connections=1)
    assert server.address is not None
    first = await connect_tcp(*server.address, timeout=5)
    await asyncio.wait_for(started.wait(), 5)
    assert server.connections == 1
    second = await connect_tcp(*server.address, timeout=5)
    async with asyncio.timeout(5):  # the server dropped it at once
        assert await second.receive_some() == b""
    assert server.refused == 1 and server.connections == 1
    await server.aclose()
    assert cancelled == [True] and server.connections == 0
    await first.aclose()
    await second.aclose()


async def _unacked_limits() -> list[int]:
    """TCP_USER_TIMEOUT (ms) of both ends of one connection, as the kernel has it."""
    pair = _tcp_pairs()
    make_pair = await anext(pair)
    try:
        ends = await make_pair()
        out = []
        for end in ends:
            assert isinstance(end, TcpStream)
            transport = end._p.transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            out.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
            await end.aclose()
        return out
    finally:
        await pair.aclose()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_both_ends_give_a_vanished_peer_up_after_the_unacked_limit(run: Any) -> None:
    """A peer whose address went away (it changed network) ACKs nothing: the kernel ends
    the connection after UNACKED_LIMIT seconds, not after its 15 minutes of retries, so a
    sender does not hold an upload slot for it until its own 60 s send timeout."""
    assert run(_unacked_limits()) == [int(UNACKED_LIMIT * 1000)] * 2
