"""The TransferServer's own limits: handshake deadline, session cap, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from crypto.content import GCM_NONCE_LEN, LeafScheme
from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.content.local import LocalContent
from overlay.transfer import server as server_module
from overlay.transfer.downloader import ChunkStored, Downloader, FetchEvent, SourceConnected
from overlay.transfer.errors import SessionFailed
from overlay.transfer.frames import Chunk, Error, ErrorCode
from overlay.transfer.requester import open_transfer_session
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import TcpStream, connect_tcp
from rendezvous.taskset import TaskSet

ME = DeviceIdentity.from_seed(b"m" * 32)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ContentStore, LocalContent]]:
    (tmp_path / "f").write_bytes(b"x" * 5000)
    store = ContentStore(tmp_path / "store")
    yield store, await store.add_local_file(tmp_path / "f", chunk_size=1024,
                                            scheme=LeafScheme.KEYED_PLAIN_AES)
    store.close()


@pytest.fixture
async def served_deterministic(
    tmp_path: Path,
) -> AsyncIterator[tuple[ContentStore, LocalContent]]:
    """A KEYED_PLAIN content: deterministic nonces, so the sender checks what it seals."""
    (tmp_path / "f").write_bytes(b"x" * 5000)
    store = ContentStore(tmp_path / "store")
    yield store, await store.add_local_file(tmp_path / "f", chunk_size=1024,
                                            scheme=LeafScheme.KEYED_PLAIN)
    store.close()


def _edit_keeping_size_and_mtime(path: Path) -> None:
    before = path.stat()
    with open(path, "r+b") as f:  # same size, and the mtime put back: only the chunk hash
        f.seek(2048)              # can tell
        f.write(b"y" * 10)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


async def test_silent_clients_are_dropped_at_the_handshake_deadline(
    served: tuple[ContentStore, LocalContent],
) -> None:
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), served[0],
                            handshake_timeout=0.2)
    host, port = await server.start()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        assert server.counters["timeouts"] == 1
    finally:
        await server.aclose()


async def test_sessions_over_the_cap_are_refused_others_carry_on(
    served: tuple[ContentStore, LocalContent],
) -> None:
    store, content = served
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, max_sessions=1)
    host, port = await server.start()
    try:
        first = await open_transfer_session(await connect_tcp(host, port), ME)
        with pytest.raises(SessionFailed):
            await open_transfer_session(await connect_tcp(host, port), ME)
        assert server.counters["sessions_refused"] == 1
        info = await first.open(content.content_id, content.capability)
        assert info.size == 5000
        await first.aclose()
    finally:
        await server.aclose()


async def test_aclose_ends_running_sessions(served: tuple[ContentStore, LocalContent]) -> None:
    store, content = served
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store)
    host, port = await server.start()
    session = await open_transfer_session(await connect_tcp(host, port), ME)
    assert server.active_sessions == 1
    await server.aclose()
    assert server.active_sessions == 0
    with pytest.raises(SessionFailed):
        async with asyncio.timeout(10):
            await session.open(content.content_id, content.capability)
    await session.aclose()


async def test_a_requester_that_stops_reading_loses_its_session(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(bytes(8 << 20))
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "big", chunk_size=1 << 20)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, idle_timeout=60,
                            send_timeout=0.3)
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(content.content_id, content.capability)
        for _ in range(6):  # ~48 MiB asked for, more than the socket buffers hold
            for i in range(8):
                await session.request(content.content_id, i)
        # Never read. The server's blocked send gives up after send_timeout, which ends
        # the session's task.
        [task] = server._running
        async with asyncio.timeout(20):
            await asyncio.wait([task])
        assert server.active_sessions == 0
        assert server.counters["send_timeouts"] == 1
        await session.aclose()
    finally:
        await server.aclose()
        store.close()


class _SlowReader:
    """A TCP stream whose reader takes at most 32 KiB every 10 ms (about 3 MB/s)."""

    path = "tcp"

    def __init__(self, inner: TcpStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        await asyncio.sleep(0.01)
        return await self.inner.receive_some(min(max_bytes, 32 << 10))

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def peer_address(self) -> str | None:
        return self.inner.peer_address()


def _small_send_buffer(server: TransferServer) -> None:
    """The server's sockets keep a 64 KiB kernel send buffer (128 KiB as Linux counts it),
    as on a slow path. On loopback it grows to 4 MiB, and a socket is writable again only
    once a third of that drained: the bytes a slow reader takes leave the process in steps
    of over a megabyte, and a send looks stalled between them."""
    serve = server.handle_stream

    async def small_send_buffer(stream: Stream) -> None:
        served = cast(TcpStream, stream)._p.transport
        assert served is not None
        served.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        await serve(stream)

    server.handle_stream = small_send_buffer  # type: ignore[method-assign]


@pytest.mark.parametrize("slow_is_stopped", [False, True])
async def test_a_requester_that_reads_slowly_keeps_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_is_stopped: bool,
) -> None:
    """A 12 MiB chunk to a reader taking 3 MB/s through a 64 KiB receive buffer outlasts
    a 0.5 s send timeout several times over (the sender's kernel holds 128 KiB of it),
    and arrives whole: the timeout is for a send that stopped moving. (With the progress
    it needs set out of reach, the same send is cut, as one timeout per chunk cut it.)"""
    if slow_is_stopped:
        monkeypatch.setattr(server_module, "MIN_SEND_PROGRESS", 1 << 40)
    data = os.urandom(12 << 20)
    (tmp_path / "big").write_bytes(data)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "big", chunk_size=12 << 20)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, send_timeout=0.5)
    _small_send_buffer(server)
    host, port = await server.start()
    loop = asyncio.get_running_loop()
    try:
        stream = await connect_tcp(host, port, read_high_water=64 << 10)
        transport = stream._p.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      64 << 10)
        session = await open_transfer_session(_SlowReader(stream), ME)
        await session.open(content.content_id, content.capability)
        started = loop.time()
        await session.request(content.content_id, 0)
        async with asyncio.timeout(30):
            if slow_is_stopped:
                with pytest.raises(SessionFailed):
                    await session.next_chunk()
                assert server.counters["send_timeouts"] == 1
                return
            reply = await session.next_chunk()
        assert loop.time() - started > 1.0  # twice the send timeout, at the least
        assert isinstance(reply, Chunk) and reply.index == 0
        assert content.cipher.open(0, reply.data) == data
        assert server.counters["send_timeouts"] == 0
        await session.aclose()
    finally:
        await server.aclose()
        store.close()


class _Unreadable:
    """The store, but chunk 2 can't be read (a disk error, the file cut short)."""

    def __init__(self, store: ContentStore) -> None:
        self.store = store

    def lookup(self, content_id: bytes) -> object:
        real = self.store.local(content_id)
        return None if real is None else _UnreadableContent(real)


class _UnreadableContent:
    def __init__(self, real: LocalContent) -> None:
        self.real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def read_sealed(self, index: int) -> bytes | bytearray:
        if index == 2:
            raise ContentStoreError("cannot read chunk 2")
        return self.real.read_sealed(index)


async def test_a_chunk_that_cannot_be_read_is_refused_and_the_rest_served(
    served: tuple[ContentStore, LocalContent],
) -> None:
    store, content = served
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32),
                            _Unreadable(store))  # type: ignore[arg-type]
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(content.content_id, content.capability)
        await session.send_requests(content.content_id, [0, 1, 2, 3, 4], [])
        got: dict[int, Chunk | Error] = {}
        async with asyncio.timeout(10):
            while len(got) < 5:
                reply = await session.next_chunk()
                assert isinstance(reply, Chunk | Error)
                assert reply.index is not None
                got[reply.index] = reply
        refused = got.pop(2)
        assert isinstance(refused, Error) and refused.code == ErrorCode.UNAVAILABLE
        opened = content.cipher.open
        assert {i: opened(i, c.data) for i, c in got.items() if isinstance(c, Chunk)} == {
            i: opened(i, content.read_sealed(i)) for i in (0, 1, 3, 4)}
        assert server.counters["read_errors"] == 1 and server.counters["chunks_served"] == 4
        await session.aclose()
    finally:
        await server.aclose()


