"""`RendezvousServer`: the asyncio adapter around `ServerConnection` and a `Store`.

One `asyncio.Protocol` per connection (no StreamReader, no task per idle connection, so
an idle session costs a few KiB). The protocol core decides what is valid; this module
does what needs the account database and the other sessions:

- AUTHORIZATION: ask the store whether the key may be the address (or register it), then
  mark the device online and flush its queue (DELIVER) and its held PIPE messages.
- SEND: `store.enqueue` (acknowledged after the commit), then DELIVER to every online
  session of each recipient device.
- LIST / RETRIEVE / REMOVE, FINGER, PIPE, ADVERTISE.
- RELAY / RELAY-ACCEPT on relay connections: the relay of last resort (relay.py). A
  relay connection is authenticated like any other but never counts as online, gets no
  pushes, and after "spliced" hands its bytes to its `Splice`.
- Extra services (STUN, a DHT bootstrap node; services.py): their ports go out in every
  CHALLENGE, their counters into `snapshot()`, and they close with the server.

Exactly-once per session without locks: envelope sequence numbers only grow, and the
store reports the highest one (`hi`) at the moment it read the device's queue during
authentication. The queue flush covers seq <= hi (in pages, following write
backpressure); live pushes go out only for seq > hi.

Wall-clock times that are stored (received, expiry, last seen, PIPE holds) come from the
injected `clock` (default `time.time`); rate limits and timers use the running loop's clock.

Bounds on sessions and pushes (`Limits`): at most `sessions_per_device`,
`sessions_per_account` and `sessions_per_ip` live sessions (relay connections don't
count; they have their own caps; an IPv6 client counts per /64, `limits.source_key`); the
AUTHORIZATION over a cap is refused with 429 and the cap in the text. A reader that lets
more than `Limits.max_push_buffer` bytes pile up is disconnected, and so are the readers
with the most unsent bytes while all sessions together have more than `push_buffer_total`
unsent (`slow_readers_dropped` counts both); their envelopes stay queued for their next
session.

FINGER and privacy: anyone may learn an address's device keys (SEND needs them), but
presence, last seen and reachability (the advertisement: addresses, NAT) go only to an
account that has exchanged mail with the address (the store records a pair for every
stored SEND, sender with each recipient and the recipients of one message among
themselves), to the address itself, or to everyone with `finger_open` (demos, tests).
Co-recipients count as exchanged because the download path needs them: a recipient
FINGERs the other recipients of a message to learn their NAT flag and the address to
signal through before fetching chunks from them, and they reach each other directly then
anyway. A keys-only answer shows every device offline, never seen, with no
advertisement. An unknown address answers 404 "no such address: X", the very text SEND,
PIPE and RELAY give, after the same single store lookup as a known one.

The listener speaks TLS 1.3 when given a `ServerTls` (rendezvous/tls.py), relay
connections included; the domain key signs the server's half of every handshake
(rendezvous/session.py). `reload_tls` puts another certificate in front of every handshake
from then on (`serve` does it on SIGHUP, for a renewed certificate); a connection keeps the
certificate its handshake used, and the binding it signs is that certificate's.

Federation (rendezvous/federation.py): with a `DomainResolver` (by default the DNS one)
the server links to other domains. A node's SEND naming foreign recipients is
acknowledged once those envelopes are in the durable outbound queue (the local ones in
the ordinary queue), and `Federation` forwards them; FINGER of a foreign address goes
over the link on the asker's behalf; TRACK shows the forwarding state of each foreign
recipient of the asker's message. Links from other servers (LINK) are checked against the
linking domain's key from the resolver; over a link the server takes SEND only from
senders of the linking domain to recipients here (403 and `link_refused_alignment`
otherwise), at most `Limits.link_rate` envelopes per second and `link_quota_*` queued per
linking domain, and FINGER on behalf of an asker of that domain. `blocked_domains` are
refused links (and so mail) outright.

PIPE across domains: a node's PIPE to a foreign address goes over our link with the
sender and its device named (`Federation.pipe`); the receiving server checks alignment
(sender of the linking domain, recipient of its own), takes at most `Limits.link_rate`
PIPE/RELAY requests per second per linking domain, and delivers or holds the message
exactly as for a local sender (the holds are in its store, fair per sender). The answer
travels back over the same link; replies go the other way over the other server's link.

The relay across domains: the *caller's* server hosts the splice, so the caller's account
pays, under the same relay limits, and relayed bytes are never stored. On a RELAY to a
foreign device the caller's server registers the pending session as for a local callee,
then forwards RELAY(to, device, session, from, from_device) over the link. The callee's
server checks alignment, that the device is bound to the address and online, and pushes
RELAY-INVITE carrying the caller's server's host:port and domain key as *it* finds them in
DNS (the same records it checked the link against), so the callee trusts nothing the other
domain said. The callee opens a relay connection to that server, checks its domain key
against the invite's key (its own server vouched for it), and authorizes with its own
address: a foreign address is accepted on a relay connection without the store, and such
a connection may only RELAY-ACCEPT. The 16-byte session id is the one-time token (random,
chosen by the caller, known only to the two servers and the callee) and it is bound to
the device key: the caller named the device (its peer id, the hash of its key), the
callee's server confirmed the device is bound to that address, and the accept must come
from a connection whose AUTHORIZATION signature proves that very key. A domain with
several servers must hand out the server holding the session: the caller's server names
itself in the forwarded RELAY (`via`, its advertised host:port), and the invite names that
server if it is one of the caller domain's SRV targets, else the first of them.

One DHT: when a link comes up the server hands the remote's DHT port (its CHALLENGE
`dht`) and address to its own "dht" service if that can `bootstrap` (overlay.dht.DhtNode
can), so the bootstrap nodes of domains that exchange mail know each other; nodes still
join through their own server's bootstrap node.

Several instances of one domain on one database (rendezvous/instances.py): the server
tells its `InstanceBus` when a device's first session here begins and its last one ends,
and which envelopes it stored; the bus pushes to our sessions what other instances stored
(`bus_deliver`), takes PIPE messages held for them (`bus_take_pipes`) and hands on relay
invites (`bus_relay_invite`). FINGER counts a device online on a live instance as online;
a PIPE for a device on another instance goes through the hold, which that instance takes
at once; a RELAY to one names this instance's address in the invite, so both ends meet
here. With SQLite the bus is `LocalBus`, which shares nothing.

`start()` opens the store and starts listening; `aclose()` stops listening, lets requests
in progress finish (bounded), closes every connection and then the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, cast

from crypto.address import domain_of, format_hostport
from crypto.codec import packb
from rendezvous.dns import DnsResolver, DomainLookupError, DomainResolver, own_records_problem
from rendezvous.domainkey import DomainKey
from rendezvous.errors import (
    DATABASE_AWAY,
    STORAGE_FULL,
    error_text,
    is_database_away,
    is_disk_full,
)
from rendezvous.federation import Federation
from rendezvous.instances import InstanceBus, LocalBus
from rendezvous.limits import Limits, TokenBucket, source_label, source_of
from rendezvous.logfmt import kv
from rendezvous.messages import (
    NONCE_LEN,
    Advertise,
    Challenge,
    Finger,
    List,
    Pipe,
    PipeMessage,
    Relay,
    RelayAccept,
    RelayInvite,
    Remove,
    Request,
    Retrieve,
    Send,
    Track,
    Withdraw,
)
from rendezvous.pipe_hold import pipe_quota
from rendezvous.records import DeviceInfo, FingerResult
from rendezvous.relay import PendingRelay, RelayRegistry, Splice
from rendezvous.services import ExtraService
from rendezvous.session import (
    AuthRequested,
    Closing,
    LinkRequested,
    RequestReceived,
    ServerConnection,
)
from rendezvous.status import Status
from rendezvous.store import (
    AuthOutcome,
    EnqueueOutcome,
    QueuedEnvelope,
    Quota,
    RegistrationPolicy,
    Store,
)
from rendezvous.taskset import TaskSet
from rendezvous.tls import ServerTls, can_half_close

log = logging.getLogger("rendezvous.server")


def _storage_trouble(exc: BaseException, verb: str, **where: Any) -> str | None:
    """The reply for a store failure that is the storage's state, not a fault of the
    request: a full disk (logged as an error: the operator has to free space) or a
    database that is away (a warning: it ends when the database is back). None for any
    other failure."""
    if is_disk_full(exc):
        log.error(kv("storage.full", **where, verb=verb, error=str(exc)))
        return STORAGE_FULL
    if is_database_away(exc):
        log.warning(kv("storage.unavailable", **where, verb=verb, error=error_text(exc)))
        return DATABASE_AWAY
    return None


_SHUTDOWN_GRACE = 5.0
# Seconds a PIPE message for a device on another instance is held for that instance to take.
_PIPE_TRANSIT = 30.0
# Seconds after a session's login during which another instance's envelope may still
# commit with a seq below the session's `hi` (a transaction in flight at the login).
_LATE_COMMIT = 60.0
# A connection whose protocol can't be built or set up is logged with its traceback at most
# once a minute per distinct error (a bug fails every connection alike), and counted.
_FAILURE_LOG_EVERY = 60.0
_FAILURES_REMEMBERED = 64

Result = tuple[Status, str | None, dict[str, Any] | None]
# `_dispatch` returns this when it has already written the reply itself (a splice).
_REPLIED: Final = (Status.OK, "already replied", None)


def _new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_LEN)


def default_resolver() -> DomainResolver:
    """The DNS resolver (name server from PEERPOST_RESOLVER, else the system's)."""
    return DnsResolver()


_DEFAULT: Final = object()  # "the DNS resolver" for RendezvousServer(resolver=...)


class _Connection(asyncio.Protocol):
    """Feeds one transport into its ServerConnection and writes what comes out."""

    __slots__ = ("_drained", "_flush_scheduled", "_last_bad", "_timer", "_timer_at",
                 "client_nonce", "core", "flush_hi", "flushed", "loop", "peer", "read_paused",
                 "server", "side", "source", "splice", "transport", "write_paused")

    def __init__(self, server: RendezvousServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.core = ServerConnection(server.domain, server.limits, self.loop.time(),
                                     server.new_nonce, server.service_ports,
                                     domain_key=server.domain_key, binding=server.binding)
        self.splice: Splice | None = None  # set once this relay connection is spliced
        self.side = 0
        self.peer = "?"
        self.source = "?"  # what per-address limits count it under (`source_of`)
        self.flush_hi = 0
        # Seqs <= flush_hi pushed to this session, kept for a while when the domain has
        # several instances (their envelopes may commit after `hi` with a smaller seq).
        self.flushed: set[int] | None = None
        self.client_nonce = b""  # of the AUTHORIZATION: the client's name for this session
        self.read_paused = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_bad = 0

    # --- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's and the simulator's transports don't subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        try:
            addr = transport.get_extra_info("peername")
            self.peer = format_hostport(*addr[:2]) if isinstance(addr, tuple) else str(addr)
            self.source = source_of(str(addr[0])) if isinstance(addr, tuple) else self.peer
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:  # the handshake is done: its certificate is known
                self.core.binding = self.server.tls_binding_of(ssl_object)
            self.server._attach(self)
            self._pump()
        except Exception as exc:
            # Only the loop's exception handler would hear of it, and the client would
            # wait on a connection nobody serves: log it, count it, and close this one.
            self.server.connection_failed("set up", exc)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.data_received(self.side, data)
            return
        self.core.receive_data(data, self.loop.time())
        self._pump()

    def eof_received(self) -> bool:
        if self.splice is not None:
            self.splice.eof_received(self.side)
            # Half-close: the other direction may still be running.
            return can_half_close(self.transport)
        self.core.receive_eof()
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.splice is not None:
            self.splice.connection_lost(self.side, exc)
        self.core.close("connection lost" if exc else "closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drained()
        self.server._detach(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.splice is not None:
            self.splice.pause_writing(self.side)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drained()
        if self.splice is not None:
            self.splice.resume_writing(self.side)

    def join(self, splice: Splice, side: int) -> None:
        """From now on this connection's bytes belong to `splice` (its reply is written)."""
        self.core.splice()
        self.splice = splice
        self.side = side
        self._rearm()
        if self.read_paused and self.transport is not None:
            # The splice decides about reading from here on.
            self.read_paused = False
            self.transport.resume_reading()

    # --- driving the core --------------------------------------------------------------
    def _pump(self) -> None:
        """Hand the core's events to the server, then write and re-arm the timer."""
        core = self.core
        while (ev := core.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                self.server._request(self, ev.request)
            elif isinstance(ev, AuthRequested):
                self.server._spawn(self.server._authenticate(self, ev))
            elif isinstance(ev, LinkRequested):
                self.server._spawn(self.server._link_in(self, ev))
            elif isinstance(ev, Closing):
                self._write_now()
                log.info(kv("conn.close", peer=self.peer, reason=ev.reason,
                            address=core.address or "-", bad_input=core.bad_input))
                if self.transport is not None:
                    if ev.abort:
                        self.transport.abort()
                    else:
                        self.transport.close()
        if core.bad_input != self._last_bad:
            self.server.bad_input += core.bad_input - self._last_bad
            self._last_bad = core.bad_input
            log.warning(kv("conn.bad_input", peer=self.peer, count=core.bad_input,
                           address=core.address or "-"))
        self.flush_soon()
        self._rearm()
        self._throttle()

    def flush_soon(self) -> None:
        """Coalesce pushes made during one loop iteration into a single write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._write_now)

    def _write_now(self) -> None:
        self._flush_scheduled = False
        data = self.core.data_to_send()
        t = self.transport
        if not data or t is None or t.is_closing():
            return
        t.write(data)
        self.server._unsent_now(self, t.get_write_buffer_size())

    def drop_slow(self, why: str) -> None:
        """Disconnect this reader: it let too much pile up (its queue stays queued)."""
        log.warning(kv("conn.slow_reader", peer=self.peer, address=self.core.address, why=why))
        self.server.slow_readers_dropped += 1
        self.core.close("slow reader")
        if self.transport is not None:
            self.transport.abort()

    def _throttle(self) -> None:
        # Stop reading while too many requests are in progress: bounds work per connection.
        t = self.transport
        if t is None or t.is_closing() or self.splice is not None:
            return
        busy = self.core.in_flight >= self.server.limits.max_in_flight
        if busy and not self.read_paused:
            self.read_paused = True
            t.pause_reading()
        elif not busy and self.read_paused:
            self.read_paused = False
            t.resume_reading()

    def _rearm(self) -> None:
        at = self.core.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self.loop.time())
        self._pump()

    def after_reply(self) -> None:
        """Called after the server answered a request of this connection."""
        self._pump()

    def replied(self) -> None:
        """`after_reply` for a plain reply: no event, state or timer can have changed."""
        self.flush_soon()
        if self.read_paused:
            self._throttle()

    async def drained(self) -> None:
        """Wait until the transport accepts more (or the connection is gone)."""
        if not self.write_paused or self.core.closed:
            return
        if self._drained is None:
            self._drained = self.loop.create_future()
        await self._drained

    def _wake_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None


class _Unbuilt(asyncio.Protocol):
    """Takes a connection whose `_Connection` could not be built, and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class RendezvousServer:
    """The rendezvous server of one domain, usable in-process (tests, simulator) or by the CLI.

    It owns `store` from `start()` on and closes it in `aclose()`.
    """

    def __init__(self, domain: str, store: Store, *, open_registration: bool = False,
                 limits: Limits | None = None, clock: Callable[[], float] = time.time,
                 new_nonce: Callable[[], bytes] = _new_nonce,
                 services: dict[str, ExtraService] | None = None, finger_open: bool = False,
                 domain_key: DomainKey | None = None, tls: ServerTls | None = None,
                 resolver: DomainResolver | object | None = _DEFAULT,
                 blocked_domains: frozenset[str] | set[str] = frozenset(),
                 rng: random.Random | None = None, bus: InstanceBus | None = None) -> None:
        """`rng` draws the outbound queue's backoff jitter. `domain_key` signs the server's half of
        every handshake (a throwaway key when None: in-process tests); `tls` makes the
        listener TLS 1.3 (None: plaintext, for the simulator and benchmarks), relay
        connections included. `resolver` finds other domains' servers and keys (default:
        DNS; None: no federation, foreign addresses are unknown as before);
        `blocked_domains` are refused links. `bus` shares presence and pushes with the
        domain's other instances on the same database (rendezvous/instances.py; default:
        this instance alone)."""
        self.domain = domain
        self.domain_key = domain_key or DomainKey.generate()
        self.tls = tls
        self.binding = tls.binding if tls is not None else b""
        # The binding of each certificate context a handshake may have used (the one the
        # listener was made with and every one `reload_tls` put in front since).
        self._tls_bindings: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = (
            weakref.WeakKeyDictionary())
        self.store = store
        self.bus: InstanceBus = bus or LocalBus()
        self.limits = limits or Limits()
        self.policy = RegistrationPolicy(open_registration, self.limits.max_devices_per_account)
        self.clock = clock
        self.new_nonce = new_nonce
        self.pipe_quota = pipe_quota(self.limits)
        self.finger_open = finger_open
        self._account_sessions: dict[str, int] = {}
        self._ip_sessions: dict[str, int] = {}
        self._unsent: dict[_Connection, int] = {}  # last seen write buffer, when > 0
        self.unsent_total = 0
        self.services: dict[str, ExtraService] = dict(services or {})
        self._relay: RelayRegistry[_Connection] | None = None
        self._connections: set[_Connection] = set()
        self._online: dict[bytes, list[_Connection]] = {}
        self._tasks = TaskSet("rendezvous-server", logger=log)
        self.resolver: DomainResolver | None = (
            default_resolver() if resolver is _DEFAULT else cast(DomainResolver | None, resolver))
        self.blocked_domains = frozenset(blocked_domains)
        self.federation: Federation | None = None
        if self.resolver is not None:
            self.federation = Federation(
                domain, self.domain_key, self.resolver, store, tls=tls is not None,
                clock=clock, expiry=self.limits.outbound_expiry,
                max_queued=self.limits.outbound_per_sender, rng=rng)
        self._link_buckets: dict[str, TokenBucket] = {}
        self._link_pipe_buckets: dict[str, TokenBucket] = {}  # PIPE/RELAY per linked domain
        if self.federation is not None:
            self.federation.on_link = self._linked_out
        self._links_in: dict[str, int] = {}  # linking domain -> live links
        self._storing: set[asyncio.Future[Any]] = set()  # SEND / REMOVE at the store
        self._server: asyncio.Server | None = None
        self._also: list[asyncio.Server] = []  # start(also=...): the other family's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.address: tuple[str, int] | None = None
        self.addresses: list[tuple[str, int]] = []
        # counters (see `snapshot`)
        self.bad_input = 0
        self.requests = 0
        self.sends = 0
        self.delivered = 0
        self.pipes_relayed = 0
        self.pipes_held = 0
        self.sessions_refused = 0
        self.sessions_replaced = 0  # ended at the device's new login (`_end_replaced`)
        self.slow_readers_dropped = 0
        self.links_accepted = 0
        self.links_refused = 0
        self.link_refused_alignment = 0
        self.link_refused_blocked = 0
        self.link_rate_limited = 0
        self.relay_invites_forwarded = 0
        self.dht_domains_joined = 0
        self.connections_failed = 0  # protocol not built or not set up (`connection_failed`)
        self._failures_logged: dict[tuple[str, str, str], float] = {}
        # Called with (verb, status, seconds from the decoded request to its reply) for
        # every answered request of a session (rendezvous/metrics.py); None: not timed.
        self.on_reply: Callable[[str, int, float], None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._loop

    @property
    def closing(self) -> bool:
        """True from the start of `aclose()` on."""
        return self._closing

    @property
    def relay(self) -> RelayRegistry[_Connection]:
        if self._relay is None:
            raise RuntimeError("server not started")
        return self._relay

    @property
    def service_ports(self) -> dict[str, int]:
        """The UDP port of each extra service, as announced in CHALLENGE."""
        return {name: svc.address[1] for name, svc in self.services.items()}

    def add_service(self, name: str, service: ExtraService) -> None:
        """Run `service` alongside (announced, counted, closed with the server)."""
        if name in self.services:
            raise ValueError(f"a service {name!r} is already there")
        self.services[name] = service

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    backlog: int = 4096, *, also: Sequence[str] = ()) -> tuple[str, int]:
        """Open the store, listen on host:port (0 picks a free port); return the bound address.

        `also`: more hosts to listen on at the same port (the other address family's, so
        that one server is reached over IPv4 and IPv6; `addresses` lists every one)."""
        self._loop = asyncio.get_running_loop()
        self._relay = RelayRegistry(self.limits, self._loop, self.clock)
        await self.store.open()
        ctx = self.tls.context if self.tls is not None else None
        if self.tls is not None and ctx is not None:
            self._tls_bindings[ctx] = self.tls.binding
            ctx.sni_callback = self._present_current_tls
        self._server = await self._loop.create_server(
            self._new_connection, host, port, backlog=backlog, ssl=ctx,
            ssl_handshake_timeout=self.limits.auth_timeout if ctx is not None else None)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self.addresses = [self.address]
        for other in also:
            extra = await self._loop.create_server(
                self._new_connection, other, sock[1], backlog=backlog, ssl=ctx,
                ssl_handshake_timeout=self.limits.auth_timeout if ctx is not None else None)
            self._also.append(extra)
            name = extra.sockets[0].getsockname()
            self.addresses.append((name[0], name[1]))
        self._spawn(self._sweep(), name="sweep")
        await self.bus.start(self, self.address)
        if self.federation is not None:
            await self.federation.start()
        log.info(kv("server.listening", domain=self.domain, host=sock[0], port=sock[1],
                    open_registration=self.policy.open_registration,
                    tls="1.3" if ctx is not None else "off",
                    domain_key=self.domain_key.fingerprint))
        return self.address

    def reload_tls(self, tls: ServerTls) -> None:
        """Present `tls`'s certificate in every TLS handshake from now on. Connections already
        up keep theirs, and each signs the binding of the certificate it was shown."""
        if self.tls is None:
            raise ValueError("a plaintext server has no certificate to replace")
        self._tls_bindings[tls.context] = tls.binding
        self.tls, self.binding = tls, tls.binding

    def _present_current_tls(self, ssl_object: ssl.SSLObject, server_name: str | None,
                             context: ssl.SSLContext) -> None:
        # OpenSSL calls this on every ClientHello, with or without a server name: the
        # listener's context is fixed when it is made, the certificate in front is not.
        del server_name, context
        if self.tls is not None and ssl_object.context is not self.tls.context:
            ssl_object.context = self.tls.context

    def tls_binding_of(self, ssl_object: ssl.SSLObject) -> bytes:
        """The channel binding of the certificate a finished handshake presented."""
        return self._tls_bindings.get(ssl_object.context, self.binding)

    async def __aenter__(self) -> RendezvousServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, finish requests in progress (bounded), close sessions and store."""
        if self._closing:
            return
        self._closing = True
        for listener in (self._server, *self._also):
            if listener is not None:
                listener.close()
        if self._relay is not None:
            self._relay.close()  # offered sessions refused, splices reset
        for conn in list(self._connections):
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.pause_reading()
        busy: list[asyncio.Future[Any]] = [t for t in self._tasks
                                           if t.get_name() not in ("sweep", "dns-check")]
        busy += self._storing
        if busy:
            await asyncio.wait(busy, timeout=_SHUTDOWN_GRACE)
        for task in self._tasks:
            task.cancel()
        for fut in list(self._storing):
            fut.cancel()  # answered "server shutting down" by `_stored`
        for conn in list(self._connections):
            conn.core.close("server shutting down")
            conn._pump()
        await self._tasks.aclose()
        await self.bus.aclose()
        if self.federation is not None:
            await self.federation.aclose()
        with contextlib.suppress(Exception):
            await self._save_relay_usage()
        for listener in (self._server, *self._also):
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.wait_closed(), 2.0)
        await self.store.aclose()
        for name, svc in self.services.items():
            try:
                await svc.aclose()
            except Exception:
                log.exception(kv("service.close_failed", service=name))
        log.info(kv("server.closed", domain=self.domain))

    def snapshot(self) -> dict[str, Any]:
        """Live figures for `stats`: sessions, devices online, counters."""
        return {
            "domain": self.domain,
            "listening": format_hostport(*self.address) if self.address else None,
            "connections": len(self._connections),
            "online_sessions": sum(len(v) for v in self._online.values()),
            "online_devices": len(self._online),
            "requests": self.requests,
            "sends": self.sends,
            "delivered": self.delivered,
            "pipes_relayed": self.pipes_relayed,
            "pipes_held": self.pipes_held,
            "sessions_refused": self.sessions_refused,
            "sessions_replaced": self.sessions_replaced,
            "slow_readers_dropped": self.slow_readers_dropped,
            "unsent_bytes": self.unsent_total,
            "bad_input": self.bad_input,
            "links_in": sum(self._links_in.values()),
            "links_accepted": self.links_accepted,
            "links_refused": self.links_refused,
            "link_refused_alignment": self.link_refused_alignment,
            "link_refused_blocked": self.link_refused_blocked,
            "link_rate_limited": self.link_rate_limited,
            "relay_invites_forwarded": self.relay_invites_forwarded,
            "dht_domains_joined": self.dht_domains_joined,
            "connections_failed": self.connections_failed,
            **self.bus.snapshot(),
            **(self.federation.snapshot() if self.federation is not None else {}),
            **(self._relay.snapshot() if self._relay is not None else {}),
            **{f"{name}_{key.replace('.', '_')}": value
               for name, svc in self.services.items() for key, value in svc.stats().items()},
        }

    def is_online(self, peer_id: bytes) -> bool:
        return peer_id in self._online

    def reconfigure(self, limits: Limits, *, blocked_domains: frozenset[str] | set[str],
                    finger_open: bool, open_registration: bool) -> None:
        """New limits and policy without dropping a session (`serve` does it on SIGHUP).

        Server-wide checks (session caps, quotas, push buffers, relay caps of accounts not
        yet metered, link rates, blocked domains, registration) use them at once; a live
        connection keeps the per-connection bounds it started with (request rate, frame
        and envelope sizes).
        """
        self.limits = limits
        self.policy = RegistrationPolicy(open_registration, limits.max_devices_per_account)
        self.pipe_quota = pipe_quota(limits)
        self.finger_open = finger_open
        self.blocked_domains = frozenset(blocked_domains)
        self._link_buckets.clear()
        self._link_pipe_buckets.clear()
        if self._relay is not None:
            self._relay.limits = limits
        if self.federation is not None:
            self.federation.expiry = limits.outbound_expiry
            self.federation.max_queued = limits.outbound_per_sender

    async def reread_accounts(self) -> int:
        """Re-read accounts and devices an operator changed in the file (`accounts
        delete`, `devices revoke`): the store drops its caches, and sessions of devices no
        longer bound end. Returns how many sessions ended."""
        ended = 0
        still = await self.store.reread_accounts(list(self._online))
        for peer_id, conns in list(self._online.items()):
            if peer_id in still:
                continue
            for conn in list(conns):
                conn.core.close("this device was removed by the server's operator")
                conn._pump()
                ended += 1
        return ended

    # --- connections -----------------------------------------------------------------
    def _new_connection(self) -> asyncio.Protocol:
        """The listener's protocol factory. It must not raise: uvloop stops accepting on
        the listener for good when a factory raises, and asyncio's default loop drops the
        connection without a word (outside debug mode)."""
        try:
            return _Connection(self)
        except Exception as exc:
            self.connection_failed("build", exc)
            return _Unbuilt()

    def connection_failed(self, stage: str, exc: Exception) -> None:
        """A connection's protocol could not be built or set up (a bug, not the client's
        doing): count it, and log it with its traceback once a minute per distinct error."""
        self.connections_failed += 1
        key = (stage, type(exc).__name__, str(exc))
        now = self.loop.time()
        last = self._failures_logged.get(key)
        if last is not None and now - last < _FAILURE_LOG_EVERY:
            return
        if len(self._failures_logged) >= _FAILURES_REMEMBERED:
            self._failures_logged.clear()
        self._failures_logged[key] = now
        log.error(kv("conn.failed", stage=stage, error=f"{type(exc).__name__}: {exc}",
                     failed=self.connections_failed), exc_info=exc)

    def _attach(self, conn: _Connection) -> None:
        if self._closing:
            if conn.transport is not None:
                conn.transport.abort()
            return
        self._connections.add(conn)
        log.debug(kv("conn.open", peer=conn.peer))

    def _detach(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self.unsent_total -= self._unsent.pop(conn, 0)
        if conn.core.relay and self._relay is not None:
            self._relay.withdraw_caller(conn)
        if (linked := conn.core.link_domain) is not None:
            left = self._links_in.get(linked, 0) - 1
            if left > 0:
                self._links_in[linked] = left
            else:
                self._links_in.pop(linked, None)
        peer_id = conn.core.peer_id
        if peer_id is None:
            return
        sessions = self._online.get(peer_id)
        if sessions and conn in sessions:
            sessions.remove(conn)
            self._count_session(conn, -1)
            if not sessions:
                del self._online[peer_id]
                self.bus.session_down(peer_id)
                if not self._closing:
                    self._spawn(self._touch(peer_id))

    # --- bounds on sessions and unsent pushes ------------------------------------------
    def _session_refusal(self, conn: _Connection, address: str, peer_id: bytes) -> str | None:
        """Why one more live session for this device, account and IP is refused (or None)."""
        lim = self.limits
        n = len(self._online.get(peer_id, ()))
        if lim.sessions_per_device and n >= lim.sessions_per_device:
            return f"this device already has {n} sessions, the limit; close one first"
        n = self._account_sessions.get(address, 0)
        if lim.sessions_per_account and n >= lim.sessions_per_account:
            return f"{address} already has {n} sessions, the limit; close one first"
        n = self._ip_sessions.get(conn.source, 0)
        if lim.sessions_per_ip and n >= lim.sessions_per_ip:
            return f"{n} sessions are already open from {source_label(conn.source)}, the limit"
        return None

    def _end_replaced(self, conn: _Connection, peer_id: bytes, nonce: bytes) -> None:
        """The device logs in again in place of its session named `nonce`, which it lost
        (it moved, or woke from sleep behind a NAT that forgot the session): end that one
        now, before the cap on sessions counts it. Waiting for the keepalive would keep
        it up to 45 s, pushing into a connection nobody reads."""
        for old in list(self._online.get(peer_id, ())):
            if old is conn or old.client_nonce != nonce:
                continue
            old.core.close(f"replaced by the device's new session from {conn.peer}",
                           abort=True)
            old._pump()  # logs conn.close and aborts the transport
            self._detach(old)  # at once: connection_lost comes a loop turn later
            self.sessions_replaced += 1

    def _count_session(self, conn: _Connection, delta: int) -> None:
        for counts, key in ((self._account_sessions, conn.core.address or ""),
                            (self._ip_sessions, conn.source)):
            left = counts.get(key, 0) + delta
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def _go_online(self, conn: _Connection, peer_id: bytes) -> None:
        self._online.setdefault(peer_id, []).append(conn)
        self._count_session(conn, 1)

    def _unsent_now(self, conn: _Connection, size: int) -> None:
        """`conn` has `size` bytes unsent after a write: enforce both push-buffer bounds.

        Buffers only shrink between writes, so the figures kept are upper bounds; they are
        read afresh only when their sum passes `push_buffer_total`.
        """
        lim = self.limits
        self.unsent_total += size - self._unsent.pop(conn, 0)
        if size > lim.max_push_buffer:
            conn.drop_slow(f"{size} bytes unsent, over {lim.max_push_buffer}")
            return
        if size:
            self._unsent[conn] = size
        if self.unsent_total <= lim.push_buffer_total:
            return
        for c in list(self._unsent):
            t = c.transport
            now = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
            if now:
                self._unsent[c] = now
            else:
                del self._unsent[c]
        self.unsent_total = sum(self._unsent.values())
        # The slowest readers (most unsent) go first, until the total is back under.
        for c in sorted(self._unsent, key=self._unsent.__getitem__, reverse=True):
            if self.unsent_total <= lim.push_buffer_total:
                break
            self.unsent_total -= self._unsent.pop(c)
            c.drop_slow(f"{self.unsent_total} bytes unsent by all sessions, over "
                        f"{lim.push_buffer_total}")

    async def _touch(self, peer_id: bytes) -> None:
        try:
            await self.store.touch(peer_id, self.clock())
        except RuntimeError:  # store closed during shutdown
            pass
        except Exception as exc:
            # When the device was last seen: soft state, the next login writes it.
            if _storage_trouble(exc, "touch") is None:
                raise

    def check_own_records(self, port: int) -> None:
        """Look up this domain's records once, in the background, and log what they say
        of this server (`dns.check`: a warning when nodes or other domains could not reach
        or would refuse it). `port`: the one this server listens on."""
        resolver = self.resolver
        if resolver is None:
            return

        async def check(key: bytes) -> None:
            try:
                async with asyncio.timeout(30):
                    problem, text = await own_records_problem(resolver, self.domain, key,
                                                              port)
            except TimeoutError:
                problem, text = True, "no answer from DNS within 30 s"
            (log.warning if problem else log.info)(kv("dns.check", domain=self.domain,
                                                      result=text))

        self._spawn(check(self.domain_key.public), name="dns-check")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        if self._tasks.closed:  # a request that raced shutdown: nobody is left to answer
            coro.close()
            return
        self._tasks.spawn(coro, name=name)

    # --- authentication --------------------------------------------------------------
    async def _authenticate(self, conn: _Connection, ev: AuthRequested) -> None:
        req = ev.request
        core = conn.core
        if req.relay and domain_of(req.address) != self.domain:
            # The callee of a caller here (module doc): no account here, no store lookup.
            if self.federation is None:
                core.reject_auth(req.id, Status.FORBIDDEN,
                                 f"address {req.address} is not served here (domain "
                                 f"{self.domain})")
            else:
                core.accept_auth(req.id, req.address, req.verify_key,
                                 {"address": req.address, "peer_id": ev.peer_id,
                                  "registered": False}, relay=True)
                log.debug(kv("auth.relay_foreign", peer=conn.peer, address=req.address))
            conn.after_reply()
            return
        if req.advertise is not None and (why := self._advertise_too_big(req.advertise)):
            core.reject_auth(req.id, Status.TOO_LARGE, why)
            conn.after_reply()
            return
        def authenticate(record: bool) -> Awaitable[AuthOutcome]:
            return self.store.authenticate(
                req.address, req.verify_key, register=req.register, invite=req.invite,
                advertise=req.advertise, now=self.clock(), policy=self.policy,
                page=0 if req.relay else self.limits.flush_page, vouch=req.vouch,
                record=record)

        try:
            try:
                outcome = await authenticate(True)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                # Last seen and the advertisement are soft state: let a known device in
                # without them, so its queued mail still reaches it while the disk is full.
                log.error(kv("storage.full", peer=conn.peer, verb=req.TAG, error=str(exc)))
                outcome = await authenticate(False)
        except Exception as exc:
            if is_disk_full(exc):  # logged above
                core.reject_auth(req.id, Status.UNAVAILABLE, STORAGE_FULL)
            elif (trouble := _storage_trouble(exc, req.TAG, peer=conn.peer)) is not None:
                core.reject_auth(req.id, Status.UNAVAILABLE, trouble)
            else:
                log.exception(kv("auth.store_failed", peer=conn.peer))
                core.reject_auth(req.id, Status.SERVER_ERROR,
                                 "server error while authenticating")
            conn.after_reply()
            return
        if outcome.status != Status.OK:
            log.info(kv("auth.refused", peer=conn.peer, address=req.address,
                        status=int(outcome.status), text=outcome.text))
            core.reject_auth(req.id, outcome.status, outcome.text)
            conn.after_reply()
            return
        if core.closed:
            return
        if req.replaces is not None and not req.relay:
            self._end_replaced(conn, ev.peer_id, req.replaces)
        if not req.relay and (why := self._session_refusal(conn, req.address, ev.peer_id)):
            self.sessions_refused += 1
            log.info(kv("auth.refused", peer=conn.peer, address=req.address,
                        status=int(Status.RATE_LIMITED), text=why))
            core.reject_auth(req.id, Status.RATE_LIMITED, why)
            conn.after_reply()
            return
        core.accept_auth(req.id, req.address, req.verify_key,
                         {"address": req.address, "peer_id": ev.peer_id,
                          "registered": outcome.created}, relay=req.relay)
        if req.relay:
            # One relayed stream, not a session: not online, no queue, no pushes.
            log.debug(kv("auth.relay", peer=conn.peer, address=req.address))
            conn.after_reply()
            return
        conn.client_nonce = req.client_nonce
        self._go_online(conn, ev.peer_id)
        conn.flush_hi = outcome.hi
        if self.bus.shared:
            conn.flushed = {q.seq for q in outcome.first_page}
            self.loop.call_later(_LATE_COMMIT, setattr, conn, "flushed", None)
        if announced := self.bus.session_up(ev.peer_id, outcome.hi):
            self._spawn(self._bus_deliver_quiet(ev.peer_id, announced, conn))
        log.info(kv("auth.ok", peer=conn.peer, address=req.address, device=ev.peer_id,
                    registered=outcome.created, queued_first_page=len(outcome.first_page)))
        for queued in outcome.first_page:
            core.deliver(queued.envelope)
        self.delivered += len(outcome.first_page)
        conn.after_reply()
        await self._deliver_held(ev.peer_id)
        if len(outcome.first_page) >= self.limits.flush_page:
            await self._flush_queue(conn, outcome.first_page[-1].seq, outcome.hi)

    async def _deliver_held(self, device: bytes) -> None:
        """Push the PIPE messages held for `device` to its live sessions."""
        sessions = self._online.get(device)
        if not sessions:
            return
        held = await self.store.take_pipes(device, self.clock())
        sessions = self._online.get(device)
        if not sessions:  # gone meanwhile: keep them for the next login
            for msg in held:
                await self.store.hold_pipe(device, msg, self.clock() + self.limits.max_pipe_hold,
                                           self.clock(), self.pipe_quota)
            return
        for conn in sessions:
            for msg in held:
                conn.core.pipe(msg)
            conn.flush_soon()

    async def _flush_queue(self, conn: _Connection, cursor: int, hi: int) -> None:
        """Deliver the rest of the queue read at authentication, page by page."""
        peer_id = conn.core.peer_id
        if peer_id is None:
            return
        while cursor < hi and not conn.core.closed:
            await conn.drained()
            page = await self.store.pending(peer_id, cursor, hi, self.limits.flush_page,
                                            self.clock())
            if not page:
                break
            flushed = conn.flushed
            for queued in page:
                if flushed is not None:
                    if queued.seq in flushed:
                        continue  # pushed meanwhile from another instance's event
                    flushed.add(queued.seq)
                conn.core.deliver(queued.envelope)
                self.delivered += 1
            cursor = page[-1].seq
            conn.flush_soon()

    # --- requests ----------------------------------------------------------------------
    def _request(self, conn: _Connection, req: Request) -> None:
        """Start answering a request of an authenticated session.

        SEND and REMOVE, most of the traffic, take no task: the store's future gets a
        callback that replies (`_stored`). The other verbs run as a task (`_handle`).
        """
        self.requests += 1
        t0 = self.loop.time() if self.on_reply is not None else 0.0
        peer_id = conn.core.peer_id
        address = conn.core.address
        if (isinstance(req, Send) and self.federation is not None and address is not None
                and any(domain_of(i.to) != self.domain for i in req.items)):
            self._spawn(self._handle(conn, req, t0))  # foreign recipients: `_send_mixed`
            return
        if peer_id is None or address is None or not isinstance(req, Send | Remove):
            self._spawn(self._handle(conn, req, t0))
            return
        pending: Awaitable[EnqueueOutcome | bool]
        try:
            if isinstance(req, Send):
                lim = self.limits
                now = self.clock()
                pending = self.store.enqueue(address, req, now, now + lim.envelope_ttl,
                                             Quota(lim.quota_count, lim.quota_bytes,
                                                   lim.sender_quota_count,
                                                   lim.sender_quota_bytes))
            else:
                pending = self.store.remove(peer_id, req.message_id)
            fut = (pending if isinstance(pending, asyncio.Future)
                   else asyncio.ensure_future(pending, loop=self.loop))
        except Exception as exc:
            self._answer(conn, req, self._failed(conn, req, exc), t0)
            return
        self._storing.add(fut)
        fut.add_done_callback(functools.partial(self._stored, conn, req, t0))

    def _stored(self, conn: _Connection, req: Send | Remove, t0: float,
                fut: asyncio.Future[Any]) -> None:
        self._storing.discard(fut)
        result: Result
        if fut.cancelled():
            result = (Status.UNAVAILABLE, "server shutting down", None)
        elif (exc := fut.exception()) is not None:
            result = self._failed(conn, req, exc)
        elif isinstance(req, Send):
            try:
                result = self._sent(fut.result())
            except Exception as err:  # as `_handle` does: every request gets its answer
                result = self._failed(conn, req, err)
        else:
            result = (Status.OK, "removed" if fut.result() else "not queued (removed or expired)",
                      None)
        self._answer(conn, req, result, t0)

    def _answer(self, conn: _Connection, req: Request, result: Result, t0: float) -> None:
        conn.core.reply(req.id, *result)
        conn.replied()
        if self.on_reply is not None:
            self.on_reply(req.TAG, result[0], self.loop.time() - t0)

    def _failed(self, conn: _Connection, req: Request, exc: BaseException) -> Result:
        """The reply to a request whose handling raised `exc`."""
        if isinstance(exc, ValueError):  # a DecodeError from a validator
            return Status.BAD_REQUEST, str(exc), None
        if self._closing:
            return Status.UNAVAILABLE, "server shutting down", None
        if (trouble := _storage_trouble(exc, req.TAG, peer=conn.peer)) is not None:
            return Status.UNAVAILABLE, trouble, None  # nothing was stored
        log.error(kv("request.failed", peer=conn.peer, verb=req.TAG), exc_info=exc)
        return Status.SERVER_ERROR, "internal error", None

    async def _handle(self, conn: _Connection, req: Request, t0: float = 0.0) -> None:
        try:
            result = await self._dispatch(conn, req)
            if result is _REPLIED:
                return
        except asyncio.CancelledError:
            conn.core.reply(req.id, Status.UNAVAILABLE, "server shutting down")
            conn.after_reply()
            raise
        except Exception as exc:
            result = self._failed(conn, req, exc)
        conn.core.reply(req.id, *result)
        conn.after_reply()
        if self.on_reply is not None:
            self.on_reply(req.TAG, result[0], self.loop.time() - t0)

    async def _dispatch(self, conn: _Connection, req: Request) -> Result:
        core = conn.core
        if core.link_domain is not None:
            return await self._link_request(core.link_domain, req)
        peer_id = core.peer_id
        address = core.address
        if peer_id is None or address is None:
            return Status.UNAUTHORIZED, "authenticate first", None
        if isinstance(req, Send):
            return await self._send_mixed(address, req)
        if isinstance(req, Withdraw):
            here, outbound = await self.store.withdraw(address, req.message_id)
            log.info(kv("server.withdrawn", sender=address, mid=req.message_id.hex(),
                        queued=here, outbound=outbound))
            return Status.OK, None, {"queued": here, "outbound": outbound}
        if isinstance(req, Track):
            states = await self.store.track(address, req.message_id)
            return Status.OK, None, {"domain": self.domain,
                                     "recipients": [st.to_wire() for st in states]}
        if isinstance(req, List):
            rows = await self.store.list_infos(peer_id, req.after, req.limit, self.clock())
            more = len(rows) >= req.limit
            return Status.OK, None, {"items": [r.info.to_wire() for r in rows],
                                     "next": rows[-1].seq if more else None}
        if isinstance(req, Retrieve):
            env = await self.store.retrieve(peer_id, req.message_id, self.clock())
            if env is None:
                return Status.NOT_FOUND, f"no queued envelope {req.message_id.hex()}", None
            return Status.OK, None, {"env": env.to_wire()}
        if isinstance(req, Finger):
            if self.federation is not None and domain_of(req.address) != self.domain:
                return await self.federation.finger(address, req.address)
            return await self._finger(address, req.address)
        if isinstance(req, Pipe):
            if self.federation is not None and domain_of(req.to) != self.domain:
                return await self.federation.pipe(address, peer_id, req)
            return await self._pipe(req, address, peer_id)
        if isinstance(req, Relay):
            return await self._relay_offer(conn, req, address, peer_id)
        if isinstance(req, RelayAccept):
            return self._relay_accept(conn, req, peer_id)
        if isinstance(req, Advertise):
            if why := self._advertise_too_big(req.advertise):
                return Status.TOO_LARGE, why, None
            await self.store.set_advertise(peer_id, req.advertise)
            return Status.OK, "advertised", None
        return Status.BAD_REQUEST, f"{req.TAG} is not handled here", None

    # --- federation --------------------------------------------------------------------
    async def _send_mixed(self, sender: str, req: Send) -> Result:
        """A node's SEND with foreign recipients: the local items into the queue, the
        foreign ones into the outbound queue, acknowledged once both are committed (a
        retry after a failure stores neither twice)."""
        fed = self.federation
        if fed is None:
            return Status.NOT_FOUND, "this server does not forward to other domains", None
        local = tuple(i for i in req.items if domain_of(i.to) == self.domain)
        foreign = tuple(i for i in req.items if domain_of(i.to) != self.domain)
        stored = 0
        if local:
            lim = self.limits
            now = self.clock()
            outcome = await self.store.enqueue(
                sender, Send(req.id, req.message_id, req.priority, local), now,
                now + lim.envelope_ttl,
                Quota(lim.quota_count, lim.quota_bytes, lim.sender_quota_count,
                      lim.sender_quota_bytes))
            status, text, body = self._sent(outcome)
            if status != Status.OK:
                return status, text, body
            stored = len(outcome.stored)
        refusal = await fed.queue(sender, Send(req.id, req.message_id, req.priority, foreign))
        if refusal is not None:
            return Status.QUOTA, refusal, None
        self.sends += 0 if local else 1
        return Status.OK, "stored", {"stored": stored, "queued": len(foreign)}

    async def _link_in(self, conn: _Connection, ev: LinkRequested) -> None:
        """A LINK: check the linking domain's signature under its key from DNS."""
        req, core = ev.request, conn.core
        domain = req.domain
        refusal: tuple[Status, str] | None = None
        key: bytes | None = None
        lim = self.limits
        if domain in self.blocked_domains:
            self.link_refused_blocked += 1
            refusal = (Status.FORBIDDEN, f"links and mail from {domain} are refused here")
        elif self.resolver is None:
            refusal = (Status.FORBIDDEN, f"{self.domain} takes no server links")
        elif lim.links_per_domain and self._links_in.get(domain, 0) >= lim.links_per_domain:
            refusal = (Status.RATE_LIMITED,
                       f"{domain} already has {lim.links_per_domain} links here, the limit")
        else:
            try:
                key = (await self.resolver.resolve(domain)).key
            except DomainLookupError as exc:
                refusal = (Status.UNAUTHORIZED, f"cannot check {domain}'s domain key: {exc}")
            except Exception as exc:
                log.warning(kv("link.lookup_failed", domain=domain), exc_info=exc)
                refusal = (Status.UNAVAILABLE, f"cannot look {domain} up right now")
        if core.finish_link(req, ev.nonce, key, refusal):
            self.links_accepted += 1
            self._links_in[domain] = self._links_in.get(domain, 0) + 1
            log.info(kv("link.in", peer=conn.peer, domain=domain))
        elif not core.closed:
            self.links_refused += 1
            log.warning(kv("link.refused", peer=conn.peer, domain=domain,
                           reason=refusal[1] if refusal else "signature does not verify "
                           "under the domain key published in DNS"))
        conn.after_reply()

    async def _link_request(self, linked: str, req: Request) -> Result:
        """SEND or FINGER over a link from `linked` (the core lets nothing else in)."""
        if linked in self.blocked_domains:
            self.link_refused_blocked += 1
            return Status.FORBIDDEN, f"mail from {linked} is refused here", None
        if isinstance(req, Finger) and req.asker is not None:
            if domain_of(req.asker) != linked or domain_of(req.address) != self.domain:
                self.link_refused_alignment += 1
                return (Status.FORBIDDEN, f"a link from {linked} may FINGER addresses of "
                        f"{self.domain} for askers of {linked} only", None)
            return await self._finger(req.asker, req.address)
        if isinstance(req, Pipe | Relay):
            return await self._link_pipe_or_relay(linked, req)
        if not isinstance(req, Send) or req.sender is None:
            return Status.BAD_REQUEST, f"{req.TAG} is not carried over a server link", None
        if domain_of(req.sender) != linked:
            self.link_refused_alignment += 1
            log.warning(kv("link.alignment", domain=linked, sender=req.sender))
            return (Status.FORBIDDEN, f"sender {req.sender} is not of the linking domain "
                    f"{linked}", None)
        for item in req.items:
            if domain_of(item.to) != self.domain:
                self.link_refused_alignment += 1
                log.warning(kv("link.alignment", domain=linked, recipient=item.to))
                return (Status.FORBIDDEN, f"recipient {item.to} is not of {self.domain}",
                        None)
        lim = self.limits
        if lim.link_rate:
            bucket = self._link_buckets.get(linked)
            if bucket is None:
                if len(self._link_buckets) >= 10_000:
                    self._link_buckets.clear()
                bucket = self._link_buckets[linked] = TokenBucket(
                    lim.link_rate, max(lim.link_burst, lim.max_items_per_send),
                    self.loop.time())
            if not bucket.take(len(req.items), self.loop.time()):
                self.link_rate_limited += 1
                return (Status.RATE_LIMITED, f"too many envelopes from {linked}: limit "
                        f"{lim.link_rate:g} per second", None)
        now = self.clock()
        outcome = await self.store.enqueue_forwarded(
            req.sender, req, now, now + lim.envelope_ttl,
            Quota(lim.quota_count, lim.quota_bytes, lim.sender_quota_count,
                  lim.sender_quota_bytes, lim.link_quota_count, lim.link_quota_bytes))
        return self._sent(outcome)

    async def _link_pipe_or_relay(self, linked: str, req: Pipe | Relay) -> Result:
        """PIPE or RELAY over a link from `linked`: aligned, rate-limited, then as local."""
        sender, sender_device = req.sender, req.sender_device
        if sender is None or sender_device is None:
            return Status.BAD_REQUEST, f"a forwarded {req.TAG} names its sender", None
        if domain_of(sender) != linked or domain_of(req.to) != self.domain:
            self.link_refused_alignment += 1
            log.warning(kv("link.alignment", domain=linked, sender=sender, to=req.to))
            return (Status.FORBIDDEN, f"a link from {linked} may carry {req.TAG} from "
                    f"senders of {linked} to addresses of {self.domain} only", None)
        lim = self.limits
        if lim.link_rate:
            bucket = self._link_pipe_buckets.get(linked)
            if bucket is None:
                if len(self._link_pipe_buckets) >= 10_000:
                    self._link_pipe_buckets.clear()
                bucket = self._link_pipe_buckets[linked] = TokenBucket(
                    lim.link_rate, lim.link_burst, self.loop.time())
            if not bucket.take(1, self.loop.time()):
                self.link_rate_limited += 1
                return (Status.RATE_LIMITED, f"too many PIPE/RELAY requests from {linked}: "
                        f"limit {lim.link_rate:g} per second", None)
        if isinstance(req, Pipe):
            return await self._pipe(req, sender, sender_device)
        return await self._relay_invite_here(linked, req, sender, sender_device)

    async def _relay_invite_here(self, linked: str, req: Relay, caller: str,
                                 caller_device: bytes) -> Result:
        """Invite our device to the splice `linked`'s server hosts (module doc)."""
        records = await self.store.devices(req.to)
        if records is None:
            return Status.NOT_FOUND, f"no such address: {req.to}", None
        if req.device not in {r.peer_id for r in records}:
            return Status.NOT_FOUND, f"device {req.device.hex()} is not bound to {req.to}", None
        sessions = self._online.get(req.device)
        if not sessions and not await self.bus.online_elsewhere([req.device]):
            return (Status.NOT_ONLINE,
                    f"{req.to} device {req.device.hex()[:12]} is not online", None)
        if self.resolver is None:
            return Status.FORBIDDEN, f"{self.domain} takes no server links", None
        try:
            found = await self.resolver.resolve(linked)
        except DomainLookupError as exc:
            return Status.UNAVAILABLE, f"cannot find {linked}'s server: {exc}", None
        if not found.servers:
            return Status.UNAVAILABLE, f"{linked} lists no server", None
        host, port = found.servers[0]
        if req.via_host is not None and req.via_port is not None \
                and (req.via_host, req.via_port) in found.servers:
            host, port = req.via_host, req.via_port  # the caller's instance (module doc)
        invite = RelayInvite(caller, caller_device, req.session, host, port, found.key)
        if not self.bus_relay_invite(req.device, invite):
            self.bus.relay_invite(req.device, invite)  # its session is on another instance
        self.relay_invites_forwarded += 1
        return Status.OK, "invited", None

    def _linked_out(self, domain: str, host: str, challenge: Challenge) -> None:
        """A link to `domain` came up: our DHT bootstrap node joins the remote's."""
        dht, port = self.services.get("dht"), challenge.dht
        join = getattr(dht, "bootstrap", None)
        if port is None or not callable(join):
            return
        log.info(kv("dht.join_domain", domain=domain, host=host, port=port))
        self._spawn(self._join_dht(join, domain, host, port), name=f"dht-join {domain}")

    async def _join_dht(self, join: Callable[[list[tuple[str, int]]], Awaitable[int]],
                        domain: str, host: str, port: int) -> None:
        try:
            size = await join([(host, port)])
        except Exception as exc:
            log.warning(kv("dht.join_failed", domain=domain, error=str(exc) or repr(exc)))
            return
        self.dht_domains_joined += 1
        log.info(kv("dht.joined_domain", domain=domain, contacts=size))

    def _advertise_too_big(self, advertise: dict[str, Any]) -> str | None:
        size = len(packb(advertise))
        if size > self.limits.max_advertise:
            return f"advertisement of {size} bytes over the limit {self.limits.max_advertise}"
        return None

    def _sent(self, outcome: EnqueueOutcome) -> Result:
        """The reply to a SEND the store has answered; push what it stored."""
        if outcome.status != Status.OK:
            return outcome.status, outcome.text, None
        self.sends += 1
        for queued in outcome.stored:
            self._push_envelope(queued)
        self.bus.stored(outcome.stored)
        return Status.OK, "stored", {"stored": len(outcome.stored)}

    def _push_envelope(self, queued: QueuedEnvelope) -> None:
        for conn in self._online.get(queued.envelope.device, ()):
            # seq <= flush_hi: that session's queue flush delivers it (see module doc).
            if queued.seq > conn.flush_hi:
                conn.core.deliver(queued.envelope)
                self.delivered += 1
                conn.flush_soon()

    async def _finger(self, asker: str, address: str) -> Result:
        """Keys for anyone; presence and reachability as the module doc says."""
        view = await self.store.finger(asker, address)
        records = view.devices
        if records is None:
            return Status.NOT_FOUND, f"no such address: {address}", None
        if not (view.exchanged or self.finger_open):
            return Status.OK, None, FingerResult(address, tuple(
                DeviceInfo(r.verify_key, False, None, {}, r.vouch) for r in records)).to_wire()
        now = self.clock()
        online = {r.peer_id for r in records if self.is_online(r.peer_id)}
        online.update(await self.bus.online_elsewhere(
            [r.peer_id for r in records if r.peer_id not in online]))
        devices = tuple(
            DeviceInfo(r.verify_key, r.peer_id in online,
                       now if r.peer_id in online else r.last_seen, r.advertise, r.vouch)
            for r in records)
        return Status.OK, None, FingerResult(address, devices).to_wire()

    async def _pipe(self, req: Pipe, sender: str, sender_device: bytes) -> Result:
        records = await self.store.devices(req.to)
        if records is None:
            return Status.NOT_FOUND, f"no such address: {req.to}", None
        targets = [r.peer_id for r in records]
        if req.device is not None:
            if req.device not in targets:
                return Status.NOT_FOUND, f"device {req.device.hex()} is not bound to {req.to}", None
            targets = [req.device]
        msg = PipeMessage(sender, sender_device, req.payload)
        online = [d for d in targets if d in self._online]
        # Devices with a session on another instance: the message goes through the hold,
        # which that instance takes at once (rendezvous/instances.py).
        elsewhere = [d for d in await self.bus.online_elsewhere(
            [d for d in targets if d not in self._online]) if d not in self._online]
        for device in online:
            for conn in self._online[device]:
                conn.core.pipe(msg)
                conn.flush_soon()
        if elsewhere:
            now = self.clock()
            transit = min(max(req.hold_ms / 1000, _PIPE_TRANSIT), self.limits.max_pipe_hold)
            for device in elsewhere:
                refusal = await self.store.hold_pipe(device, msg, now + transit, now,
                                                     self.pipe_quota)
                if refusal is not None:
                    return Status.QUOTA, refusal, None
            self.bus.pipes_held(elsewhere)
        if online or elsewhere:
            self.pipes_relayed += 1
            n = len(online) + len(elsewhere)
            return Status.OK, f"relayed to {n} device(s)", {"relayed": n}
        if req.hold_ms <= 0:
            return Status.NOT_ONLINE, f"{req.to} has no device online", None
        now = self.clock()
        hold = min(req.hold_ms / 1000, self.limits.max_pipe_hold)
        for device in targets:
            refusal = await self.store.hold_pipe(device, msg, now + hold, now, self.pipe_quota)
            if refusal is not None:
                return Status.QUOTA, refusal, None
            self.pipes_held += 1
            if device in self._online:  # logged in while the hold was being stored
                await self._deliver_held(device)
        self.bus.pipes_held(targets)  # a session that began on another instance meanwhile
        return Status.OK, f"held for {len(targets)} device(s)", {"held": len(targets)}

    # --- the relay (relay.py) ------------------------------------------------------------
    async def _relay_offer(self, conn: _Connection, req: Relay, caller: str,
                           caller_device: bytes) -> Result:
        """RELAY: invite the callee device, then wait (bounded) for its RELAY-ACCEPT."""
        relay = self.relay
        if relay.needs_restore(caller):
            day = relay.day()
            used = await self.store.relay_usage(caller, day)
            if relay.needs_restore(caller):
                relay.restore(caller, day, used)
        if domain_of(caller) != self.domain:
            return (Status.FORBIDDEN, "a relay connection of another domain may only "
                    "RELAY-ACCEPT here", None)
        if refusal := relay.refusal(caller, req.session):
            return (*refusal, None)
        if req.device == caller_device:
            return Status.BAD_REQUEST, "a device can't relay to itself", None
        foreign = domain_of(req.to) != self.domain
        sessions: list[_Connection] = []
        if not foreign:
            records = await self.store.devices(req.to)
            if records is None:
                return Status.NOT_FOUND, f"no such address: {req.to}", None
            if req.device not in {r.peer_id for r in records}:
                return (Status.NOT_FOUND, f"device {req.device.hex()} is not bound to "
                        f"{req.to}", None)
            sessions = self._online.get(req.device, [])
            if not sessions and not await self.bus.online_elsewhere([req.device]):
                return (Status.NOT_ONLINE,
                        f"{req.to} device {req.device.hex()[:12]} is not online", None)
        elif self.federation is None:
            return Status.NOT_FOUND, "this server does not forward to other domains", None
        # The store lookup yielded to the loop: ask again before registering.
        if refusal := relay.refusal(caller, req.session):
            return (*refusal, None)
        pending: PendingRelay[_Connection] = PendingRelay(
            req.session, conn, caller, caller_device, req.to, req.device, req.id,
            self.loop.create_future())
        relay.offer(pending)
        wait = self.limits.relay_accept_timeout
        if foreign and self.federation is not None:
            # Registered first: the callee may join before the link's answer is back.
            try:
                status, text, _ = await self.federation.relay_invite(
                    caller, caller_device, req, self.bus.address or self.address)
            except BaseException:
                relay.withdraw(pending, (Status.UNAVAILABLE, "server shutting down"))
                raise
            if status != Status.OK:
                relay.withdraw(pending, (status, text or ""))
                if pending.outcome.done() and pending.outcome.result() is None:
                    return _REPLIED  # spliced meanwhile (an answer lost on the link)
                return status, text, None
        elif sessions:
            invite = RelayInvite(caller, caller_device, req.session)
            for session in sessions:
                session.core.relay_invite(invite)
                session.flush_soon()
        else:
            # On another instance: the callee joins the splice here, at our address.
            host, port = self.bus.address or self.address or ("127.0.0.1", 0)
            self.bus.relay_invite(req.device, RelayInvite(
                caller, caller_device, req.session, host, port, self.domain_key.public))
        try:
            async with asyncio.timeout(wait):
                outcome = await pending.outcome
        except TimeoutError:
            relay.expired += 1
            outcome = (Status.NOT_ONLINE,
                       f"{req.to} did not accept the relay session within {wait:g} s")
        finally:
            relay.withdraw(pending, (Status.UNAVAILABLE, "server shutting down"))
        if outcome is None:
            return _REPLIED
        return (*outcome, None)

    def _relay_accept(self, conn: _Connection, req: RelayAccept, device: bytes) -> Result:
        """RELAY-ACCEPT: reply to both ends, then splice their connections."""
        relay = self.relay
        pending = relay.pending.get(req.session)
        if pending is None:
            return (Status.NOT_FOUND, f"no relay session {req.session.hex()}: it expired, "
                    "was taken, or was never offered", None)
        if pending.callee_device != device or (
                conn.core.address is not None and domain_of(conn.core.address) != self.domain
                and conn.core.address != pending.callee):
            return (Status.FORBIDDEN,
                    f"relay session {req.session.hex()} was offered to another device", None)
        caller = pending.caller
        ct, t = caller.transport, conn.transport
        if ct is None or ct.is_closing() or caller.core.closed or t is None:
            relay.withdraw(pending, (Status.UNAVAILABLE, "the relay connection closed"))
            return Status.NOT_FOUND, "the caller of this relay session has gone", None
        # Both "spliced" replies are on the wire before either side is spliced, so no
        # relayed byte can overtake the reply frame its receiver is waiting for.
        body = {"session": req.session}
        caller.core.reply(pending.request_id, Status.OK, "spliced", body)
        caller._write_now()
        conn.core.reply(req.id, Status.OK, "spliced", body)
        conn._write_now()
        splice = relay.splice(pending, ct, t)
        caller.join(splice, 0)
        conn.join(splice, 1)
        return _REPLIED

    # --- the other instances of the domain (rendezvous/instances.py) --------------------
    def bus_local_devices(self) -> list[bytes]:
        return list(self._online)

    async def bus_deliver(self, device: bytes, seqs: set[int] | None,
                          skip: set[int] | None = None, only: object | None = None) -> int:
        """Push envelopes of `device` another instance stored, read from the store
        (`InstanceBus`)."""
        conns = [c for c in self._online.get(device, ()) if only is None or c is only]
        if not conns:
            return 0
        after = min(c.flush_hi for c in conns) if seqs is None else min(seqs) - 1
        upto = max(seqs) if seqs is not None else 2**63 - 1
        pushed = 0
        while after < upto:
            page = await self.store.pending(device, after, upto, self.limits.flush_page,
                                            self.clock())
            pushed += self.bus_push(device, [
                q for q in page if (seqs is None or q.seq in seqs)
                and (skip is None or q.seq not in skip)], only)
            if len(page) < self.limits.flush_page:
                break
            after = page[-1].seq
        return pushed

    def bus_push(self, device: bytes, queued: list[QueuedEnvelope],
                 only: object | None = None) -> int:
        """Push envelopes of `device` another instance stored to its sessions here that
        have not had them; how many pushes went out."""
        pushed = 0
        for q in queued:
            for conn in self._online.get(device, ()):
                if only is not None and conn is not only:
                    continue
                if q.seq <= conn.flush_hi:
                    # Committed after the session read its queue, with a smaller seq:
                    # pushed here unless its flush had it.
                    if conn.flushed is None or q.seq in conn.flushed:
                        continue
                    conn.flushed.add(q.seq)
                conn.core.deliver(q.envelope)
                conn.flush_soon()
                pushed += 1
        self.delivered += pushed
        return pushed

    async def _bus_deliver_quiet(self, device: bytes, seqs: set[int], conn: _Connection) -> None:
        with contextlib.suppress(RuntimeError):  # store closed during shutdown
            await self.bus_deliver(device, seqs, only=conn)

    async def bus_take_pipes(self, device: bytes) -> None:
        await self._deliver_held(device)

    def bus_relay_invite(self, device: bytes, invite: RelayInvite) -> bool:
        sessions = self._online.get(device, ())
        for session in sessions:
            session.core.relay_invite(invite)
            session.flush_soon()
        return bool(sessions)

    def bus_stats(self) -> dict[str, Any]:
        return {"online_sessions": sum(len(v) for v in self._online.values()),
                "online_devices": len(self._online), "sends": self.sends,
                "delivered": self.delivered, "requests": self.requests,
                "listening": format_hostport(*self.address) if self.address else None}

    # --- housekeeping ------------------------------------------------------------------
    async def _save_relay_usage(self) -> None:
        if self._relay is None:
            return
        changed = self._relay.changed_usage()
        if changed:
            with contextlib.suppress(RuntimeError):  # store closed during shutdown
                await self.store.save_relay_usage(changed)

    async def _sweep(self) -> None:
        """Expire envelopes and save the relay meters, every `interval` for the server's
        life: a round that fails (a full disk, a database gone away for a while) is logged
        and the next one tries again."""
        interval = max(1.0, min(60.0, self.limits.envelope_ttl / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await self.store.expire(self.clock())
                await self._save_relay_usage()
            except Exception as exc:
                if self._closing:  # the store closed under the round: the server is stopping
                    return
                if _storage_trouble(exc, "sweep") is None:
                    log.exception(kv("sweep.failed"))
                continue
            if expired:
                log.info(kv("sweep", envelopes_expired=expired))
