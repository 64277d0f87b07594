"""Wire messages of the rendezvous protocol (the seed's VMIO verbs), one frozen class each.

Every frame is a msgpack map with a tag `t`. Client → server frames are requests and
carry an integer `id`; server → client frames are REPLY (`id`, `status`, `text`, `body`)
and the pushes CHALLENGE, DELIVER and PIPE. Decoding goes through an explicit tag → class
table; a name from the wire is never used to look anything else up.

| tag | fields |
|---|---|
| AUTHORIZATION | address, verify_key (32), signature (64), cnonce (32), invite?, register?, |
| | advertise?, relay?, vouch? (96), keepalive? (ms), replaces? (32) |
| QUIT | |
| PING | (none): the server answers OK "pong"; valid before and after authentication |
| SEND | mid (16), prio (0..7), items: [{to, device (20), blob}], from? (link only) |
| LIST | after? (cursor from the previous page), limit? |
| RETRIEVE / REMOVE | mid |
| WITHDRAW | mid: the sender takes back what of its message is still queued |
| FINGER | address, asker? (link only) |
| LINK | domain, cnonce (32), signature (64): a server linking in for its domain |
| TRACK | mid: the forwarding state of each foreign recipient of my message |
| PIPE | to, device (20)?, payload, hold_ms, from? + from_device (20)? (link only) |
| ADVERTISE | advertise |
| RELAY | to, device (20), session (16): open a relayed stream to that device; |
| | from? + from_device (20)? (link only: invite the device for the linking server) |
| RELAY-ACCEPT | session (16): join the stream a RELAY-INVITE offered |

Server pushes: CHALLENGE (domain, nonce (32), key (32): the domain key, stun?, dht?: the
UDP ports of the server's STUN service and DHT bootstrap node when it runs them, stun_tcp?:
the TCP port of its STUN over TCP), DELIVER
(env), PIPE (from, from_device, payload), RELAY-INVITE (from, from_device, session,
host? + port? + key? (32): the server of another domain that hosts the splice, and the
domain key it must prove, when the caller is of another domain).

A connection authorized with `relay: true` exists for one relayed stream: it may send only
RELAY or RELAY-ACCEPT, gets no DELIVER or PIPE, and does not make its device "online".
After the OK reply to that request (text "spliced") the connection carries the peer's raw
bytes, no more frames (see rendezvous/relay.py).

The handshake authenticates both ends over this very connection:

- the device signs `DeviceIdentity.sign(b"rendezvous-auth", packb([domain, nonce, cnonce,
  binding, address, verify_key]))`: the server's nonce from the CHALLENGE, a fresh
  client nonce `cnonce` it sends along, and the channel binding (SHA-256 of the server's
  TLS certificate, b"" on plaintext; rendezvous/tls.py);
- the server's REPLY to that AUTHORIZATION carries `server_sig` in its body: the domain
  key's `sign(b"rendezvous-server", packb([domain, nonce, cnonce, binding, verify_key]))`.
  The client accepts the session only if it verifies under the key it pinned.

Fresh nonces on both sides make a recorded signature worthless in another session; the
binding makes both worthless through a proxy that terminates TLS with its own certificate.

Server links (federation): a domain's server answers the CHALLENGE of another domain's
server with LINK instead of AUTHORIZATION: its own `domain`, a client nonce and the
signature of its domain key over `packb([remote domain, nonce, cnonce, binding, own
domain])`, context `b"rendezvous-link"` (`link_payload`). The receiving server checks it
under the linking domain's key from DNS (rendezvous.dns), never a key first seen on the
wire; its REPLY carries `server_sig` as for a node, with the linking domain's key in
place of the device key. A link session is authorized for a domain, not an address: its
SEND names the sender (`from`, which must be `*@<linking domain>`) and its FINGER the
`asker` (so FINGER's privacy rules hold for the asking user); PIPE and RELAY name the
sending user and device (`from`, `from_device`), and every recipient or looked-up address
must be of the receiving domain. A RELAY over a link only invites: the splice stays at the
caller's server (rendezvous/relay.py).

Keepalive: a client that sends `keepalive` (its PING interval in ms) in its AUTHORIZATION
sends a PING whenever it has sent nothing for that long, and takes the server for dead
when nothing (the "pong" included) came back for its timeout. The server then closes
such a session after `Limits.keepalive_timeout` (at least twice the announced interval)
without a byte from it, so a NAT that silently dropped the mapping leaves the device
offline (pushes queue, PIPEs are held) instead of online behind a dead connection. A
client that announces nothing is never timed out; an old server answers PING with a 400
"unknown verb", which proves it alive just the same.

`replaces`: a client that logs in again after losing its session (it moved to another
network, woke from sleep behind a NAT that forgot it, or its keepalive gave up) names that
session by the cnonce of its AUTHORIZATION. The server ends that session of the same
device at once, if it still holds it, instead of at its keepalive timeout up to 45 s
later, meanwhile counted against `Limits.sessions_per_device` and taking pushes nobody
reads. Only that one: another process holding the same device key keeps its session. An
old server ignores the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from crypto.identity import PEER_ID_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN, DeviceIdentity
from crypto.vouch import VOUCH_LEN
from rendezvous.domainkey import DomainKey
from rendezvous.errors import RemoteProtocolError
from rendezvous.records import (
    MAX_BLOB,
    MAX_MS,
    MAX_PRIORITY,
    MESSAGE_ID_LEN,
    Envelope,
    address_field,
    check_advertise,
    raw_map,
    wire_address,
)
from rendezvous.status import Status

AUTH_CONTEXT = b"rendezvous-auth"
SERVER_AUTH_CONTEXT = b"rendezvous-server"
LINK_CONTEXT = b"rendezvous-link"
NONCE_LEN = 32
MAX_REQUEST_ID = (1 << 63) - 1
MAX_ITEMS = 256          # decoder ceiling; Limits.max_items_per_send is the policy
MAX_ADVERTISE_WIRE = 4096
INVITE_MAX_LEN = 64
MAX_TEXT = 1024
MAX_DOMAIN = 190  # the domain part of an address (crypto.address)
MAX_LIST_PAGE = 1000
RELAY_SESSION_LEN = 16
MAX_KEEPALIVE_MS = 3_600_000  # an announced PING interval: 1 ms .. 1 h


def auth_payload(domain: str, nonce: bytes, client_nonce: bytes, binding: bytes,
                 address: str, verify_key: bytes) -> bytes:
    """The exact bytes a device signs to answer a CHALLENGE."""
    return packb([domain, nonce, client_nonce, binding, address, verify_key])


def server_payload(domain: str, nonce: bytes, client_nonce: bytes, binding: bytes,
                   verify_key: bytes) -> bytes:
    """The exact bytes the domain key signs in its reply to an AUTHORIZATION."""
    return packb([domain, nonce, client_nonce, binding, verify_key])


def link_payload(remote_domain: str, nonce: bytes, client_nonce: bytes, binding: bytes,
                 own_domain: str) -> bytes:
    """The exact bytes a linking server's domain key signs to answer a CHALLENGE."""
    return packb([remote_domain, nonce, client_nonce, binding, own_domain])


