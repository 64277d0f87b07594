"""Socket objects of a simulated host, for code that drives TCP sockets itself.

The TCP hole punch (overlay.transports.punch) binds several sockets to one local port
(SO_REUSEADDR and SO_REUSEPORT), connects with `loop.sock_connect`, talks STUN with
`loop.sock_sendall`/`loop.sock_recv`, listens and takes connections with
`loop.sock_accept`, and hands a connected socket to `loop.create_connection(sock=...)`.
`SimSocket` is what it gets instead of a kernel socket (through its `make_socket` seam,
`reusable_socket`), and `sim.loop.SimLoop`'s socket calls act on it: a connect is a
`Network.connect` from the bound port (so the host's NAT maps that port, and a SYN from the
endpoint it dials meets it in a simultaneous open), a listen is a `Network.listen`, and
the bytes that arrive before a protocol takes the connection over are buffered.

Only what the punch needs is here: IPv4 TCP, one connect per socket, no half-close on the
socket side, SO_* options recorded but only the reuse flags mean anything.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from sim.network.transports import SimServer, SimStreamTransport

if TYPE_CHECKING:
    from sim.network.host import Host

Addr = tuple[str, int]

MAX_BUFFERED = 1 << 20  # bytes held for a socket no protocol has taken yet: reading pauses
MAX_BACKLOG = 64  # accepted connections waiting for sock_accept; more are reset


class _Buffer(asyncio.Protocol):
    """Holds what a connection delivers until `sock_recv` reads it or a protocol takes
    the connection (`SimSocket.take_over`)."""

    def __init__(self) -> None:
        self.transport: SimStreamTransport | None = None
        self.data = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, SimStreamTransport):
            self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_BUFFERED and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # the socket may still write

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes; b"" at end of stream; the reset as an OSError."""
        while not self.data and not self.eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self.data and self.error is not None:
            raise self.error
        out = bytes(self.data[:n])
        del self.data[:n]
        if self.transport is not None and len(self.data) <= MAX_BUFFERED:
            self.transport.resume_reading()
        return out


