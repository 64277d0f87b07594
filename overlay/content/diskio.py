"""Disk I/O for chunks: O_DIRECT writes, sparse preallocation, reused buffers, safe names."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from crypto.content import (
    HASH_LEN,
    ChunkCipher,
)
from crypto.errors import DecodeError
from overlay.content.interfaces import ContentStoreError, NotEnoughSpace

# Received chunks go to the disk with O_DIRECT when their length and offset are multiples
# of this (every chunk of a 1 MiB layout but the last). Measured here writing 1 MiB blocks:
# 0.08 s of CPU per GB and nothing left to flush, against 0.26 s/GB through the page cache
# plus a final fsync of the whole file (~0.5 s per GiB) that the download waited for.
DIRECT_ALIGN = 4096
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and arm64 with 4 KiB pages
# Buffers kept for reuse by one content store, shared by every content it serves: a pool
# per content kept its chunks' buffers for as long as the node ran, about 2 MiB per file
# sent (1.6 GB of RSS after 600 small sends). At the largest files' 4 MiB chunks these
# bound what stays allocated to 64 MiB of sealed and 32 MiB of plaintext buffers.
SEND_BUFFERS = 16  # sealed chunks on their way out (some still queued in a transport)
SCRATCH_BUFFERS = 8  # plaintext chunks read for sealing (one per reading thread is used)


class ShortRead(Exception):
    """The file ended before the chunk did: it shrank since it was added."""


class ChunkChanged(Exception):
    """The chunk read is not the one its leaf names: the file was edited in place."""


class SendBuffers:
    """Buffers for sealed chunks on their way out, reused once nothing else holds them.

    A chunk handed to a transport may stay queued there after `send_all` returned (uvloop
    keeps a view until the kernel has the bytes), so a buffer is written again only when
    the pool's references are the only ones left, which CPython's reference count says
    exactly. A fresh megabyte per chunk cost the serving node 11% of its CPU in page
    faults, zeroing and unmapping (perf, 512 MiB served)."""

    def __init__(self, limit: int = SEND_BUFFERS) -> None:
        self._limit = limit
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()
        # Plaintext read for sealing where the cipher can't seal in place (fill_and_seal).
        self.scratch = ScratchBuffers()

    def take(self, n: int) -> bytearray:
        """A buffer of exactly `n` bytes that nothing else references (stale contents)."""
        with self._lock:
            for buf in self._bufs:
                # Held by the list, `buf` and getrefcount's argument: by nobody else.
                if len(buf) == n and sys.getrefcount(buf) == 3:
                    return buf
            buf = bytearray(n)
            if len(self._bufs) >= self._limit:
                self._bufs.pop(0)  # the oldest, still in use: it is simply not reused
            self._bufs.append(buf)
            return buf


class ScratchBuffers:
    """Plaintext buffers that chunk reads go into, reused by whichever thread reads next;
    at most `limit` are kept, the largest ones (a buffer serves any chunk it can hold)."""

    def __init__(self, limit: int = SCRATCH_BUFFERS) -> None:
        self._limit = limit
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        """A buffer of at least `n` bytes that no other thread holds (stale contents)."""
        with self._lock:
            # By position: list.remove would look buffers up by their contents.
            fits = [i for i, b in enumerate(self._bufs) if len(b) >= n]
            if fits:
                return self._bufs.pop(min(fits, key=lambda i: len(self._bufs[i])))
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        """Hand a buffer back once done with it."""
        with self._lock:
            if len(self._bufs) < self._limit:
                self._bufs.append(buf)
                return
            smallest = min(range(len(self._bufs)), key=lambda i: len(self._bufs[i]))
            if len(self._bufs[smallest]) < len(buf):
                self._bufs[smallest] = buf



def read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset` (ShortRead if the file ends first)."""
    got, n = 0, len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise ShortRead
        got += k


