"""Looking a message up by a prefix of its id in SQL (a range on the BLOB key) finds
exactly the ids whose hex starts with it, as reading every row and comparing strings
did: odd-length prefixes, prefixes of f's (no upper bound), upper case, and text that
is not hex or longer than an id (nothing). Against a real node.db."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.mail.db import NodeDB, id_prefix_range
from overlay.mail.inbox import Inbox
from overlay.mail.outbox import Outbox

# Few byte values, the edges among them: ids share prefixes, and some run into 0xff.
_BYTES = st.sampled_from([0x00, 0x0F, 0xAB, 0xAC, 0xF0, 0xFF])
_IDS = st.lists(st.lists(_BYTES, min_size=16, max_size=16).map(bytes), max_size=12,
                unique=True)
_PREFIXES = st.one_of(
    st.text(alphabet="0abcfF", max_size=8),
    st.text(alphabet="f", min_size=1, max_size=33),
    st.sampled_from(["x", "0x", "a b", "ab ", "g", "é", "0" * 33]))


@settings(max_examples=150, deadline=None)
@given(ids=_IDS, prefix=_PREFIXES, limit=st.integers(1, 4),
       of_an_id=st.tuples(st.booleans(), st.integers(0, 11), st.integers(1, 32)))
def test_the_rows_found_by_prefix_are_those_whose_hex_starts_so(
        ids: list[bytes], prefix: str, limit: int, of_an_id: tuple[bool, int, int]) -> None:
    use, which, digits = of_an_id
    if ids and use:  # also a prefix of a stored id, any length
        prefix = ids[which % len(ids)].hex()[:digits]
    with tempfile.TemporaryDirectory() as tmp, NodeDB.open(Path(tmp)) as db:
        inbox, outbox = Inbox(db), Outbox(db)
        for n, mid in enumerate(ids):
            inbox.add(id=mid, sender="alice@example.net", sender_peer_id=b"p" * 20,
                      title=f"clip {n}", note="", size=1, file_name="clip", media_type="",
                      content_id=bytes(32), chunk_count=1, message=b"",
                      received_at=1000.0 + n % 3)
            outbox.add(id=mid, path=f"/x/{n}", title=f"clip {n}", size=1,
                       content_id=bytes(32), created_at=1000.0 + n % 3,
                       recipients=["bob@example.net"])
        want = [m for m in ids if m.hex().startswith(prefix.lower())]
        newest = sorted(want, key=lambda m: (-(1000.0 + ids.index(m) % 3), m))[:limit]

        got, found = inbox.with_id_prefix(prefix, limit=limit)
        assert found == len(want) and [e.id for e in got] == newest
        sent, found = outbox.with_id_prefix(prefix, limit=limit)
        assert found == len(want) and [m.id for m in sent] == newest


def test_the_range_of_an_odd_prefix_and_of_one_of_f() -> None:
    assert id_prefix_range("ABC") == (b"\xab\xc0", b"\xab\xd0")
    assert id_prefix_range("af") == (b"\xaf", b"\xb0")
    assert id_prefix_range("aff") == (b"\xaf\xf0", b"\xb0")
    assert id_prefix_range("fff") == (b"\xff\xf0", None)
    assert id_prefix_range("") == (b"", None)
    assert id_prefix_range("a b") is None and id_prefix_range("f" * 33) is None
