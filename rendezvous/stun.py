"""STUN binding service (RFC 5389 / RFC 8489), so nodes learn their public UDP and TCP mappings.

A rendezvous server answers Binding requests with XOR-MAPPED-ADDRESS; nodes point aiortc
at their own server's STUN port and never at a public default. Three layers:

- a codec (`binding_request`, `parse_binding_response`) shared by server and client;
- `StunResponder`, the sans-I/O core: `datagram_received(data, addr, now)` returns the
  reply bytes or None, after a token bucket per source IPv4 address or IPv6 /64 (a flood
  is dropped and counted);
- asyncio adapters: `serve_stun()` (the server) and `query_mapping()` (a client that asks
  several servers from one local socket: the NAT lab uses it to tell an endpoint-
  independent mapping from a symmetric one);
- STUN over TCP (RFC 8489 section 6.2.2): `serve_stun_tcp()` answers one Binding request
  per connection and holds it open a while; `query_tcp_mapping()` asks from a socket bound
  with SO_REUSEADDR and SO_REUSEPORT, so a TCP hole punch can dial from the same local port
  (the NAT maps it to the same public port when its mapping is endpoint-independent).

Only what a Binding needs is implemented: no authentication (RFC 8489 section 9 says a
Binding server may run without), no RFC 5780 CHANGE-REQUEST. A request carrying an unknown
comprehension-required attribute gets a 420 with UNKNOWN-ATTRIBUTES, as section 6.3.1 asks.
Requests without the magic cookie (RFC 3489 clients) are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import socket
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from crypto.address import format_hostport
from rendezvous.limits import SourceLimiter

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E
_HEADER = struct.Struct("!HHI12s")
MAX_DATAGRAM = 548  # a Binding request is 20-100 bytes; anything longer is not for us

Address = tuple[str, int]


class StunDecodeError(ValueError):
    """A datagram is not a well-formed STUN message of the kind expected."""


@dataclass(frozen=True, slots=True)
class StunMessage:
    """One parsed STUN message: type, transaction id and raw attributes in order."""

    type: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def parse_message(data: bytes) -> StunMessage:
    """Check the header, the attribute layout and a FINGERPRINT if present (RFC 8489 s. 14.7)."""
    if len(data) < 20 or len(data) > MAX_DATAGRAM:
        raise StunDecodeError(f"bad length {len(data)}")
    mtype, length, cookie, tid = _HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunDecodeError("not STUN: top two bits set")
    if cookie != MAGIC_COOKIE:
        raise StunDecodeError("no magic cookie")
    if length % 4 or length != len(data) - 20:
        raise StunDecodeError("length field disagrees with the datagram")
    attrs: list[tuple[int, bytes]] = []
    pos = 20
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunDecodeError("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + alen
        if end > len(data):
            raise StunDecodeError("attribute overruns the message")
        value = data[pos + 4 : end]
        if atype == ATTR_FINGERPRINT:
            if alen != 4 or pos + 8 != len(data):
                raise StunDecodeError("FINGERPRINT must be last and 4 bytes")
            want = (zlib.crc32(data[:pos]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack("!I", value)[0] != want:
                raise StunDecodeError("FINGERPRINT mismatch")
        attrs.append((atype, value))
        pos = pos + 4 + _pad4(alen)
    return StunMessage(mtype, tid, tuple(attrs))


def _encode(mtype: int, tid: bytes, attrs: Sequence[tuple[int, bytes]]) -> bytes:
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (_pad4(len(v)) - len(v)) for t, v in attrs
    )
    # The FINGERPRINT's CRC covers a header whose length already counts the FINGERPRINT.
    head = _HEADER.pack(mtype, len(body) + 8, MAGIC_COOKIE, tid)
    crc = (zlib.crc32(head + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + body + struct.pack("!HHI", ATTR_FINGERPRINT, 4, crc)


def _xor_address(addr: Address, tid: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ (MAGIC_COOKIE >> 16)
    key = struct.pack("!I", MAGIC_COOKIE) + (tid if ip.version == 6 else b"")
    raw = bytes(a ^ b for a, b in zip(ip.packed, key, strict=False))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, port) + raw


def _unxor_address(value: bytes, tid: bytes) -> Address:
    if len(value) not in (8, 20):
        raise StunDecodeError("XOR-MAPPED-ADDRESS has a bad length")
    _, family, xport = struct.unpack_from("!BBH", value)
    size = {1: 4, 2: 16}.get(family)
    if size is None or len(value) != 4 + size:
        raise StunDecodeError("XOR-MAPPED-ADDRESS has a bad family")
    key = struct.pack("!I", MAGIC_COOKIE) + tid
    raw = bytes(a ^ b for a, b in zip(value[4:], key, strict=False))
    return str(ipaddress.ip_address(raw)), xport ^ (MAGIC_COOKIE >> 16)


def binding_request(transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """A Binding request datagram and its 12-byte transaction id."""
    tid = transaction_id if transaction_id is not None else os.urandom(12)
    if len(tid) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    return _encode(BINDING_REQUEST, tid, ()), tid


def binding_success(transaction_id: bytes, mapped: Address) -> bytes:
    """A Binding success response telling the client `mapped`."""
    return _encode(BINDING_SUCCESS, transaction_id,
                   [(ATTR_XOR_MAPPED_ADDRESS, _xor_address(mapped, transaction_id))])


def parse_binding_response(data: bytes, transaction_id: bytes) -> Address:
    """The mapped address from a Binding success for `transaction_id` (StunDecodeError if not)."""
    msg = parse_message(data)
    if msg.transaction_id != transaction_id:
        raise StunDecodeError("response to another transaction")
    if msg.type != BINDING_SUCCESS:
        raise StunDecodeError(f"not a Binding success (type {msg.type:#06x})")
    for atype, value in msg.attributes:
        if atype == ATTR_XOR_MAPPED_ADDRESS:
            return _unxor_address(value, transaction_id)
    raise StunDecodeError("no XOR-MAPPED-ADDRESS")


@dataclass(slots=True)
class StunStats:
    """Counters of one STUN service."""

    answered: int = 0
    rate_limited: int = 0
    malformed: int = 0
    unknown_attribute: int = 0
    sources: int = 0


class StunResponder:
    """Sans-I/O Binding responder with a token bucket per source (an IPv4 address or an
    IPv6 /64, `rendezvous.limits.source_key`).

    The bucket table is an LRU bounded by `max_sources`; evicting an idle source only
    forgets how much of its burst it had spent, which errs towards answering.
    """

    def __init__(self, *, rate: float = 20.0, burst: float = 40.0,
                 max_sources: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate and burst must be positive, max_sources at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.stats = StunStats()
        self._sources = SourceLimiter(rate, burst, max_sources)

    def datagram_received(self, data: bytes, addr: Address, now: float) -> bytes | None:
        """The reply to send back to `addr`, or None to drop the datagram."""
        allowed = self._sources.allow(addr[0], now)
        self.stats.sources = len(self._sources)
        if not allowed:
            self.stats.rate_limited += 1
            return None
        try:
            msg = parse_message(data)
        except StunDecodeError:
            self.stats.malformed += 1
            return None
        if msg.type != BINDING_REQUEST:
            # Indications, responses and other methods get no answer (RFC 8489 s. 6.3).
            self.stats.malformed += 1
            return None
        unknown = [t for t, _ in msg.attributes if t < 0x8000]
        if unknown:
            self.stats.unknown_attribute += 1
            code = struct.pack("!HBB", 0, 4, 20) + b"Unknown Attribute"
            listed = b"".join(struct.pack("!H", t) for t in unknown[:16])
            return _encode(BINDING_ERROR, msg.transaction_id,
                           [(ATTR_ERROR_CODE, code), (ATTR_UNKNOWN_ATTRIBUTES, listed)])
        self.stats.answered += 1
        return binding_success(msg.transaction_id, addr)


class StunServerProtocol(asyncio.DatagramProtocol):
    """The asyncio adapter: feeds datagrams to a `StunResponder` with the loop's time."""

    def __init__(self, responder: StunResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is None:
            return
        host, port = str(addr[0]), cast(int, addr[1])
        reply = self.responder.datagram_received(
            data, (host, port), asyncio.get_running_loop().time())
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a client went away): nothing to do.
        pass


