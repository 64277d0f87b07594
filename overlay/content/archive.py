"""A received folder served from its unpacked files: the archive's bytes, without the archive.

A folder travels as one uncompressed tar, and a receiver unpacks it and deletes the .tar.
To go on serving its co-recipients it keeps what the files don't hold: the archive's
header blocks, the zero padding after each file's data and the end-of-archive blocks (a
few hundred bytes to ~1.5 KiB per member, in a `.gaps` file in the store), and a map of
where each file's data lies in the archive (`.map`, msgpack). Byte `b` of the content is
then byte `b` of that concatenation: chunk i is read piece by piece from the gaps and the
files, and sealed as a file's chunk is.

Each file's size and mtime after unpacking are recorded and checked on every read, as a
sent file's are (LocalContent), and a chunk is checked against its leaf before it is
sealed (under KEYED_PLAIN and KEYED_PLAIN_AES alike): bytes a user edited are never served,
and the first edit found stops the whole folder from being served, as an edited sent file
is (the rest may be edited too, and a receiver bans a holder for one bad chunk).

A folder being sent is served the same way from the sender's own files, with no archive
written at all: the CLI computes the archive's header, padding and end bytes and where each
file's data lies, and writes only that map (its gap bytes inside it, its files named by
their absolute paths) into the store's `outgoing/` folder; the node names the content by
reading through it (ContentStore.add_sent_archive). A file edited since stops the serving
as an edited sent file does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from crypto.location import MAX_FOLDER_ENTRIES
from overlay.content.diskio import (
    ShortRead,
    fill_and_seal,
    pwrite_all,
    read_exactly,
    write_replace,
)
from overlay.content.interfaces import ContentStoreError
from overlay.content.local import LocalContent

log = logging.getLogger(__name__)

MAP_VERSION = 1
MAP_SUFFIX = ".map"
OUTGOING_DIR = "outgoing"  # under the content store's root: the sender's folder maps
GAPS_SUFFIX = ".gaps"
MAX_MEMBER_NAME_BYTES = 4096  # the unpacker allows 4,000 (below PATH_MAX)
MAX_SOURCE_PATH_BYTES = 4096  # a sent file's absolute path: PATH_MAX
# What a member adds to the gaps at most: its header, a PAX header of two names (each at
# most 4,000 bytes, padded to blocks) and the padding of its data.
MAX_GAP_BYTES_PER_MEMBER = 12 * 1024
# A map is at most this big: each entry a name and three integers, and a sender's gap
# bytes (beyond the members', the end blocks and the record padding: 10 KiB).
MAX_MAP_BYTES = (MAX_FOLDER_ENTRIES * (MAX_SOURCE_PATH_BYTES + 64 + MAX_GAP_BYTES_PER_MEMBER)
                 + 32 * 1024)
COPY_BLOCK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """One regular file of the archive with data: its name under the top folder ('/'
    between parts), where its data starts in the archive, its size, and its mtime on disk
    once unpacked (0 until it is recorded)."""

    name: str
    offset: int
    size: int
    mtime_ns: int = 0


def _check_name(name: str, *, absolute: bool) -> None:
    if absolute:  # a sender's own file, opened where the user keeps it
        if (not name.startswith("/") or "\x00" in name
                or len(name.encode("utf-8", "surrogateescape")) > MAX_SOURCE_PATH_BYTES):
            raise ContentStoreError(f"folder map: unusable file path {name!r}")
        return
    parts = name.split("/")
    if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or len(name.encode("utf-8", "surrogateescape")) > MAX_MEMBER_NAME_BYTES
            or "\x00" in name):
        raise ContentStoreError(f"folder map: unusable member name {name!r}")


class ArchiveMap:
    """Where each file's data lies in an archive of `size` bytes; every other byte is a
    gap byte, kept in order in the gaps file. Files with no data have no entry.

    A sender's map holds its gap bytes (`gaps`), and names its files by absolute path;
    `source` is the folder it was made of (absolute), None for several paths sent together
    and for a map from before it was kept."""

    __slots__ = ("_sources", "_starts", "files", "gaps", "gaps_size", "size", "source")

    def __init__(self, size: int, files: Iterable[ArchiveFile],
                 gaps: bytes | None = None, source: Path | None = None) -> None:
        self.size = size
        self.files = tuple(files)
        self.gaps = gaps
        self.source = source
        if source is not None and (gaps is None or not source.is_absolute()):
            raise ContentStoreError(f"folder map: unusable source folder {str(source)!r}")
        if len(self.files) > MAX_FOLDER_ENTRIES:
            raise ContentStoreError(f"folder map: more than {MAX_FOLDER_ENTRIES:,} files")
        # Pieces in archive order: _starts[k] is where piece k begins; _sources[k] >= 0 is
        # a file's index, < 0 a gap whose bytes start at -_sources[k] - 1 in the gaps file.
        self._starts = array("q")
        self._sources = array("q")
        at = held = 0
        for i, f in enumerate(self.files):
            _check_name(f.name, absolute=self.gaps is not None)
            if f.size <= 0 or f.offset < at or f.offset + f.size > size:
                raise ContentStoreError(f"folder map: {f.name!r} at {f.offset} ({f.size} "
                                        "bytes) overlaps another or lies outside the archive")
            if f.offset > at:
                self._starts.append(at)
                self._sources.append(-held - 1)
                held += f.offset - at
            self._starts.append(f.offset)
            self._sources.append(i)
            at = f.offset + f.size
        if size > at:
            self._starts.append(at)
            self._sources.append(-held - 1)
            held += size - at
        self.gaps_size = held
        if self.gaps is not None and len(self.gaps) != held:
            raise ContentStoreError(f"folder map: {len(self.gaps)} gap bytes kept, "
                                    f"{held} needed")

    def gap_ranges(self) -> Iterator[tuple[int, int]]:
        """(archive offset, length) of each gap, in order."""
        for k, src in enumerate(self._sources):
            if src < 0:
                yield self._starts[k], self._end(k) - self._starts[k]

    def _end(self, k: int) -> int:
        return self._starts[k + 1] if k + 1 < len(self._starts) else self.size

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """The pieces under archive bytes [start, end): (offset into the range, length,
        source, offset into the source); a source >= 0 is a file, < 0 the gaps file."""
        k = bisect_right(self._starts, start) - 1
        pos = start
        while pos < end and k < len(self._starts):
            piece_end = min(self._end(k), end)
            src, into = self._sources[k], pos - self._starts[k]
            if src < 0:
                into += -src - 1
            yield pos - start, piece_end - pos, src, into
            pos = piece_end
            k += 1

    def encode(self, folder: Path) -> bytes:
        """The map as saved: versioned msgpack, with the folder it describes."""
        saved: dict[str, object] = {
            "v": MAP_VERSION, "folder": os.fsencode(folder), "size": self.size,
            "files": [[f.name, f.offset, f.size, f.mtime_ns] for f in self.files]}
        if self.gaps is not None:
            saved["gaps"] = self.gaps
        if self.source is not None:
            saved["source"] = os.fsencode(self.source)
        blob: bytes = msgpack.packb(saved, use_bin_type=True)
        return blob

    @classmethod
    def decode(cls, blob: bytes) -> tuple[ArchiveMap, Path]:
        """A saved map and its folder, checked as wire input is; ContentStoreError."""
        try:
            d = msgpack.unpackb(blob, raw=False, strict_map_key=True,
                                max_bin_len=MAX_MAP_BYTES,
                                max_str_len=MAX_SOURCE_PATH_BYTES,
                                max_array_len=MAX_FOLDER_ENTRIES, max_map_len=8)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ContentStoreError(f"folder map is damaged: {exc}") from None
        if not isinstance(d, dict) or d.get("v") != MAP_VERSION:
            raise ContentStoreError("folder map of an unknown version")
        folder, size, rows = d.get("folder"), d.get("size"), d.get("files")
        gaps, source = d.get("gaps"), d.get("source")
        if (not isinstance(folder, bytes) or len(folder) > MAX_SOURCE_PATH_BYTES
                or not isinstance(size, int) or size < 0 or not isinstance(rows, list)
                or not (gaps is None or isinstance(gaps, bytes))
                or not (source is None or (isinstance(source, bytes) and b"\x00" not in source
                                           and len(source) <= MAX_SOURCE_PATH_BYTES))):
            raise ContentStoreError("folder map is damaged")
        files = []
        for r in rows:
            if (not isinstance(r, list) or len(r) != 4 or not isinstance(r[0], str)
                    or not all(isinstance(x, int) and x >= 0 for x in r[1:])):
                raise ContentStoreError("folder map is damaged")
            files.append(ArchiveFile(r[0], r[1], r[2], r[3]))
        return (cls(size, files, gaps, None if source is None else Path(os.fsdecode(source))),
                Path(os.fsdecode(folder)))


def view_paths(views_dir: Path, content_id: bytes) -> tuple[Path, Path]:
    """Where a content's folder map and gap bytes are kept."""
    stem = views_dir / content_id.hex()
    return stem.with_suffix(MAP_SUFFIX), stem.with_suffix(GAPS_SUFFIX)


