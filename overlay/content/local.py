"""A complete content this node serves from the user's own file, sealed on the way out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from crypto.content import (
    ChunkCipher,
    plain_chunk_len,
)
from overlay.content.diskio import SendBuffers, ShortRead, read_and_seal
from overlay.content.interfaces import ContentStoreError


@dataclass(frozen=True, slots=True)
class LocalContent:
    """A complete content this node can serve; the data for a location message's handle."""

    content_id: bytes
    size: int
    chunk_size: int
    key: bytes = field(repr=False)
    capability: bytes = field(repr=False)
    path: Path
    leaves: tuple[bytes, ...] = field(repr=False)
    mtime_ns: int = 0  # the file's mtime when its chunks were hashed
    cipher: ChunkCipher = field(init=False, repr=False, compare=False)
    # Plaintext buffers the serving threads read into (one per thread at most).
    scratch: list[bytearray] = field(init=False, repr=False, compare=False,
                                     default_factory=list)
    outgoing: SendBuffers = field(init=False, repr=False, compare=False,
                                  default_factory=lambda: SendBuffers())

    def __post_init__(self) -> None:
        object.__setattr__(self, "cipher", ChunkCipher(self.key))

    def _check_unchanged(self, st: os.stat_result) -> None:
        # Chunks of an edited file would fail every receiver's check and get us banned;
        # refuse instead. Size and mtime, as rsync and make judge it: re-hashing each chunk
        # would cost a fifth of the sealing work.
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            raise ContentStoreError(f"{self.path} changed since it was added")

    def have_bitmap(self) -> bytes | None:
        return None

    def has(self, index: int) -> bool:
        return 0 <= index < len(self.leaves)

    def read_sealed(self, index: int) -> bytearray:
        """Read the plaintext chunk and seal it; refuse if the file changed under us."""
        n = plain_chunk_len(self.size, self.chunk_size, index)
        try:
            with open(self.path, "rb", buffering=0) as f:
                self._check_unchanged(os.fstat(f.fileno()))
                return read_and_seal(f.fileno(), self.cipher, index, n, self.chunk_size,
                                      self.scratch, self.outgoing)
        except OSError as exc:
            raise ContentStoreError(f"cannot read {self.path}: {exc.strerror}") from None
        except ShortRead:
            raise ContentStoreError(f"{self.path} changed since it was added") from None
