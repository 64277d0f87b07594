"""asyncio transports over the simulated network: streams, datagrams, listening servers.

Stream model (TCP-like, per direction):
- `write()` queues bytes in the transport (the "send buffer"); `get_write_buffer_size()` is
  what has not left the sender's uplink yet, and drives `pause_writing`/`resume_writing`
  with asyncio's default limits (64 KiB high, 16 KiB low) so `StreamWriter.drain()` works.
- The transport feeds its uplink at most two segments (<= `segment_size`) at a time, so the
  flows and datagrams of a host share its uplink first come, first served, and at most
  `stream_window` bytes are unconsumed by the receiving protocol (flow control: a receiver
  that pauses reading stops the sender). Window updates reach the sender at once.
- A segment leaves the uplink, travels the link latency (never overtaking an earlier one),
  queues at the receiver's downlink and is handed to `data_received`.
- `close()` sends FIN after the buffered data; `abort()` and a host going offline send RST:
  the peer's protocol sees `connection_lost(ConnectionResetError)`.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from sim.trace import EventKind

if TYPE_CHECKING:
    from sim.network.host import Host
    from sim.network.net import Network

Addr = tuple[str, int]

_MAX_DATAGRAM = 65507
_SEGMENTS_IN_UPLINK = 2


class _State(enum.Enum):
    OPEN = 1
    CLOSING = 2  # close() called, flushing the send buffer then FIN
    CLOSED = 3  # FIN sent, connection_lost(None) delivered
    DEAD = 4  # aborted, reset, or the host went offline


class _Fin:
    __slots__ = ()


_FIN = _Fin()


class SimSocketInfo:
    """Stands in for `socket.socket` where asyncio code asks a server for its sockets."""

    def __init__(self, address: Addr | str, kind: socket.SocketKind) -> None:
        self._address = address
        self.family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.type = kind

    def getsockname(self) -> Addr | str:
        """The bound address (a Unix socket's path), as a real socket would report it."""
        return self._address

    def setsockopt(self, *args: Any) -> None:
        """Options (TCP_NODELAY, buffer sizes...) change nothing in the model."""

    def getsockopt(self, *args: Any) -> int:
        """Every option reads as 0."""
        return 0

    def fileno(self) -> int:
        """No file descriptor: this socket does not exist in the kernel."""
        return -1


def _call_protocol(loop: asyncio.AbstractEventLoop, what: str, fn: Any, *args: Any) -> None:
    """Call a flow-control hook the way asyncio does: errors go to the exception handler."""
    try:
        fn(*args)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        loop.call_exception_handler({"message": f"protocol.{what}() failed", "exception": exc})


class SimStreamTransport(asyncio.Transport):
    """One end of a simulated TCP connection."""

    def __init__(self, net: Network, host: Host, sockname: Addr | str,
                 peername: Addr | str) -> None:
        super().__init__()
        self._net = net
        self._loop = net.loop
        self._host = host
        self._sockname = sockname
        self._peername = peername
        self._peer: SimStreamTransport | None = None
        self._protocol: Any = None
        self._connected = False
        self._state = _State.OPEN
        self._lost_called = False
        self._eof_written = False
        self._sendq: deque[memoryview | _Fin] = deque()
        self._buffered = 0
        self._in_uplink = 0
        self._unacked = 0
        self._backlog: deque[bytes | _Fin] = deque()
        self._reading_paused = False
        self._writing_paused = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._last_arrival = 0.0

    def __repr__(self) -> str:
        return (f"<SimStreamTransport {self._host.name} {self._sockname}->{self._peername} "
                f"{self._state.name.lower()}>")

    # --- asyncio.BaseTransport -----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """'peername', 'sockname' and 'socket' (a SimSocketInfo) are known."""
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        if name == "socket":
            return SimSocketInfo(self._sockname, socket.SOCK_STREAM)
        return default

    def is_closing(self) -> bool:
        """True once close() or abort() was called or the connection died."""
        return self._state is not _State.OPEN

    def close(self) -> None:
        """Send what is buffered, then FIN; connection_lost(None) follows."""
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        self._backlog.clear()
        if not self._eof_written:
            self._eof_written = True
            self._sendq.append(_FIN)
        self._pump()
        self._maybe_finish_close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Replace the protocol (as loop.sendfile's fallback and start_tls do)."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        proto: asyncio.BaseProtocol = self._protocol
        return proto

    # --- asyncio.ReadTransport -----------------------------------------------------------

    def is_reading(self) -> bool:
        """False while paused or closing."""
        return self._state is _State.OPEN and not self._reading_paused

    def pause_reading(self) -> None:
        """Stop data_received; unconsumed data holds the sender back through the window."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """Deliver what arrived meanwhile, then carry on."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._backlog:
            self._loop.call_soon(self._flush_backlog, context=self._host.context)

    # --- asyncio.WriteTransport ----------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Same defaults and rules as asyncio's selector transports."""
        if high is None:
            high = 4 * low if low is not None else 64 * 1024
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """(low, high)."""
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        """Bytes written that have not left this host's uplink yet."""
        return self._buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` (copied) for sending."""
        if self._eof_written and self._state is _State.OPEN:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._state is not _State.OPEN or not data:
            return
        view = memoryview(bytes(data))
        self._sendq.append(view)
        self._buffered += len(view)
        self._pump()
        self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        """Write each buffer in turn."""
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        """Half-close: FIN after the buffered data; reading goes on."""
        if self._state is not _State.OPEN or self._eof_written:
            return
        self._eof_written = True
        self._sendq.append(_FIN)
        self._pump()

    def can_write_eof(self) -> bool:
        """Streams can half-close."""
        return True

    def abort(self) -> None:
        """Drop everything and reset the connection."""
        if self._state in (_State.CLOSED, _State.DEAD):
            return
        self._die(None, send_reset=True)

    # --- engine side ---------------------------------------------------------------------

    @property
    def host(self) -> Host:
        """The simulated host this end belongs to."""
        return self._host

    def accept(self, peer: SimStreamTransport, protocol: asyncio.BaseProtocol, *,
               not_before: float) -> None:
        """The listening side of a connection whose SYN arrived: talk to `peer` through
        `protocol`. Nothing it sends may arrive before `not_before` (the SYN-ACK's time)."""
        self._peer = peer
        self._protocol = protocol
        self._connected = True
        self._last_arrival = not_before

    def link(self, peer: SimStreamTransport, *, not_before: float | None = None) -> None:
        """Bytes this end sends now go to `peer` (the dialer once its SYN-ACK is in, or
        either end of a stream made already connected); with `not_before`, none of them
        arrives before then (a simultaneous open's SYN-ACK time)."""
        self._peer = peer
        if not_before is not None:
            self._last_arrival = not_before

    @property
    def linked(self) -> bool:
        """This end has a peer to send to (its connection is open or was)."""
        return self._peer is not None

    def _attach(self, protocol: asyncio.BaseProtocol) -> None:
        """The connecting side's protocol is ready: connection_made, then pending data."""
        self._protocol = protocol
        self._connected = True
        protocol.connection_made(self)
        if self._backlog and not self._reading_paused:
            self._loop.call_soon(self._flush_backlog, context=self._host.context)

    def _maybe_pause(self) -> None:
        if not self._writing_paused and self._buffered > self._high and self._protocol:
            self._writing_paused = True
            _call_protocol(self._loop, "pause_writing", self._protocol.pause_writing)

    def _maybe_resume(self) -> None:
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            _call_protocol(self._loop, "resume_writing", self._protocol.resume_writing)

    def _pump(self) -> None:
        """Move segments from the send buffer onto the uplink, within the window."""
        peer = self._peer
        if peer is None or self._state is _State.DEAD:
            return
        net = self._net
        q = self._sendq
        while q and self._in_uplink < _SEGMENTS_IN_UPLINK:
            item = q[0]
            if isinstance(item, _Fin):
                q.popleft()
                size = 0
                segment: bytes | None = None
            else:
                room = net.stream_window - self._unacked
                if room <= 0:
                    return
                size = min(len(item), net.segment_size, room)
                if size == len(item):
                    q.popleft()
                    segment = item.tobytes()
                else:
                    segment = item[:size].tobytes()
                    q[0] = item[size:]
                self._unacked += size
            self._in_uplink += 1
            depart = net.reserve_uplink(self._host, net.stream_wire(size))
            self._loop.call_at(depart, self._departed, segment, context=self._host.context)

    def _departed(self, segment: bytes | None) -> None:
        self._in_uplink -= 1
        if self._state is _State.DEAD:
            return
        peer = self._peer
        if peer is None:
            return
        size = 0 if segment is None else len(segment)
        self._buffered -= size
        loop = self._loop
        arrival = loop.time() + self._net.latency(self._host, peer._host)
        if arrival < self._last_arrival:
            arrival = self._last_arrival
        self._last_arrival = arrival
        loop.call_at(arrival, peer._arrive, segment, context=peer._host.context)
        self._pump()
        self._maybe_finish_close()
        if self._protocol is not None:
            self._maybe_resume()

    def _arrive(self, segment: bytes | None) -> None:
        """A segment reached this host: queue it at the downlink."""
        if self._state is _State.DEAD or not self._host.online:
            return
        size = 0 if segment is None else len(segment)
        t = self._net.reserve_downlink(self._host, self._net.stream_wire(size))
        if t > self._loop.time():
            self._loop.call_at(t, self._deliver, segment, context=self._host.context)
        else:
            self._deliver(segment)

    def _deliver(self, segment: bytes | None) -> None:
        state = self._state
        if state is _State.DEAD or not self._host.online:
            return
        if state is _State.CLOSED:
            if segment is not None:
                self._die(None, send_reset=True)  # data for a closed socket: RST
            return
        peer = self._peer
        if state is _State.CLOSING:
            if segment is not None and peer is not None:
                peer._ack(len(segment))
            return
        if not self._connected or self._reading_paused or self._backlog:
            self._backlog.append(_FIN if segment is None else segment)
            return
        self._hand_over(segment)

    def _hand_over(self, segment: bytes | None) -> None:
        net = self._net
        if segment is None:
            net.trace.record(self._loop.time(), self._host.index, EventKind.TCP_FIN, 0)
            if not self._protocol.eof_received():
                self.close()
            return
        net.trace.record(self._loop.time(), self._host.index, EventKind.TCP_DATA, len(segment))
        peer = self._peer
        if peer is not None:
            peer._ack(len(segment))
        self._protocol.data_received(segment)

    def _flush_backlog(self) -> None:
        while self._backlog and not self._reading_paused and self._state is _State.OPEN:
            item = self._backlog.popleft()
            self._hand_over(None if isinstance(item, _Fin) else item)

    def _ack(self, size: int) -> None:
        self._unacked -= size
        if self._state in (_State.OPEN, _State.CLOSING):
            self._pump()

    def _maybe_finish_close(self) -> None:
        if self._state is _State.CLOSING and not self._sendq and not self._in_uplink:
            self._state = _State.CLOSED
            self._host.streams.pop(self, None)
            self._loop.call_soon(self._connection_lost, None, context=self._host.context)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost_called or self._protocol is None or not self._connected:
            return
        self._lost_called = True
        self._protocol.connection_lost(exc)

    def _die(self, exc: BaseException | None, *, send_reset: bool) -> None:
        """Abort, reset or host down: drop all state, tell the protocol (and the peer)."""
        self._state = _State.DEAD
        self._sendq.clear()
        self._backlog.clear()
        self._buffered = 0
        self._host.streams.pop(self, None)
        peer = self._peer
        if send_reset and peer is not None:
            when = self._loop.time() + self._net.latency(self._host, peer._host)
            self._loop.call_at(when, peer._on_reset, context=peer._host.context)
        self._loop.call_soon(self._connection_lost, exc, context=self._host.context)

    def _on_reset(self) -> None:
        if self._state in (_State.OPEN, _State.CLOSING) and self._host.online:
            net = self._net
            net.trace.record(self._loop.time(), self._host.index, EventKind.TCP_RESET, 0)
            self._die(ConnectionResetError("Connection reset by peer"), send_reset=False)


class SimDatagramTransport(asyncio.DatagramTransport):
    """A bound UDP socket on a simulated host."""

    def __init__(self, net: Network, host: Host, port: int, remote: Addr | None) -> None:
        super().__init__()
        self._net = net
        self._host = host
        self.port = port
        self.remote = remote
        self._protocol: Any = None
        self._closing = False
        self.reading = True

    def __repr__(self) -> str:
        return f"<SimDatagramTransport {self._host.name}:{self.port}>"

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """'sockname', 'peername' (connected sockets) and 'socket' are known."""
        if name == "sockname":
            return (self._host.address, self.port)
        if name == "peername":
            return self.remote if self.remote is not None else default
        if name == "socket":
            return SimSocketInfo((self._host.address, self.port), socket.SOCK_DGRAM)
        return default

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        """Send one datagram; it may be lost, queued, dropped by a NAT or by an offline host."""
        if self._closing:
            return
        if len(data) > _MAX_DATAGRAM:
            raise OSError(90, f"datagram of {len(data)} bytes is too long")
        if addr is None:
            if self.remote is None:
                raise ValueError("no destination: sendto() needs an address")
            dst = self.remote
        else:
            dst = self._net.endpoint(addr)
            if self.remote is not None and dst != self.remote:
                raise ValueError(f"Invalid address: must be None or {self.remote}")
        self._net.send_datagram(self._host, self.port, bytes(data), dst)

    def get_write_buffer_size(self) -> int:
        """Datagrams go straight to the uplink queue."""
        return 0

    def is_closing(self) -> bool:
        """True after close()/abort()."""
        return self._closing

    def close(self) -> None:
        """Unbind; connection_lost(None) follows."""
        if self._closing:
            return
        self._closing = True
        if self._host.udp.get(self.port) is self:
            del self._host.udp[self.port]
        loop = self._net.loop
        loop.call_soon(self._protocol.connection_lost, None, context=self._host.context)

    def abort(self) -> None:
        """Same as close(): nothing is buffered."""
        self.close()

    def pause_reading(self) -> None:
        """Datagrams arriving while paused are dropped (the socket buffer is not modelled)."""
        self.reading = False

    def resume_reading(self) -> None:
        """Receive again."""
        self.reading = True

    def is_reading(self) -> bool:
        """False while paused."""
        return self.reading and not self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Replace the protocol."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        proto: asyncio.BaseProtocol = self._protocol
        return proto


class SimServer(asyncio.AbstractServer):
    """A listening TCP socket on a simulated host, as returned by loop.create_server."""

    def __init__(self, net: Network, host: Host, port: int | str, protocol_factory: Any,
                 *, serving: bool) -> None:
        self._net = net
        self._host = host
        self.port = port  # or the path of a Unix socket
        self.protocol_factory = protocol_factory
        self._serving = serving
        self._closed = False
        self._forever: asyncio.Future[None] | None = None
        where: Addr | str = port if isinstance(port, str) else (host.address, port)
        self._sockets = (SimSocketInfo(where, socket.SOCK_STREAM),)

    def __repr__(self) -> str:
        return f"<SimServer {self._host.name}:{self.port}>"

    @property
    def sockets(self) -> tuple[SimSocketInfo, ...]:
        """One pseudo-socket with the bound address."""
        return () if self._closed else self._sockets

    def close(self) -> None:
        """Stop accepting; existing connections carry on."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        if self._host.listeners.get(self.port) is self:
            del self._host.listeners[self.port]
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The simulation's loop."""
        return self._net.loop

    def is_serving(self) -> bool:
        """True while accepting connections."""
        return self._serving

    async def start_serving(self) -> None:
        """Accept connections (if created with start_serving=False)."""
        if not self._closed:
            self._serving = True

    async def serve_forever(self) -> None:
        """Accept until closed or cancelled (cancelling closes the server)."""
        if self._forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        self._serving = True
        self._forever = self._net.loop.create_future()
        try:
            await self._forever
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._forever = None

    async def wait_closed(self) -> None:
        """Returns at once: closing a simulated listener is instantaneous."""
        return None
