"""Direct TCP passes the Stream conformance suite, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
import uvloop

from overlay.stream import Stream, StreamBroken
from overlay.tcp import TcpStream, connect_tcp, serve_tcp
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