def _from(f: Fields, verb: str) -> tuple[str | None, bytes | None]:
    """`from` and `from_device` of a forwarded PIPE or RELAY: both or neither."""
    if f.has("from") != f.has("from_device"):
        raise DecodeError(f"{verb}: from and from_device go together")
    if not f.has("from"):
        return None, None
    return address_field(f, "from"), f.bytes("from_device", size=PEER_ID_LEN)


def _advertise(f: Fields, key: str, optional: bool) -> dict[str, Any] | None:
    if not f.has(key):
        if optional:
            return None
        raise DecodeError(f"missing field {key!r}")
    return check_advertise(raw_map(f, key), MAX_ADVERTISE_WIRE, key)


# --- client → server ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authorization:
    """Answer to a CHALLENGE: who I am, proof, and optionally register/advertise."""

    TAG: ClassVar[str] = "AUTHORIZATION"
    id: int
    address: str
    verify_key: bytes
    signature: bytes
    invite: str | None = None
    register: bool = False
    advertise: dict[str, Any] | None = None
    relay: bool = False  # this connection will carry one relayed stream (see module doc)
    client_nonce: bytes = b""  # NONCE_LEN fresh bytes on the wire
    vouch: bytes | None = None  # a device joining an account: crypto.vouch bytes
    keepalive_ms: int = 0  # the client PINGs after this much send silence (0: it doesn't)
    # The cnonce of this client's previous session, which it lost (see module doc).
    replaces: bytes | None = None

    @classmethod
    def signed(cls, request_id: int, identity: DeviceIdentity, domain: str, nonce: bytes,
               address: str, *, client_nonce: bytes | None = None, binding: bytes = b"",
               invite: str | None = None, register: bool = False,
               advertise: dict[str, Any] | None = None, relay: bool = False,
               vouch: bytes | None = None, keepalive_ms: int = 0,
               replaces: bytes | None = None) -> Authorization:
        """Build the answer to a challenge, signed by `identity` (fresh `client_nonce`
        from os.urandom unless given)."""
        key = identity.public.verify_key
        cnonce = os.urandom(NONCE_LEN) if client_nonce is None else client_nonce
        sig = identity.sign(AUTH_CONTEXT,
                            auth_payload(domain, nonce, cnonce, binding, address, key))
        return cls(request_id, address, key, sig, invite, register, advertise, relay, cnonce,
                   vouch, keepalive_ms, replaces)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "verify_key": self.verify_key,
                               "signature": self.signature, "cnonce": self.client_nonce,
                               "register": self.register}
        if self.invite is not None:
            out["invite"] = self.invite
        if self.advertise is not None:
            out["advertise"] = self.advertise
        if self.relay:
            out["relay"] = True
        if self.vouch is not None:
            out["vouch"] = self.vouch
        if self.keepalive_ms:
            out["keepalive"] = self.keepalive_ms
        if self.replaces is not None:
            out["replaces"] = self.replaces
        return out

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Authorization:
        return cls(rid, address_field(f, "address"), f.bytes("verify_key", size=PUBLIC_KEY_LEN),
                   f.bytes("signature", size=SIGNATURE_LEN),
                   f.str("invite", max_len=INVITE_MAX_LEN, optional=True),
                   bool(f.bool("register", optional=True)), _advertise(f, "advertise", True),
                   bool(f.bool("relay", optional=True)), f.bytes("cnonce", size=NONCE_LEN),
                   f.bytes("vouch", size=VOUCH_LEN, optional=True),
                   f.int("keepalive", lo=1, hi=MAX_KEEPALIVE_MS, optional=True) or 0,
                   f.bytes("replaces", size=NONCE_LEN, optional=True))


