"""A content being received: the `.part` file, its held-chunk bitmap and hash list."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from crypto.content import (
    ChunkCipher,
    ChunkVerifier,
    LeafScheme,
    chunk_count,
    plain_chunk_len,
)
from overlay.content.diskio import (
    DIRECT_ALIGN,
    SendBuffers,
    ShortRead,
    bit,
    direct_aligned,
    direct_buffer,
    free_name,
    open_direct,
    open_existing,
    pwrite_all,
    read_and_seal,
)
from overlay.content.interfaces import ContentStoreError, PartialGone


class PartialOwner(Protocol):
    """Where a partial content keeps its records: the catalog that opened it."""

    def have_path(self, content_id: bytes) -> Path:
        """The held-chunk bitmap file of `content_id`."""
        ...

    def save_leaves(self, content_id: bytes, leaves: Sequence[bytes]) -> None:
        """Persist the verified chunk-hash list."""
        ...

    def mark_complete(self, partial: PartialContent, final: Path) -> None:
        """Record that `partial` is now complete at `final`, servable as a full holder."""
        ...


class PartialContent:
    """A content being received: `.part` file, held-chunk bitmap, the verified hash list."""

    def __init__(
        self, owner: PartialOwner, content_id: bytes, size: int, chunk_size: int, key: bytes,
        capability: bytes, part_path: Path, dest_dir: Path, file_name: str,
        leaves: tuple[bytes, ...] | None, scheme: LeafScheme = LeafScheme.KEYED_PLAIN,
        *, outgoing: SendBuffers | None = None,
    ) -> None:
        self._owner = owner
        self.content_id = content_id
        self.size = size
        self.chunk_size = chunk_size
        self.key = key
        self.capability = capability
        self.part_path = part_path
        self._renaming = threading.Lock()  # complete()'s rename against a serving read's open
        # One complete() at a time: two downloads of one content (one partial per content
        # id) that finished together both passed the "not final yet" check, and the second
        # linked the .part the first had just removed (FileNotFoundError) or gave the file
        # a second name ("clip (1).ts").
        self._completing = threading.Lock()
        self.dest_dir = dest_dir
        self.file_name = file_name
        self.count = chunk_count(size, chunk_size)
        self.scheme = LeafScheme(scheme)
        self._verifier = self._make_verifier(leaves) if leaves is not None else None
        self._lock = threading.Lock()
        self._final: Path | None = None
        self._data_fd = open_existing(part_path, os.O_RDWR)
        self._direct_fd = open_direct(part_path) if chunk_size % DIRECT_ALIGN == 0 else -1
        have_path = owner.have_path(content_id)
        self._have_fd = os.open(have_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        nbytes = (self.count + 7) // 8
        have = bytearray(os.pread(self._have_fd, nbytes, 0))
        if len(have) < nbytes:
            have.extend(bytes(nbytes - len(have)))
            os.pwrite(self._have_fd, bytes(have), 0)
        if self.count & 7:
            have[-1] &= (1 << (self.count & 7)) - 1  # no chunks past the last one
        self._have = have
        self._held = int.from_bytes(have, "little").bit_count()
        # Chunks in the order they became held, those found at open first (in index order):
        # serving sessions keep a cursor into it and send HAVE for what follows. Only the
        # chunks held since the open are listed (at most `count`); the ones found at open
        # are listed only if a cursor ever points among them, so opening a content of 2^20
        # chunks costs its 128 KiB bitmap, not a list of every held index.
        self._held_at_open = self._held
        self._log: list[int] = []
        self._watchers: list[Callable[[], None]] = []
        # Plaintext buffers reused across write_chunk calls (one per writer thread at most):
        # a fresh megabyte per chunk costs page faults and zeroing on every chunk. Anonymous
        # mappings, so they are page-aligned as O_DIRECT wants.
        self._buffers: list[memoryview] = []
        # read_sealed's, as LocalContent's (its store's pool, shared by all its contents)
        self._outgoing = outgoing if outgoing is not None else SendBuffers()
        self._cipher = ChunkCipher(key, self.scheme)

    def _make_verifier(self, leaves: Sequence[bytes]) -> ChunkVerifier:
        return ChunkVerifier(self.content_id, leaves, self.size, self.chunk_size,
                             scheme=self.scheme, key=self.key)

    def _take_buffer(self) -> memoryview:
        try:
            return self._buffers.pop()  # list.pop/append are atomic under the GIL
        except IndexError:
            return direct_buffer(max(self.chunk_size, 1))

    def _write_plain(self, view: memoryview, offset: int) -> None:
        """Write an opened chunk: straight to the device where the filesystem allows
        (O_DIRECT: no copy into the page cache, and nothing left for complete()'s fsync
        to flush), else through the page cache."""
        fd = self._direct_fd
        if fd >= 0 and len(view) % DIRECT_ALIGN == 0 and direct_aligned(view):
            try:
                pwrite_all(fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # This filesystem takes O_DIRECT opens but not these writes: stop trying.
                self._direct_fd = -1
                with contextlib.suppress(OSError):
                    os.close(fd)
        pwrite_all(self._data_fd, view, offset)

    # --- state ------------------------------------------------------------------------
    @property
    def leaves(self) -> tuple[bytes, ...] | None:
        return self._verifier.leaves if self._verifier is not None else None

    @property
    def held(self) -> int:
        return self._held

    @property
    def is_complete(self) -> bool:
        return self._held == self.count

    @property
    def final_path(self) -> Path | None:
        """Where the file went once `complete()` ran."""
        return self._final

    def have(self, index: int) -> bool:
        return 0 <= index < self.count and bit(self._have, index)

    def has(self, index: int) -> bool:
        return self.have(index)

    def missing(self) -> list[int]:
        """Chunk indexes not yet held, in order: one int per missing chunk, so for tests
        and small contents; a download schedules from `have_bitmap()`."""
        return [i for i in range(self.count) if not bit(self._have, i)]

    @property
    def missing_count(self) -> int:
        return self.count - self._held

    def have_bitmap(self) -> bytes | None:
        return None if self.is_complete else bytes(self._have)

    def held_snapshot(self) -> tuple[bytes | None, int]:
        with self._lock:
            return self.have_bitmap(), self._held

    def held_since(self, cursor: int) -> tuple[list[int], int]:
        with self._lock:
            start = self._held_at_open
            if cursor >= start:
                return self._log[cursor - start:], self._held
            # A cursor among the chunks found at open: list them (rare; O(count)).
            later = set(self._log)
            opened = [i for i in range(self.count) if bit(self._have, i) and i not in later]
            return opened[max(cursor, 0):] + self._log, self._held

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._watchers.append(callback)

        def stop() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._watchers.remove(callback)

        return stop

    # --- receiving --------------------------------------------------------------------
    def set_leaves(self, leaves: Sequence[bytes]) -> None:
        """Accept the chunk-hash list if it matches the content id (else VerificationError),
        and persist it. Blocking."""
        verifier = self._make_verifier(leaves)
        if self._verifier is not None:
            return
        self._owner.save_leaves(self.content_id, verifier.leaves)
        self._verifier = verifier

    def write_chunk(self, index: int, sealed: bytes | bytearray | memoryview) -> bool:
        """Verify, open and write chunk `index`, then record it as held. Blocking.

        Returns False (and writes nothing) if it was already held. Raises VerificationError
        for a chunk that doesn't match its leaf; nothing is written then.
        """
        if self._verifier is None:
            raise ContentStoreError("no verified hash list yet: call set_leaves first")
        if self.have(index):
            return False
        view = memoryview(sealed)
        lead = self.scheme.seal_lead
        # Opened where it arrived when its ciphertext is on a page (TransferConnection.
        # align_payloads) and written from there; else into a reused aligned buffer.
        # Opening into a second buffer measured 0.6-0.9 ms per 2 MiB chunk in about half
        # the runs here, 0.23 ms in place. Where the cipher would copy the chunk to open
        # it in place (cryptography 51 and later), the aligned buffer costs less.
        in_place = (self._cipher.in_place and not view.readonly
                    and direct_aligned(view[lead:]))
        buf = None if in_place else self._take_buffer()
        try:
            out = view[lead:] if buf is None else buf
            self._write_plain(self._verifier.open_verified(self._cipher, index, view, out),
                              index * self.chunk_size)
        finally:
            if buf is not None:
                self._buffers.append(buf)
        # Bytes first, bit second: a kill between the two costs one re-fetch, never a hole.
        with self._lock:
            if bit(self._have, index):
                return False
            self._have[index >> 3] |= 1 << (index & 7)
            os.pwrite(self._have_fd, bytes((self._have[index >> 3],)), index >> 3)
            self._held += 1
            self._log.append(index)
            watchers = list(self._watchers)
        for notify in watchers:  # outside the lock: a watcher may read held_since
            notify()
        return True

    def read_sealed(self, index: int) -> bytearray:
        """Serve a verified chunk we hold (co-recipients serve as they go). Blocking."""
        if not self.have(index) or self._verifier is None:
            raise ContentStoreError(f"chunk {index} is not held")
        n = plain_chunk_len(self.size, self.chunk_size, index)
        fd = self._reading_fd(index)
        try:
            return read_and_seal(fd, self._cipher, index, n, self.chunk_size,
                                 self._outgoing)
        except ShortRead:
            raise ContentStoreError(f"{self.part_path} is shorter than expected") from None
        finally:
            os.close(fd)

    def _reading_fd(self, index: int) -> int:
        """A descriptor of its own (complete() closes ours) on the file this partial wrote:
        a dup of the open `.part`, or the completed file. Not `.part` opened by name: its
        name may have been deleted and taken by the download started again, and that new
        file's zeros went out sealed under the content key (the requester's leaf check then
        banned this node as a lying holder). Under _renaming, which complete() holds from
        the rename until the final name is recorded (a read that picked `.part` just
        before the rename and opened it just after found no file) and close() to close."""
        with self._renaming:
            if self._final is not None:
                return open_existing(self._final, os.O_RDONLY)
            if self._data_fd < 0:
                raise ContentStoreError(f"{self.part_path} is closed: chunk {index} is no "
                                        "longer served")
            return os.dup(self._data_fd)

    def complete(self) -> Path:
        """Flush, rename to the final name (never clobbering), register as a full holder.

        Blocking. Returns the final path; calling it again, or at the same time from
        another thread, returns the same path.
        """
        with self._completing:
            return self._complete()

    def _complete(self) -> Path:
        if self._final is not None:
            return self._final
        if not self.is_complete or self._verifier is None:
            raise ContentStoreError(f"{self.count - self._held} chunks still missing")
        os.fsync(self._data_fd)
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        linked = True
        with self._renaming:
            while True:
                final = free_name(self.dest_dir, self.file_name)
                try:
                    # link() fails if the name appeared meanwhile; rename() would clobber it.
                    os.link(self.part_path, final)
                except FileExistsError:
                    continue
                except FileNotFoundError:
                    if self.gone():
                        raise PartialGone(f"{self.part_path} was deleted during the download"
                                          ) from None
                    raise
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                        raise
                    os.replace(self.part_path, final)  # no hard links here: best effort
                    linked = False
                break
            self._final = final  # before a serving read may open a name again
        # Final name first, record second, .part last: a crash in between leaves at worst
        # a stray file, never a lost one.
        self._owner.mark_complete(self, final)
        if linked:
            self.part_path.unlink(missing_ok=True)
        self.close()
        return final

    def gone(self) -> bool:
        """Whether the `.part` file was deleted (or replaced) under the open descriptor."""
        if self._data_fd < 0:
            return False
        try:
            st = os.stat(self.part_path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        held = os.fstat(self._data_fd)
        return (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino)

    def close(self) -> None:
        """Release the file descriptors (the partial state stays on disk)."""
        with self._renaming:  # never while a serving read takes a dup of _data_fd
            for fd in (self._data_fd, self._direct_fd, self._have_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._data_fd = self._direct_fd = self._have_fd = -1