def save_view(archive: Path, folder: Path, files: Iterable[ArchiveFile],
              map_path: Path, gaps_path: Path) -> ArchiveMap:
    """Record the view of `archive` over its unpacked `folder` (blocking): each file's size
    is checked on disk and its mtime recorded, the gap bytes are copied out of the archive.
    ContentStoreError if a file is not what the archive holds."""
    recorded = []
    for f in files:
        path = folder / f.name
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise ContentStoreError(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            raise ContentStoreError(f"{path} is not the file the archive holds")
        recorded.append(ArchiveFile(f.name, f.offset, f.size, st.st_mtime_ns))
    with open(archive, "rb", buffering=0) as src:
        layout = ArchiveMap(os.fstat(src.fileno()).st_size, recorded)

        def copy_gaps(fd: int) -> None:
            buf, out = bytearray(COPY_BLOCK), 0
            for at, n in layout.gap_ranges():
                while n:
                    view = memoryview(buf)[:min(n, COPY_BLOCK)]
                    read_exactly(src.fileno(), view, at)
                    pwrite_all(fd, view, out)
                    at, n, out = at + len(view), n - len(view), out + len(view)

        try:
            write_replace(gaps_path, copy_gaps)
        except ShortRead:
            raise ContentStoreError(f"{archive} shrank while its folder map was made") from None
    blob = memoryview(layout.encode(folder))
    write_replace(map_path, lambda fd: pwrite_all(fd, blob, 0))
    return layout


def load_view(map_path: Path) -> tuple[ArchiveMap, Path] | None:
    """The saved map and its folder, None if there is none; ContentStoreError if damaged."""
    try:
        with open(map_path, "rb") as f:
            blob = f.read(MAX_MAP_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(blob) > MAX_MAP_BYTES:
        raise ContentStoreError(f"{map_path} is larger than a folder map can be")
    return ArchiveMap.decode(blob)


@dataclass(frozen=True, slots=True)
class ArchiveView(LocalContent):
    """A complete content served from an unpacked folder (`path`) and its gap bytes, or,
    on the sender, from the files its map names (`path` is then the map itself, in the
    store's outgoing folder, and the gap bytes are in it)."""

    layout: ArchiveMap = field(kw_only=True, repr=False, compare=False)
    gaps_path: Path = field(kw_only=True)
    # Each member's path as text, joined once: a Path join per piece read cost about
    # 10 us, 0.1 CPU s per GB of 100 KB files.
    member_paths: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        LocalContent.__post_init__(self)  # zero-argument super() fails in a slots class
        object.__setattr__(self, "member_paths", tuple(os.path.join(self.path, f.name)
                                                  for f in self.layout.files))

    @property
    def sent(self) -> bool:
        """Whether this is a sender's view over the files it was asked to send."""
        return self.layout.gaps is not None

    @property
    def _since(self) -> str:
        return "sent" if self.sent else "received"

    def _checks_leaves(self) -> bool:
        # A received folder's chunks are checked under KEYED_PLAIN_AES too: people edit
        # what they received, and an edit that keeps size and mtime would get this holder
        # banned by every co-recipient it serves. One BLAKE3 pass, 0.16 CPU s per GB. A
        # sent folder is checked as a sent file is (only where the nonce is the index's):
        # a fresh nonce per chunk, and the receivers' check catches the edit.
        if self.sent:
            return LocalContent._checks_leaves(self)
        return self.scheme.plain_leaves

    def _member(self, f: ArchiveFile) -> str:
        return f.name if self.sent else f"{self.path.name}/{f.name}"

    def _mark_changed(self, reason: str) -> str:
        if self.changed.reason is None:
            log.warning("%s; no chunk of the folder is served any more", reason)
            self.changed.reason = reason
        return self.changed.reason

    def source_changed(self) -> str | None:
        """Why this folder can't be served any more, or None while it is still there. One
        stat of the folder (a sender's: of its map); its files are checked as their chunks
        are read."""
        if self.changed.reason is not None:
            return self.changed.reason
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError:
            return None  # unreadable now: maybe not for good
        if self.sent:
            if st is None or not stat.S_ISREG(st.st_mode):
                return self._mark_changed(f"the folder map {self.path} was deleted: the "
                                          "folder can't be served")
        elif st is None or not stat.S_ISDIR(st.st_mode):
            return self._mark_changed(f"{self.path} was moved or deleted since it was "
                                      "received")
        return None

    def files_changed(self) -> str | None:
        """The first file whose size or mtime is not what the map recorded (one stat of
        each), as `source_changed` would say it; None if none. Not recorded: a sender
        checks this once its naming pass is done."""
        for k, f in enumerate(self.layout.files):
            try:
                st = os.stat(self.member_paths[k], follow_symlinks=False)
            except OSError:
                return f"{self._member(f)} was moved or deleted since it was {self._since}"
            if (not stat.S_ISREG(st.st_mode) or st.st_size != f.size
                    or st.st_mtime_ns != f.mtime_ns):
                return self._changed_text(f)
        return None

    def _read_and_seal(self, index: int, n: int,
                       check: Callable[[memoryview], bool] | None) -> bytearray:
        return fill_and_seal(lambda plain: self.read_plain(index * self.chunk_size, plain),
                             self.cipher, index, n, self.outgoing, check)

    def read_plain(self, start: int, view: memoryview) -> None:
        """Fill `view` with the archive's bytes from `start` (blocking); ContentStoreError
        if a file changed (recorded: nothing is served any more) or can't be read."""
        with contextlib.ExitStack() as opened:
            gaps_fd: int | None = None
            for into, length, src, at in self.layout.pieces(start, start + len(view)):
                part = view[into : into + length]
                if src >= 0:
                    self._read_file(src, part, at)
                    continue
                if self.layout.gaps is not None:
                    part[:] = self.layout.gaps[at : at + length]
                    continue
                if gaps_fd is None:
                    gaps_fd = self._open_gaps()
                    opened.callback(os.close, gaps_fd)
                try:
                    read_exactly(gaps_fd, part, at)
                except ShortRead:
                    raise ContentStoreError(self._mark_changed(
                        f"{self.gaps_path} is damaged")) from None

    def reader(self) -> io.BufferedReader:
        """The archive's bytes as a seekable file (read through `read_plain`): what a
        node that sent a folder to its own address unpacks, as a recipient unpacks the
        archive it received. A read raises ContentStoreError as `read_plain` does."""
        return io.BufferedReader(_ArchiveReader(self), COPY_BLOCK)

    def _open_gaps(self) -> int:
        try:
            return os.open(self.gaps_path, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            raise ContentStoreError(self._mark_changed(
                f"{self.gaps_path} is missing: the folder {self.path} can't be served"))\
                from None
        except OSError as exc:
            raise ContentStoreError(f"cannot read {self.gaps_path}: {exc.strerror}") from None

    def _read_file(self, k: int, part: memoryview, at: int) -> None:
        """Fill `part` from member `k` at `at`, refusing a file changed since it was
        unpacked or sent (size and mtime, as LocalContent judges a sent file)."""
        f, path, fd = self.layout.files[k], self.member_paths[k], -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_size != f.size
                    or st.st_mtime_ns != f.mtime_ns):
                raise ContentStoreError(self._mark_changed(self._changed_text(f)))
            read_exactly(fd, part, at)
        except (FileNotFoundError, NotADirectoryError):
            raise ContentStoreError(self._mark_changed(
                f"{self._member(f)} was moved or deleted since it was {self._since}")) \
                from None
        except ShortRead:
            raise ContentStoreError(self._mark_changed(self._changed_text(f))) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink put in its place: never followed
                raise ContentStoreError(self._mark_changed(self._changed_text(f))) from None
            raise ContentStoreError(f"cannot read {path}: {exc.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def _changed_text(self, f: ArchiveFile) -> str:
        return f"{self._member(f)} changed since it was {self._since}"

    def _mismatch_text(self, index: int) -> str:
        start = index * self.chunk_size
        names = [self._member(self.layout.files[src]) for _, _, src, _ in
                 self.layout.pieces(start, start + self.chunk_size) if src >= 0]
        if len(names) == 1:
            which = names[0]
        else:  # a gap byte, or one of the files
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                            else "")
            which = ((f"a file of {self.path.name}/" if not self.sent else "a file sent")
                 + (f" ({shown})" if shown else ""))
        return (f"{which} changed since it was {self._since}: chunk {index} no longer "
                "matches its hash")


class _ArchiveReader(io.RawIOBase):
    """`ArchiveView.reader`'s raw file: reads at a position, seeks anywhere."""

    def __init__(self, view: ArchiveView) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        with memoryview(b) as out:
            n = max(0, min(len(out), self._view.size - self._pos))
            if n:
                self._view.read_plain(self._pos, out.cast("B")[:n])
        self._pos += n
        return n
