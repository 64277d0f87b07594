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
from overlay.transports.tcp import UNACKED_LIMIT, TcpStream, connect_tcp, serve_tcp
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
                    n = await client.receive_into(memoryview(buf))
                    if not n:
                        break
                    got += buf[:n]
        assert got == data
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


async def _send_many_in_order() -> None:
    gen = _tcp_pairs()
    make_pair = await anext(gen)
    try:
        a, b = await make_pair()
        assert isinstance(a, TcpStream)
        big = random.Random(3).randbytes(3 << 20)  # more than the write buffer's high water
        bufs = [b"head", bytearray(big), memoryview(b"tail")]
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
