"""A requester whose network changed mid-download: the sender frees its old session's slot.

The recipient's first connection runs through a small TCP proxy that, a megabyte into the
first chunk, stops forwarding either way without closing anything (no FIN, no RST): what
the sender sees when a laptop leaves its Wi-Fi. The sender's session is then stuck in that
chunk, holding the only upload slot, while another recipient waits for a chunk. The
laptop's node comes back over a direct connection and opens the content again: the old
session ends at once, the waiting recipient gets its slot within seconds (it waited for the
slow-requester rule, 30-60 s here, or for TCP_USER_TIMEOUT, 20 s on a real path), and the
download completes with the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.transfer.downloader import ChunkStored, Downloader, FetchEvent
from overlay.transfer.frames import Chunk
from overlay.transfer.requester import open_transfer_session
from overlay.transfer.server import REPLACED_SILENCE, TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import connect_tcp

SENDER = DeviceIdentity.from_seed(b"s" * 32)
LAPTOP = DeviceIdentity.from_seed(b"l" * 32)
FAMILY = DeviceIdentity.from_seed(b"f" * 32)
# Chunks larger than what the kernel buffers between the sender and the blackhole (the
# sender's send buffer is held at `SNDBUF`, the proxy's receive buffer at 64 KiB): the
# sender's first chunk can't all leave, so its session holds the slot.
CHUNK = 8 << 20
# The sender's send buffer, held at this (the kernel doubles it). Let grow to 4 MiB, it was
# still taking bytes of the stuck chunk after the laptop's new OPEN (1.5 MB more) on a
# loaded machine; and while the proxy's reader still took bytes after the cut, the window
# it opened let 190 KB more leave later. The server then rightly saw the session move and
# gave it REPLACED_SILENCE more: the family waited 4.1 s in 3 of 6 runs beside two CPU
# hogs with either of the two alone, in none of 8 with both.
SNDBUF = 256 << 10
SIZE = 3 * CHUNK - 4321


class Blackhole:
    """A TCP proxy to (host, port) that forwards `forward` bytes towards the client, then
    forwards nothing more either way, reads nothing more from the target and closes
    nothing (`cut` is set then)."""

    def __init__(self, host: str, port: int, forward: int) -> None:
        self.target = (host, port)
        self.left = forward
        self.cut = asyncio.Event()
        self._kept: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _relay(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect
        sock.setblocking(False)
        await loop.sock_connect(sock, self.target)
        up_r, up_w = await asyncio.open_connection(sock=sock)
        self._kept += [client_w, up_w]  # never closed until the test ends

        async def upstream() -> None:
            while (data := await client_r.read(65536)) and not self.cut.is_set():
                up_w.write(data)
                await up_w.drain()

        pump = asyncio.create_task(upstream())
        self._pumps.add(pump)
        while self.left > 0 and (data := await up_r.read(min(self.left, 65536))):
            client_w.write(data)
            await client_w.drain()
            self.left -= len(data)
        upstream_transport = up_w.transport  # the socket's, which reads too
        assert isinstance(upstream_transport, asyncio.ReadTransport)
        upstream_transport.pause_reading()  # a dead path: no window opens again
        self.cut.set()
        await pump

    async def aclose(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for w in self._kept:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class WatchedSlots(asyncio.Semaphore):
    """The server's upload slots, telling when a session queues for one."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.queued = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        if self.locked():
            self.queued.set()
        return await super().acquire()


