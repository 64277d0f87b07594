"""A `Stream` over one bidirectional stream of a QUIC connection (qh3), on a UDP socket we own.

`QuicStream` is the thin adapter of STYLE's pattern around qh3's sans-I/O `QuicConnection`:
it feeds the connection the datagrams that come from the one peer address we punched to,
drains its events, transmits, and re-arms one `loop.call_at` for `get_timer()`. It is the
asyncio protocol of the socket's transport itself: there is no QUIC "server" object, since
one socket carries one connection to one peer. Two things measured in the NAT lab
(full-cone/symmetric, 64 MiB) decide the rate, and both are here:

- Datagrams reach the connection in the batches qh3's transport reads them in
  (`datagrams_received` -> `receive_many_datagrams`); qh3's stock server parses every
  datagram's header in Python first: 45-110 MB/s at ~20 CPU s/GB against 164 at 7.7.
- The timer is never armed closer than `TIMER_FLOOR` (1 ms) ahead: at a 100 Mbit/s
  bottleneck the stock adapter re-armed a pacing timer that was due at once about seven
  times per datagram; the floor took 61-72 CPU s/GB to 23-26.

Each end's bytes flow on a unidirectional stream it opens (ids 2 and 3; its FIN is the
end's EOF), so either end may send first. QUIC grants the peer more
credit as soon as the connection has handed data to us, whether or not anyone reads it, so
receive-side flow control is ours, as in webrtc_stream.py: each end says on its own
unidirectional stream (ids 6 and 7) how many bytes its reader has consumed, as 8-byte
big-endian totals, and a sender keeps at most `WINDOW` bytes unconsumed. Sends wait too while
the connection holds more than `HIGH_WATER` bytes it has not sent yet (the congestion
controller's backlog), so `send_all` never buffers a whole file.

`aclose` sends FIN, waits (at most `CLOSE_TIMEOUT`) until the peer has acknowledged every
byte, then closes the connection: QUIC's CONNECTION_CLOSE drops whatever is unacknowledged.
Both ends PING every `KEEPALIVE` s, so a transfer whose reader stalls is not ended by the
idle timeout; a peer that vanishes is, after `IDLE_TIMEOUT` s, as StreamBroken.

TLS inside QUIC is transport only (the transfer handshake with device keys runs inside the
stream, as over TCP): the answering end serves a throwaway self-signed certificate
(`ThrowawayCertificate`), and the dialling end refuses a certificate whose SHA-256 differs
from the fingerprint the signalling carried (`QuicPinError`).

qh3 is pinned exactly (pyproject.toml), since we use part of its private surface besides
its public connection API: `qh3.asyncio._transport.create_optimized_datagram_transport`
(recvmmsg/GSO, batched delivery), `qh3._hazmat.Buffer` (to read the client Initial's
header), `QuicConnection._open_stream` (as qh3's own `create_stream` does) and the native
core's `bytes_in_flight` (`QuicConnection._core`), to know when all we sent is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import socket
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from qh3._hazmat import Buffer
from qh3.asyncio._transport import create_optimized_datagram_transport
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicPacketType, pull_quic_header
from qh3.tls import SignatureAlgorithm

from crypto.address import format_hostport
from overlay.transports.stream import ChunkReceiver, StreamBroken, StreamClosed

log = logging.getLogger(__name__)


class _NormalCloseFilter(logging.Filter):
    """qh3 logs every close the peer asks for as a WARNING ("Native peer close"), one per
    transfer in a node's log; a close with error code 0 (NO_ERROR) is how every stream ends."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg == "Native peer close: %r" and isinstance(args, tuple) and args:
            native = args[0]
            return not (isinstance(native, tuple) and len(native) > 2 and native[2] == 0)
        return True


logging.getLogger("quic").addFilter(_NormalCloseFilter())  # qh3's logger

Address = tuple[str, int]

