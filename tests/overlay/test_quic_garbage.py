"""Garbage from the peer's own address can't corrupt or end a QUIC stream.

Once the handshake is done, datagrams of random bytes, truncated or bit-flipped copies of
the peer's real packets, and exact replays of them arrive from the peer's address (a second
socket can't send from the same address and port, so they go in where the socket hands its
datagrams to the stream: `QuicStream.datagrams_received`, between the real ones). qh3 must
drop each (AEAD fails, a packet number seen before, keys already discarded), and the bytes the
real peer sends must arrive equal, both ways, with the stream still open.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.transports.quic_stream import QuicStream
from tests.overlay.streams import receive_exactly, receive_to_eof
from tests.overlay.test_quic import _loopback_pair

PART = 96 << 10  # bytes the client sends before the garbage, and again after

# A mangling of one of the peer's real packets: (kind, where in the packet 0..1, a byte).
Mangle = tuple[str, float, int]
_mangles = st.tuples(st.sampled_from(["truncate", "flip", "replay", "prefix"]),
                     st.floats(0, 1), st.integers(1, 255))
# Random bytes, half of them with QUIC's fixed bit set (so they are taken for packets).
_noise = st.binary(max_size=1500) | st.binary(min_size=1, max_size=1500).map(
    lambda b: bytes([b[0] | 0x40]) + b[1:])


def _mangled(packet: bytes, how: Mangle) -> bytes:
    kind, where, byte = how
    at = int(where * len(packet))
    if kind == "truncate":
        return packet[:at]
    if kind == "flip":
        at = min(at, len(packet) - 1)
        return packet[:at] + bytes([packet[at] ^ byte]) + packet[at + 1:]
    if kind == "prefix":  # two packets' worth run together, as a coalesced datagram
        return packet + packet[:at]
    return packet  # replay


def _record_from_peer(stream: QuicStream) -> list[bytes]:
    """Keep a copy of every datagram the socket hands `stream` from its peer."""
    seen: list[bytes] = []
    real = stream.datagrams_received

    def record(data: list[bytes], addr: tuple[Any, ...]) -> None:
        seen.extend(data)
        real(data, addr)

    stream.datagrams_received = record  # type: ignore[method-assign]
    return seen


async def _garbage_then_real_bytes(noise: list[bytes], mangles: list[Mangle],
                                   seed: int) -> None:
    client, server = await _loopback_pair()
    try:
        seen = _record_from_peer(server)
        rng = random.Random(seed)
        first, second = rng.randbytes(PART), rng.randbytes(PART)
        await client.send_all(first)
        assert await receive_exactly(server, PART) == first
        assert seen, "no packet of the client's was recorded"
        peer = server.peer  # what the stream takes for the client's address
        bad = list(noise) + [_mangled(rng.choice(seen), m) for m in mangles]
        # Some before the rest of the data, some among its packets.
        server.datagrams_received(bad[: len(bad) // 2], peer)
        sending = asyncio.create_task(client.send_all(second))
        for d in bad[len(bad) // 2:]:
            await asyncio.sleep(0)
            server.datagrams_received([d], peer)
        await sending
        await client.send_eof()
        async with asyncio.timeout(20):
            assert await receive_to_eof(server) == second
            await server.send_all(b"still here")  # and the other way
            assert await receive_exactly(client, 10) == b"still here"
        assert server._broken is None and client._broken is None
        assert server.strays == 0  # every bad datagram went to the connection
    finally:
        await client.aclose()
        await server.aclose()


@given(noise=st.lists(_noise, max_size=12), mangles=st.lists(_mangles, max_size=12),
       seed=st.integers(0, 2**32))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_garbage_from_the_peers_address_neither_corrupts_nor_ends_the_stream(
        noise: list[bytes], mangles: list[Mangle], seed: int) -> None:
    asyncio.run(_garbage_then_real_bytes(noise, mangles, seed))


def test_a_flood_of_replays_and_truncations_is_dropped() -> None:
    """Every packet the peer sent so far, replayed, and each cut at three places."""
    mangles = [(kind, where, 1) for kind in ("replay", "truncate", "flip")
               for where in (0.1, 0.5, 0.97)] * 20
    asyncio.run(_garbage_then_real_bytes([], mangles, 1))
