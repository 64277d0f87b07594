"""Keepalive on the rendezvous session: the cores back to back with a hand-driven clock
(silence closes each side, traffic resets the timer, a PING gets no error), then a real
TLS server and a client behind a TCP proxy that silently stops forwarding, as a NAT that
dropped its mapping does: the server takes the device offline within the timeout, the
message sent meanwhile is queued, and the client reconnects and receives it once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from crypto.codec import packb, unpackb
from rendezvous.client import RendezvousClient
from rendezvous.client_core import ClientConnection, ClientState
from rendezvous.domainkey import load_or_create
from rendezvous.framing import encode_frame
from rendezvous.limits import Limits
from rendezvous.messages import (
    Authorization,
    Deliver,
    Finger,
    Ping,
    Reply,
    ServerMessage,
    decode_request,
    encode_request,
    encode_server_message,
)
from rendezvous.records import Envelope
from rendezvous.server import RendezvousServer
from rendezvous.session import (
    AuthRequested,
    Closing,
    Event,
    RequestReceived,
    ServerConnection,
    SessionState,
)
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.tls import self_signed, server_tls

from .conftest import DOMAIN, ident, mid

INTERVAL, TIMEOUT = 20.0, 45.0


class Pair:
    """A ServerConnection and a keepalive ClientConnection joined in memory at `now`."""

    def __init__(self, limits: Limits | None = None, *, interval: float = INTERVAL,
                 timeout: float = TIMEOUT) -> None:
        counter = itertools.count()
        self.now = 100.0
        self.server = ServerConnection(DOMAIN, limits or Limits(), self.now,
                                       lambda: next(counter).to_bytes(32, "big"))
        self.client = ClientConnection(keepalive_interval=interval, keepalive_timeout=timeout)
        self.cut = False  # a dead mapping: bytes go nowhere, both ways
        self.transfer()

    def transfer(self) -> tuple[list[Event], list[ServerMessage]]:
        events: list[Event] = []
        msgs: list[ServerMessage] = []
        while True:
            to_client = self.server.data_to_send()
            to_server = self.client.data_to_send(self.now)
            if not self.cut:
                if to_client:
                    self.client.receive_data(to_client, self.now)
                if to_server:
                    self.server.receive_data(to_server, self.now)
            while (ev := self.server.next_event()) is not None:
                events.append(ev)
            while (m := self.client.next_event()) is not None:
                msgs.append(m)
            if not to_client and not to_server:
                return events, msgs

    def login(self) -> None:
        self.client.authorize(ident(1), "alice@example.net")
        events, _ = self.transfer()
        (ev,) = events
        assert isinstance(ev, AuthRequested)
        self.server.accept_auth(ev.request.id, "alice@example.net", ev.request.verify_key)
        self.transfer()
        assert self.client.state is ClientState.AUTHENTICATED

    def run_until(self, until: float) -> tuple[list[Event], list[ServerMessage]]:
        """Fire both cores' timers in order up to `until`, moving bytes after each."""
        events: list[Event] = []
        msgs: list[ServerMessage] = []
        while True:
            due = [t for t in (self.server.get_timer(), self.client.get_timer())
                   if t is not None and t <= until]
            if not due:
                self.now = until
                return events, msgs
            self.now = max(self.now, min(due))
            self.server.handle_timer(self.now)
            self.client.handle_timer(self.now)
            e, m = self.transfer()
            events += e
            msgs += m


# --- the cores --------------------------------------------------------------------------

def test_the_authorization_announces_the_interval_and_the_server_times_out_from_it() -> None:
    p = Pair(Limits(keepalive_timeout=10.0), interval=30.0, timeout=90.0)
    p.login()
    # The server never cuts a client sooner than twice its announced PING interval.
    assert p.server.keepalive_timeout == 60.0
    p = Pair(Limits(keepalive_timeout=10.0), interval=2.0, timeout=9.0)
    p.login()
    assert p.server.keepalive_timeout == 10.0


