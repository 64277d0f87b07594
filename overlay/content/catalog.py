"""The content store: what this node holds, fully or in part, and how to serve it.

One plaintext copy per content and nothing else: a sender's file stays where the user put
it and is sealed chunk by chunk on the way out. A receiver writes
verified chunks into a preallocated `<name>.part` and records each one in a bitmap file as
soon as its bytes are written, so after `kill -9` at any point it resumes without
re-fetching a verified chunk; `complete()` renames the file and makes it servable. A
received folder archive, once unpacked, is served from the folder's files instead
(`add_archive_view`; its map and gap bytes in `views/`), and the archive is deleted. A
folder being sent is served the same way from the sender's files, through the map the CLI
wrote into `outgoing/` (`add_sent_archive`): no archive is written on either side.

Records (content id → path, key, capability, layout, leaf hashes) live in one SQLite file
(mode 0600: it holds content keys and capabilities). Methods that hash, seal or write
chunks block; async callers run them in a thread (`asyncio.to_thread`), which lets the
AEAD (OpenSSL, through `ChunkCipher`) and BLAKE3 use the second core. Received chunks are
opened into reused buffers and written with O_DIRECT where the filesystem allows it; the
serving side reads plaintext into a reused buffer and seals it into the one that goes out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import platform
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from crypto.capability import CAPABILITY_LEN, new_capability
from crypto.content import (
    HASH_LEN,
    TAG_LEN,
    ChunkCipher,
    LeafScheme,
    check_layout,
    chunk_count,
    chunk_hash,
    chunk_size_for,
    leaf_hasher,
    leaf_key,
    merkle_root,
    new_content_key,
    plain_chunk_len,
    preferred_scheme,
)
from crypto.errors import DecodeError
from overlay.content.archive import (
    MAP_SUFFIX,
    OUTGOING_DIR,
    ArchiveFile,
    ArchiveView,
    load_view,
    save_view,
    view_paths,
)
from overlay.content.diskio import (
    ScratchBuffers,
    SendBuffers,
    ShortRead,
    free_name,
    preallocate,
    private_dir,
    read_exactly,
    safe_file_name,
)
from overlay.content.interfaces import Catalog, ContentStoreError, ServedContent
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent

log = logging.getLogger(__name__)

# 2: the `scheme` column (LeafScheme; rows written by version 1 are SEALED). A node of
# version 1 refuses a store of version 2 rather than misjudge its KEYED_PLAIN contents.
# 3: the column may say KEYED_PLAIN_AES, which a node of version 2 could not read.
_SCHEMA_VERSION = 3
HASH_WORKERS = 2
# KEYED_PLAIN chunks are named a piece at a time: read into a buffer of this size and fed
# to the leaf's hasher, so BLAKE3 finds each piece still in the core's 2 MiB L2 cache
# instead of reading a whole 4 MiB chunk back from memory. `name_chunks` of a 1 GiB file
# in 4 MiB chunks, warm page cache, medians of 5 runs: 0.164 s and 0.320 CPU s in 1 MiB
# pieces, 0.165 s in 512 KiB, 0.172 s in 2 MiB, 0.170 s and 0.334 CPU s a whole chunk
# at a time.
NAMING_PIECE = 1 << 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS content (
    cid BLOB PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('full', 'partial')),
    path TEXT NOT NULL,
    dest_dir TEXT,
    file_name TEXT,
    content_key BLOB NOT NULL,
    capability BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    leaves BLOB,
    mtime_ns INTEGER,
    scheme INTEGER NOT NULL DEFAULT 1
);
"""


