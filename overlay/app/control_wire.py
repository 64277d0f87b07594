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


SHOWN_ID_DIGITS = 12


def shown_id(text: str) -> str:
    """A message id as an error quotes it: whole up to 12 characters, else its first 12
    and "...", so that the line it is in fits 80 columns (32 hex digits made `rm`'s
    95)."""
    if len(text) <= SHOWN_ID_DIGITS:
        return repr(text)
    return repr(text[:SHOWN_ID_DIGITS] + "...")


RESTART = "restart it (stop `peerpost node` and start it again)"
# What `status` and the web inbox's Sent page say while a recipient may still download
# (a recipient's `owed`: at this domain, or queued or delivered at another).
KEEP_ON_TEXT = ("Keep this computer on, with peerpost running, until everyone has what you "
                "sent: the files go from here.")


class NodeTooOld(ControlError):
    """The running node lacks what this peerpost asks of it: a field of its answer, an
    operation, or an argument (`why` says which). It was started before an upgrade: its
    answer is not a bug to show as a traceback, and a restart runs the new code. The CLI
    adds both versions to the text (`older_text`)."""

    def __init__(self, op: str, why: str) -> None:
        self.op = op
        self.why = why
        super().__init__(self.text())

    def text(self, versions: str = "") -> str:
        """The text for the user; `versions` goes after "this peerpost" (" (0.2.0; ...)")."""
        return f"the running node is older than this peerpost{versions}: {RESTART}; {self.why}"


class Reply(dict[str, Any]):
    """A map in the node's answer to `op` (a subclass per answer, `reply_type`). A field
    it did not send (a node started before the upgrade that added it) raises NodeTooOld,
    not KeyError; `.get` and `in` are as a dict's, for fields an older node may lack and
    the caller does without. json.dumps writes it as the dict it is."""

    __slots__ = ()
    op = ""

    def __missing__(self, key: str) -> Any:
        raise NodeTooOld(self.op, f"it answered `{self.op}` without `{key}`")


def reply_type(op: str) -> type[Reply]:
    """The Reply class of the answer to `op`, msgpack's object_hook while decoding it:
    10,000 inbox entries take 4-13 ms more to decode than as dicts (a copy of each
    decoded afterwards took 55)."""
    return type("Reply", (Reply,), {"__slots__": (), "op": op})


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


def decode_body(body: bytes, op: str | None = None) -> Any:
    """A frame's object; with `op`, the answer to it, its maps Replies."""
    return unpackb(body, max_bytes=MAX_CONTROL_FRAME,
                   object_hook=None if op is None else reply_type(op))


def result(reply: Any, op: str) -> Any:
    """A reply's result, or ControlError with the node's text; NodeTooOld when the node
    does not know `op`."""
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from the node")
    if not reply.get("ok"):
        error = str(reply.get("error", "unknown error"))
        if error == f"unknown operation {op!r}":  # ControlServer's answer, every version
            raise NodeTooOld(op, f"it does not know the operation `{op}`")
        raise ControlError(error)
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
        return result(decode_body(body, op), op)


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