@dataclass(frozen=True, slots=True)
class Quit:
    """Close the session (the server replies, then closes)."""

    TAG: ClassVar[str] = "QUIT"
    id: int

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Quit:
        return cls(rid)


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive: traffic on an idle session; the server answers OK "pong"."""

    TAG: ClassVar[str] = "PING"
    id: int

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Ping:
        return cls(rid)


@dataclass(frozen=True, slots=True)
class SendItem:
    """One sealed copy of a message for one recipient device."""

    to: str
    device: bytes
    blob: bytes

    @classmethod
    def decode(cls, obj: Any, what: str) -> SendItem:
        f = Fields(obj, what)
        return cls(address_field(f, "to"), f.bytes("device", size=PEER_ID_LEN),
                   f.bytes("blob", max_len=MAX_BLOB))


@dataclass(frozen=True, slots=True)
class Send:
    """Deposit one message (one sealed copy per recipient device); idempotent by id.

    `sender` is set only on a server link (the address of the forwarded message's
    sender); a node's SEND is from its own session's address."""

    TAG: ClassVar[str] = "SEND"
    id: int
    message_id: bytes
    priority: int
    items: tuple[SendItem, ...]
    sender: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mid": self.message_id, "prio": self.priority,
            "items": [{"to": i.to, "device": i.device, "blob": i.blob} for i in self.items]}
        if self.sender is not None:
            out["from"] = self.sender
        return out

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Send:
        items = f.list("items", SendItem.decode, max_items=MAX_ITEMS) or ()
        if not items:
            raise DecodeError("SEND.items: at least one recipient is needed")
        if len(items) > 1 and len({i.device for i in items}) != len(items):
            # One envelope per device and message id: the store keys on (device, mid).
            raise DecodeError("SEND.items: a device appears more than once")
        sender = address_field(f, "from") if f.has("from") else None
        return cls(rid, f.bytes("mid", size=MESSAGE_ID_LEN),
                   f.int("prio", lo=0, hi=MAX_PRIORITY), items, sender)

    @classmethod
    def decode_well_formed(cls, rid: int, obj: dict[str, Any]) -> Send | None:
        """`decode` of a node's SEND with every field right, without `Fields`; else None
        (a link's SEND, with `from`, goes through `decode`)."""
        mid, prio, raw = obj.get("mid"), obj.get("prio"), obj.get("items")
        if (type(mid) is not bytes or len(mid) != MESSAGE_ID_LEN
                or type(prio) is not int or not 0 <= prio <= MAX_PRIORITY
                or type(raw) is not list or not 1 <= len(raw) <= MAX_ITEMS
                or "from" in obj):
            return None
        items = []
        for one in raw:
            if type(one) is not dict:
                return None
            to, device, blob = wire_address(one.get("to")), one.get("device"), one.get("blob")
            if (to is None or type(device) is not bytes or len(device) != PEER_ID_LEN
                    or type(blob) is not bytes or len(blob) > MAX_BLOB):
                return None
            items.append(SendItem(to, device, blob))
        if len(items) > 1 and len({i.device for i in items}) != len(items):
            return None
        return cls(rid, mid, prio, tuple(items))


@dataclass(frozen=True, slots=True)
class List:
    """Page through this device's queued envelopes, oldest first."""

    TAG: ClassVar[str] = "LIST"
    id: int
    after: int = 0
    limit: int = MAX_LIST_PAGE

    def fields(self) -> dict[str, Any]:
        return {"after": self.after, "limit": self.limit}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> List:
        after = f.int("after", lo=0, hi=MAX_MS, optional=True)
        limit = f.int("limit", lo=1, hi=MAX_LIST_PAGE, optional=True)
        return cls(rid, after or 0, limit or MAX_LIST_PAGE)


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Fetch one queued envelope of this device."""

    TAG: ClassVar[str] = "RETRIEVE"
    id: int
    message_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"mid": self.message_id}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Retrieve:
        return cls(rid, f.bytes("mid", size=MESSAGE_ID_LEN))


@dataclass(frozen=True, slots=True)
class Remove:
    """Delete one queued envelope of this device: the delivery acknowledgement."""

    TAG: ClassVar[str] = "REMOVE"
    id: int
    message_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"mid": self.message_id}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Remove:
        return cls(rid, f.bytes("mid", size=MESSAGE_ID_LEN))

    @classmethod
    def decode_well_formed(cls, rid: int, obj: dict[str, Any]) -> Remove | None:
        """`decode` of a REMOVE with every field right, without `Fields`; else None."""
        mid = obj.get("mid")
        if type(mid) is not bytes or len(mid) != MESSAGE_ID_LEN:
            return None
        return cls(rid, mid)


@dataclass(frozen=True, slots=True)
class Finger:
    """Presence, device keys and reachability hints of an address on this server.

    `asker` is set only on a server link: the user on whose behalf the linking server
    asks (FINGER's privacy rules are applied to that address)."""

    TAG: ClassVar[str] = "FINGER"
    id: int
    address: str
    asker: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address}
        if self.asker is not None:
            out["asker"] = self.asker
        return out

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Finger:
        return cls(rid, address_field(f, "address"),
                   address_field(f, "asker") if f.has("asker") else None)


@dataclass(frozen=True, slots=True)
class Link:
    """A server's answer to a CHALLENGE: "I am the server of `domain`" (module doc)."""

    TAG: ClassVar[str] = "LINK"
    id: int
    domain: str
    client_nonce: bytes
    signature: bytes

    @classmethod
    def signed(cls, request_id: int, key: DomainKey, own_domain: str, remote_domain: str,
               nonce: bytes, client_nonce: bytes, binding: bytes) -> Link:
        """Sign with the domain key `key` over this connection."""
        sig = key.sign(LINK_CONTEXT, link_payload(remote_domain, nonce, client_nonce,
                                                  binding, own_domain))
        return cls(request_id, own_domain, client_nonce, sig)

    def fields(self) -> dict[str, Any]:
        return {"domain": self.domain, "cnonce": self.client_nonce,
                "signature": self.signature}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Link:
        domain = f.str("domain", max_len=MAX_DOMAIN, min_len=1)
        if wire_address(f"x@{domain}") != f"x@{domain}":
            raise DecodeError(f"LINK.domain: not a domain name: {domain!r}")
        return cls(rid, domain, f.bytes("cnonce", size=NONCE_LEN),
                   f.bytes("signature", size=SIGNATURE_LEN))


@dataclass(frozen=True, slots=True)
class Track:
    """Where each foreign recipient of one of my messages stands at my server."""

    TAG: ClassVar[str] = "TRACK"
    id: int
    message_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"mid": self.message_id}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Track:
        return cls(rid, f.bytes("mid", size=MESSAGE_ID_LEN))


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Take back my message: its envelopes still queued here, and for other domains, still
    waiting in the outbound queue (those already handed on are out of reach)."""

    TAG: ClassVar[str] = "WITHDRAW"
    id: int
    message_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"mid": self.message_id}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Withdraw:
        return cls(rid, f.bytes("mid", size=MESSAGE_ID_LEN))


@dataclass(frozen=True, slots=True)
class Pipe:
    """Relay a small opaque payload to online device(s) of an address; maybe hold it."""

    TAG: ClassVar[str] = "PIPE"
    id: int
    to: str
    payload: bytes
    device: bytes | None = None
    hold_ms: int = 0
    sender: str | None = None          # set only on a server link, with `sender_device`
    sender_device: bytes | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"to": self.to, "device": self.device,
                               "payload": self.payload, "hold_ms": self.hold_ms}
        if self.sender is not None:
            out["from"] = self.sender
            out["from_device"] = self.sender_device
        return out

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Pipe:
        sender, sender_device = _from(f, "PIPE")
        return cls(rid, address_field(f, "to"), f.bytes("payload", max_len=MAX_BLOB),
                   f.bytes("device", size=PEER_ID_LEN, optional=True),
                   f.int("hold_ms", lo=0, hi=MAX_MS, optional=True) or 0,
                   sender, sender_device)


@dataclass(frozen=True, slots=True)
class Advertise:
    """Replace this device's reachability hints without reconnecting."""

    TAG: ClassVar[str] = "ADVERTISE"
    id: int
    advertise: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"advertise": self.advertise}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Advertise:
        return cls(rid, _advertise(f, "advertise", False) or {})


