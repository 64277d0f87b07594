"""DHT datagrams: frozen message records, one decoder, an explicit tag table.

This replaces rpcudp's framing (umsgpack of [name, args], dispatched by `getattr(self,
f"rpc_{name}")`, decoded without limits and with ext types allowed). A datagram is one
msgpack array of at most MAX_DATAGRAM bytes:

    request: [0, msg_id(20), sender_key(32), serving(bool), body, token(0|16), padding]
    reply:   [1, msg_id(20), responder_key(32), body_bytes, signature(64)]

`body` is a map {"t": tag, ...}; a reply's body is packed separately so its signature
(context b"dht-reply", over msg_id + body_bytes) covers exact bytes. Signing the
requester's fresh random msg_id is how a node proves, on every contact, that it holds the
key its id is the hash of. `serving` is False for NAT'd clients (BEP 43's read-only flag):
they are never added to routing tables.

`token` is the return-routability token the responder handed this requester's address
earlier (empty if none is held): with a valid one the reply may be as large as the answer
needs; without, it stays within AMPLIFICATION_FACTOR times the request's size, so nobody
can aim large replies at a spoofed address. `padding` (zero bytes, ignored) is how a
requester without a token buys room for a full answer, as QUIC pads its first packets.
A reply that had to leave contacts or records out says so (`Nodes.truncated`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from crypto.codec import Fields, item_bytes, packb, unpackb
from crypto.errors import DecodeError
from crypto.identity import PEER_ID_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN
from overlay.dht.errors import RemoteProtocolError
from overlay.dht.records import CONTENT_ID_LEN, MAX_RECORD_BYTES
from overlay.dht.tokens import TOKEN_LEN

MAX_DATAGRAM = 16384
MSG_ID_LEN = 20
MAX_CONTACTS = 32
MAX_RECORDS_PER_REPLY = 20
MAX_ERROR_TEXT = 200
MAX_PADDING = 1200
# A reply to a request whose source has not proven its address (no valid token) is at most
# this many times the request's size: the limit RFC 9000 section 8.1 sets for unvalidated
# addresses.
AMPLIFICATION_FACTOR = 3
REQUEST, REPLY = 0, 1


@dataclass(frozen=True, slots=True)
class Contact:
    """A node as another node reports it: id, IP literal and UDP port."""

    node_id: bytes
    host: str
    port: int

    def encode(self) -> list[Any]:
        return [self.node_id, self.host, self.port]


def contact_item(v: Any, what: str) -> Contact:
    if not isinstance(v, list) or len(v) != 3:
        raise DecodeError(f"{what}: expected [id, host, port]")
    node_id, host, port = v
    if type(node_id) is bytes and type(host) is str and type(port) is int:
        checked = _cached_contact(node_id, host, port)  # exact types: safe to hash
    else:
        checked = _check_contact(node_id, host, port)
    if isinstance(checked, str):
        raise DecodeError(f"{what}: {checked}")
    return checked


def _check_contact(node_id: Any, host: Any, port: Any) -> Contact | str:
    """The contact, or what is wrong with it."""
    if not isinstance(node_id, bytes) or len(node_id) != PEER_ID_LEN:
        return f"node id must be {PEER_ID_LEN} bytes"
    if not isinstance(host, str) or len(host) > 45:
        return "host must be an IP literal"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Only IP literals: a host name here would make sendto() block on a DNS lookup.
        return "host must be an IP literal"
    if ip.is_unspecified or ip.is_multicast:
        return f"unusable address {host}"
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return "port outside 1..65535"
    # Canonical text, so a reply's source address compares equal to what we sent to.
    return Contact(node_id, str(ip), port)


# Every reply names up to 20 contacts, mostly ones seen before: checking each afresh (the
# IP parse above all) was a third of a 2,000-node simulation's CPU. Contacts are immutable.
_cached_contact = functools.lru_cache(maxsize=1 << 14)(_check_contact)


# --- request bodies ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ping:
    TAG: ClassVar[int] = 1

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_fields(cls, f: Fields) -> Ping:
        return cls()


@dataclass(frozen=True, slots=True)
class FindNode:
    TAG: ClassVar[int] = 2
    target: bytes

    def fields(self) -> dict[str, Any]:
        return {"target": self.target}

    @classmethod
    def from_fields(cls, f: Fields) -> FindNode:
        return cls(f.bytes("target", size=PEER_ID_LEN))


@dataclass(frozen=True, slots=True)
class FindProviders:
    TAG: ClassVar[int] = 3
    content_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"cid": self.content_id}

    @classmethod
    def from_fields(cls, f: Fields) -> FindProviders:
        return cls(f.bytes("cid", size=CONTENT_ID_LEN))


@dataclass(frozen=True, slots=True)
class StoreProvider:
    TAG: ClassVar[int] = 4
    content_id: bytes
    record: bytes
    token: bytes

    def fields(self) -> dict[str, Any]:
        return {"cid": self.content_id, "record": self.record, "token": self.token}

    @classmethod
    def from_fields(cls, f: Fields) -> StoreProvider:
        return cls(f.bytes("cid", size=CONTENT_ID_LEN),
                   f.bytes("record", max_len=MAX_RECORD_BYTES),
                   f.bytes("token", max_len=TOKEN_LEN))


# --- reply bodies -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pong:
    TAG: ClassVar[int] = 11

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_fields(cls, f: Fields) -> Pong:
        return cls()


@dataclass(frozen=True, slots=True)
class Nodes:
    """Reply to FindNode and FindProviders; `records` stay encoded until checked."""

    TAG: ClassVar[int] = 12
    contacts: tuple[Contact, ...]
    token: bytes
    records: tuple[bytes, ...] = ()
    truncated: bool = False  # contacts or records left out: ask again with the token

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": [c.encode() for c in self.contacts],
                               "token": self.token, "records": list(self.records)}
        if self.truncated:
            out["more"] = True
        return out

    @classmethod
    def from_fields(cls, f: Fields) -> Nodes:
        return cls(
            f.list("nodes", contact_item, max_items=MAX_CONTACTS) or (),
            f.bytes("token", max_len=TOKEN_LEN),
            f.list("records", item_bytes(max_len=MAX_RECORD_BYTES),
                   max_items=MAX_RECORDS_PER_REPLY) or (),
            bool(f.bool("more", optional=True)),
        )


@dataclass(frozen=True, slots=True)
class Stored:
    TAG: ClassVar[int] = 14

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_fields(cls, f: Fields) -> Stored:
        return cls()


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The request was understood but refused; `text` says why."""

    TAG: ClassVar[int] = 15
    text: str

    def fields(self) -> dict[str, Any]:
        return {"text": self.text[:MAX_ERROR_TEXT]}

    @classmethod
    def from_fields(cls, f: Fields) -> ErrorReply:
        return cls(f.str("text", max_len=MAX_ERROR_TEXT))


