"""`RendezvousClient`: the library a node uses to talk to its rendezvous server.

    async with RendezvousClient(host, port, identity, "alice@example.net",
                                register=True, advertise={"addrs": ["1.2.3.4:4567"]}) as rc:
        await rc.send(os.urandom(16), [("bob@example.net", bob_peer_id, sealed_blob)])
        async for push in rc.pushes():      # Deliver(envelope) or PipeMessage
            ...

- `start()` connects and authenticates; a refusal raises `AuthenticationError` (status
  and text from the server). With `reconnect=True` a background task notices a lost
  connection and reconnects with exponential backoff and jitter (up to `max_backoff`
  seconds), authenticating again each time; the server then flushes the queue again, so
  a push can repeat across sessions until it is REMOVEd (dedupe by message id). Each new
  login names the session before it (`replaces`), which the server ends at once if it
  still holds it (it may not have noticed the loss). If the server refuses a
  re-authentication, reconnecting stops and requests raise that error; a 429 (over a cap
  on live sessions) is tried again after the backoff instead, as a session may end.
  Something that does not prove `server_key` at the server's address (a hotel's
  TLS-terminating proxy, a captive portal, a server moved without its data) is not the
  server's word: it is never logged in to, and reconnecting goes on after
  `mismatch_backoff` (30 s doubling to 5 min: what is in the way seldom leaves within
  seconds, and `moved`/`relogin`/`retry_now` cut the wait short when the network
  changes); `mismatch` describes it meanwhile. Before each of those attempts `pinned()`
  (if given) names the key to expect now: a planned key change needs no restart.
  With `alternates` (an async function returning the domain's servers, e.g. from its SRV
  records) a reconnect that cannot reach the current server tries the others at once, in
  the order given (also when the current one shows another key, or answers the login
  with a server error or a session cap: 5xx, 429, `another_may_take`), skipping one that
  does not prove `server_key`; `on_failover(host, port)` hears of the server it reached,
  which stays current. While none takes it, each is tried once per backoff step, so two
  full instances are not hopped between faster than that. A domain's instances usually
  share one database, so whichever it lands on flushes the same queue.
- Each request waits at most `request_timeout` seconds in total. While reconnecting it
  waits for the session, and a request cut off by a lost connection is sent again on the
  next one: SEND and REMOVE are idempotent by message id, the others read only, except
  PIPE which may then arrive twice. Errors are `RendezvousError` subclasses
  (`rendezvous.errors`); a timeout is `RequestTimeoutError` (also a `TimeoutError`).
- `pushes()` yields `Deliver`, `PipeMessage` and `RelayInvite` (`is_relay_invite`) in
  arrival order, across reconnects, until `aclose()`. A relay invitation is answered by
  opening a relay connection (`overlay.transports.relay.relay_accept`), not on this session. The
  buffer is bounded: when `push_queue` items wait, the client stops reading from the
  socket until the consumer catches up (TCP backpressure to the server).
- `tls=True` speaks TLS 1.3 (what `peerpost-rendezvous serve` listens with by default;
  plaintext is for in-process servers: tests, simulator, benchmarks). No CA is consulted:
  `server_key` (the domain key pinned for this server) must sign the reply to our
  AUTHORIZATION over this connection, else `start()` raises `ServerIdentityError` (an
  `AuthenticationError`) naming the expected and seen fingerprints; a CHALLENGE naming
  another key gets no AUTHORIZATION at all (rendezvous.client_core). With no key pinned
  the first session trusts the key the server shows and `server_key` is set to it, so
  reconnects must show the same one (`peerpost init` pins it in the node's config).
- Keepalive: after `keepalive_interval` seconds (default 20) without sending, the client
  sends a PING; after `keepalive_timeout` seconds (default 45) without a byte from the
  server it drops the connection and, with `reconnect=True`, reconnects as after any
  loss. The AUTHORIZATION announces the interval, so the server likewise closes the
  session when the client falls silent (a NAT that forgot the mapping): the device is
  offline there and its mail queues until the next login. 0 turns it off.
- `moved(route_ip, advertise)`: the host changed network (the node notices its route to
  the server starting from another address). A session whose socket has the old address
  is dropped and a new one made at once, carrying `advertise`; without it only the
  keepalive timeout ended it, and the server pushed mail into it for those 45 s.
- `relogin(why)`: the same at once whatever the session's address (the host woke from
  sleep: the keepalive's clock stood still while it slept).
- `server_info`: the UDP ports of the server's extra services from the last CHALLENGE,
  e.g. `{"stun": 3478, "dht": 4000}`; a key is absent when the server doesn't run it.
- `Envelope` (`rendezvous.records`): message_id, sender, recipient, device, priority, blob,
  received_at. `EnvelopeInfo`: the same with `size` instead of `blob`. `FingerResult`:
  address and `devices` (verify_key, online, last_seen, advertise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from crypto.address import format_hostport, normalize_address
from crypto.codec import Fields
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from rendezvous.backoff import Backoff
from rendezvous.client_core import ClientConnection, ServerIdentityError
from rendezvous.errors import (
    AuthenticationError,
    ConnectionLostError,
    RemoteProtocolError,
    RendezvousError,
    RequestTimeoutError,
    error_for,
    error_text,
)
from rendezvous.framing import DEFAULT_MAX_FRAME
from rendezvous.logfmt import kv
from rendezvous.messages import (
    Advertise,
    Challenge,
    Deliver,
    Finger,
    List,
    Pipe,
    PipeMessage,
    Quit,
    RelayInvite,
    Remove,
    Reply,
    Request,
    Retrieve,
    Send,
    SendItem,
    Track,
    Withdraw,
)
from rendezvous.records import (
    Envelope,
    EnvelopeInfo,
    FingerResult,
    address_field,
    normalized_address,
    raw_map,
)
from rendezvous.taskset import raise_if_cancelled, wait_ended
from rendezvous.tls import client_context, peer_binding

log = logging.getLogger("rendezvous.client")

Push = Deliver | PipeMessage | RelayInvite

# Retrying a server that did not prove the pinned key: 30 s doubling to 5 min (module text).
MISMATCH_BACKOFF = Backoff(30.0, 300.0, jitter=0.8)

__all__ = ["Deliver", "Envelope", "EnvelopeInfo", "FingerResult", "KeyMismatch", "PipeMessage",
           "RelayInvite", "RendezvousClient", "RendezvousError", "ServerIdentityError",
           "is_relay_invite"]


def is_relay_invite(push: object) -> bool:
    """Whether a push from `pushes()` invites this device to a relayed stream."""
    return isinstance(push, RelayInvite)


@dataclass(frozen=True, slots=True)
class KeyMismatch:
    """The last login attempt met, at `server` (HOST:PORT), a server that did not prove
    the pinned key `expected` (it showed `seen`); the next attempt is at loop time
    `retry_at`."""

    server: str
    error: ServerIdentityError
    retry_at: float

    @property
    def expected(self) -> bytes | None:
        return self.error.expected

    @property
    def seen(self) -> bytes | None:
        return self.error.seen


class _ClientProtocol(asyncio.Protocol):
    """One connection: feeds the sans-I/O core, matches replies, forwards pushes."""

    def __init__(self, client: RendezvousClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.core = ClientConnection(client.max_frame, server_key=client.server_key,
                                     keepalive_interval=client.keepalive_interval,
                                     keepalive_timeout=client.keepalive_timeout)
        self.transport: asyncio.Transport | None = None
        self.challenge: asyncio.Future[Challenge] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self._flush_scheduled = False
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's and the simulator's transports don't subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.core.binding = peer_binding(transport)  # TLS is up by now (b"" if plaintext)

    def data_received(self, data: bytes) -> None:
        try:
            self.core.receive_data(data, self._loop.time())
        except RemoteProtocolError as exc:
            log.warning(kv("client.bad_server_data", text=exc.text))
            if self.transport is not None:
                self.transport.abort()
            return
        while (msg := self.core.next_event()) is not None:
            if isinstance(msg, Reply):
                fut = self.pending.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, Challenge):
                if self.challenge.done():
                    self.challenge = asyncio.get_running_loop().create_future()
                self.challenge.set_result(msg)
            else:
                self.client._on_push(msg, self)
        self._rearm()

    def _rearm(self) -> None:
        at = self.core.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None and not self.lost.done():
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        if self.client._reading_paused and self.client._proto is self:
            self.core.reading_paused(now)
        self.core.handle_timer(now)
        if self.core.dead is not None:
            log.warning(kv("client.keepalive_timeout", address=self.client.address,
                           text=self.core.dead))
            if self.transport is not None:
                self.transport.abort()
            return
        self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLostError())
        self.pending.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._on_lost(self)
        if not self.challenge.done():
            self.challenge.set_exception(ConnectionLostError("connection closed before challenge"))
            self.challenge.exception()  # retrieved: nobody waiting for it is not an error

    def request(self, make: Callable[[int], Request]) -> tuple[Request, asyncio.Future[Reply]]:
        req = make(self.core.new_id())
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[req.id] = fut
        self.core.send(req)
        self.flush()
        return req, fut

    def flush(self) -> None:
        """Write soon: requests made in one loop iteration share one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._flush_scheduled = False
        data = self.core.data_to_send(self._loop.time())
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        self._rearm()