def fill_and_seal(fill: Callable[[memoryview], object], cipher: ChunkCipher, index: int,
                  n: int, outgoing: SendBuffers,
                  check: Callable[[memoryview], bool] | None = None) -> bytearray:
    """Chunk `index` (`n` plaintext bytes) put by `fill` straight into the buffer that goes
    out (reused once the transport let go of it) and sealed there in place: one copy in,
    one out, and one chunk-sized buffer in the cache instead of two
    (`ChunkCipher.seal_in_place`). Where the cipher can't seal in place without copying
    the plaintext first (cryptography 51 and later), `fill` puts it into a reused scratch
    buffer of `outgoing`'s instead, sealed from there into the outgoing one.

    `check` sees the plaintext before it is sealed; False raises ChunkChanged and nothing
    is sealed (a KEYED_PLAIN sender's leaf check)."""
    out = outgoing.take(n + cipher.overhead)
    if not cipher.in_place:
        scratch = outgoing.scratch.take(n)
        try:
            with memoryview(scratch) as whole, whole[:n] as plain:
                _fill_checked(fill, plain, check)
                cipher.seal_into(index, plain, out)
        finally:
            outgoing.scratch.give(scratch)
        return out
    lead = cipher.scheme.seal_lead
    with memoryview(out) as whole, whole[lead : lead + n] as plain:
        _fill_checked(fill, plain, check)
    cipher.seal_in_place(index, out, n)
    return out


def _fill_checked(fill: Callable[[memoryview], object], plain: memoryview,
                  check: Callable[[memoryview], bool] | None) -> None:
    fill(plain)
    if check is not None and not check(plain):
        raise ChunkChanged


def read_and_seal(fd: int, cipher: ChunkCipher, index: int, n: int, chunk_size: int,
                  outgoing: SendBuffers,
                  check: Callable[[memoryview], bool] | None = None) -> bytearray:
    """`fill_and_seal` of chunk `index` read from the file `fd`."""
    return fill_and_seal(lambda plain: read_exactly(fd, plain, index * chunk_size), cipher,
                         index, n, outgoing, check)


