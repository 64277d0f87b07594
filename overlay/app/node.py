"""`peerpost node`: the peer daemon, the composition root of everything in overlay/.

It owns, for its lifetime: the rendezvous session (auth, pushes, reconnect), the content
store, the direct-TCP transfer server (advertised through FINGER), the DHT directory, the
WebRTC and relay links, the records database, the download queue and the local control
socket. `Node` is an async context manager that wires these parts and closes them in
reverse; the work itself is done by the parts (overlay.mail.delivery, overlay.mail.outgoing,
overlay.app.links, overlay.app.holders, overlay.app.fetch, overlay.app.operations).
SIGTERM/SIGINT close it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crypto.address import format_hostport, parse_hostport
from crypto.content import in_place_aead
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.location import LocationMessage
from overlay.app.config import NodeConfig
from overlay.app.control import ControlServer
from overlay.app.failover import ServerFailover
from overlay.app.fetch import ContentFetch
from overlay.app.fetchmeter import FetchMeter
from overlay.app.holders import HolderFinder
from overlay.app.home import HomeError, NodeHome
from overlay.app.links import EndpointFactory, PeerLinks
from overlay.app.notify import MessageHook
from overlay.app.operations import ControlOperations, key_mismatch_text
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.dht.directory import ProviderDirectory
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB, RecordsError
from overlay.mail.delivery import Delivery, Receipts
from overlay.mail.downloads import DownloadQueue
from overlay.mail.inbox import DEFAULT_MAX_ENTRIES, Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail
from overlay.mail.outbox import Outbox
from overlay.mail.outgoing import MailSender
from overlay.mail.prefs import Prefs
from overlay.transfer.holder import source_changed
from overlay.transfer.server import TransferServer
from overlay.transports.netwatch import NetworkEvents
from overlay.transports.quic import UdpOpener, kernel_udp
from overlay.transports.reachability import Reachability, probe, route_ip
from overlay.transports.wake import SleepWatch, time_asleep
from overlay.transports.webrtc import WebRtcEndpoint
from rendezvous.backoff import Backoff
from rendezvous.client import MISMATCH_BACKOFF, RendezvousClient, ServerIdentityError
from rendezvous.domainkey import encode_key, fingerprint
from rendezvous.errors import (
    AuthenticationError,
    ConnectionLostError,
    RendezvousError,
    RequestTimeoutError,
)
from rendezvous.sdnotify import notify
from rendezvous.stun import SocketMaker, reusable_socket
from rendezvous.taskset import TaskSet, raise_if_cancelled

log = logging.getLogger("peerpost.node")

FIRST_LOGIN_BACKOFF = Backoff(1.0, 60.0)  # waiting for the server at start: 1 s doubling to 60 s
DHT_REJOIN_TIMEOUT = 10.0  # pinging a new server's DHT node and a lookup of our own id
NETWORK_CHECK = 2.0  # seconds between looks at which local address reaches the server
NETWORK_SETTLE = 0.3  # quiet after a reported network change before looking
WAKE_CHECK = 1.0  # seconds between looks at whether the host slept (two clock reads)
MOVE_RETRY_WINDOW = 15.0  # seconds after a move in which a download it cut restarts at once


@dataclass
class NodeOptions:
    max_upload_rate: float | None = None
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_active_downloads: int = 1
    max_in_flight: int = 8  # chunks outstanding per source
    provider_refresh: float = 10.0  # seconds between provider lookups in one download
    receipt_retry: float = 60.0  # seconds between attempts at receipts the server missed
    inbox_max: int = DEFAULT_MAX_ENTRIES  # messages kept before new ones are refused
    # Fetch from co-recipients the DHT names as well as from the sender. Off: the sender
    # alone (what e-mail-style delivery without the overlay does; the simulator compares).
    co_recipients: bool = True
    # How the WebRTC rung is made: aiortc in production; the simulator passes its own
    # endpoint that obeys its NAT model (aiortc's DTLS and SCTP are not run there).
    webrtc_endpoint: EndpointFactory = WebRtcEndpoint
    # How the TCP punch makes its sockets: the kernel's in production; the simulator
    # passes its network's, so the real punch runs over the simulated NATs.
    punch_socket: SocketMaker = reusable_socket
    # The QUIC rung; None: the config's `quic` (on unless turned off).
    quic: bool | None = None
    # How the QUIC rung makes its UDP ports: the kernel's in production; the simulator
    # passes the loop's (`loop_udp`), a port on its simulated host.
    quic_udp: UdpOpener = kernel_udp
    web: str | None = None  # the web inbox's HOST:PORT or "off"; None: the config's `web`
    metrics: tuple[str, int] | None = None  # Prometheus /metrics and /healthz (--metrics)
    on_message: str | None = None  # command run on arrival/completion; None: the config's
    desktop_notify: bool = True  # notify-send where it is installed
    network_check: float = NETWORK_CHECK  # seconds between route looks (_watch_network); 0: off
    # Waiting to try again a server that did not prove the pinned key (at start and on
    # reconnects); a test passes a short one (`node --mismatch-retry`).
    mismatch_backoff: Backoff = MISMATCH_BACKOFF
    # Seconds the host has spent suspended since boot (overlay.transports.wake); a test
    # passes its own to put the host to sleep.
    asleep: Callable[[], float] = time_asleep


class Node:
    """One running peer node."""

    def __init__(self, home: NodeHome, *, options: NodeOptions | None = None,
                 wall: Callable[[], float], rng: random.Random | None = None) -> None:
        self.home = home
        self.config: NodeConfig = home.load_config()
        self.identity: DeviceIdentity = home.load_identity()
        self.options = options or NodeOptions()
        self.wall = wall
        self.rng = rng or random.Random()
        self.address = self.config.address
        self.listen_addr: tuple[str, int] | None = None
        self.reach: Reachability | None = None
        self._stack = contextlib.AsyncExitStack()
        self._running: list[asyncio.Task[None]] = []  # the long-lived tasks, in self._tg

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Node:
        try:
            return await self._start()
        except BaseException:
            # Refused, failed or stopped while starting (SIGTERM while the first login
            # waits for its server): close what was opened, the listening socket first.
            await self._stack.aclose()
            raise

    async def _start(self) -> Node:
        st = self._stack
        self.db = NodeDB.open(self.home.db_path)
        st.callback(self.db.close)
        self.inbox = Inbox(self.db, max_entries=self.options.inbox_max)
        self.outbox = Outbox(self.db)
        self.prefs, self.contacts = Prefs(self.db), Contacts(self.db)
        rate = self.options.max_upload_rate or self.prefs.max_upload_rate
        self.store = ContentStore(self.home.store_dir)
        st.push_async_callback(self.store.aclose)
        if not in_place_aead():
            log.warning("the installed cryptography package refuses (or garbles) sealing "
                        "and opening in place: chunks are sealed and opened through a "
                        "second buffer (a little more CPU per GB)")
        self.transfer = TransferServer(self.identity, self.store.catalog,
                                       max_upload_rate=int(rate) if rate else None)
        st.push_async_callback(self.transfer.aclose)
        self.listen_addr = await self._listen()

        host, port = parse_hostport(self.config.server, what="server")
        self._advertised = self._advertise()
        self._failover = ServerFailover(self.home, self.config)
        self.rendezvous = RendezvousClient(host, port, self.identity, self.address,
                                           advertise=self._advertised, reconnect=True,
                                           tls=not self.config.plaintext,
                                           server_key=self.config.pinned_key(),
                                           rng=random.Random(self.rng.getrandbits(64)),
                                           alternates=self._failover.servers,
                                           on_failover=self._on_failover,
                                           mismatch_backoff=self.options.mismatch_backoff,
                                           pinned=self._pinned_now)
        st.push_async_callback(self.rendezvous.aclose)
        await self._first_login()
        host, port = self.rendezvous.host, self.rendezvous.port  # another one after failover
        self._pin_server_key()
        self.reach = await probe(host, port, self.rendezvous.server_info.get("stun"),
                                 self.listen_addr[0] if self.listen_addr else "")
        if self._advertise() != self._advertised:
            await self.rendezvous.advertise(self._advertise())
        await self._start_dht(host)
        self.links = PeerLinks(self.identity, self.address, (host, port), self.rendezvous,
                               self.transfer, self.options.webrtc_endpoint,
                               punch_socket=self.options.punch_socket,
                               quic=(self.config.quic if self.options.quic is None
                                     else self.options.quic),
                               quic_udp=self.options.quic_udp,
                               rng=random.Random(self.rng.getrandbits(64)))
        await self.links.start()
        st.push_async_callback(self.links.aclose)
        self._wire_mail()
        ops = ControlOperations(
            self.identity, self.address, listen_addr=self.listen_addr,
            rendezvous=self.rendezvous, incoming=self.incoming, sender=self.sender,
            inbox=self.inbox, outbox=self.outbox, prefs=self.prefs, contacts=self.contacts,
            downloads=self.downloads, transfer=self.transfer,
            max_in_flight=self.options.max_in_flight, store=self.store,
            withdraw=self.providers.withdraw, reach=self.reach_info, received=self.fetch.dest,
            hook_counters=self.hook.counters, retention=self.delivery.retention,
            lookup_ended=self.delivery.lookup_ended)
        ops.rewithdraw()  # messages cancelled before a restart stay unserved
        await self._announce_held()  # after rewithdraw: a cancelled content is not offered
        self.control = ControlServer(self.home.control_path, ops.table())
        await self.control.start()
        st.push_async_callback(self.control.aclose)
        self.web_url = await self._start_web(ops)

        await self.delivery.retention()  # finish what a crash interrupted
        self._sleep = SleepWatch(self.options.asleep)  # a sleep from now on is a wake
        self._tg = await st.enter_async_context(asyncio.TaskGroup())
        self._running = [
            self._tg.create_task(self.delivery.pushes(), name="pushes"),
            self._tg.create_task(self.links.serve_webrtc(), name="webrtc-accept"),
            self._tg.create_task(self.delivery.downloads_after_login(), name="downloads"),
            self._tg.create_task(self.receipts.owed(), name="owed-receipts"),
            self._tg.create_task(self.delivery.lookups(), name="key-lookups"),
            self._tg.create_task(self.delivery.unstored(), name="unstored-retry"),
            self._tg.create_task(self._watch_network(), name="network-watch")]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._running:
            task.cancel()
        await self._stack.aclose()

    def _wire_mail(self) -> None:
        """The mail side: incoming, sending, the download queue, receipts and pushes."""
        command, inbox = self.options.on_message, self.inbox

        def told(entry: InboxEntry, event: str) -> None:
            try:
                if event == "arrived":
                    inbox.arrival_told(entry.id)
                else:
                    inbox.completion_told(entry.id)
            except (sqlite3.Error, OSError) as exc:  # told again at the next start
                log.warning("message hook's %s for %s not recorded as run: %s", event,
                            entry.id.hex(), exc)

        def owed(limit: int) -> list[tuple[InboxEntry, str]]:
            try:
                return [*((e, "arrived") for e in inbox.arrivals_due(limit)),
                        *((e, "complete") for e in inbox.completions_due(limit))]
            except (sqlite3.Error, OSError) as exc:  # still owed: read at the next start
                log.warning("message hooks owed not read: %s", exc)
                return []
        self.hook = MessageHook(self.config.on_message if command is None else command,
                                told=told, owed=owed, desktop=self.options.desktop_notify)
        self._stack.push_async_callback(self.hook.aclose)
        self.incoming = IncomingMail(self.identity, self.address, self.inbox, self.outbox,
                                     self.prefs, self.contacts, self.wall)
        self.sender = MailSender(
            self.identity, self.address, rendezvous=self.rendezvous, store=self.store,
            contacts=self.contacts, outbox=self.outbox, announce=self.providers.announce,
            direct_addresses=self.direct_addresses, home_server=self.config.server,
            wall=self.wall)
        self.sender.fail_unacknowledged()  # no send runs yet
        self.receipts = Receipts(self.identity, self.rendezvous, self.inbox, self.contacts,
                                 wall=self.wall, retry=self.options.receipt_retry)
        ladder = self.links.ladder
        self.holders = HolderFinder(self.address, self.rendezvous, self.providers, ladder,
                                    co_recipients=self.options.co_recipients,
                                    refresh=self.options.provider_refresh)
        fetch = ContentFetch(self.identity, self.store, self.holders,
                             dest=self.home.received_dir(self.config),
                             announce=self.providers.announce,
                             window=self.options.max_in_flight,
                             connect_timeout=ladder.budget,
                             rng=random.Random(self.rng.getrandbits(64)),
                             alone=not self.options.co_recipients)
        self.fetch = fetch
        receipts, hook = self.receipts, self.hook

        async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
            hook.fire(entry, "complete")
            await receipts.completed(entry, msg)

        def arrived(entry: InboxEntry) -> None:
            hook.fire(entry, "arrived")

        self.fetch_meter = FetchMeter(fetch)  # attempts and bytes by path, for --metrics
        self.downloads = DownloadQueue(
            self.inbox, self.prefs, self.fetch_meter, completed, wall=self.wall,
            rng=self.rng, max_active=self.options.max_active_downloads,
            retry_base=self.options.retry_base, retry_max=self.options.retry_max,
            on_declined=receipts.wake, on_started=receipts.started)
        self.delivery = Delivery(
            self.rendezvous, self.incoming, self.outbox, self.store, self.prefs,
            self.downloads, archive=self.home.root / "archive", on_pipe=self.links.feed,
            on_relay=self.links.serve_relayed,
            withdraw=self.providers.withdraw,
            # A sender's keys looked up again as a download is retried.
            lookup_backoff=Backoff(self.options.retry_base, self.options.retry_max,
                                   jitter=0.8), rng=self.rng, on_finger=self.holders.remember,
            on_arrived=arrived if hook.enabled else None)
        self.delivery.tell_due()  # what the last stop cut short
        hook.catch_up()  # and the `complete` runs it left owed

    async def _start_web(self, ops: ControlOperations) -> str | None:
        """The web inbox on this loop, closed with the node; its URL, or None when off."""
        listen = self.options.web or self.config.web
        if listen == "off":
            return None
        from overlay.app.web.server import WebInbox  # aiohttp only when it is on

        web = WebInbox(self.home.root, ops, self.store, listen=listen,
                       want=self.fetch.want_first, wall=self.wall)
        url = await web.start()
        self._stack.push_async_callback(web.aclose)
        return url

    async def _first_login(self) -> None:
        """Log in to the server, waiting with backoff while it can't be reached: a node
        started before the network is up, or while its server restarts, waits for it
        instead of exiting. Something at the server's address that does not prove the
        pinned key (a hotel's proxy, a captive portal) is not logged in to and not the
        server's word either: the node waits for its server then too, longer
        (`mismatch_backoff`), re-reading the pinned key from config.json before each try.
        A refusal by the server itself (unknown address, revoked device) ends it; a server
        error (5xx) or a session cap (429) at login is waited out as an unreachable server
        is. Each time it can't reach it, or gets such an error from it, a node whose server
        came from SRV records first tries the domain's other servers
        (overlay.app.failover). Why it waits, and until when, goes in the home for
        `peerpost info` (the control socket opens only after the login)."""
        attempt = mismatched = 0
        failover = self._failover
        try:
            while True:
                try:
                    await self.rendezvous.start()
                    return
                except (ConnectionLostError, RequestTimeoutError) as exc:
                    # SIGTERM cancels this task; a refusal landing in the same loop
                    # iteration came back from asyncio.wait_for instead, and the node went
                    # on retrying.
                    raise_if_cancelled()
                    if await failover.login_elsewhere(self.rendezvous) is not None:
                        return
                    attempt, mismatched = attempt + 1, 0
                    delay = FIRST_LOGIN_BACKOFF.delay(attempt)
                    why = f"server {self.config.server} not reachable ({exc})"
                except ServerIdentityError as exc:
                    raise_if_cancelled()
                    if await failover.login_elsewhere(
                            self.rendezvous, "does not prove the pinned key") is not None:
                        return
                    attempt, mismatched = 0, mismatched + 1
                    delay = self.options.mismatch_backoff.delay(mismatched, self.rng)
                    rv = self.rendezvous
                    why = f"{key_mismatch_text(rv.server_text, exc)}: not logging in to it"
                except AuthenticationError as exc:
                    # After ServerIdentityError, which is one of these. A server error (5xx:
                    # its store down, its disk full) or a session cap says nothing about
                    # this node: wait for the server, as the client does when a later login
                    # gets one. Only the server's word on this device (401, 403) ends it.
                    if not exc.transient:
                        raise
                    raise_if_cancelled()
                    # Another instance of the domain may take it now (this one's store or
                    # disk broken, its sessions capped); each is tried once per backoff
                    # step, so full instances are not hopped between faster than that.
                    refused = f"did not log this node in ({exc})"
                    if await failover.login_elsewhere(self.rendezvous, refused) is not None:
                        return
                    attempt, mismatched = attempt + 1, 0
                    delay = FIRST_LOGIN_BACKOFF.delay(attempt)
                    why = f"server {self.config.server} {refused}"
                log.warning("%s; trying again in %.0f s", why, delay)
                self.home.note_login_wait(why, self.wall() + delay)
                await asyncio.sleep(delay)
                if mismatched:
                    self.rendezvous.repin()
        finally:
            self.home.note_login_wait(None)

    def _pinned_now(self) -> bytes | None:
        """The server key config.json pins now: after a planned key change the user puts
        the new one there, and the next try expects it (no restart). The one pinned before
        if the file can't be read."""
        before = self.rendezvous.server_key
        try:
            config = self.home.load_config()
            key = config.pinned_key()
        except (HomeError, DecodeError, OSError) as exc:
            log.warning("cannot read the pinned server key (%s); still expecting %s", exc,
                        fingerprint(before) if before else "none")
            return before
        if key is None or key == before:
            return before
        log.warning("%s pins a new key for the server: %s (was %s)", self.home.config_path,
                    fingerprint(key), fingerprint(before) if before else "none")
        self.config.server_key = config.server_key
        return key

    def _on_failover(self, host: str, port: int) -> None:
        """The session reconnected to another server of the domain: record it, and move
        the STUN for WebRTC and the punch, and the DHT's bootstrap, to it (the services
        of the first are gone with it)."""
        self._failover.record(host, port)
        links: PeerLinks | None = getattr(self, "links", None)
        if links is not None:
            links.follow_server()
        info = self.rendezvous.server_info  # from the new server's CHALLENGE
        stun, stun_tcp, dht = info.get("stun"), info.get("stun_tcp"), info.get("dht")
        log.warning("now using the services of %s: STUN %s, STUN over TCP %s, "
                    "DHT bootstrap %s", format_hostport(host, port),
                    *(format_hostport(host, p) if isinstance(p, int) else "none"
                      for p in (stun, stun_tcp, dht)))
        following: TaskSet | None = getattr(self, "_following", None)
        if isinstance(dht, int) and following is not None and not following.closed:
            following.spawn(self._rejoin_dht((host, dht)), name="dht-rejoin")

    async def _rejoin_dht(self, bootstrap: tuple[str, int]) -> None:
        """Add the new server's DHT node as a contact and refresh the table through it."""
        try:
            async with asyncio.timeout(DHT_REJOIN_TIMEOUT):
                found = await self.providers.dht.bootstrap([bootstrap])
        except (TimeoutError, OSError) as exc:
            log.warning("DHT bootstrap through %s after failover failed: %s",
                        format_hostport(*bootstrap), exc)
            return
        log.info("DHT joined through %s after failover: %d contact%s in the routing table",
                 format_hostport(*bootstrap), found, "" if found == 1 else "s")

    async def _watch_network(self) -> None:
        """Follow the host to another network (a laptop from home Wi-Fi to a phone
        hotspot). Every `network_check` seconds, and at once when the kernel reports a
        link or address change (overlay.transports.netwatch), ask it which local address
        reaches the server (no packet is sent); when that changed, move with it
        (`_moved`). A reported change that left that address as it was (the new network
        handed out the same private address) is checked with STUN: a public address other
        than the one STUN showed before is a move too. Every `WAKE_CHECK` seconds it also
        looks whether the host slept meanwhile (`_woke`)."""
        every = self.options.network_check
        if every <= 0:
            return
        events = NetworkEvents()
        heard = events.start()
        tick = min(every, WAKE_CHECK)
        loop = asyncio.get_running_loop()
        look_at = loop.time() + every
        known = self.reach.local_ip if self.reach else None
        server = self.rendezvous.server_ip  # an address: a host name would be looked up
        try:
            while True:
                if heard and await events.wait(tick):
                    changed = True
                    while await events.wait(NETWORK_SETTLE):
                        pass  # a move is a burst of changes: look once it is over
                else:
                    changed = False
                    if not heard:
                        await asyncio.sleep(tick)
                slept = self._sleep.slept()
                if not (changed or slept) and loop.time() < look_at:
                    continue
                look_at = loop.time() + every
                server = self.rendezvous.server_ip or server
                now = await route_ip(server, self.rendezvous.port) if server else None
                try:
                    if slept:  # whether or not the network is back yet
                        await self._woke(slept)
                    elif now is None:
                        continue  # no route at all: nothing to move to yet
                    elif now != known:
                        await self._moved(known, now)
                    elif changed:
                        await self._maybe_moved(now)
                except (RendezvousError, OSError) as exc:
                    log.warning("telling the server our new addresses failed (%s); the "
                                "next login carries them", exc)
                known = now or known
        finally:
            events.close()

    async def _look(self) -> Reachability:
        rv = self.rendezvous
        return await probe(rv.host, rv.port, rv.server_info.get("stun"),
                           self.listen_addr[0] if self.listen_addr else "")

    async def _maybe_moved(self, local: str) -> None:
        """A link or address changed and the server is reached from `local` as before:
        moved all the same if STUN now sees another public address."""
        was = self.reach.mapped if self.reach else None
        look = await self._look()
        if was is None or look.mapped is None or look.mapped[0] == was[0]:
            return
        await self._moved(local, local, look, why=f"the server sees us from {look.mapped[0]} "
                          f"now, not {was[0]}")

    async def _moved(self, old: str | None, new: str, look: Reachability | None = None, *,
                     why: str = "") -> None:
        """The host now reaches the server from `new` (or, with `look`, from the same
        address through another NAT). The server session of the old network is dead
        (nothing it sends arrives) though only its 45 s keepalive timeout would say so, and
        the server would push our mail into it meanwhile; our NAT, and with it what FINGER
        and our DHT records should say, may have changed too. So: find out what the new
        network is (STUN), log in again at once from it with the new hints, and announce
        what we hold with the new addresses."""
        rv = self.rendezvous
        log.warning("network changed: %s; logging in again from it",
                    why or f"the server is reached from {new} now (was {old})")
        await self._look_again(look)
        if not rv.moved(new, self._advertised, force=look is not None) and rv.connected:
            await rv.advertise(self._advertised)  # the session survived: update it
        self._after_move(await self.providers.readdress(self.direct_addresses()))

    async def _woke(self, slept: float) -> None:
        """The host slept `slept` seconds (a laptop's lid was closed). asyncio's clock
        stood still meanwhile, so the keepalive holds the session for as fresh as before,
        though the server may have closed it and the NAT forgotten it long ago: mail would
        wait for the next PING to fail (20 to 45 s). And the DHT's republishing stood
        still too. So: log in again at once, then look at the network (it may be another
        one now) and announce all we hold again."""
        rv = self.rendezvous
        log.warning("woke after %.0f s asleep; logging in again", slept)
        rv.relogin(f"woke after {slept:.0f} s asleep")
        was = self._advertised
        await self._look_again()
        if self._advertised != was:
            await rv.advertise(self._advertised)  # after the new login, which carried `was`
        again = await self.providers.readdress(self.direct_addresses())
        self._after_move(again or await self.providers.announce_again())

    async def _look_again(self, look: Reachability | None = None) -> None:
        """Take `look` (else ask STUN now) as what the network is: what to advertise, and
        whether our DHT node serves."""
        was = self.reach
        self.reach = look or await self._look()
        if self.reach.mapped is None and was is not None and was.mapped is not None:
            # STUN answered before and not now (the new network is still coming up): a NAT
            # we can't see is likelier than none, so keep what we knew of it.
            self.reach = replace(self.reach, nat=was.nat)
        self._advertised = self._advertise()
        # The DHT role follows: behind a NAT, peers that routed to us would time out on
        # us; reachable now, we can answer (the role was chosen from the network we
        # started on).
        self.providers.dht.set_client_only(self.reach.nat,
                                           via=self._dht_bootstrap(self.rendezvous.host))

    def _after_move(self, again: int) -> None:
        """Restart the downloads the change cuts; say what we advertise now."""
        if not self._following.closed:
            self._following.spawn(self._restart_cut_downloads(), name="after-move")
        log.info("now advertising %s (%s); %d content%s announced again",
                 ", ".join(self._advertised["addrs"]) or "no direct address",
                 "behind NAT" if self._advertised["nat"] else "directly reachable",
                 again, "" if again == 1 else "s")

    async def _restart_cut_downloads(self) -> None:
        """Downloads running when the host moved fail in the next seconds (a source that
        fell silent is judged stalled after ~2.6 s) and would then wait out the queue's
        retry backoff (1-5 s) though the network is back: each starts again at once,
        one time per move."""
        waiting = {mid for mid in self.downloads.active
                   if (e := self.inbox.get(mid)) is not None
                   and e.state is InboxState.DOWNLOADING}
        loop = asyncio.get_running_loop()
        end = loop.time() + MOVE_RETRY_WINDOW
        while waiting and (left := end - loop.time()) > 0:
            changed = self.downloads.changed()
            for mid in list(waiting):
                entry = self.inbox.get(mid)
                if entry is not None and entry.state is InboxState.DOWNLOADING:
                    continue
                waiting.discard(mid)
                if entry is not None and entry.state is InboxState.RETRYING:
                    log.info("message %s: the network changed under its download; "
                             "trying again now", mid.hex())
                    self.downloads.request(mid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    def _pin_server_key(self) -> None:
        """A config from before keys were pinned: pin the key this first session showed."""
        key = self.rendezvous.server_key
        if self.config.server_key or key is None:
            return
        self.config.server_key = encode_key(key)
        self.home.save_config(self.config)
        log.warning("pinned the domain key of %s on first use: %s", self.config.server,
                    fingerprint(key))

    async def _listen(self) -> tuple[str, int]:
        host, port = parse_hostport(self.config.listen, what="listen")
        want = self.config.listen_port or port
        try:
            bound = await self.transfer.start(host, want)
        except OSError as exc:
            if not want:
                raise
            log.warning("port %d is taken (%s); listening on another", want, exc)
            bound = await self.transfer.start(host, 0)
        if bound[1] != self.config.listen_port:
            # Keep the port across restarts so hints in messages already sent stay right.
            self.config.listen_port = bound[1]
            self.home.save_config(self.config)
        return bound

    async def _start_dht(self, server_host: str) -> None:
        """Join the DHT through the server's bootstrap node and announce what we hold."""
        self.providers = ProviderDirectory(self.identity, wall=self.wall, rng=self.rng,
                                           client_only=self.reach is not None and self.reach.nat,
                                           held=self._serves)
        self._stack.push_async_callback(self.providers.aclose)
        self.transfer.unserved = self.providers.unserved
        self._following = TaskSet("server-follow", logger=log)  # DHT rejoins on failover
        self._stack.push_async_callback(self._following.aclose)
        bootstrap = self._dht_bootstrap(server_host)
        if not bootstrap:
            log.info("the server runs no DHT bootstrap node: co-recipients can't be found")
        host = self.listen_addr[0] if self.listen_addr else "0.0.0.0"
        await self.providers.start(host, bootstrap)
        self.providers.addresses = self.direct_addresses()
        self.providers.home_server = self.config.server

    async def _announce_held(self) -> None:
        """Announce every content in the store; those not served now (a received file
        deleted from disk, a cancelled message's, a download not resumed yet) are left
        out as each announce finds them (`_serves`)."""
        for cid in await asyncio.to_thread(self.store.content_ids):
            self.providers.announce(cid)

    def _serves(self, content_id: bytes) -> bool:
        """Whether a requester of `content_id` would be served now: it is in the store
        (a download's partial once it resumed) and its file is as it was sent. Blocking:
        the store's database, and one stat."""
        content = self.store.lookup(content_id)
        return content is not None and not source_changed(content)

    def _dht_bootstrap(self, server_host: str) -> list[tuple[str, int]]:
        """The server's DHT bootstrap node, if it runs one (from its CHALLENGE)."""
        dht_port = self.rendezvous.server_info.get("dht")
        return [(server_host, int(dht_port))] if isinstance(dht_port, int) else []

    def _advertise(self) -> dict[str, Any]:
        """What FINGER shows of us: direct addresses, and whether a NAT is in front."""
        host, port = self.listen_addr or ("", 0)
        if host in ("0.0.0.0", "::", ""):
            host = self.reach.local_ip or "" if self.reach else ""
        # An IPv6 host in brackets: the DHT's provider records refuse ::1:P (every announce
        # failed), and HOST:PORT parsers only took it because the port comes last.
        return {"addrs": [format_hostport(host, port)] if host else [],
                "nat": bool(self.reach and self.reach.nat)}

    def reach_info(self) -> dict[str, Any]:
        """For `info`: whether a NAT stands in front of us (None: the server runs no STUN,
        so we can't tell), the address the server sees us from, and the rungs we dial
        peers over."""
        seen = self.reach.mapped if self.reach is not None else None
        return {"nat": self.reach.nat if self.reach is not None and seen else None,
                "seen_as": format_hostport(*seen) if seen else None,
                "paths": self.links.paths()}

    def direct_addresses(self) -> list[str]:
        return list(self._advertise()["addrs"])

    async def send(self, path: Path, to: list[str], title: str, note: str) -> dict[str, Any]:
        """Send `path` as `peerpost send` does; {"id": message id in hex}."""
        return {"id": (await self.sender.send(path, to, title, note)).hex()}


def run_node(home: NodeHome, args: argparse.Namespace, *,
             options: NodeOptions | None = None) -> int:
    """`peerpost node`: run until SIGTERM/SIGINT; print `ready ...` once serving. The
    command line's settings go into `options` (a test's clocks), else into defaults."""
    opts = options or NodeOptions()
    opts.max_upload_rate = args.max_upload_rate
    if args.retry_base is not None:
        opts.retry_base = args.retry_base
    if args.retry_max is not None:
        opts.retry_max = args.retry_max
    if args.provider_refresh is not None:
        opts.provider_refresh = args.provider_refresh
    if getattr(args, "mismatch_retry", None) is not None:
        opts.mismatch_backoff = Backoff(args.mismatch_retry, 10 * args.mismatch_retry,
                                        jitter=0.8)
    if getattr(args, "no_co_recipients", False):
        opts.co_recipients = False
    if getattr(args, "no_quic", False):
        opts.quic = False
    if getattr(args, "inbox_max", None) is not None:
        opts.inbox_max = args.inbox_max
    opts.web = getattr(args, "web", None)
    opts.metrics = getattr(args, "metrics", None)
    opts.on_message = getattr(args, "on_message", None)
    if getattr(args, "no_desktop_notify", False):
        opts.desktop_notify = False

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        starting = asyncio.current_task()

        def on_signal() -> None:
            stop.set()
            if starting is not None:
                starting.cancel()  # still starting: a first login may wait for its server

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            async with Node(home, options=opts, wall=time.time) as node:
                starting = None
                await serve(node, stop)
        except asyncio.CancelledError:
            if starting is None or not stop.is_set():
                raise
            log.info("stopped before it was serving")

    async def serve(node: Node, stop: asyncio.Event) -> None:
        host, port = node.listen_addr or ("", 0)
        metrics, shown = None, ""
        if opts.metrics is not None:
            from overlay.app.metrics import NodeMetrics  # aiohttp, prometheus_client

            metrics = NodeMetrics(node, node.fetch_meter)
            node._stack.push_async_callback(metrics.aclose)
            mhost, mport = await metrics.start(*opts.metrics)
            shown = f" metrics={format_hostport(mhost, mport)}"
        print(f"ready address={node.address} listen={format_hostport(host, port)} "
              f"control={home.control_path} web={node.web_url or 'off'}{shown}", flush=True)
        notify("READY=1", f"STATUS=serving {node.address}")
        await stop.wait()
        log.info("stopping")
        notify("STOPPING=1")

    home.load_config()  # no home folder: say so before taking its lock
    with home.daemon_lock():  # HomeBusy (a HomeError) when another daemon has this home
        try:
            try:
                import uvloop
            except ImportError:
                asyncio.run(main())
            else:
                uvloop.run(main())
        except (RecordsError, ContentStoreError) as exc:  # a damaged node.db or store
            raise HomeError(str(exc)) from None
    return 0

