"""The `Range` header of /media/ID: one `bytes=` range, clipped to the file; anything a
single range can't satisfy is refused (the server answers 416 with the file's size)."""

from __future__ import annotations

import pytest

from overlay.app.web.media import parse_range

SIZE = 1000


@pytest.mark.parametrize(("header", "want"), [
    (None, None),  # no Range: the whole file, 200
    ("bytes=0-99", (0, 99)),
    ("bytes=100-100", (100, 100)),
    (" bytes=10-20 ", (10, 20)),
    ("bytes=500-", (500, 999)),  # open end: to the end of the file
    ("bytes=990-5000", (990, 999)),  # an end past the file is clipped
    ("bytes=-100", (900, 999)),  # suffix: the last 100 bytes
    ("bytes=-5000", (0, 999)),  # a suffix longer than the file is all of it
    ("bytes=999-", (999, 999)),
])
def test_satisfiable_ranges(header: str | None, want: tuple[int, int] | None) -> None:
    assert parse_range(header, SIZE) == want


@pytest.mark.parametrize("header", [
    "bytes=1000-",  # starts at the end
    "bytes=2000-3000",  # wholly outside
    "bytes=20-10",  # last before first
    "bytes=-0",  # an empty suffix
    "bytes=-",
    "bytes=0-99,200-299",  # several ranges: refused, not guessed at
    "bytes=0-1, 5-6",
    "items=0-99",  # another unit
    "bytes=a-b",
    "bytes 0-99",
    "",
])
def test_unsatisfiable_or_malformed_ranges_are_refused(header: str) -> None:
    with pytest.raises(ValueError):
        parse_range(header, SIZE)


def test_an_empty_file_satisfies_no_range() -> None:
    with pytest.raises(ValueError):
        parse_range("bytes=0-", 0)
    with pytest.raises(ValueError):
        parse_range("bytes=-10", 0)
    assert parse_range(None, 0) is None
