"""The relay transport: a `Stream` spliced through the rendezvous server (the last rung).

When neither direct TCP nor WebRTC gets through (symmetric NAT on both sides, UDP
blocked), two devices meet at the caller's server (for a callee of another domain the
invite reaches it through its own server and names the caller's server's host, port and
domain key: `relay_accept` goes there, `server_key` being that key):

    # caller (e.g. the node fetching chunks)
    stream = await relay_dial(host, port, identity, "alice@example.net",
                              "bob@example.net", bob_device, timeout=35)
    # callee: its push loop sees the invitation on its control session
    async for push in rendezvous.pushes():
        if is_relay_invite(push):
            stream = await relay_accept(host, port, identity, "bob@example.net", push)

Each side opens its own connection to the server (TLS 1.3 when `tls`, as the node's
control session does; `server_key` is the domain key pinned for the server, which must
sign the reply to the relay connection's AUTHORIZATION or the setup fails with a
`RelayError` that says so), authorizes it as a relay connection
and sends RELAY or RELAY-ACCEPT (`rendezvous.client_core.RelayHandshake`); after the
server's "spliced" reply the connection carries the peer's bytes, and the protocol object
is swapped for the one `TcpStream` uses (`transport.set_protocol`), so a `RelayStream` is a
TCP stream underneath: the same half-close, backpressure and close behaviour. The server
sees only what the transfer handshake seals end to end; its rate cap shows up here as a
slower stream, its daily cap as a `StreamBroken`, and a refusal as `RelayError` with the
server's reason.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import cast

from crypto.address import format_hostport
from crypto.identity import DeviceIdentity
from overlay.transports.stream import StreamBroken
from overlay.transports.tcp import StreamProtocol, TcpStream
from rendezvous.client_core import RelayHandshake
from rendezvous.errors import RemoteProtocolError, error_text
from rendezvous.messages import RELAY_SESSION_LEN, Relay, RelayAccept, RelayInvite
from rendezvous.tls import client_context, peer_binding

DEFAULT_TIMEOUT = 40.0  # the server gives the callee 30 s to accept


class RelayError(StreamBroken):
    """The relayed stream could not be set up; `status` is the server's code (0: local)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"relay: {text}" if not status else f"relay refused ({status}): {text}")
        self.status = status
        self.text = text


class RelayStream(TcpStream):
    """A `Stream` relayed through the rendezvous server (`path == "relay"`)."""

    path = "relay"

    def __init__(self, protocol: StreamProtocol, session: bytes, peer: str,
                 peer_device: bytes) -> None:
        super().__init__(protocol)
        self.session = session
        self.peer = peer                # the other end's address, as the server vouched
        self.peer_device = peer_device  # and its device peer id

    def peer_address(self) -> str | None:
        """None: the relay doesn't know (or tell) where the other end really is."""
        return None


class _Handshake(asyncio.Protocol):
    """Drives a `RelayHandshake`; at the splice hands the transport to a `StreamProtocol`."""

    def __init__(self, core: RelayHandshake, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[StreamProtocol] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.core.set_binding(peer_binding(transport))  # TLS is up (b"" if plaintext)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None or self.done.done():
            return
        try:
            self.core.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(0, f"the server sent garbage: {exc.text}")
            return
        out = self.core.data_to_send()
        if out:
            t.write(out)
        if self.core.refusal is not None:
            self._fail(*self.core.refusal)
        elif self.core.spliced:
            stream_proto = StreamProtocol()
            t.set_protocol(stream_proto)
            stream_proto.connection_made(t)
            if self.core.rest:
                stream_proto.data_received(self.core.rest)
            self.done.set_result(stream_proto)

    def eof_received(self) -> bool:
        self._fail(0, "the server closed the connection before the splice")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            why = "closed" if exc is None else error_text(exc)
            self._fail(0, f"connection to the server lost before the splice: {why}")

    def _fail(self, status: int, text: str) -> None:
        if not self.done.done():
            self.done.set_exception(RelayError(status, text))
        if self.transport is not None:
            self.transport.abort()


async def _open(host: str, port: int, core: RelayHandshake, timeout: float,  # noqa: ASYNC109
                tls: bool) -> StreamProtocol:
    loop = asyncio.get_running_loop()
    hs = _Handshake(core, loop)
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.create_connection(lambda: hs, host, port,
                                             ssl=client_context() if tls else None)
            except ssl.SSLError as exc:
                raise RelayError(0, f"TLS 1.3 handshake with {format_hostport(host, port)} failed: "
                                    f"{exc}") from None
            except OSError as exc:
                raise RelayError(0, f"cannot connect to {format_hostport(host, port)}: "
                                    f"{exc}") from None
            return await hs.done
    except BaseException as exc:
        if hs.transport is not None:
            hs.transport.abort()
        if isinstance(exc, TimeoutError):
            raise RelayError(0, f"no relayed stream within {timeout:g} s") from None
        raise


async def relay_dial(host: str, port: int, identity: DeviceIdentity, address: str,
                     to: str, device: bytes, *, timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
                     tls: bool = False, server_key: bytes | None = None) -> RelayStream:
    """Open a stream to device `device` of `to`, relayed by the server at host:port.

    `address` is this device's own address on that server. Waits until the callee accepts
    (the server allows it 30 s). Raises `RelayError` (a `StreamBroken`) with the server's
    reason: not online, unknown device, relay caps, or no acceptance in time.
    """
    session = os.urandom(RELAY_SESSION_LEN)
    core = RelayHandshake(identity, address, lambda rid: Relay(rid, to, device, session),
                          server_key=server_key)
    proto = await _open(host, port, core, timeout, tls)
    return RelayStream(proto, session, to, device)


async def relay_accept(host: str, port: int, identity: DeviceIdentity, address: str,
                       invite: RelayInvite, *, timeout: float = 10.0,  # noqa: ASYNC109
                       tls: bool = False, server_key: bytes | None = None) -> RelayStream:
    """Join the relayed stream `invite` (a push from our control session) offers."""
    core = RelayHandshake(identity, address, lambda rid: RelayAccept(rid, invite.session),
                          server_key=server_key)
    proto = await _open(host, port, core, timeout, tls)
    return RelayStream(proto, invite.session, invite.sender, invite.sender_device)


__all__ = ["RelayError", "RelayInvite", "RelayStream", "relay_accept", "relay_dial"]