async def test_a_file_edited_in_place_is_never_served_under_its_old_hashes(
    served_deterministic: tuple[ContentStore, LocalContent],
) -> None:
    store, content = served_deterministic
    _edit_keeping_size_and_mtime(content.path)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store)
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(content.content_id, content.capability)
        await session.send_requests(content.content_id, [0, 2], [])
        got: dict[int, Chunk | Error] = {}
        async with asyncio.timeout(10):
            while len(got) < 2:
                reply = await session.next_chunk()
                assert isinstance(reply, Chunk | Error) and reply.index is not None
                got[reply.index] = reply
        assert isinstance(got[0], Chunk)  # sealed before the changed chunk was seen
        changed = got[2]
        assert isinstance(changed, Error) and changed.code == ErrorCode.SOURCE_CHANGED
        # Marked changed: later requests are refused before any read.
        await session.send_requests(content.content_id, [1], [])
        async with asyncio.timeout(10):
            later = await session.next_chunk()
        assert isinstance(later, Error) and later.code == ErrorCode.SOURCE_CHANGED
        with pytest.raises(ContentStoreError, match="changed since it was added"):
            content.read_sealed(0)
        assert server.counters["chunks_served"] == 1
        await session.aclose()
    finally:
        await server.aclose()


async def test_an_edit_that_keeps_size_and_mtime_is_caught_by_the_receiver_under_aes(
    served: tuple[ContentStore, LocalContent], tmp_path: Path,
) -> None:
    """KEYED_PLAIN_AES seals every chunk under a fresh random nonce, so the sender does not
    hash what it serves: an edit that size and mtime miss goes out, sealed under a nonce
    never used before, and the receiver's leaf check refuses it and writes nothing."""
    _, content = served
    first = bytes(content.read_sealed(2))
    _edit_keeping_size_and_mtime(content.path)
    edited = bytes(content.read_sealed(2))
    assert edited[:GCM_NONCE_LEN] != first[:GCM_NONCE_LEN]
    part = ContentStore(tmp_path / "recv").open_partial(
        content.content_id, content.size, content.chunk_size, content.key,
        content.capability, tmp_path / "in", "f", scheme=content.scheme)
    part.set_leaves(content.leaves)
    with pytest.raises(VerificationError, match="chunk 2 does not match its hash"):
        part.write_chunk(2, edited)
    assert not part.have(2)
    assert part.write_chunk(1, content.read_sealed(1))  # unedited chunks still verify


