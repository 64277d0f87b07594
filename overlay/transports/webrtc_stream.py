"""A `Stream` over one reliable, ordered WebRTC data channel (aiortc).

Binary messages carry data, text messages carry control. A data channel has no half-close
and aiortc has no receive-side flow control (it hands every message to the application as
it arrives), so this module adds both:

- `eof`: no more data from the sender; `close`: the sender closed the whole stream and
  wants a `bye` back, which, coming in order after all our data, proves the peer has it
  all. Only then is the peer connection torn down (aiortc's close aborts the SCTP
  association and drops whatever is still unacknowledged).
- `c:N`: the receiver's application has consumed N bytes in total. A sender keeps at most
  `window` bytes unconsumed, so the receive buffer is bounded, and TCP-like backpressure
  reaches a sender whose peer stops reading.

Sends wait while `bufferedAmount` is above `high_water` and wake on `bufferedamountlow`
(`bufferedAmountLowThreshold` = `low_water`). A peer that breaks these rules (unknown
control, data past the window, data after EOF) gets the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiortc import RTCDataChannel, RTCPeerConnection

from crypto.address import format_hostport
from overlay.transports.stream import ChunkReceiver, StreamBroken, StreamClosed

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
_MAX_CONTROL = 32


@dataclass(frozen=True, slots=True)
class ChannelTuning:
    """Message size and buffer thresholds of the data channel (see benchmarks/paths.py)."""

    message_size: int = 64 * 1024
    high_water: int = 1 << 20
    low_water: int = 256 * 1024
    window: int = 4 << 20

    def __post_init__(self) -> None:
        if not 1024 <= self.message_size <= 256 * 1024:
            raise ValueError("message_size must be 1 KiB..256 KiB (aiortc's SCTP maximum)")
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        if self.window < self.message_size:
            raise ValueError("window must hold at least one message")


class WebRtcStream(ChunkReceiver):
    """A `Stream` over a data channel; it owns the peer connection and closes it."""

    path = "webrtc"

    def __init__(self, pc: RTCPeerConnection, channel: RTCDataChannel,
                 tuning: ChannelTuning = ChannelTuning(), *, remote_address: str = "",
                 remote_device: bytes = b"") -> None:
        self.remote_address = remote_address
        self.remote_device = remote_device
        self.tuning = tuning
        self._pc = pc
        self._ch = channel
        self._init_receiver()
        self._granted = 0
        self._sent = 0
        self._peer_consumed = 0
        self._eof_in = False
        self._peer_closed = False
        self._eof_sent = False
        self._closed = False
        self._broken: str | None = None
        self._opened = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._bye = asyncio.Event()
        self._teardown: asyncio.Task[None] | None = None
        channel.bufferedAmountLowThreshold = tuning.low_water
        channel.on("open", self._on_open)
        channel.on("message", self._on_message)
        channel.on("close", self._on_channel_close)
        channel.on("bufferedamountlow", self._writable.set)
        pc.on("connectionstatechange", self._on_state)
        if channel.readyState == "open":
            self._on_open()

    # --- aiortc callbacks ------------------------------------------------------------
    def _on_open(self) -> None:
        if not self._opened.done():
            self._opened.set_result(None)

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._lose(f"WebRTC connection {self._pc.connectionState}")

    def _on_channel_close(self) -> None:
        self._lose("data channel closed by the peer")

    def _on_message(self, msg: bytes | str) -> None:
        if isinstance(msg, bytes):
            if self._closed:
                return  # we no longer read; the peer has not seen our close yet
            if self._eof_in:
                self._violation("data after EOF")
                return
            self._push(msg)
            if self._buffered > self.tuning.window:
                self._violation("peer overran the flow-control window")
            return
        self._on_control(msg)

    def _on_control(self, msg: str) -> None:
        if len(msg) > _MAX_CONTROL:
            self._violation("oversized control message")
        elif msg.startswith("c:") and msg[2:].isdigit():
            consumed = int(msg[2:])
            if consumed < self._peer_consumed or consumed > self._sent:
                self._violation("credit outside what we sent")
                return
            self._peer_consumed = consumed
            self._writable.set()
        elif msg == "eof":
            self._eof_in = True
            self._readable.set()
        elif msg == "close":
            self._eof_in = True
            self._peer_closed = True
            self._send_control("bye")
            self._readable.set()
            self._writable.set()
        elif msg == "bye":
            self._bye.set()
        else:
            self._violation("unknown control message")

    def _violation(self, what: str) -> None:
        log.warning("webrtc peer %s broke the stream protocol: %s", self.remote_address, what)
        self._lose(f"peer protocol error: {what}")
        if self._teardown is None:
            self._teardown = asyncio.get_running_loop().create_task(self._pc.close())

    def _lose(self, why: str) -> None:
        if self._broken is None and not self._peer_closed:
            self._broken = why
        self._on_open()  # nobody should wait for an open that will never come
        self._readable.set()
        self._writable.set()
        self._bye.set()

    def _send_control(self, text: str) -> None:
        if self._ch.readyState == "open":
            self._ch.send(text)

    # --- opening ---------------------------------------------------------------------
    async def wait_open(self) -> None:
        """Wait for the channel to open (the caller bounds the wait); StreamBroken if it dies."""
        await asyncio.shield(self._opened)
        if self._ch.readyState != "open":
            raise StreamBroken(self._broken or "data channel did not open")

    # --- Stream ----------------------------------------------------------------------
    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise StreamClosed("stream already closed for sending")
        if self._peer_closed:
            raise StreamBroken("the peer closed the stream")
        if self._broken is not None or self._ch.readyState != "open":
            raise StreamBroken(self._broken or f"data channel is {self._ch.readyState}")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` as messages, waiting for flow-control credit and buffer room."""
        view = memoryview(data).cast("B")
        t = self.tuning
        pos = 0
        self._check_send()
        while pos < len(view):
            self._check_send()
            credit = self._peer_consumed + t.window - self._sent
            if credit <= 0 or self._ch.bufferedAmount > t.high_water:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(t.message_size, credit, len(view) - pos)
            self._ch.send(bytes(view[pos : pos + n]))
            self._sent += n
            pos += n

    def bytes_sent(self) -> int:
        """Bytes that have left this process: what went to the channel, less what it still
        buffers."""
        return self._sent - int(self._ch.bufferedAmount)

    def _on_consumed(self) -> None:
        if self._consumed - self._granted >= self.tuning.window // 4:
            self._granted = self._consumed
            self._send_control(f"c:{self._consumed}")

    async def send_eof(self) -> None:
        """Tell the peer no more data comes (a marker after the data); receiving goes on."""
        if self._closed:
            raise StreamClosed("stream is closed")
        if self._eof_sent:
            return
        self._eof_sent = True
        self._send_control("eof")

    async def aclose(self) -> None:
        """Say `close`, wait (bounded) for the peer's `bye`, then close the connection."""
        if self._closed:
            if self._teardown is not None:
                await asyncio.shield(self._teardown)
            return
        self._closed = True
        self._readable.set()
        self._writable.set()
        if self._ch.readyState == "open" and self._broken is None:
            self._send_control("close")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._bye.wait()
        if self._teardown is None:
            self._teardown = asyncio.get_running_loop().create_task(self._pc.close())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._teardown)

    def peer_address(self) -> str | None:
        """The remote ICE candidate in use, as "host:port", once connected."""
        sctp = self._pc.sctp
        if sctp is None:
            return None
        try:  # aiortc exposes no selected pair; aioice keeps it in Connection._nominated
            pair = sctp.transport.transport._connection._nominated.get(1)
            if pair is None:
                return None
            host, port = str(pair.remote_candidate.host), int(pair.remote_candidate.port)
        except AttributeError:
            return None
        return format_hostport(host, port)
