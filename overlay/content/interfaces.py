"""What the serving side needs from held content, as protocols, and the store's error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


class ContentStoreError(Exception):
    """A store operation cannot be done (unknown content, file changed, wrong state)."""


class NotEnoughSpace(ContentStoreError):
    """The disk has no room for the file now; it may have later."""


class PartialGone(ContentStoreError):
    """The `.part` file was deleted while it was being received: what it held is lost, and
    the next `open_partial` starts it again."""


class ServedContent(Protocol):
    """What the serving side needs from one content it holds, fully or in part."""

    @property
    def content_id(self) -> bytes: ...
    @property
    def size(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def capability(self) -> bytes: ...
    @property
    def leaves(self) -> tuple[bytes, ...] | None: ...

    def have_bitmap(self) -> bytes | None:
        """Held chunks, bit i = chunk i (LSB first); None when every chunk is held."""
        ...

    def has(self, index: int) -> bool: ...

    def read_sealed(self, index: int) -> bytes | bytearray:
        """The sealed chunk, as the Merkle leaf names it. Blocking."""
        ...


@runtime_checkable
class GrowingContent(Protocol):
    """A content whose held chunks grow while it is served: a download in progress, whose
    holder tells its requesters about new chunks (HAVE) as they are verified and written."""

    def held_snapshot(self) -> tuple[bytes | None, int]:
        """The have-bitmap (None: complete) and a cursor for `held_since`, taken together."""
        ...

    def held_since(self, cursor: int) -> tuple[list[int], int]:
        """Chunks that became held after `cursor`, and the new cursor."""
        ...

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from whichever thread wrote the chunk) after each newly held
        chunk; returns the function that stops it."""
        ...


class Catalog(Protocol):
    """Content id → something the serving side can serve, or None."""

    def lookup(self, content_id: bytes) -> ServedContent | None: ...

