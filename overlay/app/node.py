"""`peerpost node`: the peer daemon, the composition root of everything in overlay/.

It owns, for its lifetime: the rendezvous session (auth, pushes, reconnect), the content
store, the direct-TCP transfer server (advertised through FINGER), the records database,
the download queue and the local control socket. `Node` is an async context manager; every
long-lived task belongs to its TaskGroup, and SIGTERM/SIGINT close it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.address import parse_hostport
from crypto.codec import Fields
from crypto.content import DEFAULT_CHUNK_SIZE, chunk_count
from crypto.envelope import seal_for_recipients
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.location import MAX_RECIPIENTS, LocationMessage, decode_location
from overlay.app.control import ControlError, ControlServer
from overlay.app.home import NodeConfig, NodeHome
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.dht.directory import ProviderDirectory
from overlay.mail.contacts import Contacts, PinResult
from overlay.mail.db import NodeDB
from overlay.mail.downloads import Activity, DownloadFailed, DownloadQueue, RetryLater, SourceView
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.outgoing import (
    PreparedContent,
    Recipient,
    SendError,
    build_message,
    check_recipients,
    describe,
    seal_message,
    send_batches,
)
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import RECEIPT_KIND, Receipt
from overlay.mail.retention import apply_retention
from overlay.transfer.downloader import (
    ChunkStored,
    Downloader,
    FetchError,
    FetchEvent,
    NoSourceReachable,
)
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import ConnectionLadder, Holder, sender_addresses
from overlay.transports.reachability import Reachability, probe
from overlay.transports.relay import DEFAULT_TIMEOUT as RELAY_TIMEOUT
from overlay.transports.relay import relay_accept, relay_dial
from overlay.transports.signalling import PipeSender
from overlay.transports.stream import Stream, StreamClosed, StreamError
from overlay.transports.webrtc import WebRtcEndpoint, WebRtcSettings
from rendezvous.client import PipeMessage, RelayInvite, RendezvousClient, RendezvousError
from rendezvous.errors import ConnectionLostError, RequestTimeoutError

log = logging.getLogger("peerpost.node")

FINGER_CACHE = 30.0  # seconds a co-recipient's FINGER answer is reused while downloading
_Device = tuple[bytes, tuple[str, dict[str, Any]]]  # peer id, (address, advertisement)


@dataclass
class NodeOptions:
    max_upload_rate: float | None = None
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_active_downloads: int = 1
    max_in_flight: int = 8  # chunks outstanding per source
    provider_refresh: float = 10.0  # seconds between provider lookups in one download
    receipt_retry: float = 60.0  # seconds between attempts at receipts the server missed
    # Fetch from co-recipients the DHT names as well as from the sender. Off: the sender
    # alone (what e-mail-style delivery without the overlay does; the simulator compares).
    co_recipients: bool = True
    # How the WebRTC rung is made: aiortc in production; the simulator passes its own
    # endpoint that obeys its NAT model (aiortc's DTLS and SCTP are not run there).
    webrtc_endpoint: Callable[[PipeSender, WebRtcSettings], WebRtcEndpoint] = WebRtcEndpoint


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
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handled: set[bytes] = set()
        self._finger_cache: dict[str, tuple[float, list[_Device]]] = {}
        self._login_pending: set[bytes] | None = None
        self._login_read = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Node:
        st = self._stack
        self.db = NodeDB.open(self.home.db_path)
        st.callback(self.db.close)
        self.inbox, self.outbox = Inbox(self.db), Outbox(self.db)
        self.prefs, self.contacts = Prefs(self.db), Contacts(self.db)
        rate = self.options.max_upload_rate or self.prefs.max_upload_rate
        self.store = ContentStore(self.home.store_dir)
        st.push_async_callback(self.store.aclose)
        self.transfer = TransferServer(self.identity, self.store.catalog,
                                       max_upload_rate=int(rate) if rate else None)
        st.push_async_callback(self.transfer.aclose)
        self.listen_addr = await self._listen()

        host, port = parse_hostport(self.config.server, what="server")
        self._advertised = self._advertise()
        self.rendezvous = RendezvousClient(host, port, self.identity, self.address,
                                           advertise=self._advertised, reconnect=True)
        await self._first_login()
        st.push_async_callback(self.rendezvous.aclose)
        self.reach = await probe(host, port, self.rendezvous.server_info.get("stun"),
                                 self.listen_addr[0] if self.listen_addr else "")
        if self._advertise() != self._advertised:
            await self.rendezvous.advertise(self._advertise())
        await self._start_dht(host)
        await self._start_webrtc(host)

        self.incoming = IncomingMail(self.identity, self.address, self.inbox, self.outbox,
                                     self.prefs, self.contacts, self.wall)
        self.downloads = DownloadQueue(
            self.inbox, self.prefs, self._fetch, self._completed, wall=self.wall, rng=self.rng,
            max_active=self.options.max_active_downloads, retry_base=self.options.retry_base,
            retry_max=self.options.retry_max)
        self.control = ControlServer(self.home.control_path, self._operations())
        await self.control.start()
        st.push_async_callback(self.control.aclose)

        await self._retention()  # finish what a crash interrupted
        self._tg = asyncio.TaskGroup()
        await st.enter_async_context(self._tg)
        self._tasks = [self._tg.create_task(self._pushes(), name="pushes"),
                       self._tg.create_task(self._serve_webrtc(), name="webrtc-accept"),
                       self._tg.create_task(self._downloads_after_login(), name="downloads"),
                       self._tg.create_task(self._owed_receipts(), name="owed-receipts")]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._tg is not None:
            for task in list(self._tg._tasks):
                task.cancel()
        await self._stack.aclose()

    async def _first_login(self) -> None:
        """Log in to the server, waiting with backoff while it can't be reached: a node
        started before the network is up, or while its server restarts, waits for it
        instead of exiting. A refused login (wrong key, unknown address) still ends it."""
        delay = 1.0
        while True:
            try:
                await self.rendezvous.start()
                return
            except (ConnectionLostError, RequestTimeoutError) as exc:
                log.warning("server %s not reachable (%s); trying again in %.0f s",
                            self.config.server, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

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
                                           client_only=self.reach is not None and self.reach.nat)
        self._stack.push_async_callback(self.providers.aclose)
        dht_port = self.rendezvous.server_info.get("dht")  # from the server's CHALLENGE
        bootstrap = [(server_host, int(dht_port))] if isinstance(dht_port, int) else []
        if not bootstrap:
            log.info("the server runs no DHT bootstrap node: co-recipients can't be found")
        host = self.listen_addr[0] if self.listen_addr else "0.0.0.0"
        await self.providers.start(host, bootstrap)
        self.providers.addresses = self.direct_addresses()
        self.providers.home_server = self.config.server
        for cid in await asyncio.to_thread(self.store.content_ids):
            self.providers.announce(cid)

    async def _start_webrtc(self, server_host: str) -> None:
        """WebRTC through the server's STUN, signalled over PIPE (overlay.transports.webrtc)."""
        stun = self.rendezvous.server_info.get("stun")
        settings = WebRtcSettings(stun=[(server_host, int(stun))] if isinstance(stun, int)
                                  else [])
        self.rtc = self.options.webrtc_endpoint(self.rendezvous, settings)
        await self.rtc.start()
        self._stack.push_async_callback(self.rtc.aclose)

        async def webrtc(holder: Holder) -> Stream:
            # A NATed holder that is offline can't be retried directly: leave the offer
            # waiting at the server (the seed's held request) so it answers on coming back.
            hold = settings.answer_timeout if holder.nat else 0.0
            return await self.rtc.dial(holder.address or "", holder.peer_id, hold=hold)

        host, port = parse_hostport(self.config.server, what="server")

        async def relay(holder: Holder) -> Stream:
            return await relay_dial(host, port, self.identity, self.address,
                                    holder.address or "", holder.peer_id)

        self.ladder = ConnectionLadder(
            webrtc=webrtc, relay=relay,
            webrtc_timeout=settings.answer_timeout + settings.connect_timeout,
            relay_timeout=RELAY_TIMEOUT)

    async def _serve_relayed(self, invite: RelayInvite) -> None:
        """Join a relayed stream another device opened to us, and serve it."""
        host, port = parse_hostport(self.config.server, what="server")
        try:
            stream = await relay_accept(host, port, self.identity, self.address, invite)
        except StreamError as exc:
            log.info("relay from %s not joined: %s", invite.sender, exc)
            return
        await self.transfer.handle_stream(stream)

    async def _serve_webrtc(self) -> None:
        """Hand each accepted WebRTC stream to the transfer server."""
        while True:
            try:
                stream = await self.rtc.accept()
            except StreamClosed:
                return
            if self._tg is not None:
                self._tg.create_task(self.transfer.handle_stream(stream), name="serve-webrtc")

    def _advertise(self) -> dict[str, Any]:
        """What FINGER shows of us: direct addresses, and whether a NAT is in front."""
        host, port = self.listen_addr or ("", 0)
        if host in ("0.0.0.0", "::", ""):
            host = self.reach.local_ip or "" if self.reach else ""
        return {"addrs": [f"{host}:{port}"] if host else [],
                "nat": bool(self.reach and self.reach.nat)}

    def direct_addresses(self) -> list[str]:
        return list(self._advertise()["addrs"])

    # --- receiving ---------------------------------------------------------------------
    async def _downloads_after_login(self) -> None:
        """Start the download queue once the mailbox that was waiting at login is read.

        At login the server pushes queued envelopes one by one; choosing what to fetch
        before all of them are in would start an ordinary message ahead of a priority
        one further down the queue. Bounded: a slow flush delays downloads by 3 s at most.
        """
        try:
            pending = {e.message_id for e in await self.rendezvous.list()}
        except (RendezvousError, OSError) as exc:
            log.info("LIST at login failed (%s); starting downloads at once", exc)
            pending = set()
        self._login_pending = pending - self._handled
        if self._login_pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    await self._login_read.wait()
        self._login_pending = set()
        await self.downloads.run()

    def _note_handled(self, message_id: bytes) -> None:
        if self._login_pending is None:
            self._handled.add(message_id)  # before LIST answered
            return
        self._login_pending.discard(message_id)
        if not self._login_pending:
            self._login_read.set()

    async def _pushes(self) -> None:
        async for push in self.rendezvous.pushes():
            if isinstance(push, RelayInvite):
                if self._tg is not None:
                    self._tg.create_task(self._serve_relayed(push), name="serve-relay")
                continue
            if isinstance(push, PipeMessage):
                if not self.rtc.feed(push):
                    self.incoming.counters["dropped-pipe"] += 1
                    log.info("dropped a PIPE message from %s that isn't signalling",
                             push.sender)
                continue
            env = push.envelope
            outcome, _ = self.incoming.handle(Pushed(env.message_id, env.sender, env.blob))
            # Acknowledge only after the inbox committed it; a dropped one is removed too,
            # or the server would hand the same garbage back at every login.
            with contextlib.suppress(RendezvousError, OSError):
                await self.rendezvous.remove(env.message_id)
            self._note_handled(env.message_id)
            while self.incoming.key_checks:
                sender = self.incoming.key_checks.pop()
                try:
                    keys = [d.verify_key for d in (await self.rendezvous.finger(sender)).devices]
                except (RendezvousError, OSError) as exc:  # can't check: warn, loudly
                    log.info("FINGER %s failed: %s", sender, exc)
                    keys = []
                self.incoming.recheck_keys(sender, keys)
            if outcome is Outcome.NEW:
                self.downloads.wake()
            elif outcome is Outcome.RECEIPT:
                await self._retention()

    async def _retention(self) -> None:
        try:
            done = await asyncio.to_thread(apply_retention, self.outbox, self.store,
                                           self.prefs, self.home.root / "archive")
            for entry, action in done:
                if action != "keep":
                    await self.providers.withdraw(entry.content_id)
        except OSError as exc:  # a full or read-only archive disk must not stop the node
            log.warning("retention step failed (it is retried at the next receipt or "
                        "start): %s", exc)

    async def _fetch(self, entry: InboxEntry, msg: LocationMessage, act: Activity,
                     progress: Callable[[int], None]) -> str:
        """Fetch one message's content from every holder we know of (the Downloader)."""
        h = msg.handle
        dest = self.home.received_dir(self.config)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        try:
            partial = await asyncio.to_thread(
                self.store.open_partial, h.content_id, h.size, h.chunk_size, h.content_key,
                h.capability, dest, msg.description.file_name or f"{entry.id.hex()}.bin")
        except ContentStoreError:
            # Already held in full (the same content twice, or a crash between the
            # rename and the inbox update): nothing to fetch.
            held = self.store.local(h.content_id)
            if held is None:
                raise DownloadFailed("the content store lost track of this content") from None
            return str(held.path)
        sources = [self.ladder.source(x) for x in await self._holders(msg)]
        if partial.held:
            self.providers.announce(h.content_id)  # resumed: we already serve some chunks
        progress(partial.held)
        last = [0.0]
        got_chunk = [False]
        loop = asyncio.get_running_loop()

        def on_event(ev: FetchEvent) -> None:
            # Progress goes to SQLite (fsync'd): at most a few times a second, not per chunk,
            # except the first chunk, whose time is the "first byte" people see.
            now = loop.time()
            first = isinstance(ev, ChunkStored) and not got_chunk[0]
            if first:
                got_chunk[0] = True
                self.providers.announce(h.content_id)  # partial holders serve what they have
            if first or now - last[0] >= 0.25 or partial.is_complete:
                last[0] = now
                progress(partial.held)
            act.sources = {s.label: SourceView(peer=s.label, path=s.path or "?", bytes=s.bytes,
                                               rate=s.rate, banned=s.outcome == "banned")
                           for s in dl.stats}

        # A source's connect() may climb every rung of the ladder, each to its own timeout
        # (a held offer waits for a NATed holder to come back): give it the whole budget.
        dl = Downloader(partial, sources, self.identity, window=self.options.max_in_flight,
                        connect_timeout=self.ladder.budget, on_event=on_event)
        refresh = loop.create_task(self._refresh_holders(dl, msg), name="provider-refresh")
        try:
            path = await dl.run()
        except NoSourceReachable as exc:
            progress(partial.held)
            raise RetryLater(str(exc)) from None
        except FetchError as exc:
            raise DownloadFailed(str(exc)) from None
        finally:
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)
        progress(partial.held)
        return str(path)

    async def _refresh_holders(self, dl: Downloader, msg: LocationMessage) -> None:
        """Look the providers up again during a long download: co-recipients that got
        chunks since it started become sources too (issue 4, the repeated lookup), and a
        holder that failed earlier (a sender that was away) is tried again."""
        while True:
            await asyncio.sleep(self.options.provider_refresh)
            for holder in await self._holders(msg):
                source = self.ladder.source(holder)
                if dl.add_source(source):  # False while in use, or if it lied
                    log.info("message %s: new source %s", msg.headers.message_id.hex(),
                             source.label)

    async def _holders(self, msg: LocationMessage) -> list[Holder]:
        """The sender and every co-recipient the DHT names as a provider, with what FINGER
        says about reaching each (addresses now, NAT, the address to signal through)."""
        devices = await self._devices([msg.headers.sender, *msg.headers.recipients])
        sender = msg.headers.sender_peer_id
        s_addr, s_adv = devices.get(sender, (msg.headers.sender, {}))
        holders = [Holder(sender, s_addr, tuple(sender_addresses(msg, _addrs(s_adv))),
                          bool(s_adv.get("nat")))]
        if not self.options.co_recipients:
            return holders
        for rec in await self.providers.find(msg.handle.content_id, exclude={sender}):
            addr, adv = devices.get(rec.peer_id, (None, {}))
            holders.append(Holder(rec.peer_id, addr, tuple(rec.addresses),
                                  bool(adv.get("nat"))))
        return holders

    async def _devices(self, addresses: list[str]) -> dict[bytes, tuple[str, dict[str, Any]]]:
        """peer id -> (address, advertisement) for the devices of `addresses` (FINGER)."""

        loop = asyncio.get_running_loop()

        async def one(address: str) -> list[_Device]:
            # Every provider refresh asks again; with a hundred co-recipients that is a
            # hundred FINGERs. An answer younger than FINGER_CACHE seconds is reused.
            cached = self._finger_cache.get(address)
            if cached is not None and loop.time() - cached[0] < FINGER_CACHE:
                return cached[1]
            try:
                info = await self.rendezvous.finger(address)
            except (RendezvousError, OSError) as exc:
                log.info("FINGER %s failed: %s", address, exc)
                return []
            found = [(d.peer_id, (address, dict(d.advertise))) for d in info.devices]
            self._finger_cache[address] = (loop.time(), found)
            return found

        wanted = [a for a in dict.fromkeys(addresses) if a != self.address][:MAX_RECIPIENTS]
        found = await asyncio.gather(*(one(a) for a in wanted))
        return dict(pair for pairs in found for pair in pairs)

    async def _completed(self, entry: InboxEntry, msg: LocationMessage) -> None:
        await self._send_receipt(entry.id, msg)

    async def _send_receipt(self, entry_id: bytes, msg: LocationMessage) -> bool:
        """Tell the sender we hold it; remembered as sent only once the server took it."""
        receipt = Receipt(entry_id, "downloaded", int(self.wall()))
        if not await self._send_to_sender(msg, RECEIPT_KIND, receipt.encode()):
            return False
        await asyncio.to_thread(self.inbox.mark_receipt_sent, entry_id, self.wall())
        return True

    async def _owed_receipts(self) -> None:
        """Receipts the server did not take (it was down, or we were cut off) go again,
        at start and then every `receipt_retry` seconds, until it does: without one the
        sender never learns we have the file and keeps its copy for good."""
        while True:
            owed = await asyncio.to_thread(self.inbox.receipts_owed)
            for entry_id, raw in owed:
                try:
                    msg = decode_location(raw)
                except DecodeError as exc:  # stored only after it decoded; never expected
                    log.warning("inbox %s: stored message unreadable: %s", entry_id.hex(), exc)
                    continue
                if await self._send_receipt(entry_id, msg):
                    log.info("sent the owed receipt for %s", entry_id.hex())
            await asyncio.sleep(self.options.receipt_retry)

    async def _send_to_sender(self, msg: LocationMessage, kind: str, body: bytes) -> bool:
        sender = msg.headers.sender
        keys = self.contacts.trusted_keys(sender)
        devices = [PublicIdentity(k) for k in keys
                   if PublicIdentity(k).peer_id == msg.headers.sender_peer_id] or \
                  [PublicIdentity(k) for k in keys]
        if not devices:
            log.warning("%s for %s not sent: no trusted key for %s", kind,
                        msg.headers.message_id.hex(), sender)
            return False
        items = [(sender, d.peer_id, blob)
                 for d, blob in seal_for_recipients(self.identity, kind, body, devices)]
        try:
            await self.rendezvous.send(os.urandom(16), items)
        except (RendezvousError, OSError) as exc:
            # The client already retried across reconnects for request_timeout.
            log.warning("%s for %s not sent (tried again later): %s", kind,
                        msg.headers.message_id.hex(), exc)
            return False
        return True

    # --- sending -----------------------------------------------------------------------
    async def send(self, path: Path, to: list[str], title: str, note: str) -> dict[str, Any]:
        addresses = check_recipients(to)
        if not await asyncio.to_thread(path.is_file):
            raise SendError(f"no such file: {path}")
        recipients: list[Recipient] = []
        warnings: list[str] = []
        for addr in addresses:
            try:
                info = await self.rendezvous.finger(addr)
            except RendezvousError as exc:
                raise SendError(f"{addr}: {exc}") from None
            keys = [d.verify_key for d in info.devices]
            if not keys:
                raise SendError(f"{addr}: no device is registered for this address")
            pin = self.contacts.pin_keys(addr, keys, self.wall())
            if pin is PinResult.CHANGED:
                raise SendError(
                    f"the keys of {addr} have CHANGED since you last sent to them. Compare "
                    f"fingerprints out of band (`peerpost contacts`), then "
                    f"`peerpost contacts accept {addr}` to send anyway")
            trusted = self.contacts.trusted_keys(addr)
            recipients.append(Recipient(addr, tuple(PublicIdentity(k) for k in keys
                                                    if k in trusted)))
        local = await self.store.add_local_file(path)
        self.providers.announce(local.content_id)
        content = PreparedContent(local.content_id, local.size, local.chunk_size, local.key,
                                  local.capability)
        description, _ = await describe(path)
        msg = build_message(self.identity, self.address, addresses, content, description,
                            title=title, note=note, home_server=self.config.server,
                            direct_addresses=self.direct_addresses(), now=self.wall())
        items = seal_message(self.identity, msg, recipients)
        mid = msg.headers.message_id
        self.outbox.add(id=mid, path=str(path), title=title, size=content.size,
                        content_id=content.content_id, recipients=addresses,
                        created_at=self.wall(), message=msg.encode())
        for batch in send_batches(items):  # many recipients: several SENDs, one id
            await self.rendezvous.send(mid, batch)
            for addr in dict.fromkeys(a for a, _, _ in batch):
                self.outbox.set_recipient_state(mid, addr, RecipientStatus.SENT, self.wall())
        log.info("sent %s (%s, %d bytes) to %s", mid.hex(), title, content.size,
                 ", ".join(addresses))
        return {"id": mid.hex(), "warnings": warnings}

    # --- control operations ------------------------------------------------------------
    def _operations(self) -> dict[str, Any]:
        return {
            "ping": self._op_ping,
            "send": self._op_send,
            "inbox": self._op_inbox,
            "fetch": self._op_fetch,
            "progress": self._op_progress,
            "status": self._op_status,
            "prefs": self._op_prefs,
            "prefs_set": self._op_prefs_set,
            "prefs_list": self._op_prefs_list,
            "contacts": self._op_contacts,
            "contacts_accept": self._op_contacts_accept,
        }

    async def _op_ping(self, a: Fields) -> Any:
        return {"address": self.address, "peer_id": self.identity.peer_id.hex(),
                "fingerprint": self.identity.public.fingerprint(),
                "listen": list(self.listen_addr or ()),
                "connected": self.rendezvous.connected,
                "counters": dict(self.incoming.counters)}

    async def _op_send(self, a: Fields) -> Any:
        to = a.list("to", _item_text, max_items=64) or ()
        try:
            return await self.send(Path(a.str("path", max_len=4096)), list(to),
                                   a.str("title", max_len=200), a.str("note", max_len=4000))
        except SendError as exc:
            raise ControlError(str(exc)) from None

    def _entry_json(self, e: InboxEntry) -> dict[str, Any]:
        act = self.downloads.active.get(e.id)
        return {
            "id": e.id.hex(), "from": e.sender, "title": e.title, "note": e.note,
            "size": e.size, "file_name": e.file_name, "media_type": e.media_type,
            "state": e.state.value, "progress": round(e.progress, 4), "path": e.path,
            "junk": e.junk, "priority": e.priority, "received_at": e.received_at,
            "next_attempt": e.next_attempt, "attempts": e.attempts, "error": e.error,
            "started_at": e.started_at, "first_byte_at": e.first_byte_at,
            "completed_at": e.completed_at,
            "sources": [s.as_dict() for s in act.sources.values()] if act else [],
        }

    async def _op_inbox(self, a: Fields) -> Any:
        include_junk = bool(a.bool("include_junk", optional=True))
        return [self._entry_json(e) for e in self.inbox.list(include_junk=include_junk)]

    def _find(self, prefix: str) -> InboxEntry:
        matches = [e for e in self.inbox.list(include_junk=True) if e.id.hex().startswith(
            prefix.lower())]
        if not matches:
            raise ControlError(f"no message {prefix!r} in the inbox")
        if len(matches) > 1:
            raise ControlError(f"{prefix!r} matches {len(matches)} messages; give more digits")
        return matches[0]

    async def _op_fetch(self, a: Fields) -> Any:
        e = self._find(a.str("id", min_len=1, max_len=32))
        self.downloads.request(e.id)
        fresh = self.inbox.get(e.id)
        return self._entry_json(fresh or e)

    async def _op_progress(self, a: Fields) -> Any:
        return self._entry_json(self._find(a.str("id", min_len=1, max_len=32)))

    async def _op_status(self, a: Fields) -> Any:
        want = a.str("id", max_len=32, optional=True)
        out = []
        for m in self.outbox.list():
            if want and not m.id.hex().startswith(want.lower()):
                continue
            served = self.transfer.chunks_served(m.content_id)
            try:
                chunk_size = decode_location(m.message).handle.chunk_size
            except DecodeError:
                chunk_size = DEFAULT_CHUNK_SIZE  # a row from before messages were kept
            out.append({
                "id": m.id.hex(), "title": m.title, "size": m.size, "path": m.path,
                "content_id": m.content_id.hex(), "created_at": m.created_at,
                "chunk_count": chunk_count(m.size, chunk_size),
                "chunks_served": served, "max_in_flight": self.options.max_in_flight,
                "retention_done": m.retention_action if m.retention_done else None,
                "recipients": [{"address": r.address, "state": r.state.value,
                                "updated_at": r.updated_at, "reason": r.reason}
                               for r in m.recipients],
            })
        return out

    async def _op_prefs(self, a: Fields) -> Any:
        return self.prefs.as_dict()

    async def _op_prefs_set(self, a: Fields) -> Any:
        key, value = a.str("key", max_len=64), a.str("value", max_len=4096)
        if key == "auto-download":
            if value not in ("on", "off"):
                raise ControlError("auto-download takes on or off")
            self.prefs.auto_download = value == "on"
        elif key == "retention":
            self.prefs.retention = value
        elif key == "archive-dir":
            self.prefs.archive_dir = value or None
        elif key == "max-upload-rate":
            self.prefs.max_upload_rate = None if value in ("none", "0", "") else int(value)
        else:
            raise ControlError(f"unknown preference {key!r}")
        self.downloads.wake()
        return self.prefs.as_dict()

    async def _op_prefs_list(self, a: Fields) -> Any:
        which, action = a.str("list", max_len=16), a.str("action", max_len=16)
        pattern = a.str("address", max_len=254)
        if action == "remove":
            if not self.prefs.remove_sender(pattern):
                raise ControlError(f"{pattern} is not in the {which} list")
        elif which == "priority":
            self.prefs.add_priority(pattern)
        elif which == "junk":
            self.prefs.add_junk(pattern)
        else:
            raise ControlError(f"unknown list {which!r}")
        return self.prefs.as_dict()

    async def _op_contacts(self, a: Fields) -> Any:
        return [{"address": c.address, "fingerprints": [PublicIdentity(k).fingerprint()
                                                         for k in c.keys],
                 "first_seen": c.first_seen, "changed": c.changed}
                for c in self.contacts.list()]

    async def _op_contacts_accept(self, a: Fields) -> Any:
        addr = a.str("address", max_len=254)
        c = self.contacts.get(addr)
        if c is None or not c.changed:
            raise ControlError(f"no pending key change for {addr}")
        for k in c.pending_keys:
            self.contacts.accept_change(addr, k)
        return await self._op_contacts(a)


def _addrs(advertise: dict[str, Any]) -> list[str]:
    return [a for a in advertise.get("addrs", []) if isinstance(a, str)][:8]


def _item_text(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > 254:
        raise ControlError(f"{what}: expected an address")
    return v


def run_node(home: NodeHome, args: argparse.Namespace) -> int:
    """`peerpost node`: run until SIGTERM/SIGINT; print `ready ...` once serving."""
    opts = NodeOptions(max_upload_rate=args.max_upload_rate)
    if args.retry_base is not None:
        opts.retry_base = args.retry_base
    if args.retry_max is not None:
        opts.retry_max = args.retry_max
    if args.provider_refresh is not None:
        opts.provider_refresh = args.provider_refresh

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with Node(home, options=opts, wall=time.time) as node:
            host, port = node.listen_addr or ("", 0)
            print(f"ready address={node.address} listen={host}:{port} "
                  f"control={home.control_path}", flush=True)
            await stop.wait()
            log.info("stopping")

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


if __name__ == "__main__":
    sys.exit(0)
