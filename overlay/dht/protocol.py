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
- Requests are answered at most SOURCE_RATE a second per source IPv4 address or IPv6 /64
  (`ratelimit`), and a
  request without a valid token for its source address gets a reply no larger than
  AMPLIFICATION_FACTOR (3) times the request: contacts and records that do not fit are
  left out and the reply says so. A spoofed source therefore never receives more than 3x
  what the spoofer sent: against a node with a full table and 20 records, a bare 96-byte
  FIND_NODE draws 252 bytes (2.6x; 10x when every request got the full answer) and a
  105-byte FIND_PROVIDERS 290 bytes (2.8x; 52x before, up to ~100x with larger records).
  Our own requests carry the token the node gave us last (kept up to 4 minutes); without
  one, a find request is padded to UNPROVEN_PAD_TO bytes, which buys room for 20 IPv4
  contacts, and a reply that still came back truncated is asked again once, with its token.
- Timeouts adapt (SRTT + 4 RTTVAR, per node and overall) instead of a fixed 5 s, and every
  RPC's future is owned here and always resolved: no `ensure_future`, no datagram raising
  into the loop. The clock is the running loop's. A timer that fires late (our loop
  stalled) waits a little more, a timer that finds datagrams unread in the socket reads
  them before it judges, a STORE waits the longest RTO, and a reply after its timeout
  still puts its node back in the table.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from crypto.errors import VerificationError
