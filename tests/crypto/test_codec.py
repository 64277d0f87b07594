"""The bounded field reader that every decoder uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.codec import Fields, item_bytes
from crypto.errors import DecodeError


def test_a_bad_list_item_is_named_by_its_index() -> None:
    f = Fields({"l": [b"ab", b"cd", b"toolong", b"ef"]}, "frame")
    with pytest.raises(DecodeError, match=r"^frame\.l\[2\]"):
        f.list("l", item_bytes(size=2), max_items=8)


@given(st.lists(st.binary(max_size=3), max_size=6))
def test_list_gives_every_item_or_the_first_bad_ones_index(items: list[bytes]) -> None:
    f = Fields({"l": items}, "frame")
    bad = [i for i, x in enumerate(items) if len(x) != 2]
    if not bad:
        assert f.list("l", item_bytes(size=2), max_items=8) == tuple(items)
        return
    with pytest.raises(DecodeError, match=rf"^frame\.l\[{bad[0]}\]"):
        f.list("l", item_bytes(size=2), max_items=8)