async def test_a_moved_requester_s_silent_session_gives_its_slot_up_when_it_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    data = random.Random(11).randbytes(SIZE)
    (tmp_path / "clip.ts").write_bytes(data)
    (tmp_path / "photo.jpg").write_bytes(b"p" * 5000)
    store = ContentStore(tmp_path / "sender")
    clip = await store.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK)
    photo = await store.add_local_file(tmp_path / "photo.jpg", chunk_size=1024)
    server = TransferServer(SENDER, store, upload_slots=1)
    slots = server.upload_slots = WatchedSlots(1)
    host, port = await server.start()
    assert server._tcp is not None and server._tcp._server is not None
    for listening in server._tcp._server.sockets:  # accepted sockets inherit it
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    proxy = Blackhole(host, port, forward=1 << 20)
    p_host, p_port = await proxy.start()
    receiver = ContentStore(tmp_path / "laptop")
    partial = receiver.open_partial(clip.content_id, clip.size, clip.chunk_size, clip.key,
                                    clip.capability, tmp_path / "inbox", "clip.ts",
                                    scheme=clip.scheme)
    caplog.set_level(logging.INFO, logger="overlay.transfer.server")
    loop = asyncio.get_running_loop()

    async def via_home_wifi() -> Stream:
        return await connect_tcp(p_host, p_port, timeout=5)

    async def via_hotspot() -> Stream:
        return await connect_tcp(host, port, timeout=5)

    first = asyncio.create_task(
        Downloader(partial, [Source("alice", via_home_wifi, SENDER.peer_id)], LAPTOP).run())
    second: asyncio.Task[Path] | None = None
    family = await open_transfer_session(await connect_tcp(host, port), FAMILY)
    try:
        async with asyncio.timeout(20):
            await proxy.cut.wait()  # the laptop left home: its session is stuck in chunk 0
        assert slots.locked()
        await family.open(photo.content_id, photo.capability)
        await family.request(photo.content_id, 0)
        photo_chunk = asyncio.create_task(family.next_chunk())
        async with asyncio.timeout(10):
            await slots.queued.wait()  # the family member waits for the one upload slot

        # The laptop's node noticed the move: its cut download starts again, directly.
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        reconnected = loop.time()
        second = asyncio.create_task(
            Downloader(partial, [Source("alice", via_hotspot, SENDER.peer_id)], LAPTOP).run())
        async with asyncio.timeout(30):
            reply = await photo_chunk
        waited = loop.time() - reconnected
        assert isinstance(reply, Chunk) and photo.cipher.open(0, reply.data) == b"p" * 1024
        assert waited < REPLACED_SILENCE + 2.0, f"the family waited {waited:.1f} s"
        async with asyncio.timeout(60):
            path = await second
        assert path.read_bytes() == data
        assert server.counters["sessions_replaced"] == 1
        assert (f"ended the silent session of {LAPTOP.peer_id.hex()[:12]}@127.0.0.1:"
                in caplog.text)
        assert f"for {clip.content_id.hex()[:16]}" in caplog.text
        assert "it reconnected from 127.0.0.1:" in caplog.text
        assert server.counters["slow_dropped"] == server.counters["send_timeouts"] == 0
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await family.aclose()
        await proxy.aclose()
        await server.aclose()
        receiver.close()
        store.close()


async def test_a_device_s_busy_session_is_not_ended_by_its_second(tmp_path: Path) -> None:
    """One device fetching a content twice at once (two sessions, both moving bytes under
    the sender's upload cap): the second OPEN does not end the first, both complete."""
    data = random.Random(12).randbytes(8 * (256 << 10) + 99)
    (tmp_path / "clip.ts").write_bytes(data)
    store = ContentStore(tmp_path / "sender")
    clip = await store.add_local_file(tmp_path / "clip.ts", chunk_size=256 << 10)
    server = TransferServer(SENDER, store, max_upload_rate=1 << 20)  # about 4 s for both
    host, port = await server.start()
    receiver = ContentStore(tmp_path / "laptop")
    flowing = asyncio.Event()

    async def direct() -> Stream:
        return await connect_tcp(host, port, timeout=5)

    def download(name: str, on_event: Callable[[FetchEvent], None] | None = None
                 ) -> asyncio.Task[Path]:
        partial = receiver.open_partial(clip.content_id, clip.size, clip.chunk_size,
                                        clip.key, clip.capability, tmp_path / name,
                                        "clip.ts", scheme=clip.scheme)
        return asyncio.create_task(Downloader(
            partial, [Source("alice", direct, SENDER.peer_id)], LAPTOP,
            on_event=on_event).run())

    def stored(event: FetchEvent) -> None:
        if isinstance(event, ChunkStored):
            flowing.set()

    tasks = [download("first", stored)]
    try:
        async with asyncio.timeout(20):
            await flowing.wait()
            tasks.append(download("second"))
            paths = await asyncio.gather(*tasks)
        assert [p.read_bytes() == data for p in paths] == [True, True]
        assert server.counters["sessions_replaced"] == 0
        assert server.counters["opened"] == 2
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.aclose()
        receiver.close()
        store.close()