async def serve_stun(
    host: str, port: int, *, rate: float = 20.0, burst: float = 40.0,
    max_sources: int = 65536, sock: socket.socket | None = None,
) -> tuple[asyncio.DatagramTransport, Address]:
    """Answer Binding requests on UDP (host, port), or on `sock` already bound; returns the
    transport and bound address.

    `rate`/`burst` are per source (IPv4 address or IPv6 /64; requests per second). Close
    with `transport.close()`; counters are at `transport.get_protocol().responder.stats`.
    """
    loop = asyncio.get_running_loop()
    responder = StunResponder(rate=rate, burst=burst, max_sources=max_sources)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: StunServerProtocol(responder),
        **({"sock": sock} if sock is not None else {"local_addr": (host, port)}))
    name = transport.get_extra_info("sockname")
    return transport, (str(name[0]), int(name[1]))


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.replies.full():
            self.replies.put_nowait((data, (str(addr[0]), cast(int, addr[1]))))


async def query_mapping(
    servers: Sequence[Address], *, local_addr: Address = ("0.0.0.0", 0),
    timeout: float = 3.0, retransmit: float = 0.5,  # noqa: ASYNC109 (per-query deadline)
) -> list[Address]:
    """Ask each STUN server in turn, from one local UDP socket, which address it sees.

    Equal answers from different servers mean an endpoint-independent mapping; different
    ones, a symmetric NAT. TimeoutError names the server that did not answer.
    """
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_ClientProtocol, local_addr=local_addr)
    try:
        return [await query_on(transport, proto.replies, server, timeout=timeout,
                               retransmit=retransmit) for server in servers]
    finally:
        transport.close()


