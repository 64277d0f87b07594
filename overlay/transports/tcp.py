"""Direct TCP: the first and fastest `Stream` transport.

Built on an `asyncio.Protocol` rather than StreamReader/StreamWriter: data arrives as the
loop's own `bytes` objects and is handed out without re-buffering, reading pauses when
more than `read_high_water` bytes wait (backpressure to the sender's kernel), and sends wait
on the transport's pause/resume signals. All sockets come from the running loop
(`create_connection`/`create_server`) so the simulator's loop can run this unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from crypto.address import format_hostport
from overlay.transports.stream import StreamBroken, StreamBusy, StreamClosed
from rendezvous.errors import error_text
from rendezvous.taskset import TaskSet
from rendezvous.tls import can_half_close

log = logging.getLogger(__name__)

READ_HIGH_WATER = 1 << 20
WRITE_HIGH_WATER = 1 << 20
SCRATCH_READ = 256 << 10  # one read when nobody gave a buffer (uvloop's own size)
PULL_READ = 16 << 10  # in pull mode: a frame header, and the next payload's first bytes
CLOSE_TIMEOUT = 2.0
# Seconds that sent bytes may stay unacknowledged before the kernel gives the connection
# up (TCP_USER_TIMEOUT, RFC 5482). Without it Linux retransmits for about 15 minutes, and a
# sender serving a peer that vanished (its laptop changed network: its address is gone)
# kept the session, and one of its four upload slots, until its own 60 s send timeout
# (60.5 s measured in the NAT lab). Linux applies it to a closed receive window too: a
# peer that ACKs but reads nothing for that long is cut as well (a 2 s limit here gave
# ETIMEDOUT 2.0 s after the last write, the reader still connected and not reading). A
# slow reader opens its window now and then and is not; one that stalls (its disk) is
# cut, and its download connects again as after any cut connection.
UNACKED_LIMIT = 20.0


class _TcpBase:
    """Receive buffer and flow-control state of one connection (the protocol callbacks;
    `StreamProtocol` and `DirectTcpProtocol` say which asyncio protocol kind it is)."""

    def __init__(
        self, read_high_water: int = READ_HIGH_WATER,
        on_made: Callable[[_TcpBase], None] | None = None,
    ) -> None:
        self._high = read_high_water
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.received = 0  # bytes read from the socket so far, wherever they went
        self.eof = False
        self.lost: BaseException | None = None
        self.closed = False
        self._flow_paused = False  # more than the high water is buffered
        self._idle_paused = False  # (pull mode) nobody is waiting for bytes
        self._transport_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self.lost_event = asyncio.Event()

    # --- asyncio callbacks -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        _limit_unacked(transport)
        if self.closed:  # closed before the connection was even made
            self.transport.abort()
        elif self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        self.received += len(data)
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self._high and not self._flow_paused:
            self._flow_paused = True
            self._sync_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return can_half_close(self.transport)  # keep our sending half open

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.lost = exc
        elif self.lost is None:
            self.lost = ConnectionResetError("connection closed")
        self._wake_reader()
        self._wake_writer()
        self.lost_event.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # --- used by TcpStream -----------------------------------------------------------
    def _sync_reading(self) -> None:
        """Pause or resume the transport so it reads exactly when one of the reasons to
        stop (too much buffered, nobody asking) doesn't hold."""
        want = self._flow_paused or self._idle_paused
        t = self.transport
        if want != self._transport_paused and t is not None and not t.is_closing():
            self._transport_paused = want
            if want:
                t.pause_reading()
            else:
                t.resume_reading()

    async def wait_into(self, buf: memoryview, *, fill: bool = False) -> int:
        """Wait for bytes; a protocol that can read straight into `buf` does and returns
        how many it put there (with `fill`, once `buf` is full or the stream ended), this
        one returns 0 and leaves them in `chunks`."""
        del buf, fill
        await self.wait_data()
        return 0

    def _wake_reader(self) -> None:
        w, self._data_waiter = self._data_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        w, self._drain_waiter = self._drain_waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_data(self) -> None:
        if self._data_waiter is not None:
            raise StreamBusy("another task is already receiving on this stream")
        self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    async def drain(self) -> None:
        while self._write_paused and not self.closed and not self.lost_event.is_set():
            if self._drain_waiter is None:
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain_waiter)

    def take(self, max_bytes: int) -> bytes:
        head = self.chunks[0]
        if len(head) <= max_bytes:
            self.chunks.popleft()
            out = head
        else:
            out = head[:max_bytes]
            self.chunks[0] = head[max_bytes:]
        self.buffered -= len(out)
        if self._flow_paused and self.buffered <= self._high // 2:
            self._flow_paused = False
            self._sync_reading()
        return out


class StreamProtocol(_TcpBase, asyncio.Protocol):
    """The asyncio protocol behind a `TcpStream`: bytes arrive through `data_received`.
    The relay hands a spliced connection to one (`transport.set_protocol`) and the
    simulator feeds one the same way."""