from crypto.identity import DeviceIdentity, peer_id_of, verify
from overlay.dht.errors import RemoteProtocolError
from overlay.dht.ratelimit import dht_source_limiter
from overlay.dht.records import ProviderRecord, dht_key
from overlay.dht.routing import ClockedRoutingTable
from overlay.dht.rtt import MAX_RTO, MIN_RTO, RttTable
from overlay.dht.storage import ProviderStore
from overlay.dht.tokens import ROTATE_SECONDS, TokenIssuer
from overlay.dht.wire import (
    AMPLIFICATION_FACTOR,
    MAX_DATAGRAM,
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
from rendezvous.limits import SourceLimiter

Address = tuple[str, int]
REPLY_CONTEXT = b"dht-reply"
MAX_OUTSTANDING = 1024
MAX_VERIFYING = 64
# Records in one reply stay under this many bytes, so the datagram stays well under the cap.
RECORD_BUDGET = 10_000
# A find request sent without a token is padded to this size: 3x it is 1,200 bytes, room
# for a reply naming 20 IPv4 contacts (about 930 bytes).
UNPROVEN_PAD_TO = 400
# Tokens a node gave us, per address: used for 4 minutes (each lives 5 to 10), at most this
# many kept (the least recently received goes first).
TOKEN_USE_SECONDS = ROTATE_SECONDS - 60
MAX_HELD_TOKENS = 4096
# A timer that fires this late means the loop did not listen meanwhile (a long callback,
# GC, a descheduled process): replies that came in are still unread in the socket, as
# asyncio's default loop reads one datagram per socket per turn and fires every timer due
# in that same turn (uvloop runs all due timers before polling at all). Judged then, every
# RPC in flight timed out at once (20 stores of one announce, and their nodes left the
# routing table); so a late timer gives the reply MIN_RTO more, up to MAX_GRACES times.
LATE_TIMER = 0.02
MAX_GRACES = 3
# A timer that fires on time can still find its reply unread: after a stall the loop reads
# the backlog one datagram a turn, and on a loaded machine the graced timers came due again
# before it got to theirs. So a timer first reads what waits in the socket (at most this
# many datagrams), as the loop's next turns would, and judges only then. 15 pings across a
# 0.3 s stall of a 25-node swarm's loop, beside two CPU hogs: a ping timed out in 14 of 80
# runs (each judged on time with its reply unread in the socket), in none of 80 after.
MAX_UNREAD = 64
# RPCs that timed out, remembered this long (at most MAX_OUTSTANDING of them): a reply that
# comes after all proves the node alive, and it goes back into the routing table (the
# timeout took it out) with the late round trip in its RTT estimate. Without this, a
# joining node whose first FIND_NODE the busy bootstrap node answered 100 ms late had
# removed its only contact and was left with an empty table.
LATE_REPLY_WINDOW = 10.0
# Bytes a reply adds around its body (envelope, msg_id, key, signature), bin16 header.
REPLY_OVERHEAD = len(Reply(bytes(MSG_ID_LEN), bytes(32), b"", bytes(64)).encode()) + 1


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
    body: RequestBody
    sent_token: bool
    sent_at: float
    timer: asyncio.TimerHandle
    graces: int = 0  # late timers so far (`LATE_TIMER`)

    @property
    def request_tag(self) -> int:
        return self.body.TAG


def _responder(reply: Reply, source: Address, asked: Address) -> bytes:
    """The id of the node that signed `reply`, if it came from the address asked and its
    signature holds (RemoteProtocolError if not)."""
    if source != asked:
        raise RemoteProtocolError("wrong_address", f"reply from {source}")
    try:
        verify(reply.responder_key, REPLY_CONTEXT, reply.signed_bytes(), reply.signature)
    except VerificationError:
        raise RemoteProtocolError("bad_signature") from None
    return peer_id_of(reply.responder_key)


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """One node's UDP endpoint. Create it inside the running loop (it reads the loop clock)."""

    def __init__(self, identity: DeviceIdentity, storage: ProviderStore, ksize: int, *,
                 client_only: bool, wall: Callable[[], float], rng: random.Random,
                 limiter: SourceLimiter | None = None) -> None:
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
        self.limiter = limiter if limiter is not None else dht_source_limiter()
        self._held_tokens: OrderedDict[Address, tuple[bytes, float]] = OrderedDict()
        self.rtt = RttTable()
        self.counters: Counter[str] = Counter()
        self._wall = wall
        self._rng = rng
        self._pending: dict[bytes, _Pending] = {}
        self._verifying: set[bytes] = set()
        self._timed_out: OrderedDict[bytes, tuple[Address, bytes | None, float]] = OrderedDict()
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
                self._on_request(msg, source, len(data))
            else:
                self._on_reply(msg, source)
        except RemoteProtocolError as exc:
            self.counters[f"dropped.{exc.reason}"] += 1

    def _on_request(self, msg: Request, source: Address, size: int) -> None:
        if self.client_only or self._closed:
            raise RemoteProtocolError("not_serving")
        now = self._loop.time()
        if not self.limiter.allow(source[0], now):
            raise RemoteProtocolError("rate_limited")
        proven = bool(msg.token) and self.tokens.check(msg.token, source[0], source[1], now)
        budget = None if proven else AMPLIFICATION_FACTOR * size
        reply = self._answer(msg.body, source)
        if budget is not None and isinstance(reply, Nodes):
            reply = _fit(reply, budget - REPLY_OVERHEAD)
            if reply.truncated:
                self.counters["replies.truncated"] += 1
        body_bytes = encode_reply_body(reply)
        signature = self.identity.sign(REPLY_CONTEXT, msg.msg_id + body_bytes)
        data = Reply(msg.msg_id, self.identity.public.verify_key, body_bytes,
                     signature).encode()
        if budget is not None and len(data) > budget:
            raise RemoteProtocolError("amplification", f"{len(data)} bytes for {size}")
        self._send(data, source)
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
            self._on_late_reply(reply, source)
            return
        # A reply that fails here leaves the RPC waiting: the real reply may still come.
        peer_id = _responder(reply, source, pending.addr)
        if pending.expect_id is not None and peer_id != pending.expect_id:
            self._finish(reply.msg_id, RpcFailure("forged_id"))
            self.router.remove_contact(Node(pending.expect_id))
            raise RemoteProtocolError("forged_id", "key does not hash to the id we were given")
        try:
            body = decode_reply_body(reply, pending.request_tag)
        except RemoteProtocolError:
            self._finish(reply.msg_id, RpcFailure("bad_reply"))
            raise
        if not pending.graces:  # else the wait measured our stall, not the path
            self.rtt.sample(peer_id, self._loop.time() - pending.sent_at)
        node = Node(peer_id, source[0], source[1])
        if isinstance(body, Nodes) and body.token:
            self._hold_token(source, body.token)
            if body.truncated and not pending.sent_token:
                # Left out for lack of a token: ask again once, with the one just given.
                self._reask(reply.msg_id, pending)
                self.handle_call_response(node)
                return
        self._finish(reply.msg_id, Answer(node, body))
        self.handle_call_response(node)

    def _on_late_reply(self, reply: Reply, source: Address) -> None:
        """A reply to an RPC that timed out: its node lives after all (`LATE_REPLY_WINDOW`)."""
        late = self._timed_out.get(reply.msg_id)
        now = self._loop.time()
        if late is None or now - late[2] > LATE_REPLY_WINDOW:
            raise RemoteProtocolError("unknown_reply", "late, duplicate or never asked")
        addr, expect_id, sent_at = late
        peer_id = _responder(reply, source, addr)
        del self._timed_out[reply.msg_id]
        if expect_id is not None and peer_id != expect_id:
            raise RemoteProtocolError("forged_id", "key does not hash to the id we were given")
        self.counters["rpc.late_reply"] += 1
        self.rtt.sample(peer_id, now - sent_at)
        self.handle_call_response(Node(peer_id, source[0], source[1]))

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
        self._send_request(future, addr, body, expect_id, self._token_for(addr))
        return future

    def _send_request(self, future: asyncio.Future[Outcome], addr: Address, body: RequestBody,
                      expect_id: bytes | None, token: bytes) -> None:
        msg_id = secrets.token_bytes(MSG_ID_LEN)  # unguessable: replies are matched on it
        # A STORE is on no lookup's path, so it waits the longest RTO: a shorter wait only
        # miscounts stores the nodes made (all of one announce's 20 could time out at the
        # 100 ms floor on a loaded machine, while the lookup before them had gone fine).
        wait = MAX_RTO if isinstance(body, StoreProvider) else self.rtt.timeout_for(expect_id)
        deadline = self._loop.time() + wait
        timer = self._loop.call_at(deadline, self._on_timeout, msg_id, deadline)
        self._pending[msg_id] = _Pending(future, addr, expect_id, body, bool(token),
                                         self._loop.time(), timer)
        request = Request(msg_id, self.identity.public.verify_key, not self.client_only, body,
                          token)
        data = request.encode()
        if not token and isinstance(body, FindNode | FindProviders):
            # 3 bytes of the padding go to its own msgpack header.
            pad = UNPROVEN_PAD_TO - len(data) - 3
            if pad > 0:
                data = Request(request.msg_id, request.sender_key, request.serving, body,
                               token, pad).encode()
        self._send(data, addr)
        self.counters["rpc.sent"] += 1

    def _reask(self, msg_id: bytes, pending: _Pending) -> None:
        """Send `pending`'s request again, now with the token its truncated reply gave."""
        self._pending.pop(msg_id, None)
        pending.timer.cancel()
        token = self._token_for(pending.addr)
        self.counters["rpc.reasked"] += 1
        self._send_request(pending.future, pending.addr, pending.body, pending.expect_id,
                           token)

    def _token_for(self, addr: Address) -> bytes:
        held = self._held_tokens.get(addr)
        if held is None:
            return b""
        token, got_at = held
        if self._loop.time() - got_at > TOKEN_USE_SECONDS:
            del self._held_tokens[addr]
            return b""
        return token

    def _hold_token(self, addr: Address, token: bytes) -> None:
        self._held_tokens[addr] = (token, self._loop.time())
        self._held_tokens.move_to_end(addr)
        while len(self._held_tokens) > MAX_HELD_TOKENS:
            self._held_tokens.popitem(last=False)

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

    def _on_timeout(self, msg_id: bytes, deadline: float) -> None:
        pending = self._pending.get(msg_id)
        if pending is None:
            return
        now = self._loop.time()
        if now - deadline > LATE_TIMER and pending.graces < MAX_GRACES:
            pending.graces += 1
            self.counters["rpc.late_timer"] += 1
            pending.timer = self._loop.call_at(now + MIN_RTO, self._on_timeout, msg_id,
                                               now + MIN_RTO)
            return
        self._read_unread()
        if msg_id not in self._pending:  # its reply was waiting there
            self.counters["rpc.read_at_timer"] += 1
            return
        self.counters["rpc.timeout"] += 1
        self._finish(msg_id, RpcFailure("timeout"))
        self._timed_out[msg_id] = (pending.addr, pending.expect_id, pending.sent_at)
        while len(self._timed_out) > MAX_OUTSTANDING:
            self._timed_out.popitem(last=False)
        if pending.expect_id is not None:
            # As the package does: a node that fails to answer leaves the table, and the
            # bucket's most recent replacement takes its place.
            self.router.remove_contact(Node(pending.expect_id))

    def _read_unread(self) -> None:
        """Take in the datagrams waiting in our socket (`MAX_UNREAD`). The simulator's
        sockets have no file descriptor: nothing waits unread there."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        fd = -1 if sock is None else sock.fileno()
        if fd < 0:
            return
        try:
            own = socket.socket(sock.family, sock.type, fileno=os.dup(fd))
        except OSError:  # out of file descriptors: judged unread, as before the look
            return
        with own:
            for _ in range(MAX_UNREAD):
                try:  # one byte over the limit, so an oversized datagram is seen as one
                    data, addr = own.recvfrom(MAX_DATAGRAM + 1, socket.MSG_DONTWAIT)
                except OSError:  # BlockingIOError: nothing more waits
                    return
                self.datagram_received(data, addr)

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


def _fit(body: Nodes, budget: int) -> Nodes:
    """`body` with records, then contacts, left out from the end until it packs into
    `budget` bytes; marked truncated if anything was."""
    if len(encode_reply_body(body)) <= budget:
        return body
    records, contacts = list(body.records), list(body.contacts)
    fitted = body
    while records or contacts:
        if records:
            records.pop()
        else:
            contacts.pop()
        fitted = Nodes(tuple(contacts), body.token, tuple(records), True)
        if len(encode_reply_body(fitted)) <= budget:
            return fitted
    return Nodes((), body.token, (), True)
