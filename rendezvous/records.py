"""Values the rendezvous server keeps and hands out: envelopes, their listings, FINGER.

Times on the wire are integer milliseconds since the Unix epoch; in Python they are float
seconds. Every `decode` checks types, sizes and ranges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from crypto.address import MAX_ADDRESS_LEN, normalize_address
from crypto.codec import Fields, packb
from crypto.errors import DecodeError
from crypto.identity import PEER_ID_LEN, PUBLIC_KEY_LEN, peer_id_of
from crypto.vouch import VOUCH_LEN

MESSAGE_ID_LEN = 16
MAX_PRIORITY = 7
MAX_BLOB = 1 << 20  # decoder ceiling; the server's Limits are tighter
MAX_MS = 1 << 53
ADVERTISE_KEYS = 16
ADVERTISE_KEY_LEN = 32
ADVERTISE_TEXT_LEN = 256
ADVERTISE_LIST = 16


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


@functools.lru_cache(maxsize=4096)
def normalized_address(text: str) -> str:
    """`normalize_address`, remembered: the same few addresses come by in every frame.

    A pure function of its argument, so the memo changes no result; refusals (DecodeError)
    are not remembered.
    """
    return normalize_address(text)


def address_field(f: Fields, key: str, *, optional: bool = False) -> Any:
    """A normalized `name@domain` from a decoded map, or None when optional and absent."""
    text = f.str(key, max_len=MAX_ADDRESS_LEN, min_len=3, optional=optional)
    return None if text is None else normalized_address(text)


def wire_address(value: Any) -> str | None:
    """What `address_field` gives for `value`, or None wherever it would raise."""
    if type(value) is not str or not 3 <= len(value) <= MAX_ADDRESS_LEN:
        return None
    try:
        return normalized_address(value)
    except DecodeError:
        return None


def raw_map(f: Fields, key: str) -> dict[str, Any]:
    """The decoded map under `key`, after Fields has checked that it is one.

    Fields has no accessor for a whole sub-map (it hands out checked scalars), and some
    values (reply bodies, advertisements) are checked by their own validators.
    """
    sub = f.map(key)
    if sub is None:
        raise DecodeError(f"missing field {key!r}")
    inner: dict[str, Any] = sub._map
    return inner


def check_advertise(obj: Any, max_bytes: int, what: str = "advertise") -> dict[str, Any]:
    """Validate reachability hints: a small map of short keys to short values.

    Values may be text, booleans, integers or lists of text; the packed map must fit in
    `max_bytes`. FINGER shows it verbatim to others, so nothing else is allowed.
    """
    if not isinstance(obj, dict):
        raise DecodeError(f"{what}: expected a map")
    if len(obj) > ADVERTISE_KEYS:
        raise DecodeError(f"{what}: {len(obj)} keys, limit {ADVERTISE_KEYS}")
    for key, value in obj.items():
        if not isinstance(key, str) or not 1 <= len(key) <= ADVERTISE_KEY_LEN:
            raise DecodeError(f"{what}: keys are text of 1..{ADVERTISE_KEY_LEN} characters")
        _check_hint(value, f"{what}.{key}")
    if len(packb(obj)) > max_bytes:
        raise DecodeError(f"{what}: over {max_bytes} bytes")
    return obj


def _check_hint(value: Any, what: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_MS <= value <= MAX_MS:
            raise DecodeError(f"{what}: integer out of range")
        return
    if isinstance(value, str):
        if len(value) > ADVERTISE_TEXT_LEN:
            raise DecodeError(f"{what}: text over {ADVERTISE_TEXT_LEN} characters")
        return
    if isinstance(value, list):
        if len(value) > ADVERTISE_LIST:
            raise DecodeError(f"{what}: list over {ADVERTISE_LIST} items")
        for item in value:
            if not isinstance(item, str) or len(item) > ADVERTISE_TEXT_LEN:
                raise DecodeError(f"{what}: list items are text of <= {ADVERTISE_TEXT_LEN}")
        return
    raise DecodeError(f"{what}: expected text, a boolean, an integer or a list of text")


def _header(f: Fields) -> tuple[bytes, str, str, bytes, int]:
    """message id, sender, recipient, device, priority: shared by Envelope and its info."""
    return (f.bytes("mid", size=MESSAGE_ID_LEN), address_field(f, "from"),
            address_field(f, "to"), f.bytes("device", size=PEER_ID_LEN),
            f.int("prio", lo=0, hi=MAX_PRIORITY))


@dataclass(frozen=True, slots=True)
class EnvelopeInfo:
    """A queued envelope without its blob (what LIST shows)."""

    message_id: bytes
    sender: str
    recipient: str
    device: bytes
    priority: int
    size: int
    received_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"mid": self.message_id, "from": self.sender, "to": self.recipient,
                "device": self.device, "prio": self.priority, "size": self.size,
                "at": to_ms(self.received_at)}

    @classmethod
    def decode(cls, f: Fields) -> EnvelopeInfo:
        return cls(*_header(f), size=f.int("size", lo=0, hi=MAX_BLOB),
                   received_at=f.int("at", lo=0, hi=MAX_MS) / 1000)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A sealed location message as the server holds it. The server never opens `blob`."""

    message_id: bytes
    sender: str       # authenticated by the server from the sending session
    recipient: str
    device: bytes     # recipient device peer id
    priority: int
    blob: bytes
    received_at: float

    @property
    def size(self) -> int:
        return len(self.blob)

    def info(self) -> EnvelopeInfo:
        return EnvelopeInfo(self.message_id, self.sender, self.recipient, self.device,
                            self.priority, len(self.blob), self.received_at)

    def to_wire(self) -> dict[str, Any]:
        return {"mid": self.message_id, "from": self.sender, "to": self.recipient,
                "device": self.device, "prio": self.priority, "blob": self.blob,
                "at": to_ms(self.received_at)}

    @classmethod
    def decode(cls, f: Fields) -> Envelope:
        return cls(*_header(f), blob=f.bytes("blob", max_len=MAX_BLOB),
                   received_at=f.int("at", lo=0, hi=MAX_MS) / 1000)

    @classmethod
    def decode_well_formed(cls, obj: Any) -> Envelope | None:
        """`decode` of a map with every field right, checked without `Fields`; else None.

        The same checks as `decode` (msgpack yields exact types), for the DELIVER push a
        client decodes per message. On None the caller runs `decode` for its error text.
        """
        if type(obj) is not dict:
            return None
        mid, device, prio = obj.get("mid"), obj.get("device"), obj.get("prio")
        blob, at = obj.get("blob"), obj.get("at")
        if (type(mid) is not bytes or len(mid) != MESSAGE_ID_LEN
                or type(device) is not bytes or len(device) != PEER_ID_LEN
                or type(prio) is not int or not 0 <= prio <= MAX_PRIORITY
                or type(blob) is not bytes or len(blob) > MAX_BLOB
                or type(at) is not int or not 0 <= at <= MAX_MS):
            return None
        sender, recipient = wire_address(obj.get("from")), wire_address(obj.get("to"))
        if sender is None or recipient is None:
            return None
        return cls(mid, sender, recipient, device, prio, blob, at / 1000)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device bound to an address, as FINGER shows it.

    `vouch` is what the device presented when it joined an account that already had
    devices: another device's key and its signature over (address, this key)
    (`crypto.vouch`). The server checked it at registration; a node checks it again, since
    only a vouch by a key it pinned itself means anything to it.
    """

    verify_key: bytes
    online: bool
    last_seen: float | None
    advertise: dict[str, Any]
    vouch: bytes | None = None

    @property
    def peer_id(self) -> bytes:
        return peer_id_of(self.verify_key)

    def to_wire(self) -> dict[str, Any]:
        out = {"verify_key": self.verify_key, "online": self.online,
               "last_seen": None if self.last_seen is None else to_ms(self.last_seen),
               "advertise": self.advertise}
        if self.vouch is not None:
            out["vouch"] = self.vouch
        return out

    @classmethod
    def decode(cls, obj: Any, what: str) -> DeviceInfo:
        f = Fields(obj, what)
        seen = f.int("last_seen", lo=0, hi=MAX_MS, optional=True)
        return cls(
            verify_key=f.bytes("verify_key", size=PUBLIC_KEY_LEN),
            online=f.bool("online"),
            last_seen=None if seen is None else seen / 1000,
            advertise=(check_advertise(raw_map(f, "advertise"), 4096, what)
                       if f.has("advertise") else {}),
            vouch=f.bytes("vouch", size=VOUCH_LEN, optional=True),
        )


@dataclass(frozen=True, slots=True)
class FingerResult:
    """FINGER's answer: the address and every device bound to it."""

    address: str
    devices: tuple[DeviceInfo, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"address": self.address, "devices": [d.to_wire() for d in self.devices]}

    @classmethod
    def decode(cls, f: Fields) -> FingerResult:
        devices = f.list("devices", DeviceInfo.decode, max_items=256)
        return cls(address=address_field(f, "address"), devices=devices or ())