async def test_sessions_per_ip_are_capped(served: tuple[ContentStore, LocalContent]) -> None:
    store, content = served
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, sessions_per_ip=2)
    host, port = await server.start()
    try:
        first = await open_transfer_session(await connect_tcp(host, port), ME)
        [first_task] = server._running
        second = await open_transfer_session(await connect_tcp(host, port), ME)
        with pytest.raises(SessionFailed):
            await open_transfer_session(await connect_tcp(host, port), ME)
        assert server.counters["sessions_refused.per_ip"] == 1
        assert (await second.open(content.content_id, content.capability)).size == 5000
        await first.aclose()
        async with asyncio.timeout(10):  # its slot frees once the server sees it end
            await asyncio.wait([first_task])
        third = await open_transfer_session(await connect_tcp(host, port), ME)
        assert (await third.open(content.content_id, content.capability)).size == 5000
        await second.aclose()
        await third.aclose()
    finally:
        await server.aclose()


def test_the_session_cap_counts_an_ipv6_peer_per_64() -> None:
    source = server_module._peer_source
    assert source("[2001:db8:1:2::5]:4000") == source("[2001:db8:1:2::9]:4001") \
        == "2001:db8:1:2::/64"
    assert source("[2001:db8:1:3::5]:4000") == "2001:db8:1:3::/64"
    assert source("203.0.113.1:4000") == "203.0.113.1"
    assert source("[::ffff:203.0.113.1]:4000") == "203.0.113.1"
    assert source(None) is None and source("") is None


async def test_a_session_without_a_capability_proof_is_closed(
    served: tuple[ContentStore, LocalContent],
) -> None:
    store, content = served
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, proof_timeout=0.3)
    host, port = await server.start()
    try:
        idle = await open_transfer_session(await connect_tcp(host, port), ME)
        [idle_task] = server._running
        proven = await open_transfer_session(await connect_tcp(host, port), ME)
        await proven.open(content.content_id, content.capability)
        async with asyncio.timeout(10):
            await asyncio.wait([idle_task])
        assert server.counters["timeouts.no_capability"] == 1
        # The session that proved one carries on past the deadline.
        assert server.active_sessions == 1
        await proven.send_requests(content.content_id, [0], [])
        async with asyncio.timeout(10):
            assert isinstance(await proven.next_chunk(), Chunk)
        with pytest.raises(SessionFailed):
            async with asyncio.timeout(10):
                await idle.open(content.content_id, content.capability)
        await idle.aclose()
        await proven.aclose()
    finally:
        await server.aclose()