@dataclass(frozen=True, slots=True)
class Relay:
    """Open a relayed stream to one online device; answered when it accepts (or not)."""

    TAG: ClassVar[str] = "RELAY"
    id: int
    to: str
    device: bytes
    session: bytes  # fresh random id, chosen by the caller
    sender: str | None = None          # set only on a server link, with `sender_device`
    sender_device: bytes | None = None
    # On a link: the instance of the caller's domain hosting the splice (host, port), so
    # the callee is sent there if it is one of that domain's SRV targets.
    via_host: str | None = None
    via_port: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"to": self.to, "device": self.device, "session": self.session}
        if self.sender is not None:
            out["from"] = self.sender
            out["from_device"] = self.sender_device
        if self.via_host is not None:
            out["via_host"] = self.via_host
            out["via_port"] = self.via_port
        return out

    @classmethod
    def decode(cls, rid: int, f: Fields) -> Relay:
        sender, sender_device = _from(f, "RELAY")
        via_host = f.str("via_host", max_len=253, min_len=1, optional=True)
        via_port = f.int("via_port", lo=1, hi=65535, optional=True)
        if (via_host is None) != (via_port is None):
            raise DecodeError("RELAY: via_host and via_port go together")
        return cls(rid, address_field(f, "to"), f.bytes("device", size=PEER_ID_LEN),
                   f.bytes("session", size=RELAY_SESSION_LEN), sender, sender_device,
                   via_host, via_port)


