"""A complete content this node serves from the user's own file, sealed on the way out."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crypto.content import (
    ChunkCipher,
    LeafScheme,
    chunk_hash,
    leaf_key,
    plain_chunk_len,
    plain_leaf,
)
from overlay.content.diskio import (
    ChunkChanged,
    SendBuffers,
    ShortRead,
    read_and_seal,
)
from overlay.content.interfaces import ContentStoreError

log = logging.getLogger(__name__)


class _Changed:
    """Set once a sealed chunk no longer matched its leaf: the file was edited in place."""

    __slots__ = ("reason", "withdrawn")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.withdrawn = False  # the sender cancelled the message: not served any more


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
    scheme: LeafScheme = LeafScheme.KEYED_PLAIN  # what its leaves hash
    cipher: ChunkCipher = field(init=False, repr=False, compare=False)
    leaf_key: bytes = field(init=False, repr=False, compare=False)
    # The buffers serving threads read chunks into and seal them in, on their way out: a
    # content store gives all its contents the same pool, so what stays allocated does not
    # grow with the number of files it serves.
    outgoing: SendBuffers = field(repr=False, compare=False, default_factory=SendBuffers)
    changed: _Changed = field(init=False, repr=False, compare=False, default_factory=_Changed)
    # A download's file (a co-recipient's copy), not one this node sent: when it is gone,
    # the content has not changed, this copy has (`holder.gone_text`).
    received: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cipher", ChunkCipher(self.key, self.scheme))
        object.__setattr__(self, "leaf_key", leaf_key(self.key))

    def _check_unchanged(self, st: os.stat_result) -> None:
        # Chunks of an edited file would fail every receiver's check and get us banned;
        # refuse instead. Size and mtime, as rsync and make judge it, catch most edits before
        # any read; the leaf check in read_sealed catches the rest.
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            raise ContentStoreError(self._mark_changed(f"{self.path} changed since it was "
                                                       "added"))

    def _mark_changed(self, reason: str) -> str:
        """Record for good that the file is no longer what was sent; returns the reason."""
        if self.changed.reason is None:
            log.warning("%s; no chunk of it is served any more", reason)
            self.changed.reason = reason
        return self.changed.reason

    def withdraw(self) -> None:
        """The sender cancelled what carried this content: serve none of it from now on."""
        self.changed.withdrawn = True
        self._mark_changed(f"{self.path} was withdrawn by its sender")

    def source_changed(self) -> str | None:
        """Why this file can't be served any more (edited, moved or deleted since it was
        added), or None while it still looks as it did. One stat; the reason sticks."""
        if self.changed.reason is not None:
            return self.changed.reason
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._mark_changed(f"{self.path} was moved or deleted since it was added")
        except OSError:
            return None  # unreadable now (permissions, I/O): maybe not for good
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            return self._mark_changed(f"{self.path} changed since it was added")
        return None

    def have_bitmap(self) -> bytes | None:
        return None

    def has(self, index: int) -> bool:
        """False for every chunk once the file was found changed: GETs are refused at once."""
        return self.changed.reason is None and 0 <= index < len(self.leaves)

    def _leaf_check(self, index: int) -> Callable[[memoryview], bool]:
        leaf, key_l = self.leaves[index], self.leaf_key

        def check(plain: memoryview) -> bool:
            return hmac.compare_digest(plain_leaf(key_l, plain), leaf)

        return check

    def read_sealed(self, index: int) -> bytearray:
        """Read the plaintext chunk and seal it; refuse if the file changed under us.

        KEYED_PLAIN_AES seals under a fresh random nonce, so an edit that size and mtime
        miss (a tool that restores the mtime, an edit within the clock's granularity) costs
        no nonce: its chunk fails the receiver's leaf check. The deterministic schemes are
        checked against the Merkle leaf before the chunk leaves: KEYED_PLAIN hashes the
        plaintext read *before* sealing it, SEALED hashes the sealed chunk. Such an edited
        chunk would be new plaintext sealed under the nonce the old plaintext used, and one
        ciphertext pair under one nonce gives away the XOR of the two plaintexts. It runs on
        the sealing threads (this is called there), off the loop; the check is one BLAKE3
        pass, 0.16 CPU s per GB here.
        """
        if self.changed.reason is not None:
            raise ContentStoreError(self.changed.reason)
        n = plain_chunk_len(self.size, self.chunk_size, index)
        check = self._leaf_check(index) if self._checks_leaves() else None
        try:
            sealed: bytearray | None = self._read_and_seal(index, n, check)
        except ChunkChanged:
            sealed = None
        if sealed is None or (self.scheme is LeafScheme.SEALED
                              and chunk_hash(sealed) != self.leaves[index]):
            raise ContentStoreError(self._mark_changed(self._mismatch_text(index)))
        return sealed

    def _checks_leaves(self) -> bool:
        """Whether a chunk's plaintext is checked against its leaf before it is sealed."""
        return self.scheme is LeafScheme.KEYED_PLAIN

    def _read_and_seal(self, index: int, n: int,
                       check: Callable[[memoryview], bool] | None) -> bytearray:
        """Chunk `index` (`n` bytes) read and sealed; ContentStoreError if the file can't
        give it, ChunkChanged if `check` refuses its plaintext."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                self._check_unchanged(os.fstat(f.fileno()))
                return read_and_seal(f.fileno(), self.cipher, index, n, self.chunk_size,
                                     self.outgoing, check)
        except FileNotFoundError:
            raise ContentStoreError(self._mark_changed(
                f"{self.path} was moved or deleted since it was added")) from None
        except OSError as exc:
            raise ContentStoreError(f"cannot read {self.path}: {exc.strerror}") from None
        except ShortRead:
            raise ContentStoreError(self._mark_changed(
                f"{self.path} changed since it was added")) from None

    def _mismatch_text(self, index: int) -> str:
        return f"{self.path} changed since it was added: chunk {index} no longer matches its hash"
