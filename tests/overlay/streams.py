"""The `Stream` conformance suite: every transport (TCP, WebRTC, relay) passes `check_stream`.

Modelled on trio's `check_two_way_stream`. `make_pair` is an async callable that returns two
freshly connected streams; each check gets its own pair and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from overlay.transports.stream import Stream, StreamBusy, StreamClosed, StreamError

MakePair = Callable[[], Awaitable[tuple[Stream, Stream]]]
_WAIT = 10.0  # generous bound for steps that must finish; nothing here measures speed


async def receive_exactly(s: Stream, n: int) -> bytes:
    """Read exactly n bytes (fails on early EOF)."""
    out = bytearray()
    while len(out) < n:
        got = await s.receive_some(min(n - len(out), 1 << 20))
        if not got:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


async def receive_to_eof(s: Stream, limit: int = 1 << 28) -> bytes:
    out = bytearray()
    while True:
        got = await s.receive_some(1 << 20)
        if not got:
            return bytes(out)
        out += got
        if len(out) > limit:
            raise AssertionError("more data than expected")


def _pattern(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(n)


async def _send_in_pieces(s: Stream, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    view = memoryview(data)
    i = 0
    while i < len(view):
        step = rng.choice([1, 7, 1000, 65536, 300_000, 1 << 20])
        await s.send_all(view[i : i + step])
        i += step


async def _pair(make_pair: MakePair) -> tuple[Stream, Stream]:
    async with asyncio.timeout(_WAIT):
        return await make_pair()


async def _close(*streams: Stream) -> None:
    for s in streams:
        await s.aclose()


async def check_order_both_ways(make_pair: MakePair) -> None:
    a, b = await _pair(make_pair)
    try:
        for i in range(20):
            await a.send_all(f"a{i};".encode())
            await b.send_all(f"b{i};".encode())
        want_a = "".join(f"b{i};" for i in range(20)).encode()
        want_b = "".join(f"a{i};" for i in range(20)).encode()
        async with asyncio.timeout(_WAIT):
            assert await receive_exactly(a, len(want_a)) == want_a
            assert await receive_exactly(b, len(want_b)) == want_b
        assert isinstance(a.path, str) and a.path
    finally:
        await _close(a, b)


async def check_large_full_duplex(make_pair: MakePair, size: int = 8 << 20) -> None:
    """Several MB each way at once, in odd-sized writes; bytes arrive equal and in order."""
    a, b = await _pair(make_pair)
    try:
        da, db = _pattern(1, size), _pattern(2, size + 12345)

        async def side(s: Stream, out: bytes, n_in: int, seed: int) -> bytes:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_send_in_pieces(s, out, seed))
                got = tg.create_task(receive_exactly(s, n_in))
            return got.result()

        async with asyncio.timeout(60):
            got_b, got_a = await asyncio.gather(
                side(a, da, len(db), 3), side(b, db, len(da), 4)
            )
        assert hashlib.sha256(got_b).digest() == hashlib.sha256(db).digest()
        assert hashlib.sha256(got_a).digest() == hashlib.sha256(da).digest()
    finally:
        await _close(a, b)


async def check_backpressure(make_pair: MakePair, size: int = 48 << 20) -> None:
    """A sender to a peer that doesn't read must block, not buffer without bound."""
    a, b = await _pair(make_pair)
    try:
        data = _pattern(5, size)
        sender = asyncio.create_task(_send_in_pieces(a, data, 6))
        done, _ = await asyncio.wait([sender], timeout=0.5)
        assert not done, "send_all finished although nobody read: no backpressure"
        # A stream that counts what left the process (the holder's send timeout watches it)
        # counts nothing more once its buffers are full, and every byte once it was read.
        count = getattr(a, "bytes_sent", None)
        if count is not None:
            async with asyncio.timeout(10):
                before = -1
                while count() != before:
                    before = count()
                    await asyncio.sleep(0.2)
            assert 0 < before < size
        async with asyncio.timeout(60):
            got = await receive_exactly(b, size)
            await sender
        assert got == data
        if count is not None:
            assert count() == size
    finally:
        if not sender.done():
            sender.cancel()
        await _close(a, b)


async def check_eof(make_pair: MakePair) -> None:
    """send_eof: the peer reads the data then b"" (repeatedly); the other way still works."""
    a, b = await _pair(make_pair)
    try:
        await a.send_all(b"last words")
        await a.send_eof()
        with pytest.raises(StreamClosed):
            await a.send_all(b"more")
        async with asyncio.timeout(_WAIT):
            assert await receive_to_eof(b) == b"last words"
            assert await b.receive_some() == b""
            await b.send_all(b"reply after eof")
            await b.send_eof()
            assert await receive_to_eof(a) == b"reply after eof"
    finally:
        await _close(a, b)