ALPN = "peerpost-quic/1"
TIMER_FLOOR = 0.001
IDLE_TIMEOUT = 15.0  # no packet from the peer for this long: it is gone
KEEPALIVE = 4.0  # a PING from each end, so a stalled reader is not taken for a gone peer
CLOSE_TIMEOUT = 2.0
# aclose stops waiting for acknowledgements once the peer has sent nothing this long since
# our FIN, which a live peer acknowledges within a round trip: a killed peer's stream closes
# in this, not CLOSE_TIMEOUT (a download's retry waited on it).
PEER_SILENT = 1.0
WINDOW = 4 << 20  # bytes the peer's reader may have unconsumed from us
HIGH_WATER = 4 << 20  # unsent bytes the connection may hold before send_all waits
LOW_WATER = 1 << 20
SEND_PIECE = 256 << 10
_CREDIT = struct.Struct("!Q")
# Each end sends on two unidirectional streams of its own, opened at the handshake: its data
# (FIN is its EOF), then its credit. Client-initiated ones are 2 and 6, the server's 3 and 7.
_DATA = {True: 2, False: 3}  # by is_client
_CREDIT_STREAM = {True: 6, False: 7}
_FIXED_BIT = 0x40
MIN_INITIAL = 1200  # RFC 9000 14.1: a client's Initial datagram is at least this long


class QuicPinError(StreamBroken):
    """The peer's certificate is not the one the signalling named."""


@dataclass(frozen=True, slots=True)
class ThrowawayCertificate:
    """A self-signed Ed25519 certificate for one endpoint, and its SHA-256 fingerprint (hex
    of the DER), which the answer carries so the dialler can pin it. The dialler checks
    nothing else (no CA, no name, no dates): the pin is the whole trust.

    Ed25519 rather than P-256: its signatures (the certificate's own and the handshake's
    CertificateVerify) are always 64 bytes, where an ECDSA signature's DER is 70-72 by
    chance, so the handshake's datagrams have the same sizes every time and a seeded
    simulation gives the same trace every run."""

    cert_pem: bytes
    key_pem: bytes
    fingerprint: str

    @classmethod
    def make(cls) -> ThrowawayCertificate:
        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerpost")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .sign(key, None))
        der = cert.public_bytes(serialization.Encoding.DER)
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem,
                   hashlib.sha256(der).hexdigest())


def quic_configuration(*, is_client: bool,
                       certificate: ThrowawayCertificate | None = None) -> QuicConfiguration:
    """qh3's settings for one end: our ALPN and idle timeout; the server's certificate.
    The client checks the server's certificate itself, by fingerprint, after the handshake
    (no CA, no host name: see the module docstring)."""
    cfg = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN],
                            idle_timeout=IDLE_TIMEOUT)
    if is_client:
        cfg.verify_mode = ssl.CERT_NONE
        # qh3 leaves EdDSA out by default; P-256 for a server of the first version.
        cfg.signature_algorithms = [SignatureAlgorithm.ED25519,
                                    SignatureAlgorithm.ECDSA_SECP256R1_SHA256]
    else:
        if certificate is None:
            raise ValueError("a QUIC server needs a certificate")
        cfg.load_cert_chain(certificate.cert_pem, certificate.key_pem)
    return cfg


