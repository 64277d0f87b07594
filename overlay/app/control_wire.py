"""The control socket's frames and errors, and one request made without an event loop.

The wire is overlay.app.control's (a 4-byte big-endian length plus msgpack; a request
`{"op": NAME, "args": {...}}`, a reply `{"ok": ..., "result"|"error": ...}`); this module
holds what its asyncio client and `call` share. `call` is for a command that makes one
request and waits for its answer (`peerpost send`): importing asyncio costs about 30 ms of
such a command's start, a third of it before the request leaves.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from crypto.codec import packb, unpackb
from crypto.errors import DecodeError
from rendezvous.framing import PREFIX, encode_frame

MAX_CONTROL_FRAME = 4 << 20
CLOSED_TEXT = "the node closed the control connection"


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached; the text is for people."""


class NodeNotRunning(ControlError):
    pass


def not_running(path: Path) -> NodeNotRunning:
    """The error for a control socket at `path` that nothing listens on."""
    return NodeNotRunning(
        f"the peerpost node for {path.parent} is not running "
        f"(start it with `peerpost --home {path.parent} node`)")


def frame(obj: Any) -> bytes:
    return encode_frame(packb(obj), MAX_CONTROL_FRAME)


def request(op: str, args: dict[str, Any]) -> bytes:
    return frame({"op": op, "args": args})


def body_length(prefix: bytes) -> int:
    """The length a frame's prefix announces; DecodeError past MAX_CONTROL_FRAME."""
    (n,) = PREFIX.unpack(prefix)
    if n > MAX_CONTROL_FRAME:
        raise DecodeError(f"control frame of {n} bytes exceeds {MAX_CONTROL_FRAME}")
    return int(n)


def decode_body(body: bytes) -> Any:
    return unpackb(body, max_bytes=MAX_CONTROL_FRAME)


def result(reply: Any) -> Any:
    """A reply's result, or ControlError with the node's text."""
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from the node")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")


def call(socket_path: Path, op: str, /, **args: Any) -> Any:
    """One request to the node whose control socket is at `socket_path`, on a blocking
    socket; the same answer and errors as `ControlClient.call`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise not_running(socket_path) from None
        try:
            sock.sendall(request(op, args))
            n = body_length(_receive(sock, PREFIX.size))
            body = _receive(sock, n)
        except (ConnectionResetError, BrokenPipeError):
            # A node that dies with the request unread resets the socket (kill -9 while
            # a send runs); to the user that is the same as a close.
            raise ControlError(CLOSED_TEXT) from None
        return result(decode_body(body))


def _receive(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ControlError(CLOSED_TEXT)
        got += k
    return bytes(buf)
