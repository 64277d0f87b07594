"""A node's saved routing contacts: versioned msgpack, checked like wire input.

Replaces the package's `Server.save_state`, which pickles (loading a pickle runs code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crypto.codec import Fields, packb, unpackb
from overlay.dht.wire import Contact, contact_item

STATE_VERSION = 1
MAX_SAVED_CONTACTS = 1000
MAX_STATE_BYTES = 256 * 1024


def encode_state(contacts: list[Contact]) -> bytes:
    """The file's bytes for up to MAX_SAVED_CONTACTS contacts."""
    return packb({"v": STATE_VERSION,
                  "contacts": [c.encode() for c in contacts[:MAX_SAVED_CONTACTS]]})


def decode_state(data: bytes) -> list[Contact]:
    """Contacts from a state file; raises DecodeError if it is not one we wrote."""
    f = Fields(unpackb(data, max_bytes=MAX_STATE_BYTES), "dht state")
    f.int("v", lo=STATE_VERSION, hi=STATE_VERSION)
    return list(f.list("contacts", contact_item, max_items=MAX_SAVED_CONTACTS) or ())


def write_state(path: Path, data: bytes) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_state(path: Path) -> bytes:
    with open(path, "rb") as fh:
        data: Any = fh.read(MAX_STATE_BYTES + 1)
    return bytes(data)