def test_an_idle_healthy_session_pings_and_stays_up_for_an_hour() -> None:
    p = Pair()
    p.login()
    events, msgs = p.run_until(p.now + 3600)
    assert events == [] and msgs == []  # the pongs are consumed by the client core
    assert p.server.state is SessionState.AUTHENTICATED and p.client.dead is None
    assert p.server.bad_input == 0


def test_silence_for_the_timeout_closes_the_server_side_and_aborts() -> None:
    p = Pair()
    p.login()
    start = p.now
    p.cut = True
    events, _ = p.run_until(start + 600)
    closing = [e for e in events if isinstance(e, Closing)]
    assert len(closing) == 1 and closing[0].abort
    assert closing[0].reason.startswith("keepalive timeout: nothing from the client for 4")
    assert p.server.state is SessionState.CLOSED
    # The last byte in was the AUTHORIZATION at `start`: closed exactly TIMEOUT later.
    assert p.server.close_reason == "keepalive timeout: nothing from the client for 45 s"


def test_silence_for_the_timeout_marks_the_server_dead_on_the_client() -> None:
    p = Pair(Limits(keepalive_timeout=0))  # the server side is off: only the client acts
    p.login()
    start = p.now
    p.cut = True
    sent_pings = 0
    while p.client.dead is None and p.now < start + 600:
        at = p.client.get_timer()
        assert at is not None
        p.now = at
        p.client.handle_timer(p.now)
        out = p.client.data_to_send(p.now)
        if out:
            assert isinstance(decode_request(out[4:], 1 << 20), Ping)
            sent_pings += 1
    assert p.client.dead == "keepalive timeout: nothing from the server for 45 s"
    assert p.now == start + TIMEOUT and sent_pings == 2  # at +20 and +40
    assert p.client.get_timer() is None  # dead: the adapter drops it, nothing more to do


def test_traffic_resets_both_timers() -> None:
    p = Pair()
    p.login()
    start = p.now
    assert p.server.get_timer() == start + TIMEOUT
    assert p.client.get_timer() == start + INTERVAL
    # A FINGER at +15 and its reply: nothing is due before +35 (PING) / +60 (server).
    p.now = start + 15
    p.client.send(Finger(p.client.new_id(), "bob@example.net"))
    events, _ = p.transfer()
    assert isinstance(events[0], RequestReceived)
    p.server.reply(events[0].request.id, Status.NOT_FOUND)
    p.transfer()
    assert p.server.get_timer() == start + 15 + TIMEOUT
    assert p.client.get_timer() == start + 15 + INTERVAL
    # A push alone (the client sends nothing) keeps the client's receive side alive...
    p.now = start + 30
    p.server.deliver(_envelope())
    p.transfer()
    assert p.client.get_timer() == start + 15 + INTERVAL  # ...but its PING is still due
    p.run_until(start + 15 + INTERVAL)
    assert p.server.get_timer() == start + 15 + INTERVAL + TIMEOUT  # the PING reached it


def test_ping_is_answered_in_any_state_and_counts_no_bad_input() -> None:
    counter = itertools.count()
    srv = ServerConnection(DOMAIN, Limits(), 0.0, lambda: next(counter).to_bytes(32, "big"))
    srv.data_to_send()
    srv.receive_data(encode_frame(encode_request(Ping(7)), 1 << 20), 1.0)
    srv.receive_data(encode_frame(packb({"t": "PING", "id": 8, "extra": [1, 2]}), 1 << 20),
                     1.0)  # a field it does not know is ignored, as for every verb
    out = srv.data_to_send()
    assert srv.next_event() is None and srv.bad_input == 0
    cli = ClientConnection()
    cli.receive_data(out)
    assert [cli.next_event(), cli.next_event()] == [Reply(7, 200, "pong"),
                                                    Reply(8, 200, "pong")]
    # After authentication too, and not as a request for the server to answer.
    p = Pair()
    p.login()
    p.client.send(Ping(p.client.new_id()))
    events, msgs = p.transfer()
    assert events == [] and [m.text for m in msgs if isinstance(m, Reply)] == ["pong"]
    assert p.server.bad_input == 0