async def query_on(transport: asyncio.DatagramTransport,
                   replies: asyncio.Queue[tuple[bytes, Address]], server: Address, *,
                   timeout: float = 3.0, retransmit: float = 0.5,  # noqa: ASYNC109
                   ) -> Address:
    """The mapping `server` sees for the socket under `transport`, whose protocol puts what
    it receives into `replies` (the QUIC rung asks from the socket it then punches with).
    TimeoutError names the server that did not answer."""
    request, tid = binding_request()
    try:
        async with asyncio.timeout(timeout):
            return await _one_query(transport, replies, server, request, tid, retransmit)
    except TimeoutError:
        raise TimeoutError(f"no STUN answer from {format_hostport(*server)} "
                           f"within {timeout} s") from None


async def _one_query(transport: asyncio.DatagramTransport,
                     replies: asyncio.Queue[tuple[bytes, Address]],
                     server: Address, request: bytes, tid: bytes, retransmit: float) -> Address:
    while True:
        transport.sendto(request, server)
        try:
            async with asyncio.timeout(retransmit):
                while True:
                    data, _ = await replies.get()
                    try:
                        return parse_binding_response(data, tid)
                    except StunDecodeError:
                        continue  # a stray or late datagram; keep waiting for ours
        except TimeoutError:
            continue


# --- STUN over TCP (RFC 8489 section 6.2.2): the mapping a TCP hole punch dials from --------

TCP_READ_TIMEOUT = 5.0  # a client sends its request at once after connecting
TCP_HOLD = 10.0  # then the connection stays up (it keeps the NAT's mapping) until it closes


def tcp_message_length(head: bytes) -> int:
    """The whole length of the STUN message whose first 20 bytes are `head`
    (StunDecodeError if they can't start one within MAX_DATAGRAM)."""
    mtype, length, cookie, _ = _HEADER.unpack_from(head)
    if mtype & 0xC000 or cookie != MAGIC_COOKIE or length % 4 or 20 + length > MAX_DATAGRAM:
        raise StunDecodeError("not the start of a STUN message")
    return 20 + int(length)


