"""`DhtNode`: the DHT as the peer node uses it (announce, find, withdraw).

It takes the place of `kademlia.network.Server` rather than subclassing it: every public
method of Server either starts unowned tasks (`refresh_table`), pickles (`save_state`),
runs the round-based crawl (`bootstrap`, `get`, `set`), or stores unsigned values, so a
subclass would override all of it and still inherit `get`/`set` that must not be called.
What is kept from the package lives in the protocol, routing and storage modules.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from kademlia.node import Node

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.dht.errors import LocalProtocolError, RemoteProtocolError
from overlay.dht.lookup import Lookup, run_lookup
from overlay.dht.protocol import Answer, DhtProtocol, Outcome
from overlay.dht.ranking import rank_providers
from overlay.dht.ratelimit import SOURCE_BURST, SOURCE_RATE, dht_source_limiter
from overlay.dht.records import (
    CONTENT_ID_LEN,
    REPUBLISH_INTERVAL,
    ProviderRecord,
    dht_key,
)
from overlay.dht.state import decode_state, encode_state, read_state, write_state
from overlay.dht.storage import MAX_PER_KEY, MAX_TOTAL, ProviderStore
from overlay.dht.wire import MAX_RECORDS_PER_REPLY, Contact, ErrorReply, Nodes, Ping, Stored
from rendezvous.services import bind_udp

log = logging.getLogger("peerpost.dht")

REFRESH_INTERVAL = 600.0
LOOKUP_DEADLINE = 20.0


class DhtNode:
    """One DHT participant. Use as `async with DhtNode(...)` or call `aclose()`."""

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        client_only: bool = False,
        ksize: int = 20,
        alpha: int = 3,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_records_per_key: int = MAX_PER_KEY,
        max_records: int = MAX_TOTAL,
        source_rate: float = SOURCE_RATE,
        source_burst: float = SOURCE_BURST,
    ) -> None:
        """`source_rate`/`source_burst`: requests answered per second per source IPv4
        address or IPv6 /64 (many nodes on one loopback address in tests share one
        allowance)."""
        if not 1 <= alpha <= ksize <= 32:
            raise LocalProtocolError("need 1 <= alpha <= ksize <= 32")
        self.identity = identity
        self.client_only = client_only
        self.ksize = ksize
        self.alpha = alpha
        self._wall = wall
        self._rng = rng or random.Random()
        self.storage = ProviderStore(wall, max_per_key=max_records_per_key,
                                     max_total=max_records)
        self._source_limits = (source_rate, source_burst)
        self._protocol: DhtProtocol | None = None
        self._announced: dict[bytes, asyncio.Task[None]] = {}
        # One mark per `announce()` still publishing, by content; `withdraw()` drops them.
        self._publishing: dict[bytes, set[object]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._now_serving: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None
        self._closed = False

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def address(self) -> tuple[str, int]:
        """The bound UDP address (host, port), once `listen()` has returned."""
        if self._address is None:
            raise LocalProtocolError("the DHT node is not listening")
        return self._address

    @property
    def protocol(self) -> DhtProtocol:
        if self._protocol is None or self._closed:
            raise LocalProtocolError("the DHT node is not listening")
        return self._protocol

    async def __aenter__(self) -> DhtNode:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def listen(self, host: str, port: int, *,
                     sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind the UDP socket (clients bind one too, to send queries), or take `sock`
        already bound; return its address."""
        if self._protocol is not None:
            raise LocalProtocolError("already listening")
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: DhtProtocol(self.identity, self.storage, self.ksize,
                                client_only=self.client_only, wall=self._wall, rng=self._rng,
                                limiter=dht_source_limiter(*self._source_limits)),
            **({"sock": sock} if sock is not None else {"local_addr": (host, port)}))
        self._protocol = protocol
        self._refresher = loop.create_task(self._refresh_forever(), name="dht-refresh")
        sockname = protocol.transport.get_extra_info("sockname")
        self._address = (str(sockname[0]), int(sockname[1]))
        return self._address

    async def aclose(self) -> None:
        """Stop republishing and refreshing, resolve RPCs in flight, close the socket.

        Nothing is sent: to the rest of the network this node just goes quiet.
        """
        if self._closed:
            return
        self._closed = True
        tasks = [*self._announced.values(),
                 *(t for t in (self._refresher, self._now_serving) if t is not None)]
        self._announced.clear()
        for task in tasks:
            task.cancel()
        # Their outcome no longer matters (cancelled, or failed on a closing socket).
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._protocol is not None:
            self._protocol.close()

    def set_client_only(self, client_only: bool, *, via: list[tuple[str, int]] | None = None
                        ) -> bool:
        """Change role at runtime (the host moved behind a NAT, or out from behind one);
        returns whether it changed.

        Client-only: requests are refused from the next datagram on, and our requests say
        we don't serve, so a peer that asks us and times out drops us from its table
        (Kademlia's rule) and none adds us again. Serving: we answer from the next
        datagram, and ping `via` (the server's bootstrap node) and look up our own id at
        once, so every node on the way hears a request that says we serve, pings us and
        adds us (peers add a requester only once it answered their ping from its address).

        Records others stored with us are kept, not handed off: each one was stored at the
        k closest nodes and its provider republishes it every 22 h (records.
        REPUBLISH_INTERVAL), so the replica we stop serving is one of up to 20; the store's
        bounds hold them, they expire within the 48 h TTL, and we serve them again if we
        serve again before then.
        """
        if client_only == self.client_only:
            return False
        self.client_only = client_only
        if self._protocol is not None:
            self._protocol.client_only = client_only
        log.info("DHT: %s", "client only now: asking, no longer answering" if client_only
                 else "serving now: answering requests, and telling our contacts")
        if self._now_serving is not None:
            self._now_serving.cancel()
            self._now_serving = None
        if not client_only and self._protocol is not None and not self._closed:
            self._now_serving = asyncio.get_running_loop().create_task(
                self._survive("telling the network we serve", self._tell_contacts(via or []),
                              then="our next lookups tell the nodes they ask"),
                name="dht-now-serving")
        return True

    async def _tell_contacts(self, via: list[tuple[str, int]]) -> None:
        found = await self.bootstrap(via)
        log.info("DHT: told the network we serve: %d contact%s in the routing table",
                 found, "" if found == 1 else "s")

    def stats(self) -> dict[str, int]:
        """Counters: "rpc.sent", "rpc.served", "rpc.timeout", "rpc.late_timer",
        "rpc.read_at_timer",
        "rpc.late_reply", "dropped.<reason>",
        "store_refused.<reason>", "stored", plus "contacts" and "records" gauges."""
        out = dict(self._protocol.counters) if self._protocol is not None else {}
        out["contacts"] = self._protocol.router.size() if self._protocol is not None else 0
        out["records"] = len(self.storage)
        return out

    def contacts(self) -> list[Contact]:
        """The routing table's live contacts."""
        return [Contact(n.id, n.ip, n.port) for n in self.protocol.router.contacts()]

    # --- joining ------------------------------------------------------------------------

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Ping `addrs` (a bootstrap server's DHT port, saved contacts), then look up our
        own id to fill the table. Returns how many contacts the table holds."""
        protocol = self.protocol

        futures = [protocol.request((h, p), Ping(), None) for h, p in addrs]
        if futures:
            await asyncio.wait(futures)
        await self.find_nodes(self.peer_id)
        return protocol.router.size()

    async def find_nodes(self, target: bytes) -> list[Node]:
        """The k closest live nodes to a 20-byte id."""
        if len(target) != 20:
            raise LocalProtocolError("node ids are 20 bytes")
        protocol = self.protocol
        lookup = self._new_lookup(target)
        await self._drive(lookup, lambda n: protocol.call_find_node(n, target), None)
        return lookup.closest_answered()

    # --- providers ----------------------------------------------------------------------

    async def find_providers(self, content_id: bytes, *, limit: int = 20) -> list[ProviderRecord]:
        """Verified, unexpired provider records for `content_id` (at most `limit`, 1..20),
        best first as `ranking` orders them: diverse networks, direct addresses, fresh."""
        _check_content_id(content_id)
        if not 1 <= limit <= MAX_RECORDS_PER_REPLY:
            raise LocalProtocolError(f"limit must be in 1..{MAX_RECORDS_PER_REPLY}")
        protocol = self.protocol
        found: dict[bytes, ProviderRecord] = {r.peer_id: r
                                              for r in self.storage.providers(content_id, limit)}

        def collect(answer: Answer) -> None:
            if not isinstance(answer.body, Nodes):
                return
            for blob in answer.body.records:
                try:
                    record = ProviderRecord.decode(blob, now=self._wall())
                except RemoteProtocolError as exc:
                    protocol.counters[f"dropped.{exc.reason}"] += 1
                    continue
                if record.content_id != content_id:
                    protocol.counters["dropped.wrong_content"] += 1
                    continue
                old = found.get(record.peer_id)
                if old is None or old.expires < record.expires:
                    found[record.peer_id] = record

        lookup = self._new_lookup(dht_key(content_id))
        await self._drive(lookup, lambda n: protocol.call_find_value(n, content_id), collect,
                          stop=lambda: len(found) >= limit)
        return rank_providers(found.values(), limit)

    async def announce(self, content_id: bytes, addresses: list[str], home_server: str, *,
                       keep: Callable[[], Awaitable[bool]] | None = None) -> int:
        """Publish our signed record to the k closest nodes and keep it fresh (every 22 h)
        until `withdraw()` or `aclose()`, or until `keep()`, asked before each republish,
        says False (we no longer hold the content): then it is withdrawn. Returns how
        many nodes stored it now.

        A `withdraw()` of the content while this runs has the last word: no STORE is sent
        and our own store takes no record after it, nor is the record republished (0 is
        returned if the lookup was still running): the records it would have stored live
        48 h (records.RECORD_TTL) and could not be recalled."""
        _check_content_id(content_id)
        # Sign once up front so a bad address fails here, in the caller, not in the task.
        ProviderRecord.create(self.identity, content_id, addresses, home_server, self._wall())
        mark = object()  # set before the first await: a withdraw from now on reaches it
        self._publishing.setdefault(content_id, set()).add(mark)

        def live() -> bool:
            return mark in self._publishing.get(content_id, ())

        try:
            stored = await self._publish(content_id, addresses, home_server, live=live)
            if not live():
                return stored  # withdrawn meanwhile
        finally:
            marks = self._publishing.get(content_id)
            if marks is not None:
                marks.discard(mark)
                if not marks:
                    del self._publishing[content_id]
        old = self._announced.pop(content_id, None)
        if old is not None:
            old.cancel()
        self._announced[content_id] = asyncio.get_running_loop().create_task(
            self._republish_forever(content_id, list(addresses), home_server, keep),
            name=f"dht-republish-{content_id.hex()[:8]}")
        return stored

    async def withdraw(self, content_id: bytes) -> None:
        """Stop republishing, stop the announces of it still publishing, and drop our
        record from our own store; all of that before this first awaits. The copies other
        nodes store can't be recalled (a STORE only ever replaces a record with one that
        lives longer): they lapse within the TTL, 48 h (records.RECORD_TTL)."""
        self._publishing.pop(content_id, None)
        task = self._forget_own(content_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _forget_own(self, content_id: bytes) -> asyncio.Task[None] | None:
        """No more republishing of our record for `content_id`, nor our own copy of it;
        the republishing task, if one runs (not cancelled here)."""
        self.storage.remove(content_id, self.peer_id)
        return self._announced.pop(content_id, None)

    async def _publish(self, content_id: bytes, addresses: list[str], home_server: str, *,
                       live: Callable[[], bool] = lambda: True) -> int:
        """One round: look up the k closest nodes, then store our record with them and
        ourselves, unless `live()` says False once the lookup is done (withdrawn)."""
        protocol = self.protocol
        record = ProviderRecord.create(self.identity, content_id, addresses, home_server,
                                       self._wall())
        tokens: dict[bytes, bytes] = {}

        def keep_token(answer: Answer) -> None:
            if isinstance(answer.body, Nodes):
                tokens[answer.node.id] = answer.body.token

        lookup = self._new_lookup(dht_key(content_id))
        await self._drive(lookup, lambda n: protocol.call_find_value(n, content_id), keep_token)
        if not live():
            return 0  # nothing awaits between here and the STOREs' sending
        targets = [n for n in lookup.closest_answered() if n.id in tokens]
        if not self.client_only:
            self.storage.put(record)
        if not targets:
            return 0
        outcomes = await asyncio.gather(*(protocol.call_store(n, record, tokens[n.id])
                                          for n in targets))
        return sum(1 for o in outcomes if isinstance(o, Answer) and isinstance(o.body, Stored))

    async def _republish_forever(self, content_id: bytes, addresses: list[str],
                                 home_server: str,
                                 keep: Callable[[], Awaitable[bool]] | None) -> None:
        # A round that fails is tried again at the next: the record, published 22 h
        # before, lives 48 h (records.RECORD_TTL), so one lost round loses nothing.
        while True:
            await asyncio.sleep(REPUBLISH_INTERVAL)
            try:
                kept = keep is None or await keep()
            except Exception:
                log.exception("DHT: asking whether %s is still held failed; republishing it",
                              content_id.hex()[:8])
                kept = True
            if not kept:
                log.info("DHT: no longer republishing %s: it is no longer held here",
                         content_id.hex()[:16])
                self._forget_own(content_id)
                return
            await self._survive(f"republishing {content_id.hex()[:8]}",
                                self._publish(content_id, addresses, home_server))

    async def _refresh_forever(self) -> None:
        # Kademlia section 2.3: look up a random id in each bucket idle for an hour.
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            await self._survive("refreshing the routing table", self._refresh())

    async def _refresh(self) -> None:
        for target in self.protocol.get_refresh_ids():
            await self.find_nodes(target)

    async def _survive(self, what: str, round_: Coroutine[Any, Any, object], *,
                       then: str = "trying again at the next round") -> None:
        """Run one round of a loop that runs for the node's life, and log its failure and
        what `then` happens.

        These loops have no owner to hear of their end: out of a round, an error ended
        the loop with no trace but asyncio's 'Task exception was never retrieved', and
        the node went on without it (no republish: our records expired and co-recipients
        stopped finding us; no refresh: the table went stale). A cancel ends the loop."""
        try:
            await round_
        except Exception as exc:
            if self._closed:
                return  # the socket closed under the round: shutting down
            if isinstance(exc, OSError):  # the network went away under the round
                log.warning("DHT: %s failed (%s); %s", what, exc, then)
            else:
                log.exception("DHT: %s failed; %s", what, then)

    # --- lookups ------------------------------------------------------------------------

    def _new_lookup(self, target: bytes) -> Lookup:
        lookup = Lookup(target, k=self.ksize, alpha=self.alpha, self_id=self.peer_id)
        lookup.add(self.protocol.router.find_neighbors(Node(target), k=self.ksize))
        return lookup

    async def _drive(self, lookup: Lookup,
                     query: Callable[[Node], asyncio.Future[Outcome]],
                     on_answer: Callable[[Answer], None] | None,
                     *, stop: Callable[[], bool] = lambda: False) -> None:
        def outcome(node: Node, result: Outcome) -> list[Node] | None:
            if not isinstance(result, Answer) or isinstance(result.body, ErrorReply):
                return None
            if on_answer is not None:
                on_answer(result)
            if not isinstance(result.body, Nodes):
                return []
            return [Node(c.node_id, c.host, c.port) for c in result.body.contacts]

        self.protocol.counters["lookups"] += 1
        try:
            async with asyncio.timeout(LOOKUP_DEADLINE):
                await run_lookup(lookup, query, outcome, stop=stop)
        except TimeoutError:
            self.protocol.counters["lookups.deadline"] += 1
        self.protocol.counters["lookups.hops"] += lookup.hops

    # --- saved state --------------------------------------------------------------------

    async def save_state(self, path: Path | str) -> None:
        """Save routing contacts (versioned msgpack, written atomically)."""
        data = encode_state(self.contacts())
        await asyncio.to_thread(write_state, Path(path), data)

    async def load_state(self, path: Path | str) -> int:
        """Bootstrap from contacts saved by `save_state`; returns `bootstrap()`'s count.

        Saved contacts are only candidates: each must prove its id again before use.
        """
        data = await asyncio.to_thread(read_state, Path(path))
        try:
            contacts = decode_state(data)
        except DecodeError as exc:
            raise LocalProtocolError(f"{path}: not a DHT state file: {exc}") from None
        return await self.bootstrap([(c.host, c.port) for c in contacts])


async def run_bootstrap_node(host: str, port: int, identity: DeviceIdentity) -> DhtNode:
    """A reachable serving node for `peerpost-rendezvous serve --dht-port N`.

    The caller owns the result and must `aclose()` it.
    """
    node = DhtNode(identity)
    try:
        # IPv6 alone on an IPv6 address, beside IPv4 at the same port (bind_udp says why).
        await node.listen(host, port, sock=await bind_udp(host, port))
    except BaseException:
        await node.aclose()
        raise
    return node


def _check_content_id(content_id: bytes) -> None:
    if not isinstance(content_id, bytes) or len(content_id) != CONTENT_ID_LEN:
        raise LocalProtocolError(f"a content id is {CONTENT_ID_LEN} bytes")
