"""Receipts on the wire: a declined receipt carries its reason, bounded and readable; any
other bytes are a DecodeError naming what is wrong, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.codec import packb
from crypto.errors import DecodeError
from overlay.mail.receipts import (
    MAX_REASON,
    RECEIPT_STATES,
    REMOVED_REASON,
    Receipt,
    reason_text,
)

MID = b"m" * 16
_readable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                    max_size=MAX_REASON)


@settings(max_examples=200, deadline=None)
@given(state=st.sampled_from(RECEIPT_STATES), at=st.integers(0, 1 << 40), reason=_readable)
def test_round_trip(state: str, at: int, reason: str) -> None:
    r = Receipt(MID, state, at, reason if state == "declined" else None)
    assert Receipt.decode(r.encode()) == r


def test_a_declined_receipt_keeps_its_reason() -> None:
    r = Receipt.decode(Receipt(MID, "declined", 1_700_000_000, REMOVED_REASON).encode())
    assert (r.state, r.reason) == ("declined", "removed by the recipient")


@pytest.mark.parametrize(("fields", "error"), [
    ({"state": "declined"}, "a declined receipt needs its reason"),
    ({"state": "declined", "why": ""}, r"receipt.why: length 0 outside 1..200"),
    ({"state": "declined", "why": "x" * (MAX_REASON + 1)},
     r"receipt.why: length 201 outside 0..200"),
    ({"state": "declined", "why": b"removed"}, "receipt.why: expected text, got bytes"),
    ({"state": "declined", "why": 7}, "receipt.why: expected text, got int"),
    ({"state": "declined", "why": "bad\x1b[2Jtext"}, "receipt.why: control character"),
    ({"state": "downloaded", "why": "late"}, "a reason .why. only goes with declined"),
    ({"state": "refused", "why": "x"}, "unknown state 'refused'"),
])
def test_bad_reasons_are_refused_clearly(fields: dict[str, object], error: str) -> None:
    data = packb({"v": 1, "mid": MID, "at": 5, **fields})
    with pytest.raises(DecodeError, match=error):
        Receipt.decode(data)


_values = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                    st.text(max_size=300), st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(v=st.one_of(st.just(1), _values), mid=st.one_of(st.just(MID), _values),
       state=st.one_of(st.sampled_from(RECEIPT_STATES), _values),
       at=st.one_of(st.just(5), _values), why=st.one_of(_readable, _values),
       extra=st.dictionaries(st.text(max_size=4), _values, max_size=3))
def test_any_map_decodes_or_is_a_decode_error(v: object, mid: object, state: object,
                                              at: object, why: object,
                                              extra: dict[str, object]) -> None:
    """A receipt that decodes is exactly what the fields say; anything else refused."""
    data = packb({**extra, "v": v, "mid": mid, "state": state, "at": at, "why": why})
    try:
        r = Receipt.decode(data)
    except DecodeError:
        return
    assert (r.message_id, r.state, r.at) == (mid, state, at)
    assert r.reason == (why if state == "declined" else None)
    assert r.state != "declined" or (isinstance(why, str) and 1 <= len(why) <= MAX_REASON)


def test_reason_text_bounds_what_this_node_sends() -> None:
    assert reason_text("refused: 'a\x1bb'\n") == "refused: 'a?b'"
    long = reason_text("x" * 1000)
    assert len(long) == MAX_REASON and long.endswith("…")
    for text in ("ok", "\x00\x01", "é" * 500):
        Receipt.decode(Receipt(MID, "declined", 1, reason_text(text)).encode())
