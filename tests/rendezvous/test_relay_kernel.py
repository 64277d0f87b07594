"""A splice of two plaintext TCP legs moves its bytes in the kernel (os.splice through a
pipe per direction), on the default loop and on uvloop, and keeps what the copying splice
promises: bytes intact both ways and counted, half-close, the daily volume cut to the
byte, and the server's shutdown resetting a live splice; no descriptor outlives its
splice; pipes too small to pay leave it copying. (A reset passed on as a reset and the
rate cap: test_relay.py, whose plaintext splices are in the kernel too; TLS legs keep
copying.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from overlay.transports.stream import Stream, StreamBroken
from rendezvous.limits import Limits
from rendezvous.relay import Splice
from rendezvous.server import RendezvousServer
from tests.overlay.streams import receive_exactly, receive_to_eof
from tests.overlay.test_relay_stream import RelayPair

from .test_relay import LOOPS, UNCAPPED, Runner, gone, in_loop, until, was_reset

MB = 1_000_000

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice here")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def in_kernel(server: RendezvousServer) -> Splice:
    """The server's one splice, once the kernel moves its bytes."""
    await until(lambda: [s.in_kernel for s in server.relay.splices] == [True])
    return next(iter(server.relay.splices))


async def ended(server: RendezvousServer) -> None:
    await until(lambda: not server.relay.splices)


async def fds_back_to(n: int) -> None:
    await until(lambda: open_fds() == n, 2)


async def send(s: Stream, data: bytes) -> None:
    """`data` in pieces of 300 kB, then EOF."""
    view = memoryview(data)
    for i in range(0, len(view), 300_000):
        await s.send_all(view[i:i + 300_000])
    await s.send_eof()


@LOOPS
def test_bytes_arrive_intact_both_ways_and_are_counted(run: Runner, tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        fds = open_fds()
        a, b = await pair()
        await in_kernel(server)
        there, back = os.urandom(24 * MB), os.urandom(16 * MB)
        async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
            got_b = tg.create_task(receive_to_eof(b))
            got_a = tg.create_task(receive_to_eof(a))
            tg.create_task(send(a, there))
            tg.create_task(send(b, back))
        assert hashlib.sha256(got_b.result()).digest() == hashlib.sha256(there).digest()
        assert hashlib.sha256(got_a.result()).digest() == hashlib.sha256(back).digest()
        await ended(server)  # both ends sent EOF: the splice closed itself
        assert server.relay.snapshot()["relayed_bytes"] == 40 * MB
        await a.aclose()
        await b.aclose()
        await fds_back_to(fds)
    in_loop(run, tmp_path, UNCAPPED, body)


@LOOPS
def test_half_close_lets_the_other_way_finish(run: Runner, tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        a, b = await pair()
        await in_kernel(server)
        async with asyncio.timeout(20):
            await send(a, b"question" * 1000)
            assert await receive_to_eof(b) == b"question" * 1000
            # Alice's EOF went through; Bob answers at length on the open half.
            answer = os.urandom(5 * MB)
            sender = asyncio.create_task(send(b, answer))
            assert await receive_to_eof(a) == answer
            await sender
            await ended(server)
        await a.aclose()
        await b.aclose()
    in_loop(run, tmp_path, UNCAPPED, body)


@LOOPS
def test_the_daily_volume_cuts_to_the_byte(run: Runner, tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        a, b = await pair()
        await in_kernel(server)
        sender = asyncio.create_task(send(a, os.urandom(10 * MB)))
        got = 0
        async with asyncio.timeout(20):
            while chunk := await b.receive_some(1 << 20):
                got += len(chunk)
            exc = await gone(b)
            await asyncio.wait([sender])
        assert was_reset(exc), f"Bob's end closed with {exc!r}, not a reset"
        assert sender.exception() is None or isinstance(sender.exception(), StreamBroken)
        assert got <= 3 * MB
        snap = server.snapshot()
        assert snap["relayed_bytes"] == 3 * MB  # all of the volume, and not a byte more
        assert snap["relay_cut_daily"] == 1 and snap["relay_active"] == 0
        await a.aclose()
        await b.aclose()
    in_loop(run, tmp_path, Limits(relay_rate=0, relay_daily=3 * MB), body)


@LOOPS
def test_shutdown_resets_a_live_splice(run: Runner, tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        a, b = await pair()
        splice = await in_kernel(server)
        sender = asyncio.create_task(send(a, os.urandom(200 * MB)))
        await receive_exactly(b, MB)
        t0 = time.monotonic()
        await server.aclose()
        assert time.monotonic() - t0 < 2.0
        async with asyncio.timeout(5):
            while await b.receive_some(1 << 20):  # Bob reads on (a paused reader can't
                pass                               # see the reset)
            exc_a, exc_b = await gone(a), await gone(b)
            await asyncio.wait([sender])
        assert was_reset(exc_a) and was_reset(exc_b), (exc_a, exc_b)
        assert isinstance(sender.exception(), StreamBroken)
        assert not server.relay.splices and not splice.in_kernel  # its descriptors closed
        await a.aclose()
        await b.aclose()
    in_loop(run, tmp_path, UNCAPPED, body)


@LOOPS
def test_pipes_too_small_to_pay_leave_the_splice_copying(run: Runner, tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        fds = open_fds()
        a, b = await pair()
        data = os.urandom(2 * MB)
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            got = tg.create_task(receive_to_eof(b))
            tg.create_task(send(a, data))
        assert got.result() == data
        assert [s.in_kernel for s in server.relay.splices] == [False]
        await a.aclose()
        await b.aclose()
        await ended(server)
        await fds_back_to(fds)
    # Pipes of 16 KiB: a syscall per 16 KiB would cost more than the copy it saves.
    in_loop(run, tmp_path, Limits(relay_rate=0, relay_daily=0, relay_high_water=16 * 1024),
            body)
