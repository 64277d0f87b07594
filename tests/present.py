"""`present(x)`: a lookup's result the test expects to be there, typed without its None."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def present(value: T | None) -> T:
    """`value`; AssertionError if it is None (the record, match or reply is missing)."""
    if value is None:
        raise AssertionError("expected a value, got None")
    return value