@dataclass(frozen=True, slots=True)
class RelayAccept:
    """Join the relayed stream that a RELAY-INVITE push offered to this device."""

    TAG: ClassVar[str] = "RELAY-ACCEPT"
    id: int
    session: bytes

    def fields(self) -> dict[str, Any]:
        return {"session": self.session}

    @classmethod
    def decode(cls, rid: int, f: Fields) -> RelayAccept:
        return cls(rid, f.bytes("session", size=RELAY_SESSION_LEN))


Request = (Authorization | Quit | Ping | Send | List | Retrieve | Remove | Finger | Pipe
           | Advertise | Relay | RelayAccept | Link | Track | Withdraw)

REQUESTS: dict[str, Callable[[int, Fields], Request]] = {
    "AUTHORIZATION": Authorization.decode,
    "QUIT": Quit.decode,
    "PING": Ping.decode,
    "SEND": Send.decode,
    "LIST": List.decode,
    "RETRIEVE": Retrieve.decode,
    "REMOVE": Remove.decode,
    "FINGER": Finger.decode,
    "PIPE": Pipe.decode,
    "ADVERTISE": Advertise.decode,
    "RELAY": Relay.decode,
    "RELAY-ACCEPT": RelayAccept.decode,
    "LINK": Link.decode,
    "TRACK": Track.decode,
    "WITHDRAW": Withdraw.decode,
}