async def test_an_upload_cap_sends_a_chunk_in_slices_not_after_a_silence(
    tmp_path: Path,
) -> None:
    """At 512 KiB/s a 1 MiB chunk takes 2 s. The requester sees its bytes arrive all along
    (its stall timer counts them), not 2 s of nothing and then the whole chunk."""
    data = os.urandom(1 << 20)
    (tmp_path / "big").write_bytes(data)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "big", chunk_size=1 << 20)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store,
                            max_upload_rate=512 << 10)
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(content.content_id, content.capability)
        before = session.bytes_received
        await session.send_requests(content.content_id, [0], [])
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.8):
                await session.next_chunk()
        assert 100 << 10 <= session.bytes_received - before < 1 << 20
        async with asyncio.timeout(10):
            chunk = await session.next_chunk()
        assert isinstance(chunk, Chunk) and content.cipher.open(0, chunk.data) == data
        await session.aclose()
    finally:
        await server.aclose()
        store.close()


class _Crawler(_SlowReader):
    """A TCP stream whose reader takes 8 KiB every 100 ms (about 80 KiB/s): slow enough
    to keep a 12 MiB chunk going for over two minutes, fast enough never to look stopped
    to a 5 s send timeout (64 KiB in 5 s is 13 KiB/s)."""

    def __init__(self, inner: TcpStream) -> None:
        super().__init__(inner)
        self.received = 0
        self.chunk_flows = asyncio.Event()  # more came than any reply but a chunk

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        await asyncio.sleep(0.1)
        data = await self.inner.receive_some(min(max_bytes, 8 << 10))
        self.received += len(data)
        if self.received > 64 << 10:
            self.chunk_flows.set()
        return data


@pytest.mark.parametrize("capped", [False, True])
async def test_a_crawling_requester_gives_its_upload_slot_up_to_one_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capped: bool,
) -> None:
    """One upload slot; a requester that reads its 12 MiB chunk at ~80 KiB/s (a real
    socket with a 64 KiB receive buffer) holds it while another requester waits for one
    small chunk. The crawler is dropped once it moved less than the slow rate in a window
    while the other waited, and the other gets its chunk in seconds, not after the
    crawler's two minutes. The same under an upload cap (64 MiB/s here), where the chunk
    goes out in slices with pauses between them."""
    data = os.urandom(12 << 20)
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "small").write_bytes(b"s" * 5000)
    store = ContentStore(tmp_path / "store")
    big = await store.add_local_file(tmp_path / "big", chunk_size=12 << 20)
    small = await store.add_local_file(tmp_path / "small", chunk_size=1024)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, send_timeout=5.0,
                            upload_slots=1, slow_rate=256 << 10, slow_window=0.5,
                            max_upload_rate=(64 << 20) if capped else None)
    host, port = await server.start()
    tasks = TaskSet("crawl test")
    caplog.set_level(logging.INFO, logger="overlay.transfer.server")
    try:
        stream = await connect_tcp(host, port, read_high_water=64 << 10)
        transport = stream._p.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      64 << 10)
        crawling = _Crawler(stream)
        crawler = await open_transfer_session(crawling, ME)
        await crawler.open(big.content_id, big.capability)
        await crawler.request(big.content_id, 0)
        crawled = tasks.spawn(crawler.next_chunk())
        assert crawled is not None
        async with asyncio.timeout(10):  # the crawler's chunk has the slot
            await crawling.chunk_flows.wait()
        assert server.upload_slots.locked()
        [crawl_served] = server._running
        other = await open_transfer_session(await connect_tcp(host, port), ME)
        await other.open(small.content_id, small.capability)
        await other.request(small.content_id, 0)
        async with asyncio.timeout(15):
            reply = await other.next_chunk()
        assert isinstance(reply, Chunk) and small.cipher.open(0, reply.data) == b"s" * 1024
        async with asyncio.timeout(10):
            await asyncio.wait([crawl_served])
        assert server.counters["slow_dropped"] == 1 and server.active_sessions == 1
        assert "wait for an upload slot; session dropped" in caplog.text
        assert server.counters["send_timeouts"] == 0
        await other.aclose()
        await crawler.aclose()
    finally:
        await tasks.aclose()
        await server.aclose()
        store.close()


class _Trickle(_SlowReader):
    """A TCP stream whose reader takes 32 KiB every 40 ms (about 800 KiB/s)."""

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        await asyncio.sleep(0.04)
        return await self.inner.receive_some(min(max_bytes, 32 << 10))