async def check_close_wakes_peer(make_pair: MakePair) -> None:
    """Closing one side ends the other side's blocked receive with EOF or a stream error."""
    a, b = await _pair(make_pair)
    try:
        reader = asyncio.create_task(b.receive_some())
        await asyncio.sleep(0)
        await a.aclose()
        async with asyncio.timeout(_WAIT):
            try:
                assert await reader == b""
            except StreamError:
                pass
    finally:
        await _close(a, b)


async def check_close_wakes_own_receiver(make_pair: MakePair) -> None:
    """Closing a stream ends a receive blocked on it with StreamClosed; close is idempotent."""
    a, b = await _pair(make_pair)
    try:
        reader = asyncio.create_task(a.receive_some())
        await asyncio.sleep(0)
        await a.aclose()
        async with asyncio.timeout(_WAIT):
            with pytest.raises(StreamClosed):
                await reader
        await a.aclose()
        with pytest.raises(StreamClosed):
            await a.receive_some()
        with pytest.raises(StreamClosed):
            await a.send_all(b"x")
    finally:
        await _close(a, b)


async def check_one_receiver_at_a_time(make_pair: MakePair) -> None:
    a, b = await _pair(make_pair)
    try:
        first = asyncio.create_task(a.receive_some())
        await asyncio.sleep(0)
        with pytest.raises(StreamBusy):
            await a.receive_some()
        await b.send_all(b"ok")
        async with asyncio.timeout(_WAIT):
            assert await first == b"ok"
    finally:
        await _close(a, b)


async def check_send_to_closed_peer_fails(make_pair: MakePair) -> None:
    """Writing to a peer that closed ends with a StreamError, never a silent black hole."""
    a, b = await _pair(make_pair)
    try:
        await b.aclose()
        async with asyncio.timeout(_WAIT):
            with pytest.raises(StreamError):
                for _ in range(1000):
                    await a.send_all(b"x" * 65536)
                    await asyncio.sleep(0)
    finally:
        await _close(a, b)


async def check_cancelled_receive_loses_nothing(make_pair: MakePair) -> None:
    """A receive whose deadline expires in the loop turn its bytes arrive in (a read
    deadline as a slow chunk trickles in) leaves them for the next receive: every byte
    arrives once, in order, at either end. The loop is blocked while both happen, so that
    one turn handles the readable socket and the expired deadline together."""
    a, b = await _pair(make_pair)
    try:
        for sender, receiver in ((a, b), (b, a)):
            await _cancel_receives(sender, receiver)
    finally:
        await _close(a, b)


async def _cancel_receives(sender: Stream, receiver: Stream) -> None:
    into = getattr(receiver, "receive_into", None)

    async def receive(n: int) -> bytes:
        if into is None:
            return await receiver.receive_some(n)
        buf = bytearray(n)
        got = await into(memoryview(buf))
        return bytes(buf[:got])

    async def receive_by(deadline: float) -> bytes:
        async with asyncio.timeout(deadline):
            return await receive(4096)

    sent = b""
    got = bytearray()
    for turn in range(6):
        piece = _pattern(turn, 1000 + turn)
        reader = asyncio.create_task(receive_by(0.02))
        for _ in range(5):
            await asyncio.sleep(0)  # the reader now waits for bytes
        await sender.send_all(piece)
        sent += piece
        time.sleep(0.05)  # past the deadline, with the bytes in the receiver's socket
        with contextlib.suppress(TimeoutError):
            got += await reader
    trailer = _pattern(99, 3000)
    await sender.send_all(trailer)
    sent += trailer
    try:
        async with asyncio.timeout(_WAIT):
            while len(got) < len(sent):
                more = await receive(len(sent) - len(got))
                assert more, f"EOF after {len(got)} of {len(sent)} bytes"
                got += more
    except TimeoutError:
        raise AssertionError(f"{len(sent) - len(got)} of {len(sent)} bytes never arrived "
                             "after receives were cancelled") from None
    assert bytes(got) == sent, f"{len(got)} bytes received, {len(sent)} sent"


async def check_stream(make_pair: MakePair) -> None:
    """Run every check; a transport conforms when this returns."""
    for check in (
        check_order_both_ways,
        check_large_full_duplex,
        check_backpressure,
        check_eof,
        check_close_wakes_peer,
        check_close_wakes_own_receiver,
        check_one_receiver_at_a_time,
        check_cancelled_receive_loses_nothing,
        check_send_to_closed_peer_fails,
    ):
        await check(make_pair)
