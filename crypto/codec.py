"""msgpack with hard limits, and a small checker for decoded maps.

Every structure that crosses a boundary (network, disk) goes through `unpackb` with a
size limit and is then read field by field through `Fields`, which checks type, length
and range before anything uses it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from crypto.errors import DecodeError

T = TypeVar("T")


# `msgpack.packb` builds a Packer (and its buffer) on every call: half its cost for the
# small frames of the rendezvous protocol. Each thread reuses one Packer instead; it keeps
# nothing from one call to the next (autoreset, also after an error).
_packers = threading.local()


def packb(obj: Any) -> bytes:
    """Encode with binary types kept apart from strings."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    out: bytes = packer.pack(obj)
    return out


def unpackb(data: bytes | memoryview, *, max_bytes: int,
            object_hook: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """Decode one msgpack object of at most `max_bytes`, or raise DecodeError.

    Extension types and non-string map keys are refused; trailing bytes are an error.
    `object_hook` makes each decoded map into what it returns (msgpack's own hook).
    """
    if len(data) > max_bytes:
        raise DecodeError(f"message too large: {len(data)} bytes, limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            object_hook=object_hook,
        )
    except DecodeError:
        raise
    # Garbage raises ValueError subclasses (ExtraData, FormatError, StackError, bad UTF-8),
    # or TypeError for unhashable map keys; OutOfData for truncation.
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


# Fields' accessor methods are named after the types they return, which shadows the
# builtins inside the class body; these aliases keep the annotations readable to mypy.
_Str = str
_Int = int
_Bool = bool


class Fields:
    """Typed, bounded access to a decoded msgpack map; every failure is a DecodeError."""

    __slots__ = ("_map", "_what")

    def __init__(self, obj: Any, what: _Str) -> None:
        if not isinstance(obj, dict):
            raise DecodeError(f"{what}: expected a map, got {type(obj).__name__}")
        self._map: dict[_Str, Any] = obj
        self._what = what

    def has(self, key: _Str) -> _Bool:
        return key in self._map and self._map[key] is not None

    def _get(self, key: _Str, optional: _Bool) -> Any:
        if key not in self._map or self._map[key] is None:
            if optional:
                return None
            raise DecodeError(f"{self._what}: missing field {key!r}")
        return self._map[key]

    def bytes(
        self, key: _Str, *, size: _Int | None = None, max_len: _Int = 1 << 20,
        optional: _Bool = False,
    ) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, bytes):
            raise DecodeError(f"{self._what}.{key}: expected bytes, got {type(v).__name__}")
        if size is not None and len(v) != size:
            raise DecodeError(f"{self._what}.{key}: expected {size} bytes, got {len(v)}")
        if len(v) > max_len:
            raise DecodeError(f"{self._what}.{key}: {len(v)} bytes, limit {max_len}")
        return v

    def str(self, key: _Str, *, max_len: _Int, min_len: _Int = 0, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, _Str):
            raise DecodeError(f"{self._what}.{key}: expected text, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise DecodeError(
                f"{self._what}.{key}: length {len(v)} outside {min_len}..{max_len}"
            )
        return v

    def int(self, key: _Str, *, lo: _Int, hi: _Int, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, _Int) or isinstance(v, _Bool):
            raise DecodeError(f"{self._what}.{key}: expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise DecodeError(f"{self._what}.{key}: {v} outside {lo}..{hi}")
        return v

    def bool(self, key: _Str, *, optional: _Bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, _Bool):
            raise DecodeError(f"{self._what}.{key}: expected true/false, got {type(v).__name__}")
        return v

    def list(
        self,
        key: _Str,
        item: Callable[[Any, _Str], T],
        *,
        max_items: _Int,
        optional: _Bool = False,
    ) -> tuple[T, ...] | None:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, list):
            raise DecodeError(f"{self._what}.{key}: expected a list, got {type(v).__name__}")
        if len(v) > max_items:
            raise DecodeError(f"{self._what}.{key}: {len(v)} items, limit {max_items}")
        where = f"{self._what}.{key}"
        try:
            # No per-item location string on the way through (a DHT reply has 20 items)...
            return tuple(map(item, v, itertools.repeat(where)))
        except DecodeError:
            # ...only when one fails: checks are pure, so rerun them to name its index.
            for i, x in enumerate(v):
                item(x, f"{where}[{i}]")
            raise

    def sub(self, key: _Str) -> Fields:
        """A required nested map."""
        return Fields(self._get(key, False), f"{self._what}.{key}")

    def map(self, key: _Str, *, optional: _Bool = False) -> Fields | None:
        v = self._get(key, optional)
        if v is None:
            return None
        return Fields(v, f"{self._what}.{key}")


def item_str(max_len: int) -> Callable[[Any, str], str]:
    """A list-item checker for bounded text."""

    def check(v: Any, what: str) -> str:
        if not isinstance(v, str) or len(v) > max_len:
            raise DecodeError(f"{what}: expected text of at most {max_len} characters")
        return v

    return check


def item_bytes(size: int | None = None, max_len: int = 1 << 16) -> Callable[[Any, str], bytes]:
    """A list-item checker for bytes of a fixed size or bounded length."""

    def check(v: Any, what: str) -> bytes:
        if not isinstance(v, bytes):
            raise DecodeError(f"{what}: expected bytes")
        if size is not None and len(v) != size:
            raise DecodeError(f"{what}: expected {size} bytes, got {len(v)}")
        if len(v) > max_len:
            raise DecodeError(f"{what}: {len(v)} bytes, limit {max_len}")
        return v

    return check
