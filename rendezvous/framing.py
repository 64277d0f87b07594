"""Frames: a 4-byte big-endian length, then that many bytes of msgpack.

`FrameDecoder` is sans-I/O: feed it whatever the socket gave, take complete frames out.
The length is checked against the limit as soon as the 4 prefix bytes are in, before
any of the body is buffered, so a peer can't make us hold more than one limit's worth.
"""

from __future__ import annotations

import struct

from rendezvous.errors import RemoteProtocolError
from rendezvous.status import Status

PREFIX = struct.Struct(">I")
DEFAULT_MAX_FRAME = 256 * 1024


def encode_frame(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix `body` with its length; refuse (ValueError) bodies over `max_frame`."""
    if len(body) > max_frame:
        raise ValueError(f"frame of {len(body)} bytes over the limit {max_frame}")
    return PREFIX.pack(len(body)) + body


class FrameDecoder:
    """Reassembles length-prefixed frames; raises a fatal RemoteProtocolError on abuse."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 when between frames)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return the frames now complete, in order."""
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = PREFIX.unpack_from(buf, pos)
            if size > self.max_frame:
                raise RemoteProtocolError(
                    f"frame of {size} bytes over the limit {self.max_frame}",
                    Status.TOO_LARGE, fatal=True)
            if end - pos - 4 < size:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        if not buf and buf.__sizeof__() > 4096:
            # An idle connection shouldn't keep the capacity of its largest frame.
            self._buf = bytearray()
        return frames