def test_a_bad_ping_or_keepalive_field_is_a_400_not_a_crash() -> None:
    counter = itertools.count()
    srv = ServerConnection(DOMAIN, Limits(), 0.0, lambda: next(counter).to_bytes(32, "big"))
    srv.data_to_send()
    srv.receive_data(encode_frame(packb({"t": "PING", "id": -1}), 1 << 20), 1.0)
    auth = Authorization.signed(9, ident(1), DOMAIN, srv.nonce, "alice@example.net")
    body = encode_request(auth)
    for bad in (0, -5, 3_600_001, "20", 2.5):
        wire = {**_unpack(body), "keepalive": bad}
        srv.receive_data(encode_frame(packb(wire), 1 << 20), 1.0)
    cli = ClientConnection()
    cli.receive_data(srv.data_to_send())
    statuses = [m.status for m in iter(cli.next_event, None) if isinstance(m, Reply)]
    assert statuses == [400] * 6 and srv.bad_input == 6
    assert srv.state is SessionState.AWAITING_AUTH


def test_an_old_server_that_refuses_ping_still_proves_it_is_alive() -> None:
    p = Pair(Limits(keepalive_timeout=0))
    p.login()
    cli = p.client
    p.cut = True  # we play the old server by hand from here
    p.now += INTERVAL
    cli.handle_timer(p.now)
    ping = decode_request(cli.data_to_send(p.now)[4:], 1 << 20)
    assert isinstance(ping, Ping)
    old = Reply(ping.id, Status.BAD_REQUEST, "unknown verb 'PING'")
    cli.receive_data(encode_frame(encode_server_message(old), 1 << 20), p.now + 1)
    assert cli.next_event() is None  # consumed: no error surfaces
    assert cli.get_timer() == p.now + INTERVAL  # the next PING; the receive limit moved on
    assert cli.dead is None


def test_relay_connections_and_clients_without_keepalive_are_never_timed_out() -> None:
    p = Pair(interval=0.0, timeout=0.0)
    p.login()
    assert p.server.keepalive_timeout is None and p.client.get_timer() is None
    p.cut = True
    events, _ = p.run_until(p.now + 10 * 86400)
    assert events == [] and p.server.state is SessionState.AUTHENTICATED
    with pytest.raises(ValueError, match="interval < timeout"):
        ClientConnection(keepalive_interval=45.0, keepalive_timeout=20.0)
    # A relay connection carries one spliced stream: it announces no PINGs.
    relay = Pair()
    relay.client.authorize(ident(1), "alice@example.net", relay=True)
    auth = decode_request(relay.client.data_to_send()[4:], 1 << 20)
    assert isinstance(auth, Authorization) and auth.keepalive_ms == 0
    plain = Pair()
    plain.client.authorize(ident(1), "alice@example.net")
    auth = decode_request(plain.client.data_to_send()[4:], 1 << 20)
    assert isinstance(auth, Authorization) and auth.keepalive_ms == INTERVAL * 1000


def test_a_server_that_stopped_reading_does_not_time_out_its_client() -> None:
    p = Pair(Limits(max_in_flight=1))
    p.login()
    p.client.send(Finger(p.client.new_id(), "bob@example.net"))
    p.transfer()  # in flight, never answered: the adapter stops reading
    p.cut = True
    start = p.now
    p.now = start + TIMEOUT
    p.server.handle_timer(p.now)
    assert p.server.state is SessionState.AUTHENTICATED
    assert p.server.get_timer() == start + 2 * TIMEOUT


def _envelope() -> Envelope:
    return Envelope(bytes(16), "bob@example.net", "alice@example.net", bytes(20), 0, b"x",
                    1.0)


def _unpack(body: bytes) -> dict[str, object]:
    obj = unpackb(body, max_bytes=1 << 20)
    assert isinstance(obj, dict)
    return obj


# --- a real server, a real client, a proxy that black-holes -----------------------------