async def test_a_slow_requester_under_an_upload_cap_keeps_its_session(
    tmp_path: Path,
) -> None:
    """Under an upload cap a chunk goes out in 64 KiB slices, and a slice waits while the
    socket's write buffer drains from its 1 MiB high-water mark to 256 KiB: 768 KiB at
    the reader's pace. With one send timeout per slice, a requester reading under 768 KiB
    per send timeout (12.8 KB/s at the default 60 s) was cut as 'stopped reading'; the
    rule is now the one of an uncapped send, 64 KiB of progress per send timeout. Here:
    800 KiB/s against a 0.5 s timeout (1.5 MiB/s was needed), a 4 MiB chunk, a 64 MiB/s
    cap, and the sender's kernel buffer fixed at 64 KiB as a slow path's would be (on
    loopback it grows to 4 MiB, and the socket then takes bytes in megabyte steps)."""
    data = os.urandom(4 << 20)
    (tmp_path / "big").write_bytes(data)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "big", chunk_size=4 << 20)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store, send_timeout=0.5,
                            max_upload_rate=64 << 20)
    _small_send_buffer(server)
    host, port = await server.start()
    try:
        stream = await connect_tcp(host, port, read_high_water=64 << 10)
        transport = stream._p.transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                      64 << 10)
        session = await open_transfer_session(_Trickle(stream), ME)
        await session.open(content.content_id, content.capability)
        await session.request(content.content_id, 0)
        async with asyncio.timeout(60):
            reply = await session.next_chunk()
        assert isinstance(reply, Chunk) and content.cipher.open(0, reply.data) == data
        assert server.counters["send_timeouts"] == 0
        await session.aclose()
    finally:
        await server.aclose()
        store.close()


class _SlowToClose:
    """A stream that never receives anything and takes until `release` to close."""

    path = "test"

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        return None

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        await asyncio.Event().wait()
        return b""

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()

    def peer_address(self) -> str | None:
        return None


async def test_aclose_ends_every_session_then_passes_on_the_callers_cancel(
    served: tuple[ContentStore, LocalContent],
) -> None:
    """The node stops the transfer server while a session is still closing its stream, and
    the node's own stop is cancelled meanwhile: the server still ends every session and
    its sealing threads, and the cancel goes on; it was eaten and the caller carried on."""
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), served[0])
    stream = _SlowToClose()
    tasks = TaskSet("test")
    session = tasks.spawn(server.handle_stream(stream))
    assert session is not None
    await asyncio.sleep(0)
    assert server.active_sessions == 1
    after: list[str] = []

    async def stopping() -> None:
        await server.aclose()
        after.append("carried on")

    sealers_closed: list[bool] = []
    close_sealers = server.sealers.aclose

    async def closing_sealers() -> None:
        await close_sealers()
        sealers_closed.append(True)

    server.sealers.aclose = closing_sealers  # type: ignore[method-assign]
    stopper = tasks.spawn(stopping())
    assert stopper is not None
    try:
        async with asyncio.timeout(5):
            await stream.closing.wait()
        stopper.cancel()
        await asyncio.sleep(0)
        stream.release.set()
        async with asyncio.timeout(5):
            await asyncio.wait([stopper])
        assert stopper.cancelled(), f"the caller's cancel was lost: {after}"
        assert session.done() and server.active_sessions == 0
        assert sealers_closed, "the sealing threads were left running"
    finally:
        stream.release.set()
        await tasks.aclose()


async def test_the_first_session_starts_no_thread_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A holder's sealing threads start with `start`, and a download's filing threads as
    its first flight (OPEN and first GETs) goes out, so neither side's loop waits for a
    thread to start as the first GETs or chunks come; the download is whole."""
    data = random.Random(3).randbytes(3 << 20)
    (tmp_path / "f").write_bytes(data)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "f", chunk_size=1 << 20)
    log: list[str] = []
    loop_thread = threading.get_ident()
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        kind = thread.name.rsplit("_", 1)[0]
        if threading.get_ident() == loop_thread and kind in ("sealer", "filer"):
            log.append("start " + kind)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), store)
    host, port = await server.start()
    try:
        log.append("listening")

        def on_event(event: FetchEvent) -> None:
            if isinstance(event, SourceConnected | ChunkStored):
                log.append(type(event).__name__)

        receiving = ContentStore(tmp_path / "recv")
        partial = receiving.open_partial(
            content.content_id, content.size, content.chunk_size, content.key,
            content.capability, tmp_path / "inbox", "f", scheme=content.scheme)
        source = Source("holder", lambda: connect_tcp(host, port, timeout=10),
                        server.identity.peer_id)
        downloader = Downloader(partial, [source], ME, writers=2, on_event=on_event)
        async with asyncio.timeout(30):
            path = await downloader.run()
        assert path.read_bytes() == data
        assert log == ["start sealer", "listening", "start filer", "SourceConnected",
                       "ChunkStored", "ChunkStored", "ChunkStored"]
        assert server.chunks_served(content.content_id) == 3
        receiving.close()
    finally:
        await server.aclose()
        store.close()