RequestBody = Ping | FindNode | FindProviders | StoreProvider
ReplyBody = Pong | Nodes | Stored | ErrorReply

REQUESTS: Mapping[int, type[RequestBody]] = {
    c.TAG: c for c in (Ping, FindNode, FindProviders, StoreProvider)
}
# Which reply bodies answer which request: anything else is a protocol violation.
REPLIES_TO: Mapping[int, Mapping[int, type[ReplyBody]]] = {
    Ping.TAG: {Pong.TAG: Pong, ErrorReply.TAG: ErrorReply},
    FindNode.TAG: {Nodes.TAG: Nodes, ErrorReply.TAG: ErrorReply},
    FindProviders.TAG: {Nodes.TAG: Nodes, ErrorReply.TAG: ErrorReply},
    StoreProvider.TAG: {Stored.TAG: Stored, ErrorReply.TAG: ErrorReply},
}


@dataclass(frozen=True, slots=True)
class Request:
    msg_id: bytes
    sender_key: bytes
    serving: bool
    body: RequestBody
    token: bytes = b""
    padding: int = 0  # zero bytes sent and ignored

    def encode(self) -> bytes:
        return packb([REQUEST, self.msg_id, self.sender_key, self.serving,
                      {"t": self.body.TAG, **self.body.fields()}, self.token,
                      bytes(self.padding)])


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply as received: the body stays packed until the signature has been checked."""

    msg_id: bytes
    responder_key: bytes
    body_bytes: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return self.msg_id + self.body_bytes

    def encode(self) -> bytes:
        return packb([REPLY, self.msg_id, self.responder_key, self.body_bytes, self.signature])


def encode_reply_body(body: ReplyBody) -> bytes:
    """Pack a reply body; the caller signs msg_id + these bytes."""
    return packb({"t": body.TAG, **body.fields()})


def decode_datagram(data: bytes) -> Request | Reply:
    """Check the envelope (and a request's body). Raises RemoteProtocolError("garbage", ...)."""
    if len(data) > MAX_DATAGRAM:
        raise RemoteProtocolError("oversize", f"{len(data)} bytes")
    try:
        obj = unpackb(data, max_bytes=MAX_DATAGRAM)
        if not isinstance(obj, list) or not obj or obj[0] not in (REQUEST, REPLY) or (
                len(obj) != (7 if obj[0] == REQUEST else 5)):
            raise DecodeError("expected a 7-element request or a 5-element reply array")
        kind, msg_id, key, a, b = obj[:5]
        msg_id = item_bytes(size=MSG_ID_LEN)(msg_id, "msg_id")
        key = item_bytes(size=PUBLIC_KEY_LEN)(key, "key")
        if kind == REQUEST:
            if not isinstance(a, bool):
                raise DecodeError("serving flag must be true/false")
            body = _decode_body(b, REQUESTS, "request")
            token = item_bytes(max_len=TOKEN_LEN)(obj[5], "token")
            padding = item_bytes(max_len=MAX_PADDING)(obj[6], "padding")
            return Request(msg_id, key, a, body, token, len(padding))
        body_bytes = item_bytes(max_len=MAX_DATAGRAM)(a, "reply body")
        return Reply(msg_id, key, body_bytes, item_bytes(size=SIGNATURE_LEN)(b, "signature"))
    except DecodeError as exc:
        raise RemoteProtocolError("garbage", str(exc)) from None


def decode_reply_body(reply: Reply, request_tag: int) -> ReplyBody:
    """Decode a (signature-checked) reply body as an answer to a request of `request_tag`."""
    try:
        body: ReplyBody = _decode_body(unpackb(reply.body_bytes, max_bytes=MAX_DATAGRAM),
                                       REPLIES_TO[request_tag], "reply")
    except DecodeError as exc:
        raise RemoteProtocolError("bad_reply", str(exc)) from None
    return body


def _decode_body(obj: Any, table: Mapping[int, type[Any]], what: str) -> Any:
    f = Fields(obj, what)
    tag = f.int("t", lo=0, hi=255)
    cls = table.get(tag)
    if cls is None:
        raise DecodeError(f"{what}: unexpected message tag {tag}")
    return cls.from_fields(f)
