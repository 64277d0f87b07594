"""The location message: headers, descriptive information and handle (the seed's Figure 2).

A frozen, typed record. `decode()` checks every type, length and range, and the total size,
before anything else sees the message. The message
is signed and sealed per recipient device by `crypto.envelope`; this module is only the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crypto.address import normalize_address
from crypto.capability import CAPABILITY_LEN
from crypto.codec import Fields, item_str, packb, unpackb
from crypto.content import HASH_LEN, KEY_LEN, LeafScheme, check_layout
from crypto.errors import DecodeError
from crypto.identity import PEER_ID_LEN
from crypto.limits import MAX_NOTE, MAX_TITLE

# The version says what the content id's leaves hash and how chunks are sealed
# (LeafScheme): 2, keyed hashes of the plaintext chunks, which are sealed with
# XChaCha20-Poly1305; 3, the same leaves, chunks sealed with AES-256-GCM under random
# nonces. Version 1 (leaves hash the sealed chunks) is still read, so mail sent before the
# change downloads as it was named. A node that doesn't know a version refuses the message
# whole ("unsupported location message version 3") instead of fetching chunks it would judge
# forged and banning the sender for them.
LOCATION_VERSION = 3
_VERSION_OF_SCHEME = {LeafScheme.SEALED: 1, LeafScheme.KEYED_PLAIN: 2,
                      LeafScheme.KEYED_PLAIN_AES: 3}
_SCHEME_OF_VERSION = {v: k for k, v in _VERSION_OF_SCHEME.items()}
MESSAGE_ID_LEN = 16
MAX_LOCATION_MESSAGE = 60 * 1024  # fits a 64 KiB envelope once signed and sealed
MAX_THUMBNAIL = 32 * 1024
MAX_RECIPIENTS = 128  # the total size limit binds first for long addresses
MAX_FILE_NAME = 255
# A file system name holds 255 bytes; the receiver's store adds `.<8 hex>.part` (14 bytes)
# while it downloads, so a name is at most 241 bytes of UTF-8.
PART_SUFFIX_LEN = 14
MAX_FILE_NAME_BYTES = 255 - PART_SUFFIX_LEN
MAX_MEDIA_TYPE = 127
MAX_COPYRIGHT = 500
MAX_FIELDS = 16
MAX_FIELD_NAME = 64
MAX_FIELD_VALUE = 1000
MAX_STAMPS = 8
MAX_HINT_ADDRS = 8
MAX_HINT_LEN = 255
# A folder archive's entries (files and folders). Bounds what a receiver is asked to
# create; a family's photo folder is hundreds, a music collection tens of thousands.
MAX_FOLDER_ENTRIES = 100_000
FOLDER_MEDIA_TYPE = "application/x-tar"
_TIME_MAX = 1 << 40  # unix seconds (or ms) far beyond any real date; bounds the integer


@dataclass(frozen=True, slots=True)
class Headers:
    message_id: bytes
    sender: str
    sender_peer_id: bytes
    recipients: tuple[str, ...]
    created: int  # unix seconds
    version: int = LOCATION_VERSION


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """The content is an uncompressed tar of one folder named `name` (all members under
    `name/`): what a receiver unpacks into its download folder. `size` is the bytes of
    its files, `files` and `folders` how many of each (the top folder not counted)."""

    name: str
    files: int
    folders: int
    size: int


@dataclass(frozen=True, slots=True)
class Description:
    """What a person sees before deciding to fetch."""

    title: str = ""
    note: str = ""
    media_type: str = "application/octet-stream"
    file_name: str = ""
    # (label, unix seconds) pairs: "recorded", "modified", ...
    stamps: tuple[tuple[str, int], ...] = ()
    copyright: str = ""
    # Free text fields, and the media facts PyAV reads (duration, codecs, resolution).
    fields: tuple[tuple[str, str], ...] = ()
    duration_ms: int | None = None
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None
    # Set for a folder (or several files) sent as one tar; a receiver that does not know
    # the field ignores it and keeps the .tar, which opens as usual.
    folder: FolderInfo | None = None


@dataclass(frozen=True, slots=True)
class SenderHints:
    """How to reach the sender: peer id, home server and direct addresses ("host:port")."""

    peer_id: bytes
    home_server: str
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Handle:
    content_id: bytes
    size: int
    chunk_size: int
    content_key: bytes = field(repr=False)
    capability: bytes = field(repr=False)
    sender: SenderHints | None = None
    # What the content id's leaves hash; on the wire it is the message's version.
    scheme: LeafScheme = LeafScheme.KEYED_PLAIN_AES


@dataclass(frozen=True, slots=True)
class LocationMessage:
    headers: Headers
    description: Description
    handle: Handle

    def encode(self) -> bytes:
        """The canonical msgpack body; raises DecodeError if this record would not decode."""
        data = packb(_to_wire(self))
        # Checking our own output keeps a bad local value from ever reaching a recipient.
        decode_location(data)
        return data


def _to_wire(m: LocationMessage) -> dict[str, Any]:
    h, d, k = m.headers, m.description, m.handle
    return {
        "v": _VERSION_OF_SCHEME[k.scheme],
        "h": {"id": h.message_id, "from": h.sender, "from_peer": h.sender_peer_id,
              "to": list(h.recipients), "created": h.created},
        "d": {"title": d.title, "note": d.note, "type": d.media_type, "name": d.file_name,
              "stamps": [[k_, v] for k_, v in d.stamps], "copyright": d.copyright,
              "fields": [[k_, v] for k_, v in d.fields], "duration_ms": d.duration_ms,
              "width": d.width, "height": d.height, "thumb": d.thumbnail,
              **({} if d.folder is None else {"folder": {
                  "name": d.folder.name, "files": d.folder.files,
                  "folders": d.folder.folders, "size": d.folder.size}})},
        "k": {"cid": k.content_id, "size": k.size, "chunk": k.chunk_size,
              "key": k.content_key, "cap": k.capability,
              "src": None if k.sender is None else {
                  "peer": k.sender.peer_id, "home": k.sender.home_server,
                  "addrs": list(k.sender.addresses)}},
    }


def _pair_checker(max_key: int, value_kind: str, max_value: int) -> Any:
    def check(v: Any, what: str) -> tuple[str, Any]:
        if not isinstance(v, list) or len(v) != 2:
            raise DecodeError(f"{what}: expected a [name, value] pair")
        name, value = v
        if not isinstance(name, str) or not 0 < len(name) <= max_key:
            raise DecodeError(f"{what}: name must be 1..{max_key} characters")
        if value_kind == "str":
            if not isinstance(value, str) or len(value) > max_value:
                raise DecodeError(f"{what}: value must be text of at most {max_value}")
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < max_value:
            raise DecodeError(f"{what}: value must be a time stamp")
        return (name, value)

    return check


def decode_location(data: bytes) -> LocationMessage:
    """Parse and validate a location message body, or raise DecodeError saying why."""
    top = Fields(unpackb(data, max_bytes=MAX_LOCATION_MESSAGE), "location")
    version = top.int("v", lo=0, hi=255)
    if version not in _SCHEME_OF_VERSION:
        raise DecodeError(f"unsupported location message version {version}")

    h, d, k = top.sub("h"), top.sub("d"), top.sub("k")

    recipients = h.list("to", item_str(254), max_items=MAX_RECIPIENTS) or ()
    if not recipients:
        raise DecodeError("location.h.to: at least one recipient")
    headers = Headers(
        message_id=h.bytes("id", size=MESSAGE_ID_LEN),
        sender=normalize_address(h.str("from", max_len=254)),
        sender_peer_id=h.bytes("from_peer", size=PEER_ID_LEN),
        recipients=tuple(normalize_address(r) for r in recipients),
        created=h.int("created", lo=0, hi=_TIME_MAX),
        version=version,
    )
    description = Description(
        title=d.str("title", max_len=MAX_TITLE),
        note=d.str("note", max_len=MAX_NOTE),
        media_type=d.str("type", min_len=1, max_len=MAX_MEDIA_TYPE),
        file_name=_file_name(d.str("name", max_len=MAX_FILE_NAME)),
        stamps=d.list("stamps", _pair_checker(MAX_FIELD_NAME, "int", _TIME_MAX),
                      max_items=MAX_STAMPS) or (),
        copyright=d.str("copyright", max_len=MAX_COPYRIGHT),
        fields=d.list("fields", _pair_checker(MAX_FIELD_NAME, "str", MAX_FIELD_VALUE),
                      max_items=MAX_FIELDS) or (),
        duration_ms=d.int("duration_ms", lo=0, hi=_TIME_MAX, optional=True),
        width=d.int("width", lo=1, hi=1 << 16, optional=True),
        height=d.int("height", lo=1, hi=1 << 16, optional=True),
        thumbnail=d.bytes("thumb", max_len=MAX_THUMBNAIL, optional=True),
        folder=folder_from_fields(d.map("folder", optional=True)),
    )
    size = k.int("size", lo=0, hi=1 << 62)
    if description.folder is not None:
        check_folder(description.folder, size)
    chunk = k.int("chunk", lo=1, hi=1 << 40)
    check_layout(size, chunk)
    src = k.map("src", optional=True)
    hints = None
    if src is not None:
        hints = SenderHints(
            peer_id=src.bytes("peer", size=PEER_ID_LEN),
            home_server=src.str("home", max_len=MAX_HINT_LEN),
            addresses=src.list("addrs", item_str(MAX_HINT_LEN), max_items=MAX_HINT_ADDRS) or (),
        )
    handle = Handle(
        content_id=k.bytes("cid", size=HASH_LEN),
        size=size,
        chunk_size=chunk,
        content_key=k.bytes("key", size=KEY_LEN),
        capability=k.bytes("cap", size=CAPABILITY_LEN),
        sender=hints,
        scheme=_SCHEME_OF_VERSION[version],
    )
    return LocationMessage(headers=headers, description=description, handle=handle)


def folder_from_fields(f: Fields | None) -> FolderInfo | None:
    """A `folder` field (a message's, or the control `send` op's) read within its bounds;
    DecodeError naming the field."""
    if f is None:
        return None
    return FolderInfo(name=f.str("name", min_len=1, max_len=MAX_FILE_NAME),
                      files=f.int("files", lo=0, hi=MAX_FOLDER_ENTRIES),
                      folders=f.int("folders", lo=0, hi=MAX_FOLDER_ENTRIES),
                      size=f.int("size", lo=0, hi=1 << 62))


def check_folder(folder: FolderInfo, archive_size: int) -> None:
    """The rules a receiver holds a message's `folder` field to, for an archive of
    `archive_size` bytes: a plain name, at most MAX_FOLDER_ENTRIES files and folders
    (the top one included), files no larger than the archive. DecodeError names the
    rule; the control `send` op asks the same before the node sends (a client other than
    our CLI must not make it send what every recipient refuses)."""
    if not folder.name:
        raise DecodeError("location.d.folder.name: empty")
    _file_name(folder.name)
    if not (0 <= folder.files and 0 <= folder.folders
            and folder.files + folder.folders < MAX_FOLDER_ENTRIES):
        raise DecodeError(f"location.d.folder: more than {MAX_FOLDER_ENTRIES:,} files and "
                          "folders")
    if not 0 <= folder.size <= archive_size:
        raise DecodeError("location.d.folder.size: more than the archive holds")


def _file_name(name: str) -> str:
    # A file name from a stranger must never pick a directory on the receiver's disk.
    if "/" in name or "\\" in name or "\x00" in name or name in {".", ".."}:
        raise DecodeError(f"location.d.name: not a plain file name: {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        raise DecodeError(f"location.d.name: longer than {MAX_FILE_NAME_BYTES} bytes")
    if name and not name.strip():
        raise DecodeError("location.d.name: only blanks")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise DecodeError(f"location.d.name: control character in {name!r}")
    return name