class QuicStream(ChunkReceiver, asyncio.DatagramProtocol):
    """A `Stream` over one QUIC connection to `peer`; the protocol of its UDP transport,
    which it owns and closes. Datagrams from any other address are dropped (`strays`)."""

    path = "quic"

    def __init__(self, transport: asyncio.DatagramTransport, peer: Address,
                 configuration: QuicConfiguration, *, fingerprint: str | None = None) -> None:
        """`fingerprint`: the server certificate's SHA-256 (hex) a client insists on."""
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._sendto_many = getattr(transport, "sendto_many", None)
        self.peer = peer
        self._config = configuration
        self._is_client = configuration.is_client
        self._data_out = _DATA[self._is_client]
        self._fingerprint = fingerprint
        self._conn: QuicConnection | None = (
            QuicConnection(configuration=configuration) if self._is_client else None)
        self.strays = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._pings = 0
        self._heard = self._loop.time()  # the last datagram from the peer
        self._init_receiver()
        self._received = 0  # data bytes the peer has sent us
        self._granted = 0  # the last total we told the peer
        self._sent = 0  # data bytes handed to the connection
        self._peer_consumed = 0  # the peer's reader's total, from its credit stream
        self._control_in = bytearray()
        self._eof_in = False
        self._eof_sent = False
        self._closed = False
        self._broken: str | None = None
        self._connected = self._loop.create_future()
        self._writable = asyncio.Event()
        self._acked = asyncio.Event()
        self._teardown: asyncio.Task[None] | None = None
        transport.set_protocol(self)

    # --- opening ---------------------------------------------------------------------
    @classmethod
    async def open(cls, transport: asyncio.DatagramTransport, peer: Address,
                   configuration: QuicConfiguration, *, fingerprint: str | None = None,
                   early: Iterable[bytes] = ()) -> QuicStream:
        """Run the handshake over `transport` with `peer` (the caller bounds the time):
        a client connects and checks `fingerprint`, a server waits for the client's
        Initial (`early`: datagrams from `peer` that came in before us). On failure the
        transport is closed and StreamBroken (QuicPinError) says why."""
        self = cls(transport, peer, configuration, fingerprint=fingerprint)
        try:
            if self._conn is not None:
                self._conn.connect(peer, now=self._loop.time())
                self._transmit()
            else:
                for data in early:
                    self.datagram_received(data, peer)
            await asyncio.shield(self._connected)
        except BaseException:
            self._abort()
            raise
        return self

    def _handshake_done(self, conn: QuicConnection) -> None:
        if self._connected.done():
            return
        if self._fingerprint is not None:
            cert = conn.get_peercert()
            seen = hashlib.sha256(cert.public_bytes()).hexdigest() if cert else "none"
            if seen != self._fingerprint.lower():
                why = (f"the QUIC peer at {format_hostport(*self.peer)} has certificate "
                       f"{seen[:16]}..., not {self._fingerprint[:16]}... as its answer said")
                self._connected.set_exception(QuicPinError(why))
                self._lose(why)
                self._close_connection("certificate not the one signalled")
                return
        for want in (_DATA[self._is_client], _CREDIT_STREAM[self._is_client]):
            if conn._open_stream(is_unidirectional=True) != want:  # qh3's own create_stream
                raise AssertionError(f"qh3 did not open stream {want} first")
        self._connected.set_result(None)
        self._arm_keepalive()

    # --- datagrams in ----------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.datagrams_received([data], addr)

    def datagrams_received(self, data: list[bytes], addr: tuple[Any, ...]) -> None:
        if (addr[0], addr[1]) != self.peer:
            self.strays += len(data)
            return
        self._heard = self._loop.time()
        if not self._connected.done():  # a late punch probe is no QUIC packet (RFC 9000 17)
            data = [d for d in data if d and d[0] & _FIXED_BIT]
            if not data:
                return
        conn = self._conn
        if conn is None:
            conn = self._server_connection(data[0])
            if conn is None:
                return
        conn.receive_many_datagrams(data, self.peer, now=self._loop.time())
        self._process_events()
        self._transmit()

    def _server_connection(self, first: bytes) -> QuicConnection | None:
        """The server's connection, from the client's first Initial (anything else before
        it, a late punch probe, is dropped)."""
        if len(first) < MIN_INITIAL:
            return None
        try:
            header = pull_quic_header(Buffer(data=first), self._config.connection_id_length)
        except ValueError:
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            return None
        self._conn = QuicConnection(configuration=self._config,
                                    original_destination_connection_id=header.destination_cid)
        return self._conn

    def error_received(self, exc: Exception) -> None:
        log.debug("quic %s: %s", format_hostport(*self.peer), exc)  # ICMP; the timers decide

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose("the UDP socket closed")

    # --- the connection's events -----------------------------------------------------
    def _process_events(self) -> None:
        conn = self._conn
        if conn is None:
            return
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                if event.stream_id == _DATA[not self._is_client]:
                    self._on_data(event.data, event.end_stream)
                elif event.stream_id == _CREDIT_STREAM[not self._is_client]:
                    self._on_credit(event.data)
                else:
                    self._violation(f"data on unexpected stream {event.stream_id}")
            elif isinstance(event, events.HandshakeCompleted):
                self._handshake_done(conn)
            elif isinstance(event, events.ConnectionTerminated):
                why = event.reason_phrase or f"error code {event.error_code}"
                self._lose(f"QUIC connection closed by the peer or timed out: {why}")
                if not self._connected.done():
                    self._connected.set_exception(StreamBroken(
                        f"QUIC handshake with {format_hostport(*self.peer)} failed: {why}"))
            elif isinstance(event, events.StreamReset | events.StopSendingReceived):
                self._lose(f"the peer reset stream {event.stream_id}")

    def _on_data(self, data: bytes, end: bool) -> None:
        if self._closed:
            return  # we no longer read; the peer has not seen our close yet
        if data:
            if self._eof_in:
                self._violation("data after FIN")
                return
            self._received += len(data)
            if self._received > self._granted + WINDOW:
                self._violation("peer overran the flow-control window")
                return
            self._push(data)
        if end:
            self._eof_in = True
        self._readable.set()

    def _on_credit(self, data: bytes) -> None:
        self._control_in += data
        if len(self._control_in) > 64 * _CREDIT.size:
            self._violation("credit stream flooded")
            return
        while len(self._control_in) >= _CREDIT.size:
            (total,) = _CREDIT.unpack_from(self._control_in)
            del self._control_in[:_CREDIT.size]
            if total < self._peer_consumed or total > self._sent:
                self._violation("credit outside what we sent")
                return
            self._peer_consumed = total
        self._writable.set()

    def _violation(self, what: str) -> None:
        log.warning("quic peer %s broke the stream protocol: %s", format_hostport(*self.peer), what)
        self._lose(f"peer protocol error: {what}")
        self._close_connection(what)

    def _lose(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        self._readable.set()
        self._writable.set()
        self._acked.set()

    # --- datagrams out and the timer -------------------------------------------------
    def _transmit(self) -> None:
        conn = self._conn
        if conn is None:
            return
        now = self._loop.time()
        datagrams = conn.datagrams_to_send(now=now)
        if datagrams and not self._transport.is_closing():
            if self._sendto_many is not None:
                self._sendto_many([d for d, _ in datagrams], self.peer)
            else:
                for d, _ in datagrams:
                    self._transport.sendto(d, self.peer)
        at = conn.get_timer()
        if at is not None:
            at = max(at, now + TIMER_FLOOR)  # see the module docstring
        if self._timer is not None and self._timer_at != at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)
        self._timer_at = at
        if self._backlog() <= LOW_WATER:
            self._writable.set()
        if self._all_acked():
            self._acked.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._conn is not None:
            self._conn.handle_timer(now=self._loop.time())
            self._process_events()
            self._transmit()

    def _arm_keepalive(self) -> None:
        self._keepalive = self._loop.call_later(KEEPALIVE, self._ping)

    def _ping(self) -> None:
        if self._conn is None or self._broken is not None:
            return
        self._pings += 1
        try:
            self._conn.send_ping(self._pings)
        except QuicConnectionError as exc:  # draining the peer's close: its event comes later
            self._lose(f"QUIC connection closed: {exc.reason_phrase or exc}")
            return
        self._transmit()
        self._arm_keepalive()

    def _write(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> bool:
        """Queue `data` on one of our streams; False (and the stream broken) if the
        connection is closing already (its event may not have come out yet)."""
        if self._conn is None or self._broken is not None:
            return False
        try:
            self._conn.send_stream_data(stream_id, data, end_stream=end)
        except QuicConnectionError as exc:
            self._lose(f"QUIC connection closed: {exc.reason_phrase or exc}")
            return False
        self._transmit()
        return True

    def _backlog(self) -> int:
        """Bytes written to the data stream that the connection has not sent yet."""
        if self._conn is None:
            return 0
        return self._conn.get_send_buffer_size(self._data_out)

    async def _wait_acked(self) -> None:
        """Until the peer has acknowledged everything, CLOSE_TIMEOUT s have passed, or it
        has sent nothing for PEER_SILENT s since the wait began."""
        start = self._loop.time()
        while not self._acked.is_set():
            now = self._loop.time()
            left = min(start + CLOSE_TIMEOUT, max(self._heard, start) + PEER_SILENT) - now
            if left <= 0:
                log.debug("quic %s: closed with data unacknowledged (nothing heard for "
                          "%.1f s)", format_hostport(*self.peer), now - self._heard)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._acked.wait()

    def _all_acked(self) -> bool:
        conn = self._conn
        if conn is None or self._backlog():
            return False
        core = getattr(conn, "_core", None)  # qh3's native core (pinned version)
        return core is None or int(core.bytes_in_flight) == 0

    # --- Stream ----------------------------------------------------------------------
    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise StreamClosed("stream already closed for sending")
        if self._broken is not None:
            raise StreamBroken(self._broken)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hand `data` to the connection, waiting for the peer's credit and for the
        connection's unsent backlog to drain below HIGH_WATER."""
        view = memoryview(data).cast("B")
        pos = 0
        self._check_send()
        while pos < len(view):
            self._check_send()
            credit = self._peer_consumed + WINDOW - self._sent
            if credit <= 0 or self._backlog() > HIGH_WATER:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(SEND_PIECE, credit, len(view) - pos)
            if not self._write(self._data_out, view[pos:pos + n]):
                continue  # _check_send says why
            self._sent += n
            pos += n

    def bytes_sent(self) -> int:
        """Bytes that have left this process: what went to the connection, less what it
        has not sent yet."""
        return self._sent - self._backlog()

    def _on_consumed(self) -> None:
        if self._consumed - self._granted >= WINDOW // 4 and self._broken is None:
            self._granted = self._consumed
            self._write(_CREDIT_STREAM[self._is_client], _CREDIT.pack(self._consumed))

    async def send_eof(self) -> None:
        """FIN on the data stream; receiving goes on."""
        if self._closed:
            raise StreamClosed("stream is closed")
        if self._eof_sent:
            return
        self._eof_sent = True
        self._write(self._data_out, b"", end=True)

    async def aclose(self) -> None:
        """FIN, wait (bounded) until the peer acknowledged everything, then close the
        connection and the socket."""
        if self._closed:
            if self._teardown is not None:
                await asyncio.shield(self._teardown)
            return
        self._closed = True
        self._readable.set()
        self._writable.set()
        self._teardown = self._loop.create_task(self._close_gracefully())
        await asyncio.shield(self._teardown)

    async def _close_gracefully(self) -> None:
        try:
            if self._conn is not None and self._broken is None:
                if not self._eof_sent:
                    self._eof_sent = True
                    self._write(self._data_out, b"", end=True)
                self._acked.clear()
                self._transmit()
                await self._wait_acked()
                self._close_connection("")
        finally:
            self._abort()

    def _close_connection(self, reason: str) -> None:
        if self._conn is not None:
            with contextlib.suppress(QuicConnectionError):
                self._conn.close(reason_phrase=reason)
            self._transmit()

    def _abort(self) -> None:
        """Stop the timers and close the socket (what is queued is still sent)."""
        self._lose("stream closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._transport.close()
        if not self._connected.done():
            self._connected.cancel()

    def peer_address(self) -> str | None:
        """The punched address of the peer, as "host:port"."""
        return format_hostport(*self.peer)


async def udp_transport(sock: socket.socket, protocol: asyncio.DatagramProtocol
                        ) -> asyncio.DatagramTransport:
    """qh3's batched UDP transport (recvmmsg, GSO) over `sock`, delivering to `protocol`
    until a QuicStream takes it over; `sock` is closed with it."""
    loop = asyncio.get_running_loop()
    transport, _ = await create_optimized_datagram_transport(loop, lambda: protocol, sock)
    return transport