class DirectTcpProtocol(_TcpBase, asyncio.BufferedProtocol):
    """`StreamProtocol`'s reading, plus reading the socket straight into the reader's buffer.

    A sibling of `StreamProtocol`, not a subclass: uvloop treats a class that is both an
    `asyncio.Protocol` and a `BufferedProtocol` as a plain Protocol and never calls
    `get_buffer`.

    Until the first `receive_into` it reads like its parent (into a scratch buffer, copied
    out as `bytes`). From then on it is in *pull* mode: it reads only while a receive is
    waiting, one read at a time, into the receiver's buffer when it gave one (a CHUNK
    payload: no copy at all), else a small scratch read (a frame header and the start of
    the next payload). Bytes it didn't ask for stay in the kernel, which is the
    backpressure.

    A receive that asks to `fill` its buffer (a CHUNK payload, whose length is known) is
    woken once, when the buffer is full: the reads in between go on from the loop's read
    callback, with no task step, future or pause and resume of reading each. Then one
    more scratch read may follow (the next frame's header, there in the same loop turn
    when the socket holds it) before reading pauses.
    """

    def __init__(
        self, read_high_water: int = READ_HIGH_WATER,
        on_made: Callable[[_TcpBase], None] | None = None,
    ) -> None:
        super().__init__(read_high_water, on_made)
        self._scratch = memoryview(bytearray(SCRATCH_READ))
        self._target: memoryview | None = None
        self._target_got = 0
        self._fill = False
        self._pull = False

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._target_got:] if self._target_got else self._target
        return self._scratch[:PULL_READ] if self._pull else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        target = self._target
        if target is not None:
            self.received += nbytes
            self._target_got += nbytes
            if self._fill:
                if nbytes and self._target_got < len(target):
                    return  # reading goes on into the rest of it
                # Full: reading stays on for one scratch read (the next frame's start).
                self._target = None
                self._wake_reader()
                return
            self._target = None
            self._wake_reader()
        else:
            self.data_received(bytes(self._scratch[:nbytes]))
        if self._pull and nbytes:
            self._idle_paused = True  # one read per receive: the rest waits in the kernel
            self._sync_reading()

    async def wait_data(self) -> None:
        if self._idle_paused:
            self._idle_paused = False
            self._sync_reading()
        await super().wait_data()

    async def wait_into(self, buf: memoryview, *, fill: bool = False) -> int:
        self._pull = True
        self._target, self._target_got, self._fill = buf, 0, fill
        try:
            await self.wait_data()
        except BaseException:
            # Cancelled (a read deadline) in the loop turn that read the socket into `buf`,
            # or with `fill` before it was full: those bytes come next in the stream (before
            # any scratch read after them), so they go where the next receive looks first.
            # Dropped, they shifted every later byte: a holder on a slow uplink was banned
            # for a chunk that "does not open with the content key".
            n, self._target_got = self._target_got, 0
            if n:
                self.chunks.appendleft(bytes(buf[:n]))
                self.buffered += n
            raise
        finally:
            self._target = None
        n, self._target_got = self._target_got, 0
        return n