def encode_request(req: Request) -> bytes:
    """The msgpack body (without length prefix) of a request."""
    body = req.fields()
    body["t"] = req.TAG
    body["id"] = req.id
    return packb(body)


# The verbs of nearly all traffic: checked field by field without `Fields` when every field
# is right (a None answer means "not so": the full decoder then finds the error's text).
_WELL_FORMED_REQUESTS: dict[str, Callable[[int, dict[str, Any]], Request | None]] = {
    "SEND": Send.decode_well_formed,
    "REMOVE": Remove.decode_well_formed,
}


def decode_request(frame: bytes, max_bytes: int) -> Request:
    """Check one request frame; RemoteProtocolError (carrying the id if readable) if bad."""
    rid = 0
    try:
        obj = unpackb(frame, max_bytes=max_bytes)
        if type(obj) is dict:
            wire_id, tag = obj.get("id"), obj.get("t")
            if (type(wire_id) is int and 1 <= wire_id <= MAX_REQUEST_ID and type(tag) is str
                    and (fast := _WELL_FORMED_REQUESTS.get(tag)) is not None
                    and (req := fast(wire_id, obj)) is not None):
                return req
        f = Fields(obj, "request")
        rid = f.int("id", lo=1, hi=MAX_REQUEST_ID)
        tag = f.str("t", max_len=32)
        decode = REQUESTS.get(tag)
        if decode is None:
            raise RemoteProtocolError(f"unknown verb {tag!r}", request_id=rid)
        return decode(rid, f)
    except DecodeError as exc:
        raise RemoteProtocolError(str(exc), request_id=rid) from None


