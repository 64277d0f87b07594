"""The requester's asyncio adapter: one transfer session over a Stream.

Pull-driven, so it needs no background task: every call that waits for a reply reads
from the stream itself and files what arrives (control replies apart from chunk replies).
One task uses a session at a time; the downloader gives each source its own task.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from crypto.capability import prove_capability
from crypto.content import HASH_LEN, MAX_SEAL_OVERHEAD, chunk_count
from crypto.identity import DeviceIdentity, PublicIdentity
from overlay.transfer.core import (
    SPARE_PAYLOADS,
    BadMessage,
    ConnectionClosed,
    ConnectionFailed,
    HandshakeComplete,
    Role,
    TransferConnection,
)
from overlay.transfer.errors import RemoteError, SessionFailed
from overlay.transfer.frames import (
    MAX_GET_BATCH,
    MAX_HASH_PAGE,
    Cancel,
    Chunk,
    Error,
    Get,
    Gets,
    Hashes,
    HashesRequest,
    Have,
    Message,
    Open,
    Opened,
)
from overlay.transports.stream import Stream, StreamError

RECEIVE_SIZE = 1 << 20
_MAX_UNSOLICITED = 8


@runtime_checkable
class ReceivesInto(Protocol):
    """A stream that can also receive into a caller's buffer, until it is full (direct
    TCP), and count the bytes it read meanwhile."""

    async def receive_into(self, buf: memoryview, *, fill: bool = False) -> int: ...

    def bytes_received(self) -> int: ...


@dataclass(frozen=True, slots=True)
class OpenInfo:
    """What a holder said about a content: layout and which chunks it has (None: all)."""

    size: int
    chunk_size: int
    have: bytes | None

    def has(self, index: int) -> bool:
        if self.have is None:
            return True
        byte = index >> 3
        return byte < len(self.have) and bool(self.have[byte] & (1 << (index & 7)))


ChunkReply = Chunk | Error | Have


class TransferSession:
    """Requests to one holder: open, hashes, pipelined GETs and CANCELs."""

    def __init__(self, stream: Stream, conn: TransferConnection) -> None:
        if conn.peer is None or conn.transcript is None:
            raise SessionFailed("session used before its handshake")
        self.stream = stream
        # Asked once: a runtime-checkable isinstance walks the protocol's attributes, which
        # cost ~30 µs per chunk on the receiving loop when it was asked on every read.
        self._receives_into = isinstance(stream, ReceivesInto)
        self.peer: PublicIdentity = conn.peer
        self.transcript: bytes = conn.transcript
        self._conn = conn
        self._control: collections.deque[Message] = collections.deque()
        self._chunks: collections.deque[ChunkReply] = collections.deque()
        self._send_lock = asyncio.Lock()
        self._received = 0
        self._awaited = 0  # control replies asked for (OPEN, HASHES) and not yet taken

    @property
    def bytes_received(self) -> int:
        """Bytes from the holder so far, counted as they arrive: also those of a chunk
        still being received (the stall timer's trickle)."""
        if self._receives_into:
            return cast(ReceivesInto, self.stream).bytes_received()
        return self._received

    @property
    def path(self) -> str:
        return self.stream.path

    # --- plumbing ---------------------------------------------------------------------
    async def _flush(self) -> None:
        async with self._send_lock:
            try:
                for buf in self._conn.data_to_send():
                    await self.stream.send_all(buf)
            except StreamError as exc:
                raise SessionFailed(f"stream lost: {exc}") from None

    async def _send(self, msg: Message) -> None:
        self._conn.send(msg)
        await self._flush()

    async def _pump(self) -> None:
        """Read once from the stream and file the events."""
        space = self._conn.payload_space()
        try:
            if space is not None and self._receives_into:
                # Mid-payload on a stream that reads into buffers: straight into the
                # chunk's own buffer, no copy, and woken once it is full rather than after
                # each read (2-4 reads per 2 MiB chunk here).
                n = await cast(ReceivesInto, self.stream).receive_into(space, fill=True)
                if n:
                    self._conn.payload_received(n)
                else:
                    self._conn.receive_data(b"")
            else:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self._received += len(data)
                self._conn.receive_data(data)
        except StreamError as exc:
            raise SessionFailed(f"stream lost: {exc}") from None
        while (event := self._conn.next_event()) is not None:
            if isinstance(event, ConnectionFailed):
                if event.cut:
                    raise SessionFailed(f"the holder's {event.reason}")
                raise SessionFailed(f"protocol violation by the holder: {event.reason}")
            if isinstance(event, ConnectionClosed):
                raise SessionFailed("the holder closed the session")
            if isinstance(event, BadMessage):
                raise SessionFailed(f"bad message from the holder: {event.reason}")
            if isinstance(event, HandshakeComplete):
                continue
            if isinstance(event, Chunk | Have) or (
                    isinstance(event, Error) and event.index is not None):
                self._chunks.append(event)
            else:
                self._control.append(event)
                if len(self._control) > self._awaited + _MAX_UNSOLICITED:
                    raise SessionFailed("the holder sends replies nobody asked for")

    async def _control_reply(self) -> Message:
        while not self._control:
            await self._pump()
        self._awaited = max(0, self._awaited - 1)
        return self._control.popleft()

    def _ask(self, msg: Open | HashesRequest) -> None:
        """Queue a request answered by one control reply (sent by the next flush)."""
        self._conn.send(msg)
        self._awaited += 1

    async def flush(self) -> None:
        """Send every queued request in one go (one flight: the holder answers them in
        order, and their replies are read in that order)."""
        await self._flush()

    # --- requests ---------------------------------------------------------------------
    # Each request has a `queue_` half (queues it; `flush` sends) and a reading half, so a
    # requester that knows the layout from its handle sends OPEN, the HASHES requests and
    # its first GETs in one flight and reads the replies after one round trip, not three.
    def queue_open(self, content_id: bytes, capability: bytes, *, alone: bool = False
                   ) -> None:
        """Queue the OPEN proving the capability for `content_id`; `alone`: we fetch it
        from no other holder (`Open.alone`)."""
        self._ask(Open(content_id, prove_capability(capability, content_id, self.transcript),
                       alone))

    async def opened(self, content_id: bytes) -> OpenInfo:
        """The reply to the OPEN; RemoteError if the holder refuses."""
        reply = await self._control_reply()
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.text)
        if not isinstance(reply, Opened) or reply.content_id != content_id:
            raise SessionFailed(f"expected OPENED, got {type(reply).__name__}")
        self._conn.limit_payload(reply.chunk_size + MAX_SEAL_OVERHEAD)
        return OpenInfo(reply.size, reply.chunk_size, reply.have)

    async def open(self, content_id: bytes, capability: bytes) -> OpenInfo:
        """Prove the capability for `content_id`; RemoteError if the holder refuses."""
        self.queue_open(content_id, capability)
        await self._flush()
        return await self.opened(content_id)

    def queue_hashes(self, content_id: bytes, size: int, chunk_size: int
                     ) -> list[tuple[int, int]]:
        """Queue a HASHES request for every page of the hash list; returns the pages
        (start, count) for `hash_pages`."""
        n = chunk_count(size, chunk_size)
        pages = [(start, min(MAX_HASH_PAGE, n - start)) for start in range(0, n, MAX_HASH_PAGE)]
        for start, count in pages:
            self._ask(HashesRequest(content_id, start, count))
        return pages

    async def _hashes_reply(self, content_id: bytes, start: int, count: int
                            ) -> tuple[bytes, ...]:
        reply = await self._control_reply()
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.text)
        if (not isinstance(reply, Hashes) or reply.content_id != content_id
                or reply.start != start or not reply.leaves):
            raise SessionFailed("HASHES reply does not answer the request")
        return reply.leaves[:count]

    async def hashes(self, content_id: bytes, start: int, count: int) -> tuple[bytes, ...]:
        """One page of the chunk-hash list (may be shorter than asked)."""
        count = min(count, MAX_HASH_PAGE)
        self._ask(HashesRequest(content_id, start, count))
        await self._flush()
        return await self._hashes_reply(content_id, start, count)

    async def hash_pages(self, content_id: bytes, pages: Sequence[tuple[int, int]]
                         ) -> list[bytes]:
        """The whole hash list from the replies to `queue_hashes`, in order; a page
        answered short is completed page by page afterwards (the caller checks the list
        against the root)."""
        got = [list(await self._hashes_reply(content_id, start, count))
               for start, count in pages]
        leaves: list[bytes] = []
        for (start, count), page in zip(pages, got, strict=True):
            while len(page) < count:
                page += await self.hashes(content_id, start + len(page), count - len(page))
            leaves += page
        if any(len(h) != HASH_LEN for h in leaves):
            raise SessionFailed("hash list entry of the wrong size")
        return leaves

    def queue_first(self, content_id: bytes, indexes: Sequence[int]) -> int:
        """Queue GETs sent before the OPENED is read, after the OPEN and any HASHES
        requests (so the hash list comes before their chunks): the holder serves those its
        OPENED shows (`Gets.shown`), and so should the caller count them. Returns how many
        frames carry them."""
        batches = [indexes[k : k + MAX_GET_BATCH] for k in range(0, len(indexes), MAX_GET_BATCH)]
        for batch in batches:
            self._conn.send(Gets(content_id, tuple(batch), shown=True))
        return len(batches)

    async def all_hashes(self, content_id: bytes, size: int, chunk_size: int) -> list[bytes]:
        """The whole hash list, every page asked for at once (the caller checks it against
        the root)."""
        pages = self.queue_hashes(content_id, size, chunk_size)
        await self._flush()
        return await self.hash_pages(content_id, pages)

    async def request(self, content_id: bytes, index: int) -> None:
        """Send a GET; the reply comes from `next_chunk()`."""
        await self._send(Get(content_id, index))

    async def cancel(self, content_id: bytes, index: int) -> None:
        """Withdraw a GET (the chunk may still arrive if it was already on its way)."""
        await self._send(Cancel(content_id, index))

    async def send_requests(self, content_id: bytes, gets: list[int],
                            cancels: list[int]) -> int:
        """CANCELs then GETs, written to the stream at once; several GETs go as one GETS
        frame (one header to seal and open per batch, not per chunk). Returns how many
        frames carried the GETs."""
        for i in cancels:
            self._conn.send(Cancel(content_id, i))
        if len(gets) == 1:
            self._conn.send(Get(content_id, gets[0]))
            frames = 1
        else:
            batches = [gets[k : k + MAX_GET_BATCH] for k in range(0, len(gets), MAX_GET_BATCH)]
            for batch in batches:
                self._conn.send(Gets(content_id, tuple(batch)))
            frames = len(batches)
        await self._flush()
        return frames

    async def next_chunk(self) -> ChunkReply:
        """The next chunk reply: a Chunk, an Error naming the refused index, or a HAVE."""
        while not self._chunks:
            await self._pump()
        return self._chunks.popleft()

    def align_payloads(self, lead: int, spare: int = SPARE_PAYLOADS) -> None:
        """Receive chunks into page-aligned buffers, `lead` bytes before a page boundary
        (`TransferConnection.align_payloads`): the opener's nonce; keep up to `spare`
        recycled ones."""
        self._conn.align_payloads(lead, spare)

    def recycle(self, chunk: Chunk) -> None:
        """The caller is done with this chunk's data and holds no reference to it: its
        buffer may receive a later chunk."""
        if isinstance(chunk.data, bytearray | memoryview):
            self._conn.recycle(chunk.data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_transfer_session(
    stream: Stream, identity: DeviceIdentity, *, expected_peer: bytes | None = None,
    handshake_timeout: float = 10.0,
) -> TransferSession:
    """Run the handshake as the initiator; SessionFailed (and the stream closed) if it fails
    or the holder is not `expected_peer`."""
    conn = TransferConnection(Role.INITIATOR, identity, expected_peer=expected_peer)
    try:
        async with asyncio.timeout(handshake_timeout):
            for buf in conn.data_to_send():
                await stream.send_all(buf)
            while True:
                data = await stream.receive_some(4096)
                conn.receive_data(data)
                event = conn.next_event()
                if isinstance(event, HandshakeComplete):
                    break
                if isinstance(event, ConnectionFailed):
                    raise SessionFailed(f"handshake failed: {event.reason}")
                if event is not None:
                    raise SessionFailed("the holder closed the connection during the handshake")
            for buf in conn.data_to_send():
                await stream.send_all(buf)
    except TimeoutError:
        await stream.aclose()
        raise SessionFailed("handshake timed out") from None
    except StreamError as exc:
        await stream.aclose()
        raise SessionFailed(f"handshake failed: {exc}") from None
    except SessionFailed:
        await stream.aclose()
        raise
    return TransferSession(stream, conn)