class TcpStream:
    """A `Stream` over one TCP connection."""

    path = "tcp"

    def __init__(self, protocol: _TcpBase) -> None:
        self._p = protocol
        self._eof_sent = False
        self._receiving = False
        self._written = 0  # bytes handed to the transport

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data`, then wait while the transport's buffer is above its high water."""
        await self.send_many((data,))

    async def send_many(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """`send_all` of each buffer in turn, but handed to the transport at once: a
        transport with a writelines of its own (uvloop's) sends them with one writev, so
        a frame header and its 1 MiB payload leave in one system call and reach the peer
        together; asyncio's own would join them (a copy), so it gets them one by one."""
        p = self._p
        if p.closed or self._eof_sent:
            raise StreamClosed("stream already closed for sending")
        t = p.transport
        if p.lost is not None or t is None or t.is_closing():
            raise StreamBroken(f"connection lost: {p.lost}")
        if len(bufs) == 1 or type(t).writelines is asyncio.WriteTransport.writelines:
            for buf in bufs:
                t.write(buf)
        else:
            t.writelines(bufs)
        self._written += sum(len(buf) for buf in bufs)
        await p.drain()
        if p.closed:
            raise StreamClosed("stream closed while sending")
        if p.lost is not None:
            raise StreamBroken(f"connection lost: {p.lost}")

    def bytes_sent(self) -> int:
        """Bytes that have left this process: what `send_all` took, less what still waits
        in the transport's own buffer."""
        t = self._p.transport
        return self._written - (t.get_write_buffer_size() if t is not None else 0)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Some bytes as they arrived (at most `max_bytes`), or b"" at EOF."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        await self._receive(None, False)
        return self._p.take(max_bytes) if self._p.chunks else b""

    def bytes_received(self) -> int:
        """Bytes read from the connection so far, also those of a receive still waiting
        to `fill` its buffer."""
        return self._p.received

    async def receive_into(self, buf: memoryview, *, fill: bool = False) -> int:
        """Like `receive_some`, into `buf` (writable, not empty): how many bytes were put
        there, 0 at EOF. Bytes already buffered are copied; otherwise the socket is read
        straight into `buf` where the protocol can, and with `fill` until `buf` is full
        (or the stream ended) instead of only once."""
        if not len(buf):
            raise ValueError("receive_into needs room for at least one byte")
        n = await self._receive(buf, fill)
        if n or not self._p.chunks:
            return n
        data = self._p.take(len(buf))
        buf[: len(data)] = data
        return len(data)

    async def _receive(self, buf: memoryview | None, fill: bool) -> int:
        """Wait until bytes are buffered or EOF came (0), or the protocol read `n` bytes
        straight into `buf` (n); one receiving task at a time."""
        p = self._p
        if self._receiving:
            raise StreamBusy("another task is already receiving on this stream")
        self._receiving = True
        try:
            while True:
                if p.closed:
                    raise StreamClosed("stream is closed")
                if p.chunks or p.eof:
                    return 0
                if buf is None:
                    await p.wait_data()
                elif n := await p.wait_into(buf, fill=fill):
                    return n
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Half-close (FIN); receiving continues."""
        p = self._p
        if p.closed:
            raise StreamClosed("stream is closed")
        if self._eof_sent:
            return
        self._eof_sent = True
        if p.transport is not None and p.lost is None and p.transport.can_write_eof():
            p.transport.write_eof()

    async def aclose(self) -> None:
        """Flush what is queued (bounded by CLOSE_TIMEOUT), then close."""
        p = self._p
        if p.closed:
            return
        p.closed = True
        p._wake_reader()
        p._wake_writer()
        t = p.transport
        if t is None:
            return
        t.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await p.lost_event.wait()
        except TimeoutError:
            # The peer stopped reading; don't let its buffer hold our shutdown hostage.
            t.abort()

    def peer_address(self) -> str | None:
        t = self._p.transport
        addr = t.get_extra_info("peername") if t is not None else None
        if isinstance(addr, tuple) and len(addr) >= 2:
            return format_hostport(str(addr[0]), addr[1])
        return None


def _limit_unacked(transport: asyncio.BaseTransport) -> None:
    """Set UNACKED_LIMIT on the connection's socket where the kernel has the option
    (Linux; the simulator's sockets take and ignore options)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(UNACKED_LIMIT * 1000))
    except (OSError, AttributeError):  # not TCP after all, or a socket without options
        pass


async def connect_tcp(
    host: str, port: int, *, timeout: float = 10.0,  # noqa: ASYNC109 (connect deadline)
    read_high_water: int = READ_HIGH_WATER,
) -> TcpStream:
    """Open a TCP connection through the running loop; StreamBroken if it can't."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(
                lambda: DirectTcpProtocol(read_high_water), host, port
            )
    except (OSError, TimeoutError) as exc:
        raise StreamBroken(f"cannot connect to {format_hostport(host, port)}: "
                           f"{error_text(exc)}") from None
    return TcpStream(proto)


StreamHandler = Callable[[TcpStream], Awaitable[None]]


class TcpServer:
    """A listener whose per-connection handler tasks it owns, bounds and cancels."""

    def __init__(self, handler: StreamHandler, *, max_connections: int = 256) -> None:
        self._handler = handler
        self._tasks = TaskSet("tcp server", limit=max_connections, logger=log)
        self._server: asyncio.Server | None = None
        self.refused = 0
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (pass port 0 for any free port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, host, port)
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        return self.address

    @property
    def connections(self) -> int:
        """How many connections are being handled now."""
        return len(self._tasks)

    def _make_protocol(self) -> StreamProtocol:
        return StreamProtocol(READ_HIGH_WATER, on_made=self._connected)

    def _connected(self, proto: _TcpBase) -> None:
        # Started from connection_made, so the handler always sees a live transport.
        if self._tasks.full or self._tasks.closed:  # closed: accepted during aclose
            if self._tasks.full:
                self.refused += 1
            if proto.transport is not None:
                proto.transport.abort()
            return
        self._tasks.spawn(self._run(TcpStream(proto)), name="tcp connection")

    async def _run(self, stream: TcpStream) -> None:
        try:
            await self._handler(stream)
        except Exception:  # a handler bug must not take the listener down
            log.exception("TCP connection handler failed")
        finally:
            await stream.aclose()

    async def aclose(self) -> None:
        """Stop listening, cancel every handler and wait for them."""
        if self._server is not None:
            self._server.close()
        await self._tasks.aclose()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


async def serve_tcp(
    handler: StreamHandler, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = 256
) -> TcpServer:
    """Start a TcpServer listening on (host, port); `server.address` is the bound address."""
    server = TcpServer(handler, max_connections=max_connections)
    await server.start(host, port)
    return server
