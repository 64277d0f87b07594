"""Receipts: notes from a recipient back to the sender about one message it sent.

`downloading` and `downloaded` say how far the recipient got. `declined` says it will
never download this message, with a short reason the sender's user reads ("removed by the
recipient", "refused: ...", "source changed"): the recipient removed it unread, or its
download failed for good. A junk sender and a message refused at arrival are never told
(a junked sender learns nothing, as mail doesn't bounce spam; a refused one may be forged).

They travel as small signed-and-sealed envelopes of kind "receipt" on the same path as
location messages, so the server can't tell them apart. The reason rides as an optional
field of the same version 1 record: a node from before `declined` refuses the unknown
state in `decode` (a DecodeError, which the incoming path drops with a warning and a
counter), and its user sees that recipient as `sent`, as before.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from crypto.location import MESSAGE_ID_LEN

RECEIPT_KIND = "receipt"
DECLINED = "declined"
RECEIPT_STATES = ("downloading", "downloaded", "deleted", DECLINED)
MAX_RECEIPT = 1024
MAX_REASON = 200  # characters of a declined receipt's reason (800 bytes of UTF-8 at most)
MAX_MARKS = 3  # combining marks kept on one letter (200 of them stack up the page)
# The reasons this node gives (a user's remove; the fetcher names the permanent failures).
REMOVED_REASON = "removed by the recipient"


def check_reason(reason: str) -> str:
    """`reason` if it is a declined receipt's reason: 1..MAX_REASON characters, no control
    character; else DecodeError saying which rule it breaks."""
    if not 1 <= len(reason) <= MAX_REASON:
        raise DecodeError(f"receipt.why: length {len(reason)} outside 1..{MAX_REASON}")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in reason):
        raise DecodeError(f"receipt.why: control character in {reason!r}")
    return reason


def reason_text(text: str) -> str:
    """`text` as a declined receipt's reason, what this node sends and what it files of a
    recipient's: every character a terminal or a page would not show as itself (control,
    bidi override, zero-width, line separator) replaced by '?', other spaces by ' ', at
    most MAX_MARKS combining marks on a letter, cut to MAX_REASON characters."""
    out: list[str] = []
    marks = 0
    for c in text.strip():
        marks = marks + 1 if unicodedata.combining(c) else 0
        if marks > MAX_MARKS:
            continue
        if c.isprintable():
            out.append(c)
        else:
            out.append(" " if unicodedata.category(c) == "Zs" else "?")
    clean = "".join(out) or "declined"
    return clean if len(clean) <= MAX_REASON else clean[:MAX_REASON - 1] + "…"


@dataclass(frozen=True, slots=True)
class Receipt:
    message_id: bytes  # the location message this is about
    state: str
    at: int  # unix seconds at the recipient
    reason: str | None = None  # why, for `declined` only

    def encode(self) -> bytes:
        fields: dict[str, object] = {"v": 1, "mid": self.message_id, "state": self.state,
                                     "at": self.at}
        if self.reason is not None:
            fields["why"] = self.reason
        return packb(fields)

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        f = Fields(unpackb(data, max_bytes=MAX_RECEIPT), "receipt")
        if f.int("v", lo=0, hi=255) != 1:
            raise DecodeError("receipt: unsupported version")
        state = f.str("state", max_len=16)
        if state not in RECEIPT_STATES:
            raise DecodeError(f"receipt: unknown state {state!r}")
        reason = f.str("why", max_len=MAX_REASON, optional=True)
        if state == DECLINED:
            if reason is None:
                raise DecodeError("receipt: a declined receipt needs its reason (why)")
            check_reason(reason)
        elif reason is not None:
            raise DecodeError(f"receipt: a reason (why) only goes with declined, not {state}")
        return cls(f.bytes("mid", size=MESSAGE_ID_LEN), state, f.int("at", lo=0, hi=1 << 40),
                   reason)