# --- server → client ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """Sent by the server as soon as a connection opens (and after a failed attempt)."""

    TAG: ClassVar[str] = "CHALLENGE"
    domain: str
    nonce: bytes
    stun: int | None = None  # UDP port of the server's STUN service, if it runs one
    dht: int | None = None   # UDP port of its DHT bootstrap node, if it runs one
    key: bytes = b""         # the domain key (PUBLIC_KEY_LEN bytes on the wire)
    stun_tcp: int | None = None  # TCP port of its STUN over TCP (for TCP hole punching)

    def fields(self) -> dict[str, Any]:
        return {"domain": self.domain, "nonce": self.nonce, "key": self.key, **self.services()}

    @classmethod
    def decode(cls, f: Fields) -> Challenge:
        return cls(f.str("domain", max_len=253, min_len=1), f.bytes("nonce", size=NONCE_LEN),
                   f.int("stun", lo=1, hi=65535, optional=True),
                   f.int("dht", lo=1, hi=65535, optional=True),
                   f.bytes("key", size=PUBLIC_KEY_LEN),
                   f.int("stun_tcp", lo=1, hi=65535, optional=True))

    def services(self) -> dict[str, int]:
        """The ports announced here, by service name ("stun", "dht" on UDP, "stun_tcp" on
        TCP); absent if not run."""
        out: dict[str, int] = {}
        if self.stun is not None:
            out["stun"] = self.stun
        if self.dht is not None:
            out["dht"] = self.dht
        if self.stun_tcp is not None:
            out["stun_tcp"] = self.stun_tcp
        return out


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to request `id`: a status, a text and a verb-specific body."""

    TAG: ClassVar[str] = "REPLY"
    id: int
    status: int
    text: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "text": self.text, "body": self.body}

    @classmethod
    def decode(cls, f: Fields) -> Reply:
        return cls(f.int("id", lo=0, hi=MAX_REQUEST_ID), f.int("status", lo=100, hi=999),
                   f.str("text", max_len=MAX_TEXT), raw_map(f, "body"))

    @classmethod
    def decode_well_formed(cls, obj: dict[str, Any]) -> Reply | None:
        """`decode` of a REPLY with every field right, without `Fields`; else None."""
        rid, status, text, body = obj.get("id"), obj.get("status"), obj.get("text"), \
            obj.get("body")
        if (type(rid) is not int or not 0 <= rid <= MAX_REQUEST_ID
                or type(status) is not int or not 100 <= status <= 999
                or type(text) is not str or len(text) > MAX_TEXT or type(body) is not dict):
            return None
        return cls(rid, status, text, body)


@dataclass(frozen=True, slots=True)
class Deliver:
    """Push: a new or queued envelope for this device."""

    TAG: ClassVar[str] = "DELIVER"
    envelope: Envelope

    def fields(self) -> dict[str, Any]:
        return {"env": self.envelope.to_wire()}

    @classmethod
    def decode(cls, f: Fields) -> Deliver:
        env = f.map("env")
        if env is None:
            raise DecodeError("DELIVER.env missing")
        return cls(Envelope.decode(env))

    @classmethod
    def decode_well_formed(cls, obj: dict[str, Any]) -> Deliver | None:
        """`decode` of a DELIVER with every field right, without `Fields`; else None."""
        env = Envelope.decode_well_formed(obj.get("env"))
        return None if env is None else cls(env)


@dataclass(frozen=True, slots=True)
class PipeMessage:
    """Push: a PIPE payload from another device of this server."""

    TAG: ClassVar[str] = "PIPE"
    sender: str
    sender_device: bytes
    payload: bytes

    def fields(self) -> dict[str, Any]:
        return {"from": self.sender, "from_device": self.sender_device, "payload": self.payload}

    @classmethod
    def decode(cls, f: Fields) -> PipeMessage:
        return cls(address_field(f, "from"), f.bytes("from_device", size=PEER_ID_LEN),
                   f.bytes("payload", max_len=MAX_BLOB))


@dataclass(frozen=True, slots=True)
class RelayInvite:
    """Push: `sender` wants a relayed stream with this device; answer with RELAY-ACCEPT."""

    TAG: ClassVar[str] = "RELAY-INVITE"
    sender: str
    sender_device: bytes
    session: bytes
    # A caller of another domain: its server hosts the splice at host:port and must prove
    # `key` (its domain key, as our server found it in DNS). None: our own server.
    host: str | None = None
    port: int | None = None
    key: bytes | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.sender, "from_device": self.sender_device,
                               "session": self.session}
        if self.host is not None:
            out.update(host=self.host, port=self.port, key=self.key)
        return out

    @classmethod
    def decode(cls, f: Fields) -> RelayInvite:
        host = f.str("host", max_len=253, min_len=1, optional=True)
        port = f.int("port", lo=1, hi=65535, optional=True)
        key = f.bytes("key", size=PUBLIC_KEY_LEN, optional=True)
        if (host is None) != (port is None) or (host is None) != (key is None):
            raise DecodeError("RELAY-INVITE: host, port and key go together")
        return cls(address_field(f, "from"), f.bytes("from_device", size=PEER_ID_LEN),
                   f.bytes("session", size=RELAY_SESSION_LEN), host, port, key)


ServerMessage = Challenge | Reply | Deliver | PipeMessage | RelayInvite

SERVER_MESSAGES: dict[str, Callable[[Fields], ServerMessage]] = {
    "CHALLENGE": Challenge.decode,
    "REPLY": Reply.decode,
    "DELIVER": Deliver.decode,
    "PIPE": PipeMessage.decode,
    "RELAY-INVITE": RelayInvite.decode,
}


def encode_server_message(msg: ServerMessage) -> bytes:
    """The msgpack body (without length prefix) of a reply or push."""
    body = msg.fields()
    body["t"] = msg.TAG
    return packb(body)


_WELL_FORMED_SERVER_MESSAGES: dict[str, Callable[[dict[str, Any]], ServerMessage | None]] = {
    "REPLY": Reply.decode_well_formed,
    "DELIVER": Deliver.decode_well_formed,
}


def decode_server_message(frame: bytes, max_bytes: int) -> ServerMessage:
    """Check one server frame; RemoteProtocolError if it is not a valid message."""
    try:
        obj = unpackb(frame, max_bytes=max_bytes)
        if type(obj) is dict:
            tag = obj.get("t")
            if (type(tag) is str and (fast := _WELL_FORMED_SERVER_MESSAGES.get(tag)) is not None
                    and (msg := fast(obj)) is not None):
                return msg
        f = Fields(obj, "server message")
        tag = f.str("t", max_len=32)
        decode = SERVER_MESSAGES.get(tag)
        if decode is None:
            raise RemoteProtocolError(f"unknown server message {tag!r}")
        return decode(f)
    except DecodeError as exc:
        raise RemoteProtocolError(str(exc)) from None

