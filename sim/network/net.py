"""The simulated network: hosts, addresses, NAT routing, link capacity, datagrams, connections.

Capacity model (kept simple so an event costs a few microseconds):
- Each host has an uplink and a downlink rate in bytes/s (None: unlimited), each a FIFO
  queue. A packet of n bytes on the wire occupies the sender's uplink for n/up seconds
  after what is queued before it, travels the one-way latency of the latency model, then
  occupies the receiver's downlink for n/down seconds after what arrived before it.
- Bytes on the wire: the payload, plus `tcp_header` bytes per `mss` bytes of stream
  payload (a stream segment is that many packets on a real link) and `udp_header` bytes
  per datagram. Both default to 0 (payload only, as the figures before they existed);
  `WIRE_HEADERS` holds Ethernet's: 66 bytes per 1448-byte TCP segment (Ethernet 14, IPv4
  20, TCP 20 + timestamps 12) and 42 per datagram (14 + 20 + UDP 8), 4.6% of a bulk
  transfer, which a link shaped by `tc tbf` (counting whole frames) charges.
- Datagrams are lost with probability 1 - (1-net)(1-src)(1-dst), decided when sent, and
  dropped when the sender's uplink queue holds more than `uplink_queue_limit` seconds of
  data (tail drop), when a NAT filters them, or when the receiver is offline or unbound.
- Streams: see `sim.network.transports`. Connection setup costs one round trip; a SYN to a port with
  no listener is refused after one round trip; a SYN that is dropped (a NAT with no forward
  and no mapping whose TCP filtering admits it, offline host, unknown address) fails after
  `tcp_connect_timeout` (Linux: about 127 s); a SYN that reaches a port dialling its sender
  at that moment opens both connects at once (a TCP simultaneous open, what the TCP punch
  relies on).

Addresses: public hosts and NAT boxes get 10.x.y.z; hosts behind a NAT get 172.16.0.0/12
addresses, reachable only from behind the same box. These never touch the real network.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sim.network.host import Host
from sim.network.latency import FixedLatency, LatencyModel
from sim.network.nat import NatBehaviour, NatBox, webrtc_possible
from sim.network.transports import SimDatagramTransport, SimServer, SimStreamTransport
from sim.trace import EventKind, Trace

if TYPE_CHECKING:
    from sim.loop import SimLoop

Addr = tuple[str, int]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

_PUBLIC_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
_PRIVATE_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
_WILDCARDS = frozenset({"", "0.0.0.0", "::", None})
_LOOPBACK = "127.0.0.1"
WIRE_HEADERS = {"tcp_header": 66, "udp_header": 42, "mss": 1448}


class Network:
    """Hosts and NAT boxes, the names they are registered under, and packet movement."""

    def __init__(self, loop: SimLoop, *, rng: random.Random,
                 trace: Trace | None = None, latency: LatencyModel | None = None,
                 loss: float = 0.0, segment_size: int = 64 * 1024,
                 stream_window: int = 1 << 20, tcp_connect_timeout: float = 127.0,
                 lan_latency: float = 0.0002, loopback_latency: float = 0.00002,
                 uplink_queue_limit: float = 1.0, tcp_header: int = 0, udp_header: int = 0,
                 mss: int = 1448) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.loop = loop
        self.rng = rng
        self.trace = trace if trace is not None else Trace()
        self.latency_model: LatencyModel = latency if latency is not None else FixedLatency()
        self.loss = loss
        self.segment_size = segment_size
        self.stream_window = stream_window
        self.tcp_connect_timeout = tcp_connect_timeout
        self.lan_latency = lan_latency
        self.loopback_latency = loopback_latency
        self.uplink_queue_limit = uplink_queue_limit
        if tcp_header < 0 or udp_header < 0 or mss < 1:
            raise ValueError("headers must be >= 0 bytes and mss >= 1")
        self.tcp_header = tcp_header
        self.udp_header = udp_header
        self.mss = mss
        self.hosts: list[Host] = []
        self.by_name: dict[str, Host] = {}
        self.nats: dict[str, NatBox] = {}
        self._by_addr: dict[str, Host | NatBox] = {}
        self._names: dict[str, str] = {}
        self._public = 0
        self._private = 0
        self._nat_seed = rng.getrandbits(64)
        self.webrtc_endpoints: dict[Host, Any] = {}  # sim.webrtc.SimChannels by host
        # connects whose SYN is out, by (host, local port, destination): a SYN from that
        # destination to that port is a simultaneous open
        self._syn_sent: dict[tuple[Host, int, Addr],
                             tuple[SimStreamTransport, asyncio.Future[None]]] = {}
        # of those, the ones a listener took (their SYN-ACK is on its way)
        self._answered: set[SimStreamTransport] = set()

    # --- building ------------------------------------------------------------------------

    def _next_public(self) -> str:
        self._public += 1
        return str(ipaddress.IPv4Address(_PUBLIC_BASE + self._public))

    def add_nat(self, name: str, behaviour: NatBehaviour) -> NatBox:
        """A NAT box with a fresh public address; put hosts behind it with add_host(nat=)."""
        if name in self.nats or name in self._names:
            raise ValueError(f"name {name!r} is taken")
        box = NatBox(name, self._next_public(), behaviour,
                     random.Random(f"{self._nat_seed}/{name}"))
        self.nats[name] = box
        self._by_addr[box.address] = box
        self._names[name] = box.address
        return box

    def add_host(self, name: str, *, up: float | None = None, down: float | None = None,
                 nat: NatBox | NatBehaviour | None = None, loss: float = 0.0) -> Host:
        """A host; `nat` is a shared box, or a behaviour for a box of its own."""
        if name in self._names:
            raise ValueError(f"name {name!r} is taken")
        if isinstance(nat, NatBehaviour):
            nat = self.add_nat(f"{name}-nat", nat)
        if nat is None:
            address = self._next_public()
        else:
            self._private += 1
            address = str(ipaddress.IPv4Address(_PRIVATE_BASE + self._private))
        host = Host(self, len(self.hosts), name, address, up=up, down=down, nat=nat, loss=loss)
        self.hosts.append(host)
        self.by_name[name] = host
        self._by_addr[address] = host
        self._names[name] = address
        self.latency_model.place(host)
        return host

    def register_name(self, name: str, address: str) -> None:
        """Make `name` resolve to `address` (host names are registered already)."""
        self._names[name] = address

    # --- names and addresses -------------------------------------------------------------

    def resolve(self, name: str | None) -> str:
        """Name or IPv4 literal to an address; socket.gaierror if unknown."""
        if name in self._by_addr:
            return str(name)
        if name in _WILDCARDS:
            return "0.0.0.0"
        if name == "localhost":
            return _LOOPBACK
        known = self._names.get(str(name))
        if known is not None:
            return known
        try:
            return str(ipaddress.IPv4Address(str(name)))
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME,
                                  f"Name or service not known: {name!r}") from None

    def endpoint(self, addr: Any) -> Addr:
        """Normalise a user-given (host, port) to (address, port)."""
        if not isinstance(addr, tuple) or len(addr) < 2:
            raise TypeError(f"address must be a (host, port) tuple, got {addr!r}")
        host, port = addr[0], addr[1]
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise OverflowError(f"port must be 0-65535, got {port!r}")
        return (self.resolve(host), port)

    def check_local(self, host: Host, ip: str | None) -> None:
        """Binding to `ip` on `host` is allowed only for its own, wildcard or loopback address."""
        if ip in _WILDCARDS or ip in (host.address, _LOOPBACK, "localhost"):
            return
        raise OSError(errno.EADDRNOTAVAIL, f"[{host.name}] cannot assign address {ip!r}")

    # --- capacity and latency ------------------------------------------------------------

    def latency(self, a: Host, b: Host) -> float:
        """One-way delay from `a` to `b` now."""
        if a is b:
            return self.loopback_latency
        if a.nat is not None and a.nat is b.nat:
            return self.lan_latency
        return self.latency_model.one_way(a, b)

    def stream_wire(self, size: int) -> int:
        """Bytes on the wire for a stream segment of `size` payload bytes (0: a FIN)."""
        if not self.tcp_header:
            return size
        return size + max(1, -(-size // self.mss)) * self.tcp_header

    def reserve_uplink(self, host: Host, size: int) -> float:
        """Queue `size` bytes on `host`'s uplink; the time they have left it."""
        now = self.loop.time()
        rate = host.up_rate
        if rate is None:
            return now
        start = host.up_free_at if host.up_free_at > now else now
        host.up_free_at = start + size / rate
        return host.up_free_at

    def reserve_downlink(self, host: Host, size: int) -> float:
        """Queue `size` bytes arriving now on `host`'s downlink; the time they are through."""
        now = self.loop.time()
        rate = host.down_rate
        if rate is None:
            return now
        start = host.down_free_at if host.down_free_at > now else now
        host.down_free_at = start + size / rate
        return host.down_free_at

    # --- routing -------------------------------------------------------------------------

    def _route(self, src: Host, proto: str, sport: int,
               dst: Addr) -> tuple[Host, Addr, NatBox | None] | None:
        """Where a packet from `src`:`sport` to `dst` goes: (receiving host, source address
        it will see, box that still has to let it in), or None if it goes nowhere."""
        dip = dst[0]
        if dip == src.address or dip.startswith("127."):
            return src, (dip if dip.startswith("127.") else src.address, sport), None
        target = self._by_addr.get(dip)
        box = src.nat
        if box is not None:
            if isinstance(target, Host) and target.nat is box:
                return target, (src.address, sport), None
            now = self.loop.time()
            seen = (box.address, box.outbound(proto, (src.address, sport), dst, now))
        else:
            seen = (src.address, sport)
        if target is None:
            return None
        if isinstance(target, NatBox):
            inner = target.peek(proto, dst[1])
            if inner is None:
                return None
            host = self._by_addr.get(inner[0])
            if not isinstance(host, Host):
                return None
            return host, seen, target
        if target.nat is not None:
            return None  # a private address, seen from outside its LAN
        return target, seen, None

    def _loss(self, a: Host, b: Host) -> bool:
        if not (self.loss or a.loss or b.loss):
            return False
        keep = (1.0 - self.loss) * (1.0 - a.loss) * (1.0 - b.loss)
        return self.rng.random() >= keep

    # --- datagrams -----------------------------------------------------------------------

    def send_datagram(self, src: Host, sport: int, data: bytes, dst: Addr) -> None:
        """Carry one datagram from `src`:`sport` to `dst`, or drop it."""
        loop = self.loop
        now = loop.time()
        trace = self.trace
        size = len(data)
        trace.record(now, src.index, EventKind.UDP_SEND, size)
        route = self._route(src, "udp", sport, dst) if src.online else None
        if route is None:
            trace.record(now, src.index, EventKind.UDP_DROP, size)
            return
        target, seen, box = route
        if self._loss(src, target):
            trace.record(now, src.index, EventKind.UDP_DROP, size)
            return
        if src.up_rate is None:
            depart = now
        else:
            start = src.up_free_at if src.up_free_at > now else now
            if start - now > self.uplink_queue_limit:
                trace.record(now, src.index, EventKind.UDP_DROP, size)
                return
            depart = src.up_free_at = start + (size + self.udp_header) / src.up_rate
        arrival = depart + self.latency(src, target)
        loop.call_at(arrival, self._udp_arrive, target, dst[1], seen, data, box,
                     context=target.context)

    def _udp_arrive(self, host: Host, port: int, seen: Addr, data: bytes,
                    box: NatBox | None) -> None:
        if box is not None:
            inner = box.inbound("udp", seen, port, self.loop.time())
            if inner is None or inner[0] != host.address:
                self.trace.record(self.loop.time(), host.index, EventKind.UDP_DROP, len(data))
                return
            port = inner[1]
        if host.down_rate is not None:
            t = self.reserve_downlink(host, len(data) + self.udp_header)
            self.loop.call_at(t, self._udp_deliver, host, port, seen, data,
                              context=host.context)
        else:
            self._udp_deliver(host, port, seen, data)

    def _udp_deliver(self, host: Host, port: int, seen: Addr, data: bytes) -> None:
        ep = host.udp.get(port)
        now = self.loop.time()
        if (ep is None or not host.online or not ep.reading
                or (ep.remote is not None and ep.remote != seen)):
            self.trace.record(now, host.index, EventKind.UDP_DROP, len(data))
            return
        self.trace.record(now, host.index, EventKind.UDP_DELIVER, len(data))
        ep.get_protocol().datagram_received(data, seen)  # type: ignore[attr-defined]

    def open_datagram(self, host: Host, factory: ProtocolFactory, local: Addr | None,
                      remote: Addr | None) -> tuple[SimDatagramTransport, asyncio.BaseProtocol]:
        """Bind a UDP socket on `host` (loop.create_datagram_endpoint)."""
        port = 0
        if local is not None:
            self.check_local(host, local[0])
            port = local[1]
        port = host.bind_port("udp", port)
        transport = SimDatagramTransport(self, host, port, remote)
        protocol = factory()
        transport.set_protocol(protocol)
        host.udp[port] = transport
        protocol.connection_made(transport)
        return transport, protocol

    # --- streams -------------------------------------------------------------------------

    def listen(self, host: Host, factory: ProtocolFactory, ip: str | None, port: int,
               *, serving: bool = True) -> SimServer:
        """Listen for connections on `host` (loop.create_server)."""
        self.check_local(host, ip)
        port = host.bind_port("tcp", port)
        server = SimServer(self, host, port, factory, serving=serving)
        host.listeners[port] = server
        return server

    def listen_unix(self, host: Host, factory: ProtocolFactory, path: str,
                    *, serving: bool = True) -> SimServer:
        """Listen on a Unix socket path, private to `host` (loop.create_unix_server)."""
        if path in host.listeners:
            raise OSError(errno.EADDRINUSE, f"[{host.name}] address already in use: {path}")
        server = SimServer(self, host, path, factory, serving=serving)
        host.listeners[path] = server
        return server

    async def connect(self, host: Host, factory: ProtocolFactory, dst: Addr, *,
                      unix_path: str | None = None, local_port: int | None = None
                      ) -> tuple[SimStreamTransport, asyncio.BaseProtocol]:
        """Open a connection from `host` to `dst` (loop.create_connection), or to the
        Unix socket `unix_path` on `host` itself (loop.create_unix_connection).

        `local_port`: connect from that port (a socket bound to it, sim.network.sockets).
        While the SYN is out, a SYN that reaches that port from `dst` itself completes
        the connection as a TCP simultaneous open (RFC 9293 section 3.5), ahead of any
        listener on the port."""
        loop = self.loop
        if not host.online and unix_path is None:
            raise OSError(errno.ENETUNREACH, f"[{host.name}] network is unreachable (offline)")
        sport = host.bind_port("tcp", 0) if local_port is None else local_port
        if unix_path is None:
            client = SimStreamTransport(self, host, (host.address, sport), dst)
        else:
            client = SimStreamTransport(self, host, "", unix_path)
        waiter: asyncio.Future[None] = loop.create_future()
        now = loop.time()
        self.trace.record(now, host.index, EventKind.TCP_CONNECT, 0)
        route = self._route(host, "tcp", sport, dst) if unix_path is None else (
            host, (host.address, sport), None)
        if route is not None:
            target, seen, box = route
            key: int | str = dst[1] if unix_path is None else unix_path
            loop.call_at(now + self.latency(host, target), self._syn_arrive, client, waiter,
                         target, key, seen, box, context=target.context)
        timer = loop.call_at(now + self.tcp_connect_timeout, self._connect_timeout, host,
                             waiter, dst, context=host.context)
        opening = (host, sport, dst) if unix_path is None else None
        if opening is not None:
            self._syn_sent[opening] = (client, waiter)
        try:
            await waiter
        except BaseException:  # refused, timed out, or the caller gave up (cancelled)
            client._die(None, send_reset=True)
            raise
        finally:
            timer.cancel()
            if opening is not None and self._syn_sent.get(opening, (None,))[0] is client:
                del self._syn_sent[opening]
            self._answered.discard(client)
        try:
            protocol = factory()
        except BaseException:
            client.abort()
            raise
        client._attach(protocol)
        return client, protocol

    def _connect_timeout(self, host: Host, waiter: asyncio.Future[None], dst: Addr) -> None:
        if not waiter.done():
            self.trace.record(self.loop.time(), host.index, EventKind.TCP_TIMEOUT, 0)
            waiter.set_exception(TimeoutError(errno.ETIMEDOUT, f"Connect call failed {dst}"))

    def _syn_arrive(self, client: SimStreamTransport, waiter: asyncio.Future[None],
                    target: Host, port: int | str, seen: Addr, box: NatBox | None) -> None:
        loop = self.loop
        now = loop.time()
        if client.linked:
            return  # this SYN crossed the other's: the simultaneous open joined them already
        if box is not None and isinstance(port, int):
            inner = box.inbound("tcp", seen, port, now)
            if inner is None or inner[0] != target.address:
                return  # dropped: the client times out
            port = inner[1]
        if not target.online and not isinstance(port, str):
            return
        back = now + self.latency(target, client._host)
        if isinstance(port, int):
            opening = self._syn_sent.get((target, port, seen))
            if opening is not None and not opening[1].done():
                if opening[0] in self._answered:
                    # Its own SYN was taken by a listener at the other end (from another
                    # NAT port than this SYN's): it joins that connection, this SYN none.
                    return
                self._open_simultaneously(client, waiter, *opening, back)
                return
        listener = target.listeners.get(port)
        if listener is None or not listener.is_serving():
            self.trace.record(now, target.index, EventKind.TCP_REFUSED, 0)
            loop.call_at(back, self._refuse, waiter, client._peername,
                         context=client._host.context)
            return
        if isinstance(port, str):
            server = SimStreamTransport(self, target, port, "")
        else:
            server = SimStreamTransport(self, target, (target.address, port), seen)
        try:
            protocol = listener.protocol_factory()
        except Exception as exc:
            loop.call_exception_handler({"message": "protocol factory failed", "exception": exc})
            loop.call_at(back, self._refuse, waiter, client._peername,
                         context=client._host.context)
            return
        server.accept(client, protocol, not_before=back)  # nothing may overtake the SYN-ACK
        self._answered.add(client)
        target.streams[server] = None
        self.trace.record(now, target.index, EventKind.TCP_ACCEPT, 0)
        loop.call_at(back, self._synack_arrive, client, waiter, server,
                     context=client._host.context)
        protocol.connection_made(server)

    def _open_simultaneously(self, client: SimStreamTransport, waiter: asyncio.Future[None],
                             mine: SimStreamTransport, my_waiter: asyncio.Future[None],
                             back: float) -> None:
        """`client`'s SYN reached `mine`, which is dialling `client`'s endpoint: both are
        connected, `mine` now, `client` when the answer is back (at `back`)."""
        host = mine._host
        mine.link(client, not_before=back)  # nothing of ours may overtake the SYN-ACK
        host.streams[mine] = None
        self.trace.record(self.loop.time(), host.index, EventKind.TCP_ACCEPT, 0)
        my_waiter.set_result(None)
        self.loop.call_at(back, self._synack_arrive, client, waiter, mine,
                          context=client._host.context)

    def _refuse(self, waiter: asyncio.Future[None], dst: Addr | str) -> None:
        if not waiter.done():
            waiter.set_exception(
                ConnectionRefusedError(errno.ECONNREFUSED, f"Connect call failed {dst}"))

    def _synack_arrive(self, client: SimStreamTransport, waiter: asyncio.Future[None],
                       server: SimStreamTransport) -> None:
        host = client._host
        if waiter.done() or not host.online or client.is_closing():
            # The client gave up: its RST reaches the server one latency later.
            when = self.loop.time() + self.latency(host, server._host)
            self.loop.call_at(when, server._on_reset, context=server._host.context)
            return
        client.link(server)
        host.streams[client] = None
        waiter.set_result(None)

    def webrtc_possible(self, a: Host, b: Host) -> bool:
        """Would a WebRTC data channel open between `a` and `b` (STUN on the public side)?

        The simulated WebRTC transport (sim.webrtc) uses this, plus the measured 40-80 ms
        setup time, to decide whether its channel opens.
        """
        if a.nat is not None and a.nat is b.nat:
            return True  # same LAN: host candidates work
        return webrtc_possible(a.nat.behaviour if a.nat else None,
                               b.nat.behaviour if b.nat else None)

    def pair_streams(self, a: Host, b: Host, proto_a: asyncio.BaseProtocol,
                     proto_b: asyncio.BaseProtocol) -> tuple[SimStreamTransport,
                                                            SimStreamTransport]:
        """Connect `a` and `b` with a stream now, past any NAT (a punched WebRTC channel).

        Each end sees the other at its public address; link rates and latency apply.
        """
        pa, pb = a.bind_port("tcp", 0), b.bind_port("tcp", 0)
        ta = SimStreamTransport(self, a, (a.address, pa), (_public(b), pb))
        tb = SimStreamTransport(self, b, (b.address, pb), (_public(a), pa))
        ta.link(tb)
        tb.link(ta)
        a.streams[ta] = None
        b.streams[tb] = None
        now = self.loop.time()
        self.trace.record(now, a.index, EventKind.TCP_CONNECT, 0)
        self.trace.record(now, b.index, EventKind.TCP_ACCEPT, 0)
        b.context.copy().run(tb._attach, proto_b)
        a.context.copy().run(ta._attach, proto_a)
        return ta, tb

    # --- churn ---------------------------------------------------------------------------

    def set_online(self, host: Host, online: bool) -> None:
        """Take `host` off the network (resetting its connections) or put it back."""
        if host.online == online:
            return
        now = self.loop.time()
        self.trace.record(now, host.index, EventKind.HOST_UP if online else EventKind.HOST_DOWN)
        if online:
            host.online = True
            return
        for stream in list(host.streams):
            stream._die(ConnectionAbortedError(f"[{host.name}] went offline"), send_reset=True)
        host.online = False
        host.up_free_at = host.down_free_at = now


def _public(host: Host) -> str:
    return host.nat.address if host.nat is not None else host.address
