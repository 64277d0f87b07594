"""Federation, the sending side: server links and the outbound queue that holds and retries.

A node hands everything for a foreign address to its own server. This module is what that
server does with it:

- `LinkClient`: one server link to another domain's server, found and authenticated with
  the domain's records from a `DomainResolver` (servers in RFC 2782 order, the domain
  key). It answers the CHALLENGE with LINK (rendezvous/messages.py) and accepts the link
  only if the reply's `server_sig` verifies under the key DNS publishes for that domain;
  a server showing another key is refused (`LinkError`, counted, logged). Requests go
  in windows (a lock): up to 32 SENDs in one write, then their REPLYs; a link gets no
  pushes.
- `Federation`: the outbound queue worker. A SEND naming foreign recipients is
  acknowledged once the store has committed those envelopes to its outbound queue; then
  `wake(domain)` forwards them at once over the domain's link, grouped per (sender,
  message, recipient) with the sender named (`from`). While the domain is unreachable
  (no records, no server answering, a LINK refused with 401 (its key check failed), a
  429/5xx) every waiting envelope records the error and when the outage began, and the
  worker tries again after `Backoff` delays. A permanent refusal (400/403/404/413: no
  such address, alignment) bounces that recipient's envelopes with the remote's text,
  and a LINK refused with 403 by every server of the domain (it blocks ours) bounces
  everything waiting for it. After `expiry` (default 5 days) waiting envelopes bounce.
  The queue is in the store, so a restart (or kill -9) of either server loses nothing:
  `start()` wakes every domain with envelopes waiting, and the receiving server stores a
  repeated forward once (`Store.enqueue_forwarded`).
- `finger(asker, address)`: FINGER over the link on behalf of `asker`, so the remote's
  privacy rules apply to the asking user; 503 "b.test is unreachable: ..." otherwise.

- `pipe(...)`: a node's PIPE to a foreign address (WebRTC offers, answers, held offers),
  forwarded at once over the link with the sending user and device named; the remote
  delivers or holds it as for a local sender and its reply comes back as the node's
  reply. At most `_PIPES_WAITING` PIPEs per domain wait for the link; more get 503.
- `relay_invite(...)`: a node's RELAY to a foreign device. The caller's server (this one)
  hosts the splice; the link carries only the invitation, and the callee's server pushes
  RELAY-INVITE with this server's host, port and domain key as it found them in DNS
  (rendezvous/server.py has the whole design).
- `on_link(domain, host, challenge)`: called when a link comes up, with the remote's
  address and CHALLENGE (its `dht` port), so the server's DHT bootstrap node joins the
  other domain's (one DHT for all domains that exchange mail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

from crypto.address import domain_of, format_hostport
from rendezvous.backoff import Backoff
from rendezvous.client_core import ClientConnection
from rendezvous.dns import DomainLookupError, DomainRecords, DomainResolver
from rendezvous.domainkey import DomainKey, fingerprint
from rendezvous.errors import RemoteProtocolError, error_text, is_disk_full
from rendezvous.framing import DEFAULT_MAX_FRAME
from rendezvous.logfmt import kv
from rendezvous.messages import Challenge, Finger, Pipe, Relay, Reply, Request, Send, SendItem
from rendezvous.status import Status
from rendezvous.store import OutboundRow, Store
from rendezvous.taskset import TaskSet, raise_if_cancelled
from rendezvous.tls import client_context, peer_binding

log = logging.getLogger("rendezvous.federation")

DAY = 86400.0
DEFAULT_EXPIRY = 5 * DAY
_PAGE = 256                   # outbound rows read per round
_BATCH_BYTES = 160 * 1024     # blob bytes per forwarded SEND (the frame limit is 256 KiB)
_BATCH_ITEMS = 64
_PIPELINE = 32                # forwarded SENDs per write, replies awaited together
PACE_DELAY = 1.0              # seconds to wait after the other domain's 429 (its burst refills)
                              # (the receiver reads at most 64 in flight per link)
_MAX_LINKS = 256              # open links at once (FINGER can name any domain)
_PIPES_WAITING = 64           # PIPE/RELAY requests waiting for one domain's link
_PERMANENT = frozenset({Status.BAD_REQUEST, Status.FORBIDDEN, Status.NOT_FOUND,
                        Status.TOO_LARGE})


class LinkError(Exception):
    """The link could not be opened or broke; the text says why (shown to senders)."""


class LinkRefused(LinkError):
    """Every server of the other domain answered our LINK with 403: its operator refuses
    links, and so mail, from this domain (`--block-domain`, or no federation at all). Not
    an outage: waiting mail bounces at once instead of at expiry, as a 5xx in SMTP does."""

    def __init__(self, text: str, remote_text: str) -> None:
        super().__init__(text)
        self.remote_text = remote_text  # the refusing server's own words


class RemotePacing(LinkError):
    """The other domain answered 429: it is up, and takes our mail at its own rate."""


class LinkClient:
    """One authenticated server link to `records.domain` (see the module doc)."""

    def __init__(self, own_domain: str, domain_key: DomainKey, records: DomainRecords, *,
                 tls: bool, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.own_domain = own_domain
        self.domain_key = domain_key
        self.records = records
        self.remote = records.domain
        self.tls = tls
        self.timeout = timeout
        self.max_frame = max_frame
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._core: ClientConnection | None = None
        self._lock = asyncio.Lock()
        self.identity_mismatch = False  # the last refusal was the remote's key
        self.challenge: Challenge | None = None  # the remote's, once linked (its services)
        self.peer_ip: str | None = None          # the address the link connected to

    @property
    def alive(self) -> bool:
        w = self._writer
        return w is not None and not w.is_closing() and self._core is not None

    async def connect(self) -> None:
        """Open the link to the first server of the domain that takes it; LinkError if
        none does (the last reason)."""
        why = f"{self.remote} lists no server"
        refusals: list[LinkRefused] = []
        for host, port in self.records.servers:
            where = format_hostport(host, port)
            try:
                await asyncio.wait_for(self._open(host, port), self.timeout)
                return
            except LinkRefused as exc:
                why = str(exc)
                refusals.append(exc)
            except TimeoutError:
                why = f"{where} did not answer within {self.timeout:g} s"
            except (OSError, ssl.SSLError) as exc:
                why = f"cannot connect to {where}: {error_text(exc)}"
            except RemoteProtocolError as exc:
                why = f"{where} sent garbage: {exc.text}"
            except LinkError as exc:
                why = str(exc)
            await self.aclose()
        if refusals and len(refusals) == len(self.records.servers):
            raise LinkRefused(why, refusals[-1].remote_text)
        raise LinkError(why)

    async def _open(self, host: str, port: int) -> None:
        where = format_hostport(host, port)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_context() if self.tls else None,
            limit=self.max_frame + 16)
        self._reader, self._writer = reader, writer
        core = ClientConnection(self.max_frame, binding=peer_binding(writer.transport),
                                server_key=self.records.key)
        self._core = core
        first = await self._next(core)
        if not isinstance(first, Challenge):
            raise LinkError(f"{where} did not start with a CHALLENGE")
        if first.domain != self.remote:
            raise LinkError(f"{where} is the server of {first.domain}, not {self.remote}")
        if first.key != self.records.key:  # no LINK signed for a server we won't accept
            self.identity_mismatch = True
            raise LinkError(f"{self.remote} ({where}) did not prove the domain key "
                            f"DNS publishes for it: it shows {fingerprint(first.key)}, DNS "
                            f"publishes {fingerprint(self.records.key)}")
        rid = core.link(self.domain_key, self.own_domain)
        await self._flush(core)
        while True:
            msg = await self._next(core)
            if isinstance(msg, Reply) and msg.id == rid:
                break
        if msg.status == Status.FORBIDDEN:
            raise LinkRefused(f"{self.remote} refused the link: {msg.status} {msg.text}",
                              msg.text or "")
        if not msg.ok:
            # The remote's word alone (its signature covers the key it looked up for us).
            raise LinkError(f"{self.remote} refused the link: {msg.status} {msg.text}")
        if core.identity_error is not None:
            self.identity_mismatch = True
            raise LinkError(f"{self.remote} ({where}) did not prove the domain key "
                            f"DNS publishes for it: {core.identity_error.text}")
        self.identity_mismatch = False
        self.challenge = first
        peer = writer.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else host
        log.info(kv("link.up", remote=self.remote, server=where))

    async def _next(self, core: ClientConnection) -> Any:
        reader = self._reader
        if reader is None:
            raise LinkError("link closed")
        while (msg := core.next_event()) is None:
            data = await reader.read(65536)
            if not data:
                raise LinkError(f"{self.remote} closed the link")
            core.receive_data(data)
        return msg

    async def _flush(self, core: ClientConnection) -> None:
        w = self._writer
        if w is None:
            raise LinkError("link closed")
        w.write(core.data_to_send())
        await w.drain()

    async def request(self, make: Callable[[int], Request]) -> Reply:
        """Send one request and wait for its REPLY (LinkError if the link fails)."""
        return (await self.request_many([make]))[0]

    async def request_many(self, makes: list[Callable[[int], Request]]) -> list[Reply]:
        """Send the requests in one write and wait for every REPLY (in request order):
        one round trip for all of them, and the remote's store commits them together.
        LinkError if the link fails before every reply is in."""
        async with self._lock:
            core = self._core
            if core is None or not self.alive:
                raise LinkError(f"the link to {self.remote} is closed")
            try:
                async with asyncio.timeout(self.timeout):
                    reqs = [make(core.new_id()) for make in makes]
                    for req in reqs:
                        core.send(req)
                    await self._flush(core)
                    replies: dict[int, Reply] = {}
                    want = {req.id for req in reqs}
                    while len(replies) < len(want):
                        msg = await self._next(core)
                        if isinstance(msg, Reply) and msg.id in want:
                            replies[msg.id] = msg
                    return [replies[req.id] for req in reqs]
            except TimeoutError:
                await self.aclose()
                raise LinkError(f"{self.remote} did not answer within {self.timeout:g} s"
                                ) from None
            except (OSError, RemoteProtocolError) as exc:
                await self.aclose()
                raise LinkError(f"the link to {self.remote} broke: {exc}") from None
            except LinkError:
                await self.aclose()
                raise

    async def aclose(self) -> None:
        w, self._writer, self._reader, self._core = self._writer, None, None, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 1.0)


class Federation:
    """The outbound queue worker and the links of one server (see the module doc)."""

    def __init__(self, domain: str, domain_key: DomainKey, resolver: DomainResolver,
                 store: Store, *, tls: bool, clock: Callable[[], float] = time.time,
                 expiry: float = DEFAULT_EXPIRY, max_queued: int = 10_000,
                 backoff: Backoff | None = None, link_timeout: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.domain = domain
        self.domain_key = domain_key
        self.resolver = resolver
        self.store = store
        self.tls = tls
        self.clock = clock
        self.expiry = expiry
        self.max_queued = max_queued
        self.backoff = backoff or Backoff(1.0, 300.0, jitter=0.8)
        self.link_timeout = link_timeout
        self._rng = rng or random.Random()
        self._links: dict[str, LinkClient] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._running: set[str] = set()   # domains whose worker runs
        self._again: set[str] = set()     # woken while their worker ran
        self._tasks = TaskSet("federation", logger=log)
        self._waiting: dict[str, int] = {}  # domain -> PIPE/RELAY requests in progress
        # Called with (domain, host, CHALLENGE) whenever a link comes up (see module doc).
        self.on_link: Callable[[str, str, Challenge], None] | None = None
        # counters
        self.forwarded = 0
        self.bounced = 0
        self.link_failures = 0
        self.paced = 0  # 429s from the other domain, each followed by PACE_DELAY
        self.links_refused_identity = 0
        self.links_refused = 0  # LINKs the other domain refused for good (403)

    async def start(self) -> None:
        """Bounce what expired while we were down, then wake every waiting domain."""
        await self._expire(self.clock())
        for domain in await self.store.outbound_domains():
            self.wake(domain)
        self._tasks.spawn(self._sweep(), name="federation-sweep")

    async def aclose(self) -> None:
        await self._tasks.aclose()
        for link in list(self._links.values()):
            await link.aclose()
        self._links.clear()

    def snapshot(self) -> dict[str, int]:
        return {"fed_forwarded": self.forwarded, "fed_bounced": self.bounced,
                "fed_link_failures": self.link_failures,
                "fed_links_refused_identity": self.links_refused_identity,
                "fed_links_refused": self.links_refused,
                "fed_links_open": sum(link.alive for link in self._links.values())}

    # --- the queue -----------------------------------------------------------------------
    async def queue(self, sender: str, send: Send) -> str | None:
        """Commit `send` (all items foreign) to the outbound queue; the refusal text if
        over the sender's bound. Wakes the workers once committed."""
        now = self.clock()
        refusal = await self.store.queue_outbound(sender, send, now, now + self.expiry,
                                                  self.max_queued)
        if refusal is None:
            for domain in {domain_of(i.to) for i in send.items}:
                self.wake(domain)
        return refusal

    def wake(self, domain: str) -> None:
        """Forward what waits for `domain` now (or right after the current round)."""
        if domain in self._running:
            self._again.add(domain)
            return
        if self._tasks.closed:
            return
        self._running.add(domain)
        self._tasks.spawn(self._worker(domain), name=f"outbound {domain}")

    async def _worker(self, domain: str) -> None:
        """Forward what waits for `domain`, page by page, until nothing does. A round the
        store fails (a full disk refusing the bookkeeping, a database restarting) is
        logged and tried again after the backoff: a worker that ended on it left the
        domain's mail waiting for the next send to it or a restart (nothing else wakes a
        domain on SQLite)."""
        attempt = 0
        try:
            while True:
                raise_if_cancelled()
                self._again.discard(domain)
                try:
                    more, attempt = await self._round(domain, attempt)
                except Exception as exc:
                    raise_if_cancelled()
                    if self._tasks.closed:  # the store closed under it: the server stops
                        return
                    # A RuntimeError too: PgStore fails a round with one while PostgreSQL
                    # starts up or shuts down ('cannot connect to ...').
                    attempt += 1
                    if is_disk_full(exc):
                        log.error(kv("storage.full", verb="outbound", domain=domain,
                                     error=str(exc)))
                    else:
                        log.exception(kv("outbound.round_failed", domain=domain))
                    await asyncio.sleep(self.backoff.delay(attempt, self._rng))
                    continue
                if not more:
                    return  # `finally` runs before any other callback: no wake is lost
        finally:
            self._running.discard(domain)

    async def _round(self, domain: str, attempt: int) -> tuple[bool, int]:
        """Forward the next page of `domain`'s queue: whether to go on, and the attempt
        the link's backoff is at."""
        rows = await self.store.outbound_due(domain, 0, _PAGE)
        if not rows:
            return domain in self._again, attempt
        try:
            await self._forward(domain, rows)
            attempt = 0
        except LinkRefused as exc:
            raise_if_cancelled()
            await self._bounce_refused(domain, rows, exc)
            attempt = 0
        except RemotePacing as exc:
            # The other domain is up and takes mail at its own rate: not an outage,
            # so no "unreachable since" and no growing backoff, just a pause.
            self.paced += 1
            log.info(kv("outbound.paced", domain=domain, waiting=len(rows),
                        reply=str(exc)))
            await asyncio.sleep(PACE_DELAY)
        except LinkError as exc:
            raise_if_cancelled()
            attempt += 1
            self.link_failures += 1
            text = f"{domain} unreachable: {exc}"
            log.warning(kv("outbound.retry", domain=domain, attempt=attempt,
                           waiting=len(rows), error=str(exc)))
            await self.store.outbound_failed(domain, text, self.clock())
            await asyncio.sleep(self.backoff.delay(attempt, self._rng))
        return True, attempt

    async def _bounce_refused(self, domain: str, rows: list[OutboundRow],
                              exc: LinkRefused) -> None:
        """Bounce `rows` (the next page of the domain's queue; the worker goes on to the
        next) with the refusing server's words."""
        reason = f"{domain} refused it: {exc.remote_text}"
        ids = [r.id for r in rows]
        self.bounced += len(ids)
        self.links_refused += 1
        log.warning(kv("outbound.refused", domain=domain, bounced=len(ids), reason=reason))
        await self.store.outbound_done(ids, "bounced", reason, self.clock())

    async def _forward(self, domain: str, rows: list[OutboundRow]) -> None:
        now = self.clock()
        if any(r.expires_at <= now for r in rows):
            await self._expire(now)
        groups: dict[tuple[str, bytes, str, int], list[OutboundRow]] = {}
        for row in rows:
            if row.expires_at <= now:
                continue  # the sweep bounces it
            groups.setdefault((row.sender, row.message_id, row.recipient, row.priority),
                              []).append(row)
        sends = [(sender, mid, recipient, prio, batch)
                 for (sender, mid, recipient, prio), group in groups.items()
                 for batch in _batches(group)]
        for start in range(0, len(sends), _PIPELINE):
            window = sends[start:start + _PIPELINE]
            link = await self.link(domain)
            replies = await link.request_many([
                _forward_send(mid, prio, tuple(SendItem(r.recipient, r.device, r.blob)
                                               for r in batch), sender)
                for sender, mid, _, prio, batch in window])
            delivered: list[int] = []
            bounced: dict[str, list[int]] = {}
            transient: Reply | None = None
            for (_, mid, recipient, _, batch), reply in zip(window, replies, strict=True):
                ids = [r.id for r in batch]
                if reply.ok:
                    delivered += ids
                    log.info(kv("outbound.delivered", domain=domain, to=recipient,
                                mid=mid.hex(), envelopes=len(batch)))
                elif reply.status in _PERMANENT:
                    reason = f"{domain} refused it: {reply.text}"
                    bounced.setdefault(reason, []).extend(ids)
                    log.warning(kv("outbound.bounced", domain=domain, to=recipient,
                                   mid=mid.hex(), reason=reason))
                elif transient is None:
                    transient = reply
            # Recorded before any retry: the remote stores a repeated forward once anyway.
            if delivered:
                self.forwarded += len(delivered)
                await self.store.outbound_done(delivered, "delivered", None, self.clock())
            for reason, ids in bounced.items():
                self.bounced += len(ids)
                await self.store.outbound_done(ids, "bounced", reason, self.clock())
            if transient is not None and transient.status == Status.RATE_LIMITED:
                raise RemotePacing(f"{domain} answered {transient.status} {transient.text}")
            if transient is not None:
                raise LinkError(f"{domain} answered {transient.status} {transient.text}")

    async def _sweep(self) -> None:
        interval = max(1.0, min(60.0, self.expiry / 10))
        # A store shared by several instances (PgStore) hands each waiting row to one of
        # them for `outbound_claim` seconds: wake every waiting domain at half that, so
        # the rows of an instance that died are forwarded soon after its claim lapses.
        claim = getattr(self.store, "outbound_claim", None)
        if isinstance(claim, int | float) and claim > 0:
            interval = min(interval, max(0.1, claim / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._expire(self.clock())
                if claim is not None:
                    for domain in await self.store.outbound_domains():
                        self.wake(domain)
            except Exception as exc:  # a lost database connection: the next round retries
                if self._tasks.closed:  # the store closed during shutdown
                    return
                log.warning(kv("outbound.sweep_failed", error=str(exc) or repr(exc)))

    async def _expire(self, now: float) -> None:
        n = await self.store.outbound_expire(now)
        if n:
            self.bounced += n
            log.warning(kv("outbound.expired", bounced=n))

    # --- links ---------------------------------------------------------------------------
    async def link(self, domain: str) -> LinkClient:
        """The open link to `domain`, opened (resolver, TLS, LINK) if needed; LinkError
        if that fails."""
        link = self._links.get(domain)
        if link is not None and link.alive:
            return link
        lock = self._connecting.setdefault(domain, asyncio.Lock())
        async with lock:
            link = self._links.get(domain)
            if link is not None and link.alive:
                return link
            try:
                records = await self.resolver.resolve(domain)
            except DomainLookupError as exc:
                raise LinkError(str(exc)) from None
            link = LinkClient(self.domain, self.domain_key, records, tls=self.tls,
                              timeout=self.link_timeout)
            try:
                await link.connect()
            except LinkError as exc:
                if link.identity_mismatch:
                    self.links_refused_identity += 1
                    log.warning(kv("link.identity_mismatch", remote=domain, text=str(exc)))
                raise
            if len(self._links) >= _MAX_LINKS:
                old_domain, old = next(iter(self._links.items()))
                del self._links[old_domain]
                self._connecting.pop(old_domain, None)
                await old.aclose()
            self._links[domain] = link
            if self.on_link is not None and link.challenge is not None:
                try:
                    self.on_link(domain, link.peer_ip or records.servers[0][0], link.challenge)
                except Exception:
                    log.exception(kv("link.on_link_failed", remote=domain))
            return link

    async def finger(self, asker: str, address: str,
                     ) -> tuple[Status, str | None, dict[str, Any] | None]:
        """FINGER `address` at its domain's server on behalf of `asker`."""
        domain = domain_of(address)
        try:
            link = await self.link(domain)
            reply = await link.request(lambda rid: Finger(rid, address, asker))
        except LinkRefused as exc:
            return Status.FORBIDDEN, _refused_text(domain, self.domain, exc), None
        except LinkError as exc:
            return Status.UNAVAILABLE, f"{domain} is unreachable: {exc}", None
        status = Status(reply.status) if Status.known(reply.status) else Status.SERVER_ERROR
        return status, reply.text, reply.body


    async def pipe(self, sender: str, sender_device: bytes, req: Pipe,
                   ) -> tuple[Status, str | None, dict[str, Any] | None]:
        """Forward a node's PIPE to `req.to` of another domain; the remote's answer."""
        return await self._ask(domain_of(req.to), lambda rid: Pipe(
            rid, req.to, req.payload, req.device, req.hold_ms, sender, sender_device))

    async def relay_invite(self, caller: str, caller_device: bytes, req: Relay,
                           via: tuple[str, int] | None = None,
                           ) -> tuple[Status, str | None, dict[str, Any] | None]:
        """Ask the server of `req.to` to invite its device to our splice (module doc);
        `via`: the address of this instance, which hosts it."""
        host, port = via if via is not None and via[1] else (None, None)
        return await self._ask(domain_of(req.to), lambda rid: Relay(
            rid, req.to, req.device, req.session, caller, caller_device, host, port))

    async def _ask(self, domain: str, make: Callable[[int], Request],
                   ) -> tuple[Status, str | None, dict[str, Any] | None]:
        waiting = self._waiting.get(domain, 0)
        if waiting >= _PIPES_WAITING:
            return (Status.UNAVAILABLE, f"{waiting} requests already wait for the link to "
                    f"{domain}; try again later", None)
        self._waiting[domain] = waiting + 1
        try:
            link = await self.link(domain)
            reply = await link.request(make)
        except LinkRefused as exc:
            return Status.FORBIDDEN, _refused_text(domain, self.domain, exc), None
        except LinkError as exc:
            return Status.UNAVAILABLE, f"{domain} is unreachable: {exc}", None
        finally:
            left = self._waiting.get(domain, 1) - 1
            if left > 0:
                self._waiting[domain] = left
            else:
                self._waiting.pop(domain, None)
        status = Status(reply.status) if Status.known(reply.status) else Status.SERVER_ERROR
        return status, reply.text, reply.body


def _refused_text(remote: str, own: str, exc: LinkRefused) -> str:
    return f"{remote} refuses mail from {own}: {exc.remote_text}"


def _forward_send(mid: bytes, prio: int, items: tuple[SendItem, ...],
                  sender: str) -> Callable[[int], Request]:
    return lambda rid: Send(rid, mid, prio, items, sender)


def _batches(rows: list[OutboundRow]) -> list[list[OutboundRow]]:
    out: list[list[OutboundRow]] = []
    cur: list[OutboundRow] = []
    size = 0
    for row in rows:
        if cur and (len(cur) >= _BATCH_ITEMS or size + len(row.blob) > _BATCH_BYTES):
            out.append(cur)
            cur, size = [], 0
        cur.append(row)
        size += len(row.blob)
    if cur:
        out.append(cur)
    return out