class RendezvousClient:
    """A device's session with its rendezvous server (see the module docstring)."""

    def __init__(self, host: str, port: int, identity: DeviceIdentity, address: str, *,
                 domain: str | None = None, advertise: dict[str, Any] | None = None,
                 register: bool = False, invite: str | None = None,
                 request_timeout: float = 10.0, reconnect: bool = True,
                 max_backoff: float = 30.0, push_queue: int = 10_000,
                 max_frame: int = DEFAULT_MAX_FRAME, rng: random.Random | None = None,
                 tls: bool = False, server_key: bytes | None = None,
                 vouch: bytes | None = None, keepalive_interval: float = 20.0,
                 keepalive_timeout: float = 45.0,
                 alternates: Callable[[], Awaitable[Sequence[tuple[str, int]]]] | None = None,
                 on_failover: Callable[[str, int], None] | None = None,
                 mismatch_backoff: Backoff = MISMATCH_BACKOFF,
                 pinned: Callable[[], bytes | None] | None = None) -> None:
        if keepalive_interval > 0 and not keepalive_interval < keepalive_timeout:
            raise ValueError("keepalive_interval must be under keepalive_timeout (or 0: off)")
        self.host = host
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.tls = tls
        self.server_key = server_key  # the domain key pinned (set by the first session)
        self._ssl: ssl.SSLContext | None = client_context() if tls else None
        self.port = port
        self.identity = identity
        self.address = normalize_address(address)
        self.domain = domain
        self._advertise = advertise
        self.register = register
        self.invite = invite
        self.vouch = vouch  # crypto.vouch bytes presented when registering a new device
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.push_queue = push_queue
        self.max_frame = max_frame
        self._rng = rng or random.Random()
        self._proto: _ClientProtocol | None = None
        self._connected = asyncio.Event()
        self._pushes: deque[Push] = deque()
        self._push_ready = asyncio.Event()
        self._reading_paused = False
        self._supervisor: asyncio.Task[None] | None = None
        self._fatal: RendezvousError | None = None
        self._retry_now = asyncio.Event()  # cuts the reconnect backoff short (retry_now)
        # The cnonce of the last session: a login after it was lost asks the server to end
        # it (its side may not know yet; rendezvous.messages `replaces`).
        self._last_session: bytes | None = None
        self._closed = False
        self._services: dict[str, int] = {}
        self.reconnects = 0
        self.alternates = alternates
        self.on_failover = on_failover
        self.failovers = 0
        self.mismatch_backoff = mismatch_backoff
        self.pinned = pinned
        self._mismatch: KeyMismatch | None = None

    @property
    def server_text(self) -> str:
        """The server as HOST:PORT, for messages."""
        return format_hostport(self.host, self.port)

    # --- lifecycle -----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Logged in now (not after the server refused a login: that ends the session)."""
        return self._connected.is_set() and self._fatal is None

    @property
    def refused(self) -> str | None:
        """Why the server refused to log this client in again (account deleted, device
        revoked), which ends its reconnecting; None while that has not happened."""
        return str(self._fatal) if self._fatal is not None else None

    @property
    def mismatch(self) -> KeyMismatch | None:
        """While reconnecting after a server that did not prove the pinned key: which,
        and when the next attempt is; None otherwise."""
        return self._mismatch

    @property
    def server_info(self) -> dict[str, int]:
        """UDP ports of the server's STUN ("stun") and DHT bootstrap ("dht") services."""
        return dict(self._services)

    async def start(self) -> None:
        """Connect and authenticate; keep reconnecting in the background if asked to."""
        await self._connect_once()
        if self.reconnect:
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"rendezvous-client {self.address}")

    async def aclose(self) -> None:
        """Say QUIT (briefly), close the connection, stop reconnecting, end `pushes()`."""
        if self._closed:
            return
        self._closed = True
        cancelled = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            # A cancel of our caller meanwhile is raised once closed, not swallowed.
            cancelled = await wait_ended([self._supervisor])
        proto, self._proto = self._proto, None
        self._connected.clear()
        if proto is not None and proto.transport is not None:
            if not proto.lost.done():
                with contextlib.suppress(Exception):
                    _, fut = proto.request(Quit)
                    await asyncio.wait_for(fut, min(1.0, self.request_timeout))
            proto.transport.close()
        self._push_ready.set()
        if cancelled is not None:
            raise cancelled

    async def __aenter__(self) -> RendezvousClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def retry_now(self) -> None:
        """Reconnect at once instead of at the end of the backoff's wait: the user is
        waiting (a `send` while disconnected). After a 10 s outage that wait reaches several
        seconds, so the session came back up to 6 s after its server did."""
        self._retry_now.set()

    @property
    def local_ip(self) -> str | None:
        """The local address of the current session's socket; None while disconnected."""
        return self._session_ip("sockname")

    @property
    def server_ip(self) -> str | None:
        """The server's address as the current session reached it (`host` may be a name);
        None while disconnected."""
        return self._session_ip("peername")

    def _session_ip(self, which: str) -> str | None:
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        name = proto.transport.get_extra_info(which)
        return str(name[0]) if name else None

    def moved(self, route_ip: str, advertise: dict[str, Any] | None = None, *,
              force: bool = False) -> bool:
        """The host changed network: the kernel now reaches the server from `route_ip`.

        `advertise` (if given) replaces the reachability hints sent at the next login.
        A session whose socket is bound to another address can never come back: nothing
        it sends leaves from an address the host still has, so only the keepalive timeout
        (45 s) would end it, and the server would push our mail into it meanwhile. It is
        dropped and a new one started at once, from the new address; True then. A session
        that still uses `route_ip` is kept (False), unless `force` (the same address on
        another network, behind another NAT that knows nothing of the session)."""
        if advertise is not None:
            self._advertise = advertise
        proto = self._proto
        if proto is None or proto.transport is None or (self.local_ip == route_ip
                                                         and not force):
            if proto is None:
                self._retry_now.set()  # reconnecting: don't wait out the backoff
            return False
        log.info(kv("client.moved", address=self.address, old=self.local_ip, new=route_ip))
        self._drop(proto)
        return True

    def relogin(self, why: str) -> None:
        """Drop the session, whatever state it seems to be in, and log in again at once.

        For when its silence proves nothing: the host slept (CLOCK_MONOTONIC, which the
        keepalive counts in, stood still), so the server may have closed the session and
        the NAT forgotten it minutes ago while the keepalive thinks no time passed."""
        proto = self._proto
        if proto is not None and proto.transport is not None:
            log.info(kv("client.relogin", address=self.address, text=why))
            self._drop(proto)
        self._retry_now.set()

    def _drop(self, proto: _ClientProtocol) -> None:
        """End `proto`'s session now and reconnect at once; not `connected` from here on
        (connection_lost, which would say so, comes a loop turn later)."""
        if proto.transport is not None:
            proto.transport.abort()
        self._connected.clear()
        self._retry_now.set()

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait for an authenticated session; TimeoutError (RequestTimeoutError) if none."""
        if self._fatal is not None:
            raise self._fatal
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise RequestTimeoutError(
                f"not connected to {self.server_text} within {timeout}s") from None
        if self._fatal is not None:
            raise self._fatal

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientProtocol(self, loop), self.host,
                                       self.port, ssl=self._ssl), timeout)
        except ssl.SSLError as exc:
            raise ConnectionLostError(
                f"TLS 1.3 handshake with {self.server_text} failed ({exc}); is it a "
                "peerpost rendezvous server with TLS on?") from None
        except (OSError, TimeoutError) as exc:
            raise ConnectionLostError(
                f"cannot connect to {self.server_text}: {error_text(exc)}"
            ) from None
        try:
            challenge = await asyncio.wait_for(asyncio.shield(proto.challenge), timeout)
        except TimeoutError:
            transport.abort()
            raise RequestTimeoutError(
                f"no CHALLENGE from {self.server_text} within {timeout}s"
                + ("" if self.tls else " (a server with TLS on says nothing to a "
                   "plaintext client)")) from None
        except BaseException:
            transport.abort()
            raise
        if (mismatch := proto.core.identity_error) is not None:
            transport.abort()  # it showed another key: no AUTHORIZATION is signed for it
            raise mismatch
        try:
            if self.domain is not None and challenge.domain != self.domain:
                raise AuthenticationError(
                    0, f"server is for domain {challenge.domain}, expected {self.domain}")
            rid = proto.core.authorize(self.identity, self.address, invite=self.invite,
                                       register=self.register, advertise=self._advertise,
                                       vouch=self.vouch if self.register else None,
                                       replaces=self._last_session)
            fut: asyncio.Future[Reply] = loop.create_future()
            proto.pending[rid] = fut
            proto.flush()
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            transport.abort()
            raise RequestTimeoutError(f"no answer to AUTHORIZATION within {timeout}s") from None
        except BaseException:
            transport.abort()
            raise
        if (mismatch := proto.core.identity_error) is not None:
            transport.abort()
            raise mismatch
        if not reply.ok:
            transport.close()
            raise AuthenticationError(reply.status, reply.text)
        if self.server_key is None:
            self.server_key = proto.core.server_key_seen  # trusted on first use
        self._proto = proto
        self._last_session = proto.core.client_nonce  # what the next login replaces
        self._services = challenge.services()
        self._connected.set()
        log.info(kv("client.connected", address=self.address, server=self.server_text))

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0  # failed reconnects since the session was lost
        mismatched = 0  # of those, in a row, to a server that did not prove the key
        while not self._closed:
            proto = self._proto
            if proto is not None:
                await asyncio.shield(proto.lost)
                self._connected.clear()
                self._proto = None
                self._reading_paused = False
                log.info(kv("client.disconnected", address=self.address))
            attempt += 1
            if self._mismatch is not None:
                delay = max(0.0, self._mismatch.retry_at - loop.time())
            else:
                delay = Backoff(0.1, self.max_backoff, jitter=0.5).delay(attempt, self._rng)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retry_now.wait()
            self._retry_now.clear()
            try:
                if self._mismatch is not None:
                    self.repin()
                await self._connect_any()
            except ServerIdentityError as exc:
                # Not the server's word (it never answered): wait, and try again.
                mismatched += 1
                wait = self.mismatch_backoff.delay(mismatched, self._rng)
                where = self.server_text
                self._mismatch = KeyMismatch(where, exc, loop.time() + wait)
                log.warning(kv("client.server_identity", address=self.address, server=where,
                               text=exc.text, retry_in=f"{wait:.0f}s"))
                continue
            except AuthenticationError as exc:
                if exc.transient:
                    # Over a cap on live sessions (the device's, the account's, the IP's):
                    # one of them ends sooner or later. Or a server error (its store down,
                    # its disk full), which says nothing about this device, unlike a
                    # revoked one's 403. Either way, try again after the backoff.
                    log.info(kv("client.reconnect_failed", address=self.address,
                                text=exc.text, attempt=attempt))
                    continue
                log.warning(kv("client.reauth_refused", address=self.address, text=exc.text))
                self._fatal = exc
                self._connected.set()  # wake waiters so they see the error
                return
            except RendezvousError as exc:
                log.info(kv("client.reconnect_failed", address=self.address, text=exc.text,
                            attempt=attempt))
                self._mismatch, mismatched = None, 0  # unreachable now: another network
                continue
            except Exception:
                # A bug, or an error of a hook (alternates, pinned): try again after the
                # backoff. Out of this loop, it left the client offline for good, with no
                # trace but a task exception never retrieved.
                raise_if_cancelled()
                log.exception(kv("client.reconnect_failed", address=self.address,
                                 attempt=attempt))
                continue
            self.reconnects += 1
            attempt = mismatched = 0
            self._mismatch = None

    def repin(self) -> None:
        """Before trying again after a mismatch: the key `pinned()` names now."""
        if self.pinned is None:
            return
        key = self.pinned()
        if key is not None:
            self.server_key = key

    async def _connect_any(self) -> None:
        """Connect to the current server, else to one of `alternates` (module text)."""
        first: RendezvousError
        try:
            await self._connect_once()
            return
        except RendezvousError as exc:
            if self.alternates is None or not another_may_take(exc):
                raise
            first = exc
        current = (self.host, self.port)
        try:
            others = [s for s in await self.alternates() if s != current]
        except Exception as exc:
            log.info(kv("client.alternates_failed", address=self.address, error=str(exc)))
            raise first from None
        for host, port in others:
            self.host, self.port = host, port
            try:
                await self._connect_once()
            except RendezvousError as exc:
                log.info(kv("client.alternate_failed", address=self.address,
                            server=self.server_text, text=exc.text))
                continue
            self.failovers += 1
            log.warning(kv("client.failover", address=self.address,
                           old=format_hostport(*current), new=self.server_text,
                           text=first.text or str(first)))
            if self.on_failover is not None:
                try:
                    self.on_failover(host, port)
                except Exception as exc:
                    # The session is up. The hook's error (a node's full disk refusing
                    # config.json) ended the reconnect loop, and the client never
                    # reconnected again after this session.
                    if isinstance(exc, OSError):
                        log.error(kv("client.on_failover_failed", address=self.address,
                                     error=str(exc)))
                    else:
                        log.exception(kv("client.on_failover_failed", address=self.address))
            return
        self.host, self.port = current
        raise first

    def _on_lost(self, proto: _ClientProtocol) -> None:
        if proto is self._proto:
            self._connected.clear()

    # --- pushes --------------------------------------------------------------------------
    def _on_push(self, msg: Push, proto: _ClientProtocol) -> None:
        self._pushes.append(msg)
        self._push_ready.set()
        if len(self._pushes) >= self.push_queue and not self._reading_paused:
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.pause_reading()
                self._reading_paused = True

    def pushes(self) -> AsyncIterator[Push]:
        """DELIVER and PIPE pushes, in order, across reconnects, until `aclose()`."""
        return self._iterate_pushes()

    async def _iterate_pushes(self) -> AsyncIterator[Push]:
        while True:
            while not self._pushes:
                if self._closed:
                    return
                self._push_ready.clear()
                await self._push_ready.wait()
            msg = self._pushes.popleft()
            if self._reading_paused and len(self._pushes) <= self.push_queue // 2:
                self._reading_paused = False
                proto = self._proto
                if proto is not None and proto.transport is not None:
                    proto.transport.resume_reading()
            yield msg

    # --- requests ------------------------------------------------------------------------
    async def _request(self, make: Callable[[int], Request]) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._closed:
                raise ConnectionLostError("client is closed")
            remaining = deadline - loop.time()
            proto = self._proto
            if proto is None or proto.lost.done() or not self._connected.is_set():
                if not self.reconnect:
                    raise ConnectionLostError()
                if remaining <= 0:
                    raise RequestTimeoutError(f"not connected to {self.server_text} "
                                              f"within {self.request_timeout}s")
                await self.wait_connected(remaining)
                continue
            req, fut = proto.request(make)
            # One timer per request, not asyncio.wait_for (a second future, callbacks and
            # a timer), which cost more than the rest of a request's client side.
            timer = loop.call_later(max(remaining, 0.001), _time_out, fut)
            try:
                reply = await fut
            except TimeoutError:
                proto.pending.pop(req.id, None)
                raise RequestTimeoutError(f"no reply to {req.TAG} from {self.server_text} "
                                          f"within {self.request_timeout}s") from None
            except ConnectionLostError:
                if not self.reconnect:
                    raise
                continue
            finally:
                timer.cancel()
            if not reply.ok:
                raise error_for(reply.status, reply.text)
            return reply

    async def send(self, message_id: bytes, items: list[tuple[str, bytes, bytes]],
                   priority: int = 0) -> None:
        """Deposit one message: one sealed blob per (address, device peer id). Durable on return."""
        parsed = tuple(SendItem(normalized_address(a) if type(a) is str else normalize_address(a),
                                d, b) for a, d, b in items)
        await self._request(lambda rid: Send(rid, message_id, priority, parsed))

    async def list(self) -> list[EnvelopeInfo]:
        """Every envelope queued for this device (paged under the hood)."""
        out: list[EnvelopeInfo] = []
        after = 0
        while True:
            reply = await self._request(_list_page(after))
            try:
                f = Fields(reply.body, "LIST reply")
                out.extend(f.list("items", lambda o, w: EnvelopeInfo.decode(Fields(o, w)),
                                  max_items=1000) or ())
                nxt = f.int("next", lo=1, hi=1 << 62, optional=True)
            except DecodeError as exc:
                raise RendezvousError(0, f"malformed LIST reply: {exc}") from None
            if nxt is None:
                return out
            after = nxt

    async def retrieve(self, message_id: bytes) -> Envelope:
        """One queued envelope of this device (NotFoundError if not queued)."""
        reply = await self._request(lambda rid: Retrieve(rid, message_id))
        try:
            return Envelope.decode(Fields(raw_map(Fields(reply.body, "reply"), "env"), "env"))
        except DecodeError as exc:
            raise RendezvousError(0, f"malformed RETRIEVE reply: {exc}") from None

    async def remove(self, message_id: bytes) -> None:
        """Acknowledge delivery: the server forgets the envelope (idempotent)."""
        await self._request(lambda rid: Remove(rid, message_id))

    async def finger(self, address: str) -> FingerResult:
        """Presence, keys and reachability of `address` (NotFoundError if unknown)."""
        target = normalize_address(address)
        reply = await self._request(lambda rid: Finger(rid, target))
        try:
            return FingerResult.decode(Fields(reply.body, "FINGER reply"))
        except DecodeError as exc:
            raise RendezvousError(0, f"malformed FINGER reply: {exc}") from None

    async def withdraw(self, message_id: bytes) -> tuple[int, int]:
        """Take back what of my message `message_id` is still queued at my server: (its
        envelopes for this domain's devices, those still waiting for other domains)."""
        reply = await self._request(lambda rid: Withdraw(rid, message_id))
        try:
            f = Fields(reply.body, "WITHDRAW reply")
            return (f.int("queued", lo=0, hi=1 << 31), f.int("outbound", lo=0, hi=1 << 31))
        except DecodeError as exc:
            raise RendezvousError(0, f"malformed WITHDRAW reply: {exc}") from None

    async def track(self, message_id: bytes) -> tuple[str, tuple[Tracked, ...]]:
        """My server's domain and the forwarding state of each foreign recipient of my
        message `message_id` (none: it had no foreign recipient, or it was forgotten)."""
        reply = await self._request(lambda rid: Track(rid, message_id))
        try:
            f = Fields(reply.body, "TRACK reply")
            domain = f.str("domain", max_len=253)
            items = f.list("recipients", lambda o, w: Tracked.decode(Fields(o, w)),
                           max_items=1000) or ()
        except DecodeError as exc:
            raise RendezvousError(0, f"malformed TRACK reply: {exc}") from None
        return domain, tuple(items)

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        """Relay `payload` to online device(s) of `to`; hold it `hold` seconds if offline."""
        target = normalize_address(to)
        hold_ms = max(0, round(hold * 1000))
        await self._request(lambda rid: Pipe(rid, target, payload, device, hold_ms))

    async def advertise(self, advertise: dict[str, Any]) -> None:
        """Replace this device's reachability hints (also used on reconnects)."""
        await self._request(lambda rid: Advertise(rid, advertise))
        self._advertise = advertise


@dataclass(frozen=True, slots=True)
class Tracked:
    """One foreign recipient's state at the sender's server (TRACK): "queued" (since:
    first failure of the current outage, error: the last one), "delivered" (to its
    domain's server) or "bounced" (error: the reason)."""

    to: str
    state: str
    queued_at: float
    since: float | None
    error: str | None
    updated_at: float

    @classmethod
    def decode(cls, f: Fields) -> Tracked:
        state = f.str("state", max_len=16)
        if state not in ("queued", "delivered", "bounced"):
            raise DecodeError(f"unknown forwarding state {state!r}")
        return cls(address_field(f, "to"), state, f.int("queued_at", lo=0, hi=1 << 40),
                   f.int("since", lo=0, hi=1 << 40, optional=True),
                   f.str("error", max_len=1024, optional=True),
                   f.int("updated_at", lo=0, hi=1 << 40))


def another_may_take(exc: RendezvousError) -> bool:
    """Whether another server of the domain may log in a client that `exc` kept out of
    this one: it can't be reached, does not prove the pinned key, or failed or is full at
    the login (5xx, 429: its store or disk broken, its sessions capped, which says nothing
    about the device). A refusal (401, 403) is the domain's word on the device."""
    if isinstance(exc, ConnectionLostError | RequestTimeoutError | ServerIdentityError):
        return True
    return isinstance(exc, AuthenticationError) and exc.transient


def _time_out(fut: asyncio.Future[Reply]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _list_page(after: int) -> Callable[[int], Request]:
    return lambda rid: List(rid, after)
