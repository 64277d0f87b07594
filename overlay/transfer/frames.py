"""Transfer wire messages: frozen records, one decoder, an explicit tag → class table.

Every message travels as an encrypted msgpack *header*; a CHUNK also carries the sealed
chunk as a raw payload after the header. The payload is not encrypted a second time: it is
already AEAD-sealed under the content key and is checked against the Merkle root before
anything uses it. Its index and length are in the authenticated header.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from crypto.capability import PROOF_LEN
from crypto.codec import Fields, item_bytes, packb, unpackb
from crypto.content import (
    HASH_LEN,
    MAX_CHUNK_SIZE,
    MAX_CONTENT_SIZE,
    MAX_SEAL_OVERHEAD,
    MIN_CHUNK_SIZE,
)
from crypto.content import (
    MAX_CHUNKS as MAX_CHUNKS,  # re-exported: the wire bound is the layout bound
)
from crypto.errors import DecodeError

MAX_HEADER = 256 << 10  # plaintext control header: a hash page or a have-bitmap fits
MAX_HASH_PAGE = 4096  # leaves per HASHES reply (128 KiB of hashes)
MAX_HAVE_BYTES = MAX_CHUNKS // 8  # the have-bitmap of the largest layout (128 KiB)
MAX_INDEX = MAX_CHUNKS - 1  # no content has more chunks than crypto.content allows
MAX_PAYLOAD = MAX_CHUNK_SIZE + MAX_SEAL_OVERHEAD
MAX_TEXT = 400
MAX_HAVE_ITEMS = 8192  # chunk indexes per HAVE frame (at most 5 bytes each in msgpack)
MAX_GET_BATCH = 64  # chunk indexes per GETS frame: no more than a holder queues per session


class ErrorCode(IntEnum):
    """Numeric error codes, HTTP-flavoured so a log reader guesses them right."""

    BAD_REQUEST = 400
    BAD_CAPABILITY = 403
    UNKNOWN_CONTENT = 404
    NOT_OPEN = 409
    # The holder's file is no longer what was sent (edited, moved or deleted): it will never
    # serve this content again. A requester stops asking it; when no other source can
    # finish the download, the message has failed (not a reason to retry).
    SOURCE_CHANGED = 410
    NOT_HELD = 416
    BUSY = 429
    UNAVAILABLE = 503


def _cid(f: Fields) -> bytes:
    cid: bytes = f.bytes("c", size=HASH_LEN)
    return cid


def _index(f: Fields, key: str = "i") -> int:
    i: int = f.int(key, lo=0, hi=MAX_INDEX)
    return i


@dataclass(frozen=True, slots=True)
class Open:
    """Ask to fetch a content, proving the capability on this session.

    `alone`: this requester fetches the content from no other holder (its node's
    co-recipient sourcing is off), so a holder that super-seeds shows it every chunk, as it
    would a requester alone (superseed.py). On the wire only when true; a holder that does
    not know the key ignores it, and an OPEN without it is a requester that may share."""

    TAG: ClassVar[int] = 1
    content_id: bytes
    proof: bytes
    alone: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.alone:
            return {"c": self.content_id, "p": self.proof, "a": True}
        return {"c": self.content_id, "p": self.proof}

    @classmethod
    def from_wire(cls, f: Fields) -> Open:
        return cls(_cid(f), f.bytes("p", size=PROOF_LEN), bool(f.bool("a", optional=True)))


@dataclass(frozen=True, slots=True)
class Opened:
    """The content's layout, and which chunks this holder has (None: all of them)."""

    TAG: ClassVar[int] = 2
    content_id: bytes
    size: int
    chunk_size: int
    have: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "s": self.size, "k": self.chunk_size, "h": self.have}

    @classmethod
    def from_wire(cls, f: Fields) -> Opened:
        return cls(_cid(f), f.int("s", lo=0, hi=MAX_CONTENT_SIZE),
                   f.int("k", lo=MIN_CHUNK_SIZE, hi=MAX_CHUNK_SIZE),
                   f.bytes("h", max_len=MAX_HAVE_BYTES, optional=True))


@dataclass(frozen=True, slots=True)
class HashesRequest:
    TAG: ClassVar[int] = 3
    content_id: bytes
    start: int
    count: int

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "i": self.start, "n": self.count}

    @classmethod
    def from_wire(cls, f: Fields) -> HashesRequest:
        return cls(_cid(f), _index(f), f.int("n", lo=1, hi=MAX_HASH_PAGE))


@dataclass(frozen=True, slots=True)
class Hashes:
    """A page of the chunk-hash list (leaves `start` .. `start + len(leaves) - 1`)."""

    TAG: ClassVar[int] = 4
    content_id: bytes
    start: int
    leaves: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "i": self.start, "l": list(self.leaves)}

    @classmethod
    def from_wire(cls, f: Fields) -> Hashes:
        leaves = f.list("l", item_bytes(size=HASH_LEN), max_items=MAX_HASH_PAGE)
        return cls(_cid(f), _index(f), leaves or ())


