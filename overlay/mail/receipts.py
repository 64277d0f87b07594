"""Receipts: "downloaded" / "deleted" notes from a recipient back to the sender.

They travel as small signed-and-sealed envelopes of kind "receipt" on the same path as
location messages, so the server can't tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from crypto.location import MESSAGE_ID_LEN

RECEIPT_KIND = "receipt"
RECEIPT_STATES = ("downloading", "downloaded", "deleted")
MAX_RECEIPT = 1024


@dataclass(frozen=True, slots=True)
class Receipt:
    message_id: bytes  # the location message this is about
    state: str
    at: int  # unix seconds at the recipient

    def encode(self) -> bytes:
        return packb({"v": 1, "mid": self.message_id, "state": self.state, "at": self.at})

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        f = Fields(unpackb(data, max_bytes=MAX_RECEIPT), "receipt")
        if f.int("v", lo=0, hi=255) != 1:
            raise DecodeError("receipt: unsupported version")
        state = f.str("state", max_len=16)
        if state not in RECEIPT_STATES:
            raise DecodeError(f"receipt: unknown state {state!r}")
        return cls(f.bytes("mid", size=MESSAGE_ID_LEN), state, f.int("at", lo=0, hi=1 << 40))
