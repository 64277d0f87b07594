"""The byte-stream interface every transport offers to the transfer protocol.

A *byte* stream rather than a message interface: WebRTC data channels and the relay carry
messages of limited size and TCP carries bytes, so the transfer core does its own framing
and each transport only moves bytes in order. Shaped after trio's `Stream`; every
transport must pass `tests/overlay/streams.py::check_stream`.

Semantics, which the conformance suite checks:
- `send_all` returns once the transport has taken all of `data` into a bounded buffer
  (it waits for room: that is the backpressure). It raises `StreamClosed` after our own
  `send_eof`/`aclose`, `StreamBroken` if the peer went away.
- `receive_some` returns between 1 and `max_bytes` bytes, or `b""` once the peer has sent
  EOF or closed (and on every call after that). It raises `StreamClosed` if *this* side
  was closed, including while a task was blocked in it, and `StreamBusy` if another task is
  already receiving.
- `send_eof` tells the peer no more bytes will come, keeping our receive side open.
  A transport that cannot half-close must still deliver the EOF (a marker message).
- `aclose` is idempotent and bounded in time; the peer then reads EOF (or StreamBroken).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol, runtime_checkable


class StreamError(Exception):
    """Base class of transport failures."""


class StreamClosed(StreamError):
    """This side already closed (or sent EOF, for sends)."""


class StreamBroken(StreamError):
    """The peer or the network broke the stream (reset, timeout, abort)."""


class StreamBusy(StreamError):
    """Two tasks tried to receive on one stream at once."""


@runtime_checkable
class Stream(Protocol):
    """An ordered, reliable, bidirectional byte stream to one peer."""

    @property
    def path(self) -> str:
        """Which kind of route this is: "tcp", "webrtc" or "relay" (shown in inbox sources)."""
        ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of `data`, waiting for buffer room."""
        ...

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Some bytes, or b"" at EOF."""
        ...

    async def send_eof(self) -> None:
        """Half-close: no more bytes from us."""
        ...

    async def aclose(self) -> None:
        """Close both directions and release the transport."""
        ...

    def peer_address(self) -> str | None:
        """The remote address as "host:port" where the transport knows one."""
        ...


class ChunkReceiver:
    """`receive_some` over the pieces a message transport hands us (WebRTC's data channel
    messages, QUIC's stream frames), for a stream class that sets `_closed`, `_eof_in` and
    `_broken` (and wakes `_readable` when they change), calls `_push` with each piece and
    hears of each read in `_on_consumed` (to grant the peer credit)."""

    _closed: bool
    _eof_in: bool
    _broken: str | None

    def _init_receiver(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0  # received, not read yet
        self._consumed = 0  # read in all
        self._receiving = False
        self._readable = asyncio.Event()

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _on_consumed(self) -> None:
        """Called after each read (the subclass grants credit here)."""

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Some bytes (at most `max_bytes`), or b"" once the peer sent EOF or closed."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if self._receiving:
            raise StreamBusy("another task is already receiving on this stream")
        self._receiving = True
        try:
            while True:
                if self._closed:
                    raise StreamClosed("stream is closed")
                if self._chunks:
                    return self._take(max_bytes)
                if self._eof_in:
                    return b""
                if self._broken is not None:
                    raise StreamBroken(self._broken)
                self._readable.clear()
                await self._readable.wait()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int) -> bytes:
        head = self._chunks[0]
        if len(head) <= max_bytes:
            self._chunks.popleft()
            out = head
        else:
            out = head[:max_bytes]
            self._chunks[0] = head[max_bytes:]
        self._buffered -= len(out)
        self._consumed += len(out)
        self._on_consumed()
        return out