class StunTcpProtocol(asyncio.Protocol):
    """One TCP connection to the STUN service: one Binding request in, one reply out, then
    held open (at most TCP_HOLD s) until the client closes, so the client's NAT keeps the
    mapping while the client punches from the same port. Anything else closes it."""

    def __init__(self, responder: StunResponder, live: set[StunTcpProtocol],
                 max_connections: int) -> None:
        self.responder = responder
        self._live = live
        self._max = max_connections
        self._buf = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if len(self._live) >= self._max:
            self.responder.stats.rate_limited += 1
            self._transport.abort()
            return
        self._live.add(self)
        self._timer = asyncio.get_running_loop().call_later(TCP_READ_TIMEOUT, self._close)

    def data_received(self, data: bytes) -> None:
        t = self._transport
        if t is None or self._answered:
            self._close()  # one request per connection
            return
        self._buf += data
        if len(self._buf) < 20:
            return
        try:
            need = tcp_message_length(self._buf[:20])
        except StunDecodeError:
            self.responder.stats.malformed += 1
            self._close()
            return
        if len(self._buf) < need:
            return
        if len(self._buf) > need:  # more than one request: not a client of ours
            self.responder.stats.malformed += 1
            self._close()
            return
        peer = t.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        reply = self.responder.datagram_received(self._buf, (str(peer[0]), int(peer[1])),
                                                 loop.time())
        self._buf = b""
        if reply is None:
            self._close()
            return
        t.write(reply)
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(TCP_HOLD, self._close)

    def eof_received(self) -> bool:
        return False  # the client is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class StunTcpServer:
    """A listening STUN-over-TCP service: `address`, `stats()`, `aclose()`."""

    def __init__(self, server: asyncio.Server, responder: StunResponder,
                 live: set[StunTcpProtocol]) -> None:
        self._server = server
        self.responder = responder
        self._live = live
        sock = server.sockets[0].getsockname()
        self.address: Address = (str(sock[0]), int(sock[1]))

    def stats(self) -> dict[str, int]:
        return dataclasses.asdict(self.responder.stats)

    async def aclose(self) -> None:
        """Stop listening and close the connections still held."""
        self._server.close()
        for proto in list(self._live):
            proto._close()
        await self._server.wait_closed()


async def serve_stun_tcp(
    host: str, port: int, *, rate: float = 20.0, burst: float = 40.0,
    max_sources: int = 65536, max_connections: int = 1024,
) -> StunTcpServer:
    """Answer Binding requests over TCP on (host, port), at most `max_connections` at once.
    `rate`/`burst` are per source (IPv4 address or IPv6 /64), as on UDP."""
    loop = asyncio.get_running_loop()
    responder = StunResponder(rate=rate, burst=burst, max_sources=max_sources)
    live: set[StunTcpProtocol] = set()
    server = await loop.create_server(
        lambda: StunTcpProtocol(responder, live, max_connections), host, port)
    return StunTcpServer(server, responder, live)


def reusable_socket(family: int, local: Address) -> socket.socket:
    """A non-blocking TCP socket bound to `local` with SO_REUSEADDR and SO_REUSEPORT, so
    that several sockets can dial out from one local port (to different destinations)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(local)
    except BaseException:
        sock.close()
        raise
    return sock


# How a TCP hole punch gets a socket bound to a local address with address and port reuse:
# `reusable_socket` (the kernel's); the simulator passes one of its network's.
SocketMaker = Callable[[int, Address], socket.socket]


@dataclass(slots=True)
class TcpMapping:
    """What a STUN server saw of one TCP connection: `mapped` (the public address), the
    local address it was made from, and the socket, kept open because it holds the NAT's
    mapping; close it when done with the port."""

    mapped: Address
    local: Address
    sock: socket.socket

    def close(self) -> None:
        self.sock.close()


async def query_tcp_mapping(
    server: Address, *, local: Address | None = None,
    timeout: float = 3.0,  # noqa: ASYNC109 (the query's deadline)
    make_socket: SocketMaker = reusable_socket,
) -> TcpMapping:
    """Connect to a STUN server over TCP from a reusable socket (`local`, default any
    address and port of the server's family; made by `make_socket`) and ask what it sees.
    TimeoutError or OSError if it can't; StunDecodeError if it answers something else."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(server[0], server[1], type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{server[0]} has no address")
    family, _, _, _, target = infos[0]
    if local is None:
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    sock = make_socket(family, local)
    try:
        request, tid = binding_request()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
            await loop.sock_sendall(sock, request)
            data = b""
            while len(data) < 20 or len(data) < tcp_message_length(data[:20]):
                more = await loop.sock_recv(sock, MAX_DATAGRAM - len(data))
                if not more:
                    raise StunDecodeError("the STUN server closed before answering")
                data += more
        mapped = parse_binding_response(data, tid)
        name = sock.getsockname()
        return TcpMapping(mapped, (str(name[0]), int(name[1])), sock)
    except BaseException:
        sock.close()
        raise