class BlackHoleProxy:
    """TCP forwarder to `upstream`. `black_hole()` makes every connection open now (and
    any opened until `forward()`) swallow bytes both ways without closing, forever, as a
    NAT that lost the mapping; connections opened after `forward()` work."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.holed = False
        self._dead: set[int] = set()
        self._ids = itertools.count()
        self._live: set[int] = set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()  # every pipe's read ends, so every handler returns

    def black_hole(self) -> None:
        self.holed = True
        self._dead |= self._live

    def forward(self) -> None:
        self.holed = False

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        cid = next(self._ids)
        self._writers.append(w)
        if self.holed:
            self._dead.add(cid)
            r2: asyncio.StreamReader | None = None
        else:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.upstream)
            self._writers.append(w2)
        self._live.add(cid)
        if r2 is None:
            await self._pipe(cid, r, None)
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pipe(cid, r, w2))
            tg.create_task(self._pipe(cid, r2, w))

    async def _pipe(self, cid: int, r: asyncio.StreamReader,
                    w: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                if cid in self._dead or w is None:
                    continue  # swallowed: no FIN, no RST
                w.write(data)
                await w.drain()
            if w is not None and cid not in self._dead:
                w.close()


class LogEvents(logging.Handler):
    """Sets an asyncio.Event when a log record's text contains a given string."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []
        self._waits: list[tuple[str, asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.seen.append(text)
        for needle, ev in self._waits:
            if needle in text:
                ev.set()

    async def wait_for(self, needle: str, within: float) -> float:
        """Seconds until a record containing `needle` (one already seen counts as 0)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if any(needle in t for t in self.seen):
            return 0.0
        ev = asyncio.Event()
        self._waits.append((needle, ev))
        try:
            await asyncio.wait_for(ev.wait(), within)
        except TimeoutError:
            raise AssertionError(f"no log line with {needle!r} within {within} s: "
                                 f"{self.seen[-20:]}") from None
        return loop.time() - start


@contextlib.contextmanager
def watching(*names: str) -> Iterator[LogEvents]:
    """What the loggers `names` log at INFO and above while the block runs."""
    handler = LogEvents()
    loggers = [logging.getLogger(name) for name in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


@pytest.fixture
def log_events() -> Iterator[LogEvents]:
    with watching("rendezvous.server", "rendezvous.client") as handler:
        yield handler


@contextlib.asynccontextmanager
async def tls_server(data: Path, limits: Limits) -> AsyncIterator[RendezvousServer]:
    data.mkdir(parents=True, exist_ok=True)
    server = RendezvousServer(DOMAIN, SqliteStore(data / "rv.sqlite3"), open_registration=True,
                              limits=limits, domain_key=load_or_create(data), finger_open=True,
                              tls=server_tls(*self_signed(data, DOMAIN)))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.aclose()


FAST_INTERVAL, FAST_TIMEOUT = 0.3, 1.0


async def test_a_black_holed_client_goes_offline_then_reconnects_and_gets_its_mail_once(
        tmp_path: Path, log_events: LogEvents) -> None:
    alice_id, bob_id = ident(61), ident(62)
    async with tls_server(tmp_path / "srv", Limits(keepalive_timeout=FAST_TIMEOUT)) as srv:
        assert srv.address is not None
        port = srv.address[1]
        async with BlackHoleProxy(port) as proxy, \
                RendezvousClient("127.0.0.1", proxy.port, alice_id, "alice@example.net",
                                 register=True, tls=True, request_timeout=2.0,
                                 max_backoff=0.5, keepalive_interval=FAST_INTERVAL,
                                 keepalive_timeout=FAST_TIMEOUT) as alice, \
                RendezvousClient("127.0.0.1", port, bob_id, "bob@example.net",
                                 register=True, tls=True) as bob:
            pushes = alice.pushes()

            async def online() -> bool:
                (dev,) = (await bob.finger("alice@example.net")).devices
                return dev.online

            # Idle for several intervals: PINGs keep it up, nobody is cut.
            await asyncio.sleep(4 * FAST_INTERVAL)
            assert await online() and alice.reconnects == 0

            proxy.black_hole()
            took = await log_events.wait_for("keepalive timeout: nothing from the client",
                                             FAST_TIMEOUT + 2.0)
            assert took <= FAST_TIMEOUT + 0.5
            assert not await online()
            await log_events.wait_for("client.keepalive_timeout", FAST_TIMEOUT + 2.0)

            m = mid()
            await bob.send(m, [("alice@example.net", alice_id.peer_id, b"while-away")])
            assert not await online()  # queued for alice, not pushed into the dead link

            proxy.forward()
            await alice.wait_connected(10.0)
            async with asyncio.timeout(10.0):
                push = await anext(pushes)
            assert isinstance(push, Deliver)
            assert (push.envelope.message_id, push.envelope.blob) == (m, b"while-away")
            await alice.remove(m)
            assert await online()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await anext(pushes)  # exactly once
            assert alice.reconnects >= 1


async def test_a_login_after_a_lost_session_ends_it_at_the_server_at_once(
        tmp_path: Path, log_events: LogEvents) -> None:
    """The laptop woke (or moved) behind a NAT that forgot its session: the server still
    holds it, for up to its 45 s keepalive timeout. The new login names it and the server
    ends it there and then, so it takes no place under the cap on sessions (one here: the
    new login was refused with 429, which ends reconnecting) and gets no more pushes. The
    same device key's session in another process is left alone."""
    alice_id, bob_id = ident(63), ident(64)
    async with tls_server(tmp_path / "srv", Limits(sessions_per_device=2)) as srv:
        assert srv.address is not None
        port = srv.address[1]
        async with BlackHoleProxy(port) as proxy, \
                RendezvousClient("127.0.0.1", proxy.port, alice_id, "alice@example.net",
                                 register=True, tls=True, request_timeout=5.0) as laptop, \
                RendezvousClient("127.0.0.1", port, alice_id, "alice@example.net",
                                 tls=True) as other, \
                RendezvousClient("127.0.0.1", port, bob_id, "bob@example.net",
                                 register=True, tls=True) as bob:
            assert srv.snapshot()["online_sessions"] == 3
            pushes = laptop.pushes()
            proxy.black_hole()  # the NAT forgets the laptop's session, silently
            proxy.forward()  # new connections go through
            laptop.relogin("woke after 600 s asleep")
            await laptop.wait_connected(5.0)
            await log_events.wait_for("replaced by the device's new session", 2.0)
            snap = srv.snapshot()
            assert laptop.refused is None and laptop.connected
            assert (snap["online_sessions"], snap["sessions_replaced"]) == (3, 1)
            assert other.connected and other.reconnects == 0

            m = mid()
            await bob.send(m, [("alice@example.net", alice_id.peer_id, b"after-wake")])
            async with asyncio.timeout(5.0):
                push = await anext(pushes)
            assert isinstance(push, Deliver) and push.envelope.blob == b"after-wake"


async def test_a_relogin_over_the_session_cap_is_tried_again_not_given_up(
        tmp_path: Path, log_events: LogEvents) -> None:
    """While the laptop was away another process of its device took the one session the
    cap allows: its new login gets a 429. It keeps trying (the other session may end, and
    does), where it used to stop reconnecting for good."""
    alice_id = ident(65)
    async with tls_server(tmp_path / "srv", Limits(sessions_per_device=1)) as srv:
        assert srv.address is not None
        port = srv.address[1]
        async with BlackHoleProxy(port) as proxy, \
                RendezvousClient("127.0.0.1", proxy.port, alice_id, "alice@example.net",
                                 register=True, tls=True, request_timeout=1.0,
                                 max_backoff=0.3) as laptop:
            proxy.black_hole()  # away: its session and its next logins go nowhere
            laptop.relogin("woke after 600 s asleep")
            await log_events.wait_for("client.reconnect_failed", 5.0)
            for conn in list(srv._online.get(alice_id.peer_id, ())):
                conn.core.close("the server timed it out", abort=True)
                conn._pump()  # (its keepalive timeout, made short)
            async with RendezvousClient("127.0.0.1", port, alice_id, "alice@example.net",
                                        tls=True, reconnect=False):
                proxy.forward()
                await log_events.wait_for("this device already has 1 sessions", 5.0)
                assert laptop.refused is None and not laptop.connected
            await laptop.wait_connected(5.0)  # the other one ended: the laptop is back
            assert laptop.refused is None
