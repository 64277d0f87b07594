"""STUN over TCP: one Binding per connection, answered with the mapping, then held open."""

from __future__ import annotations

import asyncio
import socket

from rendezvous.stun import (
    binding_request,
    parse_binding_response,
    query_tcp_mapping,
    reusable_socket,
    serve_stun_tcp,
)


async def test_a_client_learns_its_mapping_and_can_dial_again_from_that_port() -> None:
    server = await serve_stun_tcp("127.0.0.1", 0)
    try:
        got = await query_tcp_mapping(server.address)
        try:
            assert got.mapped == ("127.0.0.1", got.local[1])
            # While the STUN connection holds the port, another socket dials from it.
            listener = socket.create_server(("127.0.0.1", 0))
            again = reusable_socket(socket.AF_INET, ("0.0.0.0", got.local[1]))
            with listener, again:
                await asyncio.get_running_loop().sock_connect(again, listener.getsockname())
                assert again.getsockname()[1] == got.local[1]
        finally:
            got.close()
        assert server.stats()["answered"] == 1
    finally:
        await server.aclose()


async def test_garbage_is_counted_and_the_connection_closed() -> None:
    server = await serve_stun_tcp("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.stats()["malformed"] == 1
    finally:
        await server.aclose()


async def test_a_request_split_across_segments_is_answered() -> None:
    server = await serve_stun_tcp("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.address)
        request, tid = binding_request()
        writer.write(request[:7])
        await writer.drain()
        await asyncio.sleep(0)
        writer.write(request[7:])
        head = await asyncio.wait_for(reader.readexactly(20), 5)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[2:4], "big")), 5)
        host, port = writer.get_extra_info("sockname")[:2]
        assert parse_binding_response(head + body, tid) == (host, port)
        writer.close()
    finally:
        await server.aclose()


async def test_closing_the_service_ends_held_connections() -> None:
    server = await serve_stun_tcp("127.0.0.1", 0)
    got = await query_tcp_mapping(server.address)
    try:
        await asyncio.wait_for(server.aclose(), 5)
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(got.sock, 10), 5) == b""
    finally:
        got.close()
