"""The DHT's datagram protocol: `kademlia.protocol.KademliaProtocol` with its RPC layer
replaced.

What changes from the package, and why:
- Framing and dispatch: our `wire` module (bounded msgpack, typed records, tag table)
  instead of rpcudp's unbounded umsgpack and `getattr(self, "rpc_" + name)`; rpcudp's
  `__getattr__`, which turns any missing attribute into a remote call, is switched off.
- Replies are signed over the requester's random msg_id and must come from the address
  asked and, when we knew whom we asked, from the key that hashes to that node id; a node
  enters a routing table only after such a reply (requesters are pinged first), so forged
  ids and spoofed sources never get in. NAT'd clients (`client_only`) ask but never answer
  and are never added.
- `rpc_store` accepts only a signed, unexpired `ProviderRecord` for the content id given,
  with a return-routability token (BEP 5); find replies hand tokens out.
- Timeouts adapt (SRTT + 4 RTTVAR, per node and overall) instead of a fixed 5 s, and every
  RPC's future is owned here and always resolved: no `ensure_future`, no datagram raising
  into the loop. The clock is the running loop's.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity, peer_id_of, verify
from overlay.dht.errors import RemoteProtocolError
from overlay.dht.records import ProviderRecord, dht_key
from overlay.dht.routing import ClockedRoutingTable
from overlay.dht.rtt import MAX_RTO, RttTable
from overlay.dht.storage import ProviderStore
from overlay.dht.tokens import TokenIssuer
from overlay.dht.wire import (
    MAX_RECORDS_PER_REPLY,
    MSG_ID_LEN,
    Contact,
    ErrorReply,
    FindNode,
    FindProviders,
    Nodes,
    Ping,
    Pong,
    Reply,
    ReplyBody,
    Request,
    RequestBody,
    Stored,
    StoreProvider,
    decode_datagram,
    decode_reply_body,
    encode_reply_body,
)

Address = tuple[str, int]
REPLY_CONTEXT = b"dht-reply"
MAX_OUTSTANDING = 1024
MAX_VERIFYING = 64
# Records in one reply stay under this many bytes, so the datagram stays well under the cap.
RECORD_BUDGET = 10_000


@dataclass(frozen=True, slots=True)
class Answer:
    """A verified reply: `node` proved its id (the hash of the key that signed)."""

    node: Node
    body: ReplyBody


@dataclass(frozen=True, slots=True)
class RpcFailure:
    """No usable reply: "timeout", "forged_id", "bad_reply", "busy" or "closed"."""

    reason: str


Outcome = Answer | RpcFailure


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Outcome]
    addr: Address
    expect_id: bytes | None
    request_tag: int
    sent_at: float
    timer: asyncio.TimerHandle


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """One node's UDP endpoint. Create it inside the running loop (it reads the loop clock)."""

    def __init__(self, identity: DeviceIdentity, storage: ProviderStore, ksize: int, *,
                 client_only: bool, wall: Callable[[], float], rng: random.Random) -> None:
        # KademliaProtocol.__init__ would build a RoutingTable on time.monotonic().
        RPCProtocol.__init__(self, wait_timeout=MAX_RTO)
        self._loop = asyncio.get_running_loop()
        self.identity = identity
        self.source_node = Node(identity.peer_id)
        self.storage = storage
        self.ksize = ksize
        self.client_only = client_only
        self.router = ClockedRoutingTable(ksize, self.source_node, self._loop.time,
                                          self._check_head)
        self.tokens = TokenIssuer(self._loop.time())
        self.rtt = RttTable()
        self.counters: Counter[str] = Counter()
        self._wall = wall
        self._rng = rng
        self._pending: dict[bytes, _Pending] = {}
        self._verifying: set[bytes] = set()
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns unknown attributes into remote calls; a typo must stay a typo.
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # --- lifecycle ----------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def error_received(self, exc: Exception) -> None:
        self.counters["socket_errors"] += 1

    def close(self) -> None:
        """Resolve every RPC in flight as "closed" and stop answering."""
        self._closed = True
        for msg_id in list(self._pending):
            self._finish(msg_id, RpcFailure("closed"))
        if self.transport is not None:
            self.transport.close()

    # --- receive ------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """The single receive point: a bad datagram is counted and dropped, never raised."""
        self.counters["datagrams_in"] += 1
        try:
            source: Address = (str(addr[0]), int(addr[1]))
            msg = decode_datagram(data)
            if isinstance(msg, Request):
                self._on_request(msg, source)
            else:
                self._on_reply(msg, source)
        except RemoteProtocolError as exc:
            self.counters[f"dropped.{exc.reason}"] += 1

    def _on_request(self, msg: Request, source: Address) -> None:
        if self.client_only or self._closed:
            raise RemoteProtocolError("not_serving")
        reply = self._answer(msg.body, source)
        body_bytes = encode_reply_body(reply)
        signature = self.identity.sign(REPLY_CONTEXT, msg.msg_id + body_bytes)
        self._send(Reply(msg.msg_id, self.identity.public.verify_key, body_bytes,
                         signature).encode(), source)
        self.counters["rpc.served"] += 1
        if msg.serving:
            self.welcome_if_new(Node(peer_id_of(msg.sender_key), source[0], source[1]))

    def _answer(self, body: RequestBody, source: Address) -> ReplyBody:
        if isinstance(body, Ping):
            return self.rpc_ping(source)
        if isinstance(body, FindNode):
            return self.rpc_find_node(source, body.target)
        if isinstance(body, FindProviders):
            return self.rpc_find_value(source, body.content_id)
        return self.rpc_store(source, body)

    def _on_reply(self, reply: Reply, source: Address) -> None:
        pending = self._pending.get(reply.msg_id)
        if pending is None:
            raise RemoteProtocolError("unknown_reply", "late, duplicate or never asked")
        if source != pending.addr:
            raise RemoteProtocolError("wrong_address", f"reply from {source}")
        try:
            verify(reply.responder_key, REPLY_CONTEXT, reply.signed_bytes(), reply.signature)
        except VerificationError:
            # Leave the RPC waiting: the real reply may still come.
            raise RemoteProtocolError("bad_signature") from None
        peer_id = peer_id_of(reply.responder_key)
        if pending.expect_id is not None and peer_id != pending.expect_id:
            self._finish(reply.msg_id, RpcFailure("forged_id"))
            self.router.remove_contact(Node(pending.expect_id))
            raise RemoteProtocolError("forged_id", "key does not hash to the id we were given")
        try:
            body = decode_reply_body(reply, pending.request_tag)
        except RemoteProtocolError:
            self._finish(reply.msg_id, RpcFailure("bad_reply"))
            raise
        self.rtt.sample(peer_id, self._loop.time() - pending.sent_at)
        node = Node(peer_id, source[0], source[1])
        self._finish(reply.msg_id, Answer(node, body))
        self.handle_call_response(node)

    # --- the RPCs we answer (the package's rpc_* roles, typed) ---------------------------

    def rpc_ping(self, sender: Address) -> Pong:
        return Pong()

    def rpc_find_node(self, sender: Address, target: bytes) -> Nodes:
        return Nodes(self._closest(target, sender), self.tokens.issue(*sender, self._loop.time()))

    def rpc_find_value(self, sender: Address, content_id: bytes) -> Nodes:
        records: list[bytes] = []
        used = 0
        for record in self.storage.providers(content_id, MAX_RECORDS_PER_REPLY):
            blob = record.encode()
            if used + len(blob) > RECORD_BUDGET:
                break
            records.append(blob)
            used += len(blob)
        return Nodes(self._closest(dht_key(content_id), sender),
                     self.tokens.issue(*sender, self._loop.time()), tuple(records))

    def rpc_store(self, sender: Address, body: StoreProvider) -> Stored | ErrorReply:
        if not self.tokens.check(body.token, sender[0], sender[1], self._loop.time()):
            self.counters["store_refused.token"] += 1
            return ErrorReply("invalid or expired token: look the key up first")
        try:
            record = ProviderRecord.decode(body.record, now=self._wall())
        except RemoteProtocolError as exc:
            self.counters[f"store_refused.{exc.reason}"] += 1
            return ErrorReply(f"record refused: {exc}")
        if record.content_id != body.content_id:
            self.counters["store_refused.wrong_content"] += 1
            return ErrorReply("record refused: it is for another content id")
        if not self.storage.put(record):
            self.counters["store_refused.full"] += 1
            return ErrorReply("storage full")
        self.counters["stored"] += 1
        return Stored()

    def _closest(self, key: bytes, exclude: Address) -> tuple[Contact, ...]:
        marker = Node(bytes(20), exclude[0], exclude[1])
        nodes = self.router.find_neighbors(Node(key), k=self.ksize, exclude=marker)
        return tuple(Contact(n.id, n.ip, n.port) for n in nodes)

    # --- the RPCs we send ----------------------------------------------------------------

    def request(self, addr: Address, body: RequestBody,
                expect_id: bytes | None) -> asyncio.Future[Outcome]:
        """Send one request; the future always resolves (reply, failure, or at close)."""
        future: asyncio.Future[Outcome] = self._loop.create_future()
        if self._closed or self.transport is None:
            future.set_result(RpcFailure("closed"))
            return future
        if len(self._pending) >= MAX_OUTSTANDING:
            self.counters["rpc.busy"] += 1
            future.set_result(RpcFailure("busy"))
            return future
        msg_id = secrets.token_bytes(MSG_ID_LEN)  # unguessable: replies are matched on it
        timer = self._loop.call_later(self.rtt.timeout_for(expect_id), self._on_timeout, msg_id)
        self._pending[msg_id] = _Pending(future, addr, expect_id, body.TAG, self._loop.time(),
                                         timer)
        request = Request(msg_id, self.identity.public.verify_key, not self.client_only, body)
        self._send(request.encode(), addr)
        self.counters["rpc.sent"] += 1
        return future

    def call_ping(self, node: Node) -> asyncio.Future[Outcome]:
        return self.request((node.ip, node.port), Ping(), node.id)

    def call_find_node(self, node: Node, target: bytes) -> asyncio.Future[Outcome]:
        return self.request((node.ip, node.port), FindNode(target), node.id)

    def call_find_value(self, node: Node, content_id: bytes) -> asyncio.Future[Outcome]:
        return self.request((node.ip, node.port), FindProviders(content_id), node.id)

    def call_store(self, node: Node, record: ProviderRecord,
                   token: bytes) -> asyncio.Future[Outcome]:
        body = StoreProvider(record.content_id, record.encode(), token)
        return self.request((node.ip, node.port), body, node.id)

    def _on_timeout(self, msg_id: bytes) -> None:
        pending = self._pending.get(msg_id)
        if pending is None:
            return
        self.counters["rpc.timeout"] += 1
        self._finish(msg_id, RpcFailure("timeout"))
        if pending.expect_id is not None:
            # As the package does: a node that fails to answer leaves the table, and the
            # bucket's most recent replacement takes its place.
            self.router.remove_contact(Node(pending.expect_id))

    def _finish(self, msg_id: bytes, outcome: Outcome) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            return
        pending.timer.cancel()
        if not pending.future.done():
            pending.future.set_result(outcome)

    def _send(self, data: bytes, addr: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.sendto(data, addr)
        except (OSError, ValueError):
            self.counters["send_errors"] += 1

    # --- routing table upkeep ------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """A serving node asked us something: ping it, and add it only once it proves its id
        from that address (the package adds requesters on their word)."""
        if node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        self._verify(node)

    def handle_call_response(self, node: Node) -> None:
        """`node` answered and proved its id: it belongs in the routing table."""
        if node.id != self.source_node.id:
            self.router.add_contact(node)

    def _check_head(self, head: Node) -> None:
        # Kademlia section 2.2: a full bucket keeps its oldest node if that one still answers.
        self._verify(head)

    def _verify(self, node: Node) -> None:
        if node.id in self._verifying or len(self._verifying) >= MAX_VERIFYING:
            return
        self._verifying.add(node.id)
        self.call_ping(node).add_done_callback(lambda _: self._verifying.discard(node.id))

    def get_refresh_ids(self) -> list[bytes]:
        """Random ids in buckets not looked up for an hour (from our rng, not the module's)."""
        return [min(self._rng.randint(*b.range), 2**160 - 1).to_bytes(20, "big")
                for b in self.router.lonely_buckets()]