@dataclass(frozen=True, slots=True)
class Get:
    TAG: ClassVar[int] = 5
    content_id: bytes
    index: int

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "i": self.index}

    @classmethod
    def from_wire(cls, f: Fields) -> Get:
        return cls(_cid(f), _index(f))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A sealed chunk; `data` is the raw payload that follows the header on the wire."""

    TAG: ClassVar[int] = 6
    content_id: bytes
    index: int
    data: bytes | bytearray | memoryview

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "i": self.index, "n": len(self.data)}

    @classmethod
    def from_wire(cls, f: Fields) -> Chunk:
        # The payload is attached by `decode_header`'s caller once its length is checked.
        return cls(_cid(f), _index(f), b"")


@dataclass(frozen=True, slots=True)
class Cancel:
    TAG: ClassVar[int] = 7
    content_id: bytes
    index: int

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "i": self.index}

    @classmethod
    def from_wire(cls, f: Fields) -> Cancel:
        return cls(_cid(f), _index(f))


@dataclass(frozen=True, slots=True)
class Error:
    """An error reply; `index` set when it answers one GET, `content_id` when it concerns
    one content."""

    TAG: ClassVar[int] = 8
    code: int
    text: str
    content_id: bytes | None = None
    index: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"e": int(self.code), "x": self.text[:MAX_TEXT], "c": self.content_id,
                "i": self.index}

    @classmethod
    def from_wire(cls, f: Fields) -> Error:
        return cls(f.int("e", lo=100, hi=999), f.str("x", max_len=MAX_TEXT),
                   f.bytes("c", size=HASH_LEN, optional=True),
                   f.int("i", lo=0, hi=MAX_INDEX, optional=True))


def _item_index(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_INDEX:
        raise DecodeError(f"{what}: expected a chunk index 0..{MAX_INDEX}")
    return v


@dataclass(frozen=True, slots=True)
class Have:
    """A partial holder now holds these chunks too (verified and written since its OPENED
    bitmap or its last HAVE). Sent unasked to every requester that opened the content."""

    TAG: ClassVar[int] = 9
    content_id: bytes
    indexes: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "l": list(self.indexes)}

    @classmethod
    def from_wire(cls, f: Fields) -> Have:
        indexes = f.list("l", _item_index, max_items=MAX_HAVE_ITEMS)
        return cls(_cid(f), indexes or ())


@dataclass(frozen=True, slots=True)
class Gets:
    """Several GETs of one content in one frame: a requester refilling its window asks for
    the chunks it picked at once, so both ends seal, send and open one control header per
    batch instead of one per chunk. The holder treats it exactly as that many GETs, in
    order (each one may be refused on its own).

    `shown`: GETs sent in the same flight as the OPEN, before its OPENED came (the
    requester knows the layout from its handle): the holder takes only the chunks its
    OPENED showed (a partial holder's bitmap, the few a super-seeding sender shows; all
    when it showed no bitmap) and drops the others unanswered, as the requester, which
    reads the same OPENED, drops them too."""

    TAG: ClassVar[int] = 10
    content_id: bytes
    indexes: tuple[int, ...]
    shown: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.content_id, "l": list(self.indexes), "s": self.shown or None}

    @classmethod
    def from_wire(cls, f: Fields) -> Gets:
        indexes = f.list("l", _item_index, max_items=MAX_GET_BATCH) or ()
        if not indexes:
            raise DecodeError("GETS names no chunk")
        if len(set(indexes)) != len(indexes):
            raise DecodeError("GETS names a chunk twice")
        return cls(_cid(f), indexes, bool(f.bool("s", optional=True)))


Message = Open | Opened | HashesRequest | Hashes | Get | Chunk | Cancel | Error | Have | Gets

_BY_TAG: dict[int, type[Message]] = {
    Open.TAG: Open,
    Opened.TAG: Opened,
    HashesRequest.TAG: HashesRequest,
    Hashes.TAG: Hashes,
    Get.TAG: Get,
    Chunk.TAG: Chunk,
    Cancel.TAG: Cancel,
    Error.TAG: Error,
    Have.TAG: Have,
    Gets.TAG: Gets,
}

# Who may send what: the requester (initiator) asks, the holder (responder) answers.
REQUESTS: tuple[type[Message], ...] = (Open, HashesRequest, Get, Gets, Cancel)
REPLIES: tuple[type[Message], ...] = (Opened, Hashes, Chunk, Error, Have)


def encode_header(msg: Message) -> bytes:
    """The plaintext control header of `msg` (a CHUNK's payload travels separately)."""
    body = msg.to_wire()
    body["t"] = msg.TAG
    out = packb(body)
    if len(out) > MAX_HEADER:
        raise DecodeError(f"{type(msg).__name__} header is {len(out)} bytes, limit {MAX_HEADER}")
    return out


def decode_header(plaintext: bytes, payload: bytes | bytearray | memoryview) -> Message:
    """Check a decrypted header (and the payload length it declares) into a Message."""
    f = Fields(unpackb(plaintext, max_bytes=MAX_HEADER), "transfer message")
    tag = f.int("t", lo=0, hi=255)
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise DecodeError(f"unknown transfer message type {tag}")
    msg = cls.from_wire(f)
    if isinstance(msg, Chunk):
        declared = f.int("n", lo=0, hi=MAX_PAYLOAD)
        if declared != len(payload):
            raise DecodeError(f"chunk payload is {len(payload)} bytes, header says {declared}")
        return Chunk(msg.content_id, msg.index, payload)
    if len(payload):
        raise DecodeError(f"{cls.__name__} carries no payload, got {len(payload)} bytes")
    return msg