class SimSocket:
    """A TCP socket on a simulated host (see the module docstring)."""

    def __init__(self, host: Host, family: int = socket.AF_INET) -> None:
        if family != socket.AF_INET:
            raise OSError(errno.EAFNOSUPPORT, "only IPv4 is simulated")
        self.host = host
        self.family = family
        self.type = socket.SOCK_STREAM
        self.reuse = False
        self.port = 0
        self.transport: SimStreamTransport | None = None
        self.buffer: _Buffer | None = None
        self.server: SimServer | None = None
        self._accepted: deque[tuple[SimSocket, Addr]] = deque()
        self._accept_waiter: asyncio.Future[None] | None = None
        self.closed = False

    @classmethod
    def reusable(cls, host: Host, family: int, local: Addr) -> SimSocket:
        """As `rendezvous.stun.reusable_socket`: SO_REUSEADDR and SO_REUSEPORT, bound."""
        sock = cls(host, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(local)
        return sock

    def __repr__(self) -> str:
        return f"<SimSocket {self.host.name}:{self.port}>"

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        """SO_REUSEADDR/SO_REUSEPORT allow binding a port in use; the rest is ignored."""
        if level == socket.SOL_SOCKET and option in (socket.SO_REUSEADDR,
                                                     socket.SO_REUSEPORT):
            self.reuse = self.reuse or bool(value)

    def setblocking(self, flag: bool) -> None:
        """Simulated sockets never block."""

    def fileno(self) -> int:
        """No file descriptor: this socket does not exist in the kernel."""
        return -1

    def gettimeout(self) -> float:
        """Non-blocking, as asyncio wants its sockets."""
        return 0.0

    def bind(self, address: Addr) -> None:
        """Bind to one of the host's addresses (or any) and a port (0: an ephemeral one)."""
        net = self.host.network
        net.check_local(self.host, address[0])
        port = int(address[1])
        if port == 0:
            port = self.host.bind_port("tcp", 0)
        elif not self.reuse and port in self.host.listeners:
            raise OSError(errno.EADDRINUSE,
                          f"[{self.host.name}] address already in use: {port}")
        self.port = port

    def getsockname(self) -> Addr:
        """The host's address and the bound port."""
        return (self.host.address, self.port)

    def getpeername(self) -> Addr:
        """The address the connection sees at the other end."""
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        if peer is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return (str(peer[0]), int(peer[1]))

    def listen(self, backlog: int = MAX_BACKLOG) -> None:
        """Take connections to the bound port (`sock_accept` hands them out)."""
        if self.port == 0:
            self.bind(("0.0.0.0", 0))
        self.server = self.host.network.listen(self.host, self._incoming, None, self.port)

    def _incoming(self) -> asyncio.BaseProtocol:
        return _Accepting(self)

    def _accepted_one(self, sock: SimSocket, peer: Addr) -> bool:
        if self.closed or len(self._accepted) >= MAX_BACKLOG:
            return False
        self._accepted.append((sock, peer))
        if self._accept_waiter is not None and not self._accept_waiter.done():
            self._accept_waiter.set_result(None)
        return True

    async def accept(self) -> tuple[SimSocket, Addr]:
        """The next connection taken on this listening socket."""
        if self.server is None:
            raise OSError(errno.EINVAL, "the socket is not listening")
        while not self._accepted:
            if self.closed:
                raise OSError(errno.EBADF, "the socket is closed")
            self._accept_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._accept_waiter
            finally:
                self._accept_waiter = None
        return self._accepted.popleft()

    async def connect(self, address: Addr) -> None:
        """Connect from the bound port (an ephemeral one if unbound)."""
        if self.closed:
            raise OSError(errno.EBADF, "the socket is closed")
        if self.transport is not None:
            raise OSError(errno.EISCONN, "the socket is already connected")
        if self.port == 0:
            self.bind(("0.0.0.0", 0))
        net = self.host.network
        transport, protocol = await net.connect(self.host, _Buffer, net.endpoint(address),
                                                local_port=self.port)
        if not isinstance(transport, SimStreamTransport) or not isinstance(protocol, _Buffer):
            raise OSError(errno.EPROTO, "not a simulated stream")
        if self.closed:  # closed while connecting
            transport.abort()
            raise OSError(errno.EBADF, "the socket is closed")
        self.transport, self.buffer = transport, protocol

    def _connected(self) -> tuple[SimStreamTransport, _Buffer]:
        if self.transport is None or self.buffer is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return self.transport, self.buffer

    def sendall(self, data: bytes) -> None:
        """Queue `data` on the connection (the model's send buffer has no limit here)."""
        transport, _ = self._connected()
        if transport.is_closing():
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        transport.write(data)

    async def recv(self, n: int) -> bytes:
        """Up to `n` bytes that arrived; b"" once the peer closed."""
        _, buffer = self._connected()
        return await buffer.read(n)

    def take_over(self, protocol: asyncio.BaseProtocol) -> SimStreamTransport:
        """Give the connection to `protocol` (loop.create_connection(sock=...)): it is
        made, then handed whatever arrived meanwhile. The socket is detached."""
        transport, buffer = self._connected()
        self.transport = self.buffer = None
        self.closed = True
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        # Handed over as the transport hands data to any protocol (a BufferedProtocol of
        # ours reads through data_received too, see SimStreamTransport._hand_over).
        took: Any = protocol
        if buffer.data:
            took.data_received(bytes(buffer.data))
        if buffer.eof:
            if buffer.error is not None:
                protocol.connection_lost(buffer.error)
            elif not took.eof_received():
                transport.close()
        transport.resume_reading()
        return transport

    def close(self) -> None:
        """Close the connection if there is one (FIN after what is queued), stop
        listening, drop connections not accepted yet."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            self.transport = self.buffer = None
        if self.server is not None:
            self.server.close()
        while self._accepted:
            self._accepted.popleft()[0].close()
        if self._accept_waiter is not None and not self._accept_waiter.done():
            self._accept_waiter.set_result(None)


class _Accepting(_Buffer):
    """The protocol of a connection a listening SimSocket takes: it becomes a connected
    SimSocket in the listener's accept queue (reset if the queue is full)."""

    def __init__(self, listener: SimSocket) -> None:
        super().__init__()
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is None:
            return
        sock = SimSocket(self._listener.host, self._listener.family)
        sock.port = self._listener.port
        sock.transport, sock.buffer = self.transport, self
        peer = self.transport.get_extra_info("peername")
        if not self._listener._accepted_one(sock, (str(peer[0]), int(peer[1]))):
            self.transport.abort()
