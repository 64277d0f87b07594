"""The relay of last resort, server side: its caps hold (rate: the stream slows to the cap;
daily: the splice is cut and the next RELAY is refused with the reason), it never writes
relayed bytes to disk, other users carry on while it runs flat out, sessions that are not
accepted end with a clear error, and a reset (a peer's, a cut, the shutdown) reaches the
other end as a reset, on plaintext and TLS legs, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from overlay.transports.relay import RelayError, RelayStream, relay_dial
from overlay.transports.stream import Stream, StreamBroken
from rendezvous.client import RendezvousClient
from rendezvous.limits import Limits
from rendezvous.messages import Deliver, PipeMessage
from rendezvous.server import RendezvousServer
from rendezvous.status import Status
from tests.overlay.streams import receive_exactly
from tests.overlay.test_relay_stream import ALICE, BOB, RelayPair, relay_setup

from .conftest import ident, mid

CAROL = ident(43)
MB = 1_000_000
UNCAPPED = Limits(relay_rate=0, relay_daily=0)
Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def pump(stream: Stream, total: int, block: int = 256 * 1024) -> None:
    """Send `total` bytes as fast as the stream takes them, then EOF."""
    data = os.urandom(block)
    sent = 0
    while sent < total:
        n = min(block, total - sent)
        await stream.send_all(data[:n])
        sent += n
    await stream.send_eof()


def in_loop(run: Runner, tmp_path: Path, limits: Limits,
            body: Callable[[RendezvousServer, RelayPair], Awaitable[None]],
            tls: bool = False) -> None:
    """`body(server, pair)` on the loop `run` makes, with a relay server of `limits`."""
    async def main() -> None:
        async with relay_setup(tmp_path, limits, tls=tls) as (server, pair):
            await body(server, pair)
    run(main())


def reset(s: Stream) -> None:
    """Close `s`'s socket with a reset (linger 0), as a crashed peer's kernel would."""
    assert isinstance(s, RelayStream) and s._p.transport is not None
    sock = s._p.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s._p.transport.abort()


async def gone(s: Stream) -> BaseException | None:
    """How the connection under a relay stream ended, once it has."""
    assert isinstance(s, RelayStream)
    await s._p.lost_event.wait()
    return s._p.lost


def was_reset(exc: BaseException | None) -> bool:
    """A reset from the kernel (errno set), not the stand-in for a clean close."""
    return isinstance(exc, ConnectionResetError) and exc.errno is not None


async def until(cond: Callable[[], bool], seconds: float = 5) -> None:
    """Poll `cond` (server state no event announces) until it holds."""
    async with asyncio.timeout(seconds):
        while True:
            if cond():
                return
            await asyncio.sleep(0.005)


async def test_rate_cap_slows_the_stream_to_the_cap(tmp_path: Path) -> None:
    cap = 2 * MB
    async with relay_setup(tmp_path, Limits(relay_rate=cap, relay_daily=0)) as (_, pair):
        a, b = await pair()
        sender = asyncio.create_task(pump(a, 100 * MB))
        try:
            await receive_exactly(b, MB)  # past the burst and the socket buffers' fill-up
            t0, got = time.monotonic(), 0
            while time.monotonic() - t0 < 2.0:
                got += len(await b.receive_some(1 << 20))
            rate = got / (time.monotonic() - t0)
            assert 0.75 * cap <= rate <= 1.25 * cap, f"{rate / MB:.2f} MB/s against a cap of 2"
        finally:
            sender.cancel()
            await a.aclose()
            await b.aclose()


async def test_daily_cap_cuts_the_splice_then_refuses_with_the_reason(tmp_path: Path) -> None:
    limits = Limits(relay_rate=0, relay_daily=3 * MB)
    async with relay_setup(tmp_path, limits) as (server, pair):
        a, b = await pair()
        sender = asyncio.create_task(pump(a, 10 * MB))
        got = 0
        async with asyncio.timeout(20):
            # A cut reads as the end of the stream (or a break) well short of 10 MB; the
            # transfer protocol above notices the truncation.
            with contextlib.suppress(StreamBroken):
                while chunk := await b.receive_some(1 << 20):
                    got += len(chunk)
            assert got <= 3 * MB
            # The receiving end was reset: writing fails rather than vanishing. (The sender
            # may have had all 10 MB taken into socket buffers before the cut.)
            with pytest.raises(StreamBroken):
                while True:
                    await b.send_all(b"x" * 65536)
                    await asyncio.sleep(0.01)
            await asyncio.wait([sender])
            exc = await gone(b)
        assert was_reset(exc), f"Bob's end closed with {exc!r}, not a reset"
        assert sender.exception() is None or isinstance(sender.exception(), StreamBroken)
        await a.aclose()
        await b.aclose()

        host, port = server.address or ("", 0)
        with pytest.raises(RelayError) as refused:
            await relay_dial(host, port, ALICE, "alice@example.net", "bob@example.net",
                             BOB.peer_id, timeout=5)
        assert refused.value.status == Status.RATE_LIMITED
        assert re.search(r"daily relay volume of alice@example.net used up: .* of 3 MB "
                         r"today; it resets at 00:00 UTC", refused.value.text)
        snap = server.snapshot()
        assert snap["relay_cut_daily"] == 1 and snap["relay_refused"] == 1
        assert snap["relay_active"] == 0 and snap["relayed_bytes"] <= 3 * MB


async def test_relayed_bytes_never_reach_the_disk(tmp_path: Path) -> None:
    async with relay_setup(tmp_path, UNCAPPED) as (server, pair):
        a, b = await pair()  # authentications (last-seen writes) are done by now
        before = dir_bytes(tmp_path)
        size = 20 * MB
        sender = asyncio.create_task(pump(a, size))
        assert len(await receive_exactly(b, size)) == size
        await sender
        await a.aclose()
        await b.aclose()
        assert server.snapshot()["relayed_bytes"] >= size
        grown = dir_bytes(tmp_path) - before
        assert grown < 256 * 1024, f"the data folder grew by {grown} bytes during a relay"


async def test_other_users_carry_on_while_a_relay_runs_flat_out(tmp_path: Path) -> None:
    async with relay_setup(tmp_path, UNCAPPED) as (server, pair):
        host, port = server.address or ("", 0)
        a, b = await pair()
        size = 200 * MB
        sender = asyncio.create_task(pump(a, size))
        reader = asyncio.create_task(receive_exactly(b, size))
        async with RendezvousClient(host, port, CAROL, "carol@example.net",
                                    register=True) as carol:
            async with RendezvousClient(host, port, ident(44), "dave@example.net",
                                        register=True) as dave:
                pushes = dave.pushes()
                for i in range(20):
                    async with asyncio.timeout(2):
                        await carol.pipe("dave@example.net", b"hi %d" % i)
                        push = await anext(pushes)
                    assert push == PipeMessage("carol@example.net", CAROL.peer_id, b"hi %d" % i)
                m = mid()
                async with asyncio.timeout(2):
                    await carol.send(m, [("dave@example.net", ident(44).peer_id, b"sealed")])
                    push = await anext(pushes)
                assert isinstance(push, Deliver) and push.envelope.message_id == m
        assert not reader.done(), "the relay finished first: the check proved nothing"
        async with asyncio.timeout(60):
            await sender
            assert len(await reader) == size
        await a.aclose()
        await b.aclose()


async def test_a_session_not_accepted_in_time_fails_clearly(tmp_path: Path) -> None:
    limits = Limits(relay_accept_timeout=0.3)
    async with relay_setup(tmp_path, limits) as (server, _):
        host, port = server.address or ("", 0)
        with pytest.raises(RelayError, match=re.escape(
                "bob@example.net did not accept the relay session within 0.3 s")) as err:
            await relay_dial(host, port, ALICE, "alice@example.net", "bob@example.net",
                             BOB.peer_id, timeout=5)
        assert err.value.status == Status.NOT_ONLINE
        assert server.snapshot()["relay_expired"] == 1
        assert server.snapshot()["relay_pending"] == 0


async def test_relay_to_a_device_that_is_not_online_or_not_there(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as (server, _):
        host, port = server.address or ("", 0)
        async with RendezvousClient(host, port, CAROL, "carol@example.net", register=True):
            pass  # Carol exists, now offline
        cases = [("carol@example.net", CAROL.peer_id, Status.NOT_ONLINE,
                  f"carol@example.net device {CAROL.peer_id.hex()[:12]} is not online"),
                 ("nobody@example.net", CAROL.peer_id, Status.NOT_FOUND,
                  "no such address: nobody@example.net"),
                 ("bob@example.net", CAROL.peer_id, Status.NOT_FOUND,
                  f"device {CAROL.peer_id.hex()} is not bound to bob@example.net"),
                 ("alice@example.net", ALICE.peer_id, Status.BAD_REQUEST,
                  "a device can't relay to itself")]
        for to, device, status, text in cases:
            with pytest.raises(RelayError) as err:
                await relay_dial(host, port, ALICE, "alice@example.net", to, device, timeout=5)
            assert (err.value.status, err.value.text) == (status, text)


async def test_shutdown_breaks_splices_and_refuses_offers_promptly(tmp_path: Path) -> None:
    async with relay_setup(tmp_path, UNCAPPED) as (server, pair):
        host, port = server.address or ("", 0)
        a, b = await pair()
        offered = asyncio.create_task(relay_dial(host, port, ALICE, "alice@example.net",
                                                 "bob@example.net", BOB.peer_id, timeout=10))
        await pair.next_invite()  # offered, never accepted
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await server.aclose()
        assert loop.time() - t0 < 2.0
        with pytest.raises(RelayError) as err:
            await offered
        assert (err.value.status, err.value.text) == (Status.UNAVAILABLE,
                                                      "server shutting down")
        with pytest.raises(StreamBroken):
            async with asyncio.timeout(5):
                while True:
                    await a.send_all(b"x" * 65536)
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            exc_a, exc_b = await gone(a), await gone(b)
        assert was_reset(exc_a) and was_reset(exc_b), (exc_a, exc_b)
        await a.aclose()
        await b.aclose()


@LOOPS
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_reset_reaches_the_other_end_as_a_reset(run: Runner, tls: bool,
                                                  tmp_path: Path) -> None:
    async def body(server: RendezvousServer, pair: RelayPair) -> None:
        a, b = await pair()
        await a.send_all(b"x" * 1000)
        assert await receive_exactly(b, 1000) == b"x" * 1000
        reset(a)
        async with asyncio.timeout(5):
            assert await b.receive_some() == b""
            exc = await gone(b)
        assert was_reset(exc), f"Bob's end closed with {exc!r}, not a reset"
        await until(lambda: not server.relay.splices)
        await a.aclose()
        await b.aclose()
    in_loop(run, tmp_path, UNCAPPED, body, tls=tls)