@functools.cache
def local_scheme() -> LeafScheme:
    """This machine's `preferred_scheme`, from its /proc/cpuinfo (read once: the CPU does
    not change under a running node)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpuinfo: str | None = f.read(1 << 16)
    except OSError:
        cpuinfo = None
    return preferred_scheme(cpuinfo, platform.machine())


def _pack_leaves(leaves: Sequence[bytes]) -> bytes:
    return b"".join(leaves)


def _unpack_leaves(blob: bytes, count: int) -> tuple[bytes, ...]:
    if len(blob) != count * HASH_LEN:
        raise ContentStoreError("stored hash list is damaged")
    return tuple(blob[i : i + HASH_LEN] for i in range(0, len(blob), HASH_LEN))


def _damaged(path: Path, problem: str) -> str:
    """What to do about a content store SQLite cannot read (a disk error, a bad copy)."""
    from rendezvous.admin import damaged_text  # 45 ms of imports, rarely needed

    return damaged_text(path, problem, kept=(
        "received files stay where they are, but unfinished downloads start over and files "
        "you sent are served again only once you `peerpost resend` them"))


class NamingStopped(Exception):
    """A naming pass ended early because its caller set its `stop` flag: nothing was named."""


@dataclass(frozen=True, slots=True)
class NamedContent:
    """A content whose chunks are named (its one hash pass done) but not yet recorded:
    `ContentStore.hold` records it. A send names its file while the recipients' keys are
    looked up, and records it only once every recipient is accepted."""

    make: Callable[..., LocalContent]  # builds it, given content_id= and capability=
    leaves: tuple[bytes, ...]
    # Raises if the source is no longer what was named (OSError if it is gone,
    # ContentStoreError if it changed): a send may hold a name for a WAN round trip.
    check_source: Callable[[], None]


def name_chunks(fd: int, size: int, chunk_size: int, key: bytes,
                scheme: LeafScheme, stop: threading.Event | None = None) -> list[bytes]:
    """The leaf of every chunk of the file open at `fd` (ShortRead if it ends early;
    NamingStopped, once every thread has let go of its chunk, if `stop` is set meanwhile).

    KEYED_PLAIN: each chunk is read into a buffer its thread reuses and hashed there, one
    BLAKE3 pass and no sealing, NAMING_PIECE bytes at a time. SEALED: read whole, sealed,
    hashed. Both release the GIL, so HASH_WORKERS threads use both cores; each holds one
    buffer."""
    return name_chunks_from(lambda start, view: read_exactly(fd, view, start), size,
                            chunk_size, key, scheme, stop)


def name_chunks_from(fill: Callable[[int, memoryview], None], size: int, chunk_size: int,
                     key: bytes, scheme: LeafScheme,
                     stop: threading.Event | None = None) -> list[bytes]:
    """`name_chunks` of a content whose bytes from offset `start` `fill(start, view)` puts
    into `view` (a sent folder's, read through its ArchiveView)."""
    count = chunk_count(size, chunk_size)
    cipher = ChunkCipher(key) if scheme is LeafScheme.SEALED else None
    key_l = leaf_key(key)
    buffers = ScratchBuffers(HASH_WORKERS)

    def leaf(i: int) -> bytes:
        # Checked per chunk: a refused send stops a pass over a 10 GB file within a chunk.
        if stop is not None and stop.is_set():
            raise NamingStopped("the naming pass was stopped")
        n = plain_chunk_len(size, chunk_size, i)
        start = i * chunk_size
        if cipher is None:
            plain = buffers.take(min(n, NAMING_PIECE))
            try:
                with memoryview(plain) as view:
                    h = leaf_hasher(key_l)
                    for at in range(start, start + n, NAMING_PIECE):
                        with view[: min(NAMING_PIECE, start + n - at)] as piece:
                            fill(at, piece)
                            h.update(piece)
                    out: bytes = h.digest()
                    return out
            finally:
                buffers.give(plain)
        plain = buffers.take(chunk_size)
        try:
            view = memoryview(plain)[:n]
            fill(start, view)
            sealed = bytearray(n + TAG_LEN)
            cipher.seal_into(i, view, sealed)
            return chunk_hash(sealed)
        finally:
            buffers.give(plain)

    def every_nth(first: int) -> list[bytes]:
        return [leaf(i) for i in range(first, count, HASH_WORKERS)]

    if count == 1:
        return [leaf(0)]
    # Worker w hashes chunks w, w + HASH_WORKERS, ...: one task per worker rather than a
    # future per chunk (a million of them for the largest contents).
    with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
        parts = list(pool.map(every_nth, range(HASH_WORKERS)))
    leaves: list[bytes] = [b""] * count
    for first, part in enumerate(parts):
        leaves[first::HASH_WORKERS] = part
    return leaves


class ContentStore:
    """Everything this node holds, keyed by content id; also the serving side's Catalog."""

    def __init__(self, root_dir: Path) -> None:
        self.root = Path(root_dir)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        self.views = self.root / "views"  # received folders' maps (overlay/content/archive.py)
        self.views.mkdir(mode=0o700, exist_ok=True)
        db_path = self.root / "content.sqlite"
        fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        try:
            self._open_db()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, full, unreadable
                raise ContentStoreError(f"cannot open {db_path}: {exc}") from None
            raise ContentStoreError(_damaged(db_path, str(exc))) from None
        except BaseException:
            self._db.close()
            raise
        self._lock = threading.Lock()
        self._partials: dict[bytes, PartialContent] = {}
        self._full: dict[bytes, LocalContent] = {}
        # Every content's serving buffers (see diskio.SEND_BUFFERS).
        self._outgoing = SendBuffers()

    def _open_db(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise ContentStoreError(f"content store schema {version} is newer than this code")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(content)")}
        if "scheme" not in columns:  # a store of version 1: all its contents are SEALED
            self._db.execute("ALTER TABLE content ADD COLUMN scheme INTEGER NOT NULL DEFAULT 1")
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise sqlite3.DatabaseError(problem)

    def close(self) -> None:
        for p in list(self._partials.values()):
            p.close()
        self._partials.clear()
        self._db.close()

    async def aclose(self) -> None:
        """`close()` for async exit stacks."""
        self.close()

    @property
    def catalog(self) -> Catalog:
        """The serving side's view of this store (the store itself)."""
        return self

    def chunk_size_of(self, content_id: bytes) -> int:
        """The chunk size of a held content (ContentStoreError if unknown)."""
        with self._lock:
            row = self._db.execute("SELECT chunk_size FROM content WHERE cid = ?",
                                   (content_id,)).fetchone()
        if row is None:
            raise ContentStoreError(f"unknown content {content_id.hex()}")
        return int(row[0])

    def files_of(self, content_ids: Iterable[bytes]) -> dict[bytes, Path]:
        """The file each of `content_ids` held complete is served from, which
        `remove(delete_file=True)` deletes: its path as resolved when it was added."""
        ids = list(dict.fromkeys(content_ids))
        out: dict[bytes, Path] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                for cid, path in self._db.execute(
                        "SELECT cid, path FROM content WHERE state = 'full'"
                        f" AND cid IN ({','.join('?' * len(batch))})", batch):
                    out[bytes(cid)] = Path(path)
        return out

    def have_path(self, content_id: bytes) -> Path:
        return self.root / "partial" / f"{content_id.hex()}.have"

    # --- sending side -----------------------------------------------------------------
    async def add_local_file(
        self, path: Path, *, chunk_size: int | None = None, key: bytes | None = None,
        capability: bytes | None = None, scheme: LeafScheme | None = None,
    ) -> LocalContent:
        """Register a file to send: hash every chunk once (in threads) to get the leaves
        and the content id. Only the plaintext file is kept, where it is. Key and capability
        are fresh unless given (another holder of the same content passes both, and its
        scheme); the scheme is this machine's `local_scheme()` and the chunk size
        `chunk_size_for(size)` unless given."""
        return await asyncio.to_thread(self.add_local_file_blocking, path,
                                       chunk_size=chunk_size, key=key, capability=capability,
                                       scheme=scheme)

    def add_local_file_blocking(
        self, path: Path, *, chunk_size: int | None = None, key: bytes | None = None,
        capability: bytes | None = None, scheme: LeafScheme | None = None,
    ) -> LocalContent:
        """`add_local_file` for callers already in a thread."""
        return self.hold(self.name_local_file_blocking(path, chunk_size=chunk_size, key=key,
                                                       scheme=scheme), capability)

    async def name_local_file(self, path: Path, *, stop: threading.Event | None = None,
                              media: bool = False) -> NamedContent:
        """`add_local_file`'s hash pass alone (in threads), recording nothing: `hold`
        records what it names. Setting `stop` ends the pass early (NamingStopped). `media`:
        the file is audio or video (`chunk_size_for`)."""
        return await asyncio.to_thread(self.name_local_file_blocking, path, stop=stop,
                                       media=media)

    def name_local_file_blocking(
        self, path: Path, *, chunk_size: int | None = None, key: bytes | None = None,
        scheme: LeafScheme | None = None, stop: threading.Event | None = None,
        media: bool = False,
    ) -> NamedContent:
        """`name_local_file` for callers already in a thread (with `add_local_file`'s
        chunk size, key and scheme)."""
        path = Path(path).resolve()
        key = new_content_key() if key is None else key
        scheme = local_scheme() if scheme is None else LeafScheme(scheme)
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            before = os.fstat(fd)
            size = before.st_size
            if chunk_size is None:
                chunk_size = chunk_size_for(size, media=media)
            check_layout(size, chunk_size)
            try:
                leaves = tuple(name_chunks(fd, size, chunk_size, key, scheme, stop))
            except ShortRead:
                raise ContentStoreError(f"{path} shrank while it was being added") from None
            after = os.fstat(fd)
        named = (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
        if named[2:] != (size, before.st_mtime_ns):
            raise ContentStoreError(f"{path} changed while it was being added")

        def check_source() -> None:
            now = os.stat(path)  # FileNotFoundError if it went meanwhile
            if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != named:
                raise ContentStoreError(f"{path} changed while it was being added")

        return NamedContent(functools.partial(
            LocalContent, size=size, chunk_size=chunk_size, key=key, path=path,
            leaves=leaves, mtime_ns=before.st_mtime_ns, scheme=scheme,
            outgoing=self._outgoing), leaves, check_source)

    def hold(self, named: NamedContent, capability: bytes | None = None) -> LocalContent:
        """Record a complete content this node named (`name_local_file`,
        `name_sent_archive`), if its source is still what was named (else the error
        `named.check_source` raises, and nothing is recorded). The capability is fresh
        unless given or already handed out for this content (same bytes, same key: same
        content id). Blocking."""
        if capability is not None and len(capability) != CAPABILITY_LEN:
            raise DecodeError("a capability is 32 bytes")
        named.check_source()
        make, leaves = named.make, named.leaves
        content = make(content_id=merkle_root(leaves),
                       capability=capability or new_capability())
        size, chunk_size, key, path, scheme = (content.size, content.chunk_size, content.key,
                                               content.path, content.scheme)
        with self._lock:
            old = self._db.execute("SELECT capability FROM content WHERE cid = ?",
                                   (content.content_id,)).fetchone()
            if old is not None and capability is None:
                content = make(content_id=content.content_id, capability=bytes(old[0]))
            self._db.execute(
                "INSERT OR REPLACE INTO content (cid, state, path, content_key, capability,"
                " size, chunk_size, leaves, mtime_ns, scheme)"
                " VALUES (?, 'full', ?, ?, ?, ?, ?, ?, ?, ?)",
                (content.content_id, str(path), key, content.capability, size, chunk_size,
                 _pack_leaves(leaves), content.mtime_ns, int(scheme)),
            )
            self._full[content.content_id] = content
        return content

    async def add_sent_archive(self, map_path: Path) -> ArchiveView:
        """Register a folder to send from the map the CLI wrote in the outgoing folder
        (see overlay/content/archive.py): its chunks are named by reading through the view
        over the user's files, and served from there; no archive is written."""
        return await asyncio.to_thread(self.add_sent_archive_blocking, map_path)

    def add_sent_archive_blocking(self, map_path: Path) -> ArchiveView:
        """`add_sent_archive` for callers already in a thread. ContentStoreError if the
        map is not a sender's, or a file changed since the map was made."""
        content = self.hold(self.name_sent_archive_blocking(map_path))
        if not isinstance(content, ArchiveView):  # unreachable: its `make` builds views
            raise ContentStoreError(f"{map_path} is not a folder map")
        return content

    async def name_sent_archive(self, map_path: Path, *,
                                stop: threading.Event | None = None) -> NamedContent:
        """`add_sent_archive`'s hash pass alone (in threads), recording nothing: `hold`
        records what it names. Setting `stop` ends the pass early (NamingStopped)."""
        return await asyncio.to_thread(self.name_sent_archive_blocking, map_path, stop=stop)

    def name_sent_archive_blocking(self, map_path: Path, *,
                                   stop: threading.Event | None = None) -> NamedContent:
        """`name_sent_archive` for callers already in a thread. ContentStoreError as
        `add_sent_archive`'s."""
        map_path = Path(map_path)
        if not self._is_sent_map(map_path):
            raise ContentStoreError(f"{map_path} is not a folder map in {self.sent_maps}")
        saved = load_view(map_path)
        if saved is None or saved[0].gaps is None:
            raise ContentStoreError(f"{map_path} is not the folder map of a send")
        layout = saved[0]
        key, scheme = new_content_key(), local_scheme()
        chunk_size = chunk_size_for(layout.size)
        check_layout(layout.size, chunk_size)
        make = functools.partial(
            ArchiveView, size=layout.size, chunk_size=chunk_size, key=key, path=map_path,
            mtime_ns=0, scheme=scheme, outgoing=self._outgoing,
            layout=layout, gaps_path=map_path)
        reader = make(content_id=b"", capability=b"", leaves=())
        leaves = tuple(name_chunks_from(reader.read_plain, layout.size, chunk_size, key,
                                        scheme, stop))

        def check_source() -> None:
            if (changed := reader.files_changed()) is not None:
                raise ContentStoreError(changed)

        check_source()  # during the pass
        return NamedContent(functools.partial(make, leaves=leaves), leaves,
                            check_source)

    @property
    def sent_maps(self) -> Path:
        """Where the maps of folders being sent are (the CLI writes them)."""
        return self.root / OUTGOING_DIR

    def _is_sent_map(self, path: Path) -> bool:
        return path.suffix == MAP_SUFFIX and os.path.realpath(path.parent) == \
            os.path.realpath(self.sent_maps)

    # --- receiving side ---------------------------------------------------------------
    def open_partial(
        self, content_id: bytes, size: int, chunk_size: int, key: bytes, capability: bytes,
        dest_dir: Path, file_name: str, *, scheme: LeafScheme = LeafScheme.KEYED_PLAIN,
    ) -> PartialContent:
        """Start or resume receiving a content into `<file_name>.<id>.part` in the node's
        own folder `dest_dir/.peerpost-partial` (created without following symlinks), to
        be renamed into `dest_dir` when complete. `scheme`: what its leaves hash (the
        location message says). Blocking."""
        scheme = LeafScheme(scheme)
        check_layout(size, chunk_size)
        if len(content_id) != HASH_LEN:
            raise DecodeError("a content id is 32 bytes")
        file_name = safe_file_name(file_name)
        with self._lock:
            if (cached := self._partials.get(content_id)) is not None:
                if not cached.gone():
                    return cached
                cached.close()  # its .part was deleted: start it again from the record
                del self._partials[content_id]
            row = self._db.execute(
                "SELECT state, path, dest_dir, file_name, leaves, size, chunk_size, scheme"
                " FROM content WHERE cid = ?", (content_id,),
            ).fetchone()
            if row is not None and row[0] == "full":
                raise ContentStoreError(f"content already held complete at {row[1]}")
            if row is not None:
                if (row[5], row[6], row[7]) != (size, chunk_size, scheme):
                    raise ContentStoreError("content layout differs from the one being resumed")
                part_path, dest, name = Path(row[1]), Path(row[2]), row[3]
                leaves = (_unpack_leaves(bytes(row[4]), chunk_count(size, chunk_size))
                          if row[4] is not None else None)
                if not part_path.is_file() or part_path.is_symlink():
                    # Someone deleted the .part (or its folder): its held bits would now
                    # be lies.
                    self.have_path(content_id).unlink(missing_ok=True)
                    private_dir(dest)
                    preallocate(part_path, size)
            else:
                dest, name, leaves = Path(dest_dir), file_name, None
                part_path = private_dir(dest) / f"{name}.{content_id[:4].hex()}.part"
                self.have_path(content_id).unlink(missing_ok=True)
                preallocate(part_path, size)
                self._db.execute(
                    "INSERT INTO content (cid, state, path, dest_dir, file_name, content_key,"
                    " capability, size, chunk_size, scheme)"
                    " VALUES (?, 'partial', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (content_id, str(part_path), str(dest), name, key, capability, size,
                     chunk_size, int(scheme)),
                )
            partial = PartialContent(self, content_id, size, chunk_size, key, capability,
                                     part_path, dest, name, leaves, scheme,
                                     outgoing=self._outgoing)
            self._partials[content_id] = partial
            return partial

    def save_leaves(self, content_id: bytes, leaves: Sequence[bytes]) -> None:
        with self._lock:
            self._db.execute("UPDATE content SET leaves = ? WHERE cid = ?",
                             (_pack_leaves(leaves), content_id))

    def mark_complete(self, partial: PartialContent, final: Path) -> None:
        leaves = partial.leaves
        if leaves is None:
            raise ContentStoreError("complete without a hash list")
        mtime_ns = final.stat().st_mtime_ns
        with self._lock:
            self._db.execute("UPDATE content SET state = 'full', path = ?, mtime_ns = ?"
                             " WHERE cid = ?", (str(final), mtime_ns, partial.content_id))
            self._partials.pop(partial.content_id, None)
            self._full[partial.content_id] = LocalContent(
                partial.content_id, partial.size, partial.chunk_size, partial.key,
                partial.capability, final, leaves, mtime_ns, partial.scheme,
                outgoing=self._outgoing, received=True)
        self.have_path(partial.content_id).unlink(missing_ok=True)

    def add_archive_view(self, content_id: bytes, folder: Path,
                         files: Sequence[ArchiveFile]) -> ArchiveView:
        """A complete folder archive was unpacked into `folder`: serve the content from the
        folder's files from now on (see ArchiveView) and delete the archive. Blocking.
        ContentStoreError (the archive kept, as held) if a file is not what it holds."""
        held = self.local(content_id)
        if held is None or isinstance(held, ArchiveView):
            raise ContentStoreError(f"no complete archive {content_id.hex()} to unpack")
        map_path, gaps_path = view_paths(self.views, content_id)
        folder = Path(folder).resolve()
        try:
            layout = save_view(held.path, folder, files, map_path, gaps_path)
            if layout.size != held.size:
                raise ContentStoreError(f"{held.path} is not the archive received")
        except BaseException:
            map_path.unlink(missing_ok=True)
            gaps_path.unlink(missing_ok=True)
            raise
        view = ArchiveView(content_id, held.size, held.chunk_size, held.key, held.capability,
                           folder, held.leaves, 0, held.scheme, outgoing=self._outgoing,
                           received=True, layout=layout, gaps_path=gaps_path)
        with self._lock:
            self._db.execute("UPDATE content SET path = ?, mtime_ns = 0 WHERE cid = ?",
                             (str(folder), content_id))
            self._full[content_id] = view
        held.path.unlink(missing_ok=True)
        return view

    # --- serving side -----------------------------------------------------------------
    def lookup(self, content_id: bytes) -> ServedContent | None:
        """The full or partial content with this id, if held."""
        with self._lock:
            if content_id in self._partials:
                return self._partials[content_id]
            if content_id in self._full:
                return self._full[content_id]
        return self.local(content_id)

    def local(self, content_id: bytes) -> LocalContent | None:
        """A complete content by id (sender's files and finished downloads)."""
        with self._lock:
            if content_id in self._full:
                return self._full[content_id]
            row = self._db.execute(
                "SELECT path, content_key, capability, size, chunk_size, leaves, mtime_ns,"
                " scheme, dest_dir FROM content"
                " WHERE cid = ? AND state = 'full'", (content_id,),
            ).fetchone()
            if row is None:
                return None
            args = (content_id, row[3], row[4], bytes(row[1]), bytes(row[2]), Path(row[0]),
                    _unpack_leaves(bytes(row[5]), chunk_count(row[3], row[4])),
                    int(row[6] or 0), LeafScheme(row[7]))
            received = row[8] is not None  # a download's row names where it went
            map_path, gaps_path = view_paths(self.views, content_id)
            sent = self._is_sent_map(Path(row[0]))
            if sent:  # a folder being sent: its map is the row's file
                map_path = gaps_path = Path(row[0])
            try:
                saved = load_view(map_path)
            except ContentStoreError as exc:
                log.warning("content %s is not served: %s", content_id.hex(), exc)
                return None
            content: LocalContent
            # A map naming another path is left from an unpack cut short before the row
            # moved to the folder: the row's file is still the archive.
            if saved is not None and (saved[1] == Path(row[0]) or sent):
                content = ArchiveView(*args, outgoing=self._outgoing, received=received,
                                      layout=saved[0], gaps_path=gaps_path)
            else:
                content = LocalContent(*args, outgoing=self._outgoing, received=received)
            self._full[content_id] = content
            return content

    def content_ids(self) -> list[bytes]:
        with self._lock:
            return [bytes(r[0]) for r in self._db.execute("SELECT cid FROM content")]

    # --- retention --------------------------------------------------------------------
    def remove(self, content_id: bytes, *, delete_file: bool = False) -> None:
        """Forget a content. A partial download's files always go; a complete file is
        deleted only with `delete_file=True` (it is the user's file)."""
        with self._lock:
            partial = self._partials.pop(content_id, None)
            self._full.pop(content_id, None)
            row = self._db.execute("SELECT state, path FROM content WHERE cid = ?",
                                   (content_id,)).fetchone()
            if row is None:
                raise ContentStoreError(f"unknown content {content_id.hex()}")
            self._db.execute("DELETE FROM content WHERE cid = ?", (content_id,))
        if partial is not None:
            partial.close()
        map_path, gaps_path = view_paths(self.views, content_id)
        a_view = map_path.exists()
        # A received folder is the user's now: its caller deletes it (`rm --delete-file`).
        if row[0] == "partial" or (delete_file and not a_view):
            Path(row[1]).unlink(missing_ok=True)
        self.have_path(content_id).unlink(missing_ok=True)
        map_path.unlink(missing_ok=True)
        gaps_path.unlink(missing_ok=True)

    def archive(self, content_id: bytes, folder: Path) -> Path:
        """Move a complete content's file into `folder` (no clobbering) and forget it."""
        content = self.local(content_id)
        if content is None or isinstance(content, ArchiveView):
            raise ContentStoreError(f"no complete content {content_id.hex()} to archive")
        Path(folder).mkdir(parents=True, exist_ok=True)
        target = free_name(Path(folder), content.path.name)
        os.replace(content.path, target)
        self.remove(content_id)
        return target