def direct_buffer(n: int, lead: int = 0) -> memoryview:
    """`n` bytes of fresh memory whose byte `lead` (0 <= lead < a page) starts a page, for
    data written with O_DIRECT from there: private anonymous memory, the whole 2 MiB pages
    inside it asked to be transparent huge pages. The kernel pins a buffer's pages for
    every O_DIRECT write; a huge page is pinned as one (a shared mapping, as mmap(-1)
    makes, is shmem and is pinned and faulted 4 KiB at a time). Measured here, 2 MiB
    O_DIRECT writes took 0.024-0.031 CPU s per GB from huge pages, 0.039-0.045 from
    private 4 KiB pages and 0.050-0.076 from a shared mapping."""
    if not 0 <= lead < mmap.PAGESIZE:
        raise ValueError(f"a lead of {lead} bytes is not within a page")
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    huge = advise is not None and n - lead >= HUGE_PAGE
    align = HUGE_PAGE if huge else mmap.PAGESIZE
    m = mmap.mmap(-1, n + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -(base + lead) % align  # base + start + lead is on an `align` boundary
    if huge and advise is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            m.madvise(advise, start + lead, (n - lead) // HUGE_PAGE * HUGE_PAGE)
    return memoryview(m)[start : start + n]


def open_direct(path: Path) -> int:
    """A second, write-only descriptor with O_DIRECT, or -1 where the system or the
    filesystem has none (tmpfs refuses the open)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag | _NOFOLLOW)
    except OSError:
        return -1


def direct_aligned(view: memoryview) -> bool:
    """Whether a writable buffer starts on a DIRECT_ALIGN boundary, as O_DIRECT wants (a
    read-only one can't be asked, and is never opened in place)."""
    if view.readonly or not view.nbytes:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def bit(bitmap: bytes | bytearray, i: int) -> bool:
    return bool(bitmap[i >> 3] & (1 << (i & 7)))


def _pack_leaves(leaves: Sequence[bytes]) -> bytes:
    return b"".join(leaves)


def _unpack_leaves(blob: bytes, count: int) -> tuple[bytes, ...]:
    if len(blob) != count * HASH_LEN:
        raise ContentStoreError("stored hash list is damaged")
    return tuple(blob[i : i + HASH_LEN] for i in range(0, len(blob), HASH_LEN))


def free_name(directory: Path, name: str) -> Path:
    """`name`, or `stem (1).ext`, `stem (2).ext`... whichever doesn't exist yet."""
    candidate = directory / name
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    n = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = directory / f"{stem} ({n}){dot}{ext}"
        n += 1
    return candidate


# A name is at most 255 bytes on Linux file systems; the `.part` name adds 14 (`.` + 8 hex
# digits + `.part`) and free_name may add ` (NNN)`.
MAX_NAME_BYTES = 255
PART_SUFFIX_BYTES = 14
FREE_NAME_ROOM = 8


def safe_file_name(name: str) -> str:
    """`name` as a plain file name that fits this file system with our suffixes, counted in
    bytes (a longer stem is cut, the extension kept); DecodeError if nothing usable is left."""
    # The name comes from a location message: never let it leave dest_dir.
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = "".join(c for c in base if ord(c) >= 0x20 and ord(c) != 0x7F)
    if base in ("", ".", "..") or "\x00" in base:
        raise DecodeError(f"unusable file name {name!r}")
    room = MAX_NAME_BYTES - PART_SUFFIX_BYTES - FREE_NAME_ROOM
    if len(os.fsencode(base)) > room:
        stem, dot, ext = base.rpartition(".")
        if not stem or len(os.fsencode(ext)) > 16:
            stem, dot, ext = base, "", ""
        keep = room - len(os.fsencode(dot + ext))
        stem = os.fsencode(stem)[:keep].decode("utf-8", "ignore").rstrip() or "file"
        base = stem + dot + ext
    return base


PARTIAL_DIR = ".peerpost-partial"  # beside the received files: same file system for link()
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_replace(path: Path, write: Callable[[int], None]) -> None:
    """Write `path` through a temporary name (mode 0600, `write(fd)`), fsync'd, then
    renamed into place: a crash leaves the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def private_dir(parent: Path) -> Path:
    """`parent/.peerpost-partial`, made mode 0700 if missing; ContentStoreError unless it
    is a real directory owned by this user (a planted symlink or a stranger's folder is
    refused). `.part` files live here, so nobody else can put a name in their way."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / PARTIAL_DIR
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ContentStoreError(f"{folder} is not a folder of this user; not writing there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def create_new(path: Path) -> int:
    """Open a new file at `path` for reading and writing, mode 0600, never through a
    symlink and never an existing file: whatever was at that name (a stale `.part`, a
    planted symlink) is unlinked first, its target untouched."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # removes a symlink itself, not what it points to
        return os.open(path, flags, 0o600)


def open_existing(path: Path, flags: int) -> int:
    """os.open(path, flags) refusing a symlink at `path` (OSError ELOOP)."""
    return os.open(path, flags | _NOFOLLOW)


def preallocate(path: Path, size: int) -> None:
    """Create `path` new (see create_new) at its final size, sparse.

    Not posix_fallocate: writing into fallocated (unwritten) extents measured 416 MiB/s on
    ext4 here against 4,300 MiB/s into a sparse file in one run, and in others both made
    2.1-3.0 GB/s (1 GiB in 2 MiB O_DIRECT writes from four threads): it never gained. Free
    space is checked up front instead, so a full disk still fails now rather than halfway.
    Measured again in whole deliveries: ext4 takes its inode lock exclusively for an
    O_DIRECT write into a hole, so the writers of a sparse file wait on each other (perf:
    half of their waits), and into fallocated extents they don't; but 1 GiB delivered no
    faster (`benchmarks transfer`, median pair 1.00 over 10 pairs): the disk was the limit.
    """
    vfs = os.statvfs(path.parent)
    if size > vfs.f_bavail * vfs.f_frsize:
        raise NotEnoughSpace(
            f"not enough free space in {path.parent}: {size:,} bytes needed, "
            f"{vfs.f_bavail * vfs.f_frsize:,} available")
    fd = create_new(path)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
