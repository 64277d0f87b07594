"""A folder, or several files, sent as one message: one uncompressed tar.

The archive is a PAX tar, members in sorted order under one top folder `NAME/`, regular
files and folders only (media is already compressed, and a receiver never has to create a
link or a device). The sender never writes it: `write_map` computes each member's header
bytes as tarfile would write them, the padding and the end blocks, and writes only those
and where each file's data lies, `<store>/outgoing/NAME.map` (a few hundred bytes per
file), which the node reads the archive's bytes through, from the user's own files
(overlay/content/archive.py). It is sent as usual with a `folder` field in the
description, and the map is deleted once nobody needs it (`release_archives`); the files
are the user's and are never deleted. `pack` writes the same archive as a real file. A
receiver that knows the field unpacks it into its download folder as `NAME/` (`NAME (1)/`
if taken); one that does not keeps a valid .tar.

Unpacking trusts nothing in the archive: every member is judged first (tarfile's `data`
filter, then our own rules: under `NAME/`, a file or a folder, a short plain name, no
duplicates, the whole no larger than the archive), and one bad member refuses the whole
archive with every bad member named, before anything is written. What is written goes to
a private folder first and is moved into place in one rename.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import io
import json
import logging
import math
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from crypto.errors import DecodeError
from crypto.location import MAX_FILE_NAME_BYTES, MAX_FOLDER_ENTRIES, FolderInfo, check_folder
from overlay.content.archive import (
    MAP_SUFFIX,
    OUTGOING_DIR,
    ArchiveFile,
    ArchiveMap,
    load_view,
)
from overlay.content.catalog import ContentStore
from overlay.content.diskio import private_dir, pwrite_all, write_replace
from overlay.content.interfaces import ContentStoreError, NotEnoughSpace
from overlay.mail.outbox import (
    ALL_SENT,
    SETTLED,
    WITHDRAWN_REASON,
    Outbox,
    OutboxEntry,
    RecipientStatus,
)
from overlay.mail.prefs import size_text
from overlay.mail.tarheaders import HeaderRefused, bounded_tarinfo

log = logging.getLogger("peerpost.folders")

TAR_SUFFIX = ".tar"
NUMBER_ROOM = 8  # bytes of ` (NNNNN)` that `numbered` may add to a clean name
# Room in a name for the `.tar` we add and a number.
MAX_NAME_BYTES = MAX_FILE_NAME_BYTES - len(TAR_SUFFIX) - NUMBER_ROOM
MAX_PATH_BYTES = 4000  # below PATH_MAX (4096) with room for the download folder
# What one member costs in the archive beyond its data: a 512-byte header, a PAX header
# (2 blocks) for a long or non-ASCII name, and the padding of its data to 512 bytes.
MEMBER_OVERHEAD = 4 * tarfile.BLOCKSIZE
COPY_BUFFER = 1 << 20
SHOWN_REFUSALS = 10  # members named in a refusal; the rest are counted


class FolderError(Exception):
    """Packing or unpacking refused; the text names the cause (and the member). `why`,
    for a received archive refused, is the cause without any local path: what the
    sender is told in a declined receipt."""

    def __init__(self, text: str, *, why: str | None = None) -> None:
        super().__init__(text)
        self.why = why


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    why: str


@dataclass
class PackPlan:
    """What `pack` will write: (source, member name) pairs, a source None for a folder.
    `source`: the folder sent, when one folder is (resolved), else None."""

    name: str
    source: Path | None = None
    entries: list[tuple[Path | None, str]] = field(default_factory=list)
    files: int = 0
    folders: int = 0
    size: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    renamed: list[Skipped] = field(default_factory=list)

    @property
    def archive_size(self) -> int:
        """At most this many bytes of tar (each member's overhead, the closing blocks)."""
        return (self.size + (len(self.entries) + 1) * MEMBER_OVERHEAD
                + tarfile.RECORDSIZE)

    def info(self) -> FolderInfo:
        return FolderInfo(name=self.name, files=self.files, folders=self.folders,
                          size=self.size)


def clean_name(name: str, fallback: str = "folder") -> str:
    """`name` as one plain, printable name of at most MAX_NAME_BYTES of UTF-8 (the
    extension kept when the stem is cut); `fallback` if nothing usable is left."""
    name = "".join(c for c in name.replace("/", "_").replace("\\", "_")
                   if ord(c) >= 0x20 and ord(c) != 0x7F and not 0xD800 <= ord(c) < 0xE000)
    name = name.strip()
    if name in ("", ".", ".."):
        name = fallback
    if len(name.encode()) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if not stem or len(ext.encode()) > 16:
            stem, dot, ext = name, "", ""
        keep = MAX_NAME_BYTES - len((dot + ext).encode())
        stem = stem.encode()[:keep].decode("utf-8", "ignore").rstrip() or fallback
        name = stem + dot + ext
    return name


def numbered(name: str, n: int, *, keep_extension: bool) -> str:
    """`name (n)` (before the extension of a file name): how a taken name is varied. At
    most NUMBER_ROOM bytes longer than MAX_NAME_BYTES: a stem that would pass that is cut,
    never the number (cut, every number gave the same name)."""
    stem, dot, ext = name.rpartition(".") if keep_extension else ("", "", "")
    if not stem:
        stem, dot, ext = name, "", ""
    tail = f" ({n}){dot}{ext}"
    room = MAX_NAME_BYTES + NUMBER_ROOM - len(tail.encode())
    if len(stem.encode()) > room:
        stem = stem.encode()[:max(room, 0)].decode("utf-8", "ignore").rstrip() or "file"
    return stem + tail


def unique_names(names: Iterable[str]) -> list[str]:
    """One clean name per name given, in order, no two alike even to a file system that
    ignores case: the second `a.jpg` becomes `a (1).jpg`."""
    out: list[str] = []
    taken: set[str] = set()
    for raw in names:
        base = clean_name(raw, "file")
        name, n = base, 0
        while name.casefold() in taken:
            n += 1
            name = numbered(base, n, keep_extension=True)
            if n > 1_000_000:  # unreachable: a clean name always has a free number
                raise FolderError(f"no free name for {raw!r}")
        taken.add(name.casefold())
        out.append(name)
    return out


def given_name(path: Path) -> str:
    """The name a path was given by (a symlink's own name), or its target's for `..`."""
    return path.name if path.name not in ("", "..") else path.resolve().name


def archive_name(paths: list[Path]) -> str:
    """The top folder of the archive: the folder's own name, or `N files` (`N folders`,
    `N files and folders`) for the paths given: two folders sent together arrived as
    `2 files/`."""
    if len(paths) == 1:
        return clean_name(given_name(paths[0]))
    dirs = sum(p.is_dir() for p in paths)
    kind = ("files" if not dirs else "folders" if dirs == len(paths)
            else "files and folders")
    return f"{len(paths)} {kind}"


def plan_pack(paths: list[Path]) -> PackPlan:
    """Walk what is to be sent (blocking). Each path given is taken as it is named (a
    symlink given by name is followed); inside a folder nothing is followed: symlinks,
    devices, pipes and sockets are skipped and listed. FolderError for a path that is
    neither a file nor a folder, or too many entries."""
    one_folder = len(paths) == 1 and paths[0].is_dir()
    plan = PackPlan(archive_name(paths), paths[0].resolve() if one_folder else None)
    top = plan.name
    names = ([top] if one_folder
             else [f"{top}/{n}" for n in unique_names(given_name(p) for p in paths)])
    plan.entries.append((None, top))
    for path, member in zip(paths, names, strict=True):
        if path.is_dir():
            if member != top:
                _add_folder(plan, member)
            _walk(plan, path, member)
        elif path.is_file():  # resolved: the pack never follows a link itself
            _add_file(plan, path.resolve(), member, path.stat().st_size)
        else:
            raise FolderError(f"{path} is neither a file nor a folder")
    return plan


def _add_folder(plan: PackPlan, member: str) -> None:
    plan.folders += 1
    _add(plan, None, member)


def _add_file(plan: PackPlan, source: Path, member: str, size: int) -> None:
    plan.files += 1
    plan.size += size
    _add(plan, source, member)


def _add(plan: PackPlan, source: Path | None, member: str) -> None:
    if len(plan.entries) >= MAX_FOLDER_ENTRIES:
        raise FolderError(f"more than {MAX_FOLDER_ENTRIES:,} files and folders: send it in "
                          "parts")
    plan.entries.append((source, member))


def _walk(plan: PackPlan, folder: Path, member: str) -> None:
    try:
        with os.scandir(folder) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise FolderError(f"cannot read {folder}: {exc.strerror or exc}") from None
    # A receiver refuses two names alike where case does not count (on its disk one
    # would overwrite the other): the later ones are numbered, `IMG (1).jpg`.
    taken: set[str] = set()
    names = {e.name.casefold() for e in found}
    for entry in found:
        path = Path(entry.path)
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            plan.skipped.append(Skipped(str(path), "its name is not UTF-8"))
            continue
        here, n = entry.name, 0
        while here.casefold() in taken or (n and here.casefold() in names):
            n += 1
            # From a clean name, which leaves room for the number.
            here = numbered(clean_name(entry.name, "file"), n, keep_extension=True)
        taken.add(here.casefold())
        if n:
            plan.renamed.append(Skipped(str(path), f"sent as {here!r}: another name there "
                                        "differs only in case"))
        name = f"{member}/{here}"
        if len(name.encode()) > MAX_PATH_BYTES:
            plan.skipped.append(Skipped(str(path), "its path is too long"))
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            plan.skipped.append(Skipped(str(path), exc.strerror or str(exc)))
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
                plan.skipped.append(Skipped(str(path), "not readable (permission denied)"))
            elif stat.S_ISDIR(st.st_mode):
                _add_folder(plan, name)
                _walk(plan, path, name)
            else:
                _add_file(plan, path, name, st.st_size)
        else:
            plan.skipped.append(Skipped(str(path), _kind(st.st_mode)))


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    return "a device"


def outgoing_dir(store_root: Path) -> Path:
    return Path(store_root) / OUTGOING_DIR


def is_own_archive(store_root: Path, path: Path | str) -> bool:
    """Whether `path` is a folder map (or, from an older version, an archive) this node
    wrote for a send, and so deletes when done: never one of the user's files."""
    p = Path(path)
    return p.suffix in (MAP_SUFFIX, TAR_SUFFIX) and os.path.realpath(
        p.parent) == os.path.realpath(outgoing_dir(store_root))


def check_sent_folder(path: Path, folder: FolderInfo) -> None:
    """Whether `folder` describes the archive of ours at `path` as a receiver will judge
    it (check_folder, and for a map its top folder's name, which every member is under);
    FolderError naming the rule. An unreadable map is left to the send, which says so."""
    try:
        if path.suffix == MAP_SUFFIX:
            loaded = load_view(path)
            if loaded is None:
                return
            size, top = loaded[0].size, str(loaded[1])
        else:
            size, top = path.stat().st_size, None
    except (OSError, ContentStoreError):
        return
    try:
        check_folder(folder, size)
    except DecodeError as exc:
        raise FolderError(f"the folder field is refused: {exc}") from None
    if top is not None and folder.name != top:
        raise FolderError(f"the folder field is refused: its name {folder.name!r} is not "
                          f"the archive's top folder {top!r}")


def same_place(path: Path | str) -> str:
    """`path` with its folder resolved (symlinks, `..`), the name itself kept: how two
    texts naming one file of the outgoing folder compare equal."""
    p = Path(path)
    return os.path.join(os.path.realpath(p.parent), p.name)


def free_space(folder: Path) -> int:
    vfs = os.statvfs(folder)
    return vfs.f_bavail * vfs.f_frsize


def member_info(member: str, st: os.stat_result | None) -> tarfile.TarInfo:
    """The header of a member as the archive has it: a folder (`st` None) or a file of
    that stat; owner 0, no names, no times but a file's whole-second mtime."""
    info = tarfile.TarInfo(member)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if st is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size, info.mtime = st.st_size, int(st.st_mtime)
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


def plan_view(plan: PackPlan) -> ArchiveMap:
    """The archive of `plan` without its file data: each member's header bytes exactly as
    tarfile writes them (`TarInfo.tobuf` in PAX format, tarfile's own encoding), each
    file's data padded to a block, the two end blocks and the padding to a record, and
    where each file's data lies (its absolute path, size and mtime as stat'ed now).
    Blocking: one lstat per file. FolderError for a file that is no longer one."""
    gaps = bytearray()
    files: list[ArchiveFile] = []
    at = 0
    for source, member in plan.entries:
        st = None
        if source is not None:
            try:
                st = os.lstat(source)
            except OSError as exc:
                raise FolderError(f"cannot read {source}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(st.st_mode):
                raise FolderError(f"{source} is no longer a regular file")
        header = member_info(member, st).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING,
                                               "surrogateescape")
        gaps += header
        at += len(header)
        if st is not None and st.st_size:
            files.append(ArchiveFile(str(source), at, st.st_size, st.st_mtime_ns))
            at += st.st_size
            pad = -st.st_size % tarfile.BLOCKSIZE
            gaps += bytes(pad)
            at += pad
    end = 2 * tarfile.BLOCKSIZE  # tarfile's close: two zero blocks, then a whole record
    end += -(at + end) % tarfile.RECORDSIZE
    gaps += bytes(end)
    try:
        return ArchiveMap(at + end, files, bytes(gaps), plan.source)
    except ContentStoreError as exc:
        raise FolderError(str(exc)) from None


def write_map(plan: PackPlan, store_root: Path) -> tuple[Path, FolderInfo]:
    """Write the map of `plan`'s archive (`plan_view`) into `<store_root>/outgoing` as
    `NAME.map` (`NAME (1).map`... if taken), for the node to send the folder from the
    files themselves; its path, and the folder as mapped (its size is the files' as
    stat'ed for the map, which a file rewritten since the walk may have changed).
    Blocking. NotEnoughSpace naming both sizes if even the map does not fit; on any
    failure, or a KeyboardInterrupt, nothing is left behind."""
    folder = outgoing_dir(store_root)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout = plan_view(plan)
    blob = layout.encode(Path(plan.name))
    free = free_space(folder)
    if len(blob) > free:
        raise NotEnoughSpace(f"not enough free space in {folder} for the map of "
                             f"{plan.name}: {size_text(len(blob))} needed, "
                             f"{size_text(free)} free")
    path = _link_new(folder, plan.name, MAP_SUFFIX, lambda out: out.write(blob),
                     f"writing the map of {plan.name} ({size_text(len(blob))} needed)")
    return path, dataclasses.replace(plan.info(), size=sum(f.size for f in layout.files))


def _link_new(folder: Path, name: str, suffix: str, write: Callable[[Any], object],
              doing: str) -> Path:
    """Write a new file through a temporary name (fsync'd), then link it in as the first
    free `name` + `suffix`, `name (1)` + `suffix`...: never over another send's. Nothing
    is left on any failure; a full disk is NotEnoughSpace saying what was being done."""
    tmp = folder / f".{os.urandom(6).hex()}.tmp"
    try:
        with open(tmp, "xb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        n = 0
        while True:
            target = folder / (numbered(name, n, keep_extension=False) if n else name)
            target = target.with_name(target.name + suffix)
            try:
                os.link(tmp, target)
            except FileExistsError:
                n += 1
                continue
            return target
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NotEnoughSpace(f"the disk of {folder} filled up while {doing}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def pack(plan: PackPlan, store_root: Path, progress: Callable[[int], None]) -> Path:
    """Write the archive into `<store_root>/outgoing` (blocking); its path. `progress(n)`
    is told the bytes of file data written so far. Free space is checked first
    (NotEnoughSpace naming both sizes); on any failure, or a KeyboardInterrupt, nothing
    is left behind. The CLI does not pack (it writes the map); this is the archive a
    receiver gets, as a file."""
    folder = outgoing_dir(store_root)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    need, free = plan.archive_size, free_space(folder)
    if need > free:
        raise NotEnoughSpace(f"not enough free space in {folder} to pack {plan.name}: "
                             f"{size_text(need)} needed, {size_text(free)} free")
    return _link_new(folder, plan.name, TAR_SUFFIX, lambda out: _write(plan, out, progress),
                     f"packing {plan.name} ({size_text(need)} needed)")


def _write(plan: PackPlan, out: object, progress: Callable[[int], None]) -> None:
    done = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      copybufsize=COPY_BUFFER) as tar:
        for source, member in plan.entries:
            if source is None:
                tar.addfile(member_info(member, None))
                continue
            try:
                # Not through a link, and never blocking on a pipe put in its place.
                fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise FolderError(f"cannot read {source}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FolderError(f"{source} is no longer a regular file")
                info = member_info(member, st)
                try:
                    tar.addfile(info, _Counted(f, progress, done))
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise
                    raise FolderError(f"cannot read {source}: {exc}") from None
            done += info.size
            progress(done)


class _Counted:
    """A file object whose reads are reported (bytes so far), for the progress bar."""

    def __init__(self, f: object, seen: Callable[[int], None], before: int) -> None:
        self._f = f
        self._seen = seen
        self._n = before  # the bytes of the files before this one

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)  # type: ignore[attr-defined]
        self._n += len(data)
        self._seen(self._n)
        if n and n > 0 and len(data) < n:
            # tarfile would raise a bare "unexpected end of data": say which file.
            raise OSError(f"{getattr(self._f, 'name', 'a file')} shrank while being packed")
        return data


def summary(info: FolderInfo, top_names: list[str] | None = None) -> str:
    """What the message's title says: `sunday/: 48 files, 1.2 GiB`."""
    files = f"{info.files} file{'s' if info.files != 1 else ''}"
    if top_names:
        return f"{files}, {size_text(info.size)}: {', '.join(top_names)}"
    return f"{info.name}/: {files}, {size_text(info.size)}"


# --- the sender's copy ------------------------------------------------------------------

def needed(entry: OutboxEntry) -> bool:
    """Whether a recipient may still fetch this message: one that has not downloaded nor
    declined it, unless the sender withdrew it (a send the server never took stays:
    `resend` needs it)."""
    return any(r.state not in SETTLED
               and not (r.state is RecipientStatus.FAILED and r.reason == WITHDRAWN_REASON)
               for r in entry.recipients)


def release_archives(outbox: Outbox, store: ContentStore,
                     held: Callable[[bytes], bool] | None = None) -> list[str]:
    """Delete every folder map (or archive) this node wrote that no sent message needs any
    more (each recipient has it or declined it, or the message was withdrawn), never the
    files a map names; blocking. The paths deleted. A map of a content `held(content_id)`
    says this node's inbox holds complete (mailed to its own address) stays while it does:
    the address's receipt is this node's own, and its other devices fetch the folder from
    this map, which has it alone. Only the messages whose path ends as
    a map's or archive's are read: reading every message was most of the 0.14 CPU s a
    retention pass took with 10,000 sent, at each receipt that settled one (0.015 now).

    Decided again and done under the outbox's guard (`Outbox.file_unneeded`), as
    retention deletes a user's file: a send of the map running (`resend`), or one
    recorded since the outbox was read, keeps it. The map was deleted under the send, or
    after it was recorded, and the new message had no folder to serve."""
    seen = outbox.sends_seen  # before the read: a send recorded after it changes it
    gone = []
    for path, entries in _own_maps(outbox, store).items():
        if (any(needed(m) for m in entries) or not os.path.lexists(path)
                or (held is not None and any(held(m.content_id) for m in entries))):
            continue
        with outbox.file_unneeded(path, seen=seen, needed=functools.partial(
                _map_needed, outbox, store, path)) as unneeded:
            if not unneeded:
                continue
            for m in entries:
                with contextlib.suppress(ContentStoreError):
                    store.remove(m.content_id)
            Path(path).unlink(missing_ok=True)
        log.info("deleted the folder map %s: no recipient needs it any more", path)
        gone.append(path)
    return gone


def _own_maps(outbox: Outbox, store: ContentStore) -> dict[str, list[OutboxEntry]]:
    """The messages of each folder map (or archive) this node wrote, by its `same_place`."""
    by_path: dict[str, list[OutboxEntry]] = {}
    for m in outbox.ending_with((MAP_SUFFIX, TAR_SUFFIX)):
        if is_own_archive(store.root, m.path):
            by_path.setdefault(same_place(m.path), []).append(m)
    return by_path


def _map_needed(outbox: Outbox, store: ContentStore, path: str) -> bool:
    """Whether a message names the map at `path` (a `same_place`) that a recipient may
    still fetch, as the outbox is now."""
    return any(needed(m) for m in _own_maps(outbox, store).get(path, []))


# An archive in the outgoing folder that no sent message names, this much older than the
# node's start, was left by a `send` cut before the node took it (Ctrl-C, a node that
# stopped): a `send` packing right now is younger.
ORPHAN_AGE = 3600.0


def sweep_orphans(outbox: Outbox, store: ContentStore, now: float) -> list[Path]:
    """At start (no send runs): delete archives no sent message names and older than
    ORPHAN_AGE, and packing leftovers as old; the paths deleted. Blocking."""
    folder = outgoing_dir(store.root)
    if not folder.is_dir():
        return []
    # A home reached through a symlink or `..` names one file by several texts.
    named = {same_place(m.path) for m in outbox.list(limit=ALL_SENT)}
    gone = []
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            if same_place(p) not in named and now - p.lstat().st_mtime > ORPHAN_AGE:
                p.unlink()
                gone.append(p)
    if gone:
        log.info("deleted %d folder archive(s) no sent message names", len(gone))
    return gone


def discard_unsent(outbox: Outbox, store: ContentStore, path: Path,
                   content_id: bytes | None) -> None:
    """A send of an archive of ours failed before it was recorded: the archive goes,
    unless another sent message names it (a `resend`)."""
    if any(same_place(m.path) == same_place(path) for m in outbox.list(limit=ALL_SENT)):
        return
    if content_id is not None:
        with contextlib.suppress(ContentStoreError):
            store.remove(content_id)
    path.unlink(missing_ok=True)


# --- receiving --------------------------------------------------------------------------

def unpack(archive: Path, info: FolderInfo, dest_dir: Path) -> Path:
    """Unpack a received folder archive into `dest_dir` as `NAME/` (or `NAME (1)/`...);
    the folder's path. Blocking. FolderError naming every refused member, with nothing
    written, for an archive that breaks a rule; NotEnoughSpace if the files don't fit."""
    return unpack_with_layout(archive, info, dest_dir)[0]


# What gives the archive's bytes when they are not a file at the archive's path: a node
# that mailed a folder to its own address reads it through its map (ArchiveView.reader).
ArchiveOpener = Callable[[], IO[bytes]]


def _opened(archive: Path, reader: ArchiveOpener | None = None) -> tarfile.TarFile:
    try:
        # Uncompressed only (no decompression bomb), and no header read whole past a bound.
        return tarfile.open(archive, mode="r:", tarinfo=bounded_tarinfo(),
                            fileobj=None if reader is None else reader())
    except HeaderRefused as exc:
        raise _refused(archive, [str(exc)]) from None
    except (tarfile.TarError, OSError) as exc:
        raise FolderError(f"{archive.name} is not a tar archive ({exc})",
                          why="not a tar archive") from None


def archive_layout(archive: Path, info: FolderInfo,
                   reader: ArchiveOpener | None = None) -> list[ArchiveFile] | None:
    """The layout `unpack_with_layout` gives, with nothing unpacked (the archive judged
    again): for a folder already moved into place. Blocking; FolderError as unpack."""
    with _opened(archive, reader) as tar:
        return _layout(_judge(tar, archive, info, _archive_size(archive, reader)), info.name)


def unpack_with_layout(archive: Path, info: FolderInfo, dest_dir: Path,
                       moving: Callable[[Path], None] | None = None,
                       reader: ArchiveOpener | None = None,
                       ) -> tuple[Path, list[ArchiveFile] | None]:
    """`unpack`, and where each file's data lies in the archive (names under the folder),
    from which the folder serves the archive's bytes (ContentStore.add_archive_view);
    None for an archive whose files don't hold its bytes as they are (a sparse member).
    `moving(target)` is told the folder's name once it is reserved, before the folder is
    moved there (UnpackRecord keeps it, so a restart finds the folder). `reader`: where
    the archive's bytes are read from instead of the file `archive` (which then only
    names it)."""
    with _opened(archive, reader) as tar:
        members = _judge(tar, archive, info, _archive_size(archive, reader))
        total = sum(m.size for m in members if m.isreg())
        free = free_space(dest_dir)
        need = total + len(members) * tarfile.BLOCKSIZE * 8
        if need > free:
            raise NotEnoughSpace(f"not enough free space in {dest_dir} to unpack "
                                 f"{info.name}: {size_text(need)} needed, {size_text(free)} free")
        work = private_dir(dest_dir) / f"{os.urandom(6).hex()}.unpack"
        work.mkdir(mode=0o700)
        try:
            (work / info.name).mkdir()
            try:
                if _HAS_FILTERS:
                    tar.extractall(work, members=members, filter=_unpack_filter)
                else:
                    tar.extractall(work, members=[_unpack_filter(m, str(work))
                                                  for m in members])
            except tarfile.TarError as exc:  # a member's data cut short
                raise _refused(archive, [f"damaged ({exc})"]) from None
            return (_move_into_place(work / info.name, dest_dir, info.name, moving),
                    _layout(members, info.name))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _layout(members: list[tarfile.TarInfo], top: str) -> list[ArchiveFile] | None:
    if any(m.issparse() for m in members):
        return None  # its data in the archive is not the file's bytes
    return [ArchiveFile(m.name[len(top) + 1:], m.offset_data, m.size)
            for m in members if m.isreg() and m.size > 0]


def _archive_size(archive: Path, reader: ArchiveOpener | None) -> int:
    if reader is None:
        return archive.stat().st_size
    with reader() as f:
        return f.seek(0, io.SEEK_END)


def _judge(tar: tarfile.TarFile, archive: Path, info: FolderInfo,
           size: int) -> list[tarfile.TarInfo]:
    """Every member checked before anything is written; FolderError naming the bad ones.
    `size`: the archive's, which its files can't add up to more than."""
    refused: list[str] = []
    members: list[tarfile.TarInfo] = []
    # By name as a disk that ignores case sees it: each member's name, each file's, and
    # each folder a member needs (its parents), with the member that first needed it.
    seen: dict[str, str] = {}
    files: dict[str, str] = {}
    needed: dict[str, str] = {}
    total, limit = 0, size
    top = info.name
    listing = iter(tar)
    while True:
        if len(members) + len(refused) >= MAX_FOLDER_ENTRIES:
            refused.append(f"more than {MAX_FOLDER_ENTRIES:,} entries")
            break
        try:
            m = next(listing, None)
        except HeaderRefused as exc:
            refused.append(str(exc))
            break
        except (tarfile.TarError, ValueError, OverflowError, OSError) as exc:
            # A header tarfile can't read after a good one, or a negative size (its seek
            # to -1 is EINVAL); a read error of the disk itself is raised as it is.
            if isinstance(exc, OSError) and exc.errno != errno.EINVAL:
                raise
            refused.append(f"damaged after {len(members) + len(refused)} members ({exc})")
            break
        if m is None:
            break
        why = _refusal(m, top, str(archive.parent))
        name = m.name.rstrip("/")
        if why is None:
            why = _clash(m, name, seen, files, needed)
        if why is None and m.isreg():
            total += m.size
            if total > limit:
                why = "the files add up to more than the archive holds"
        if why is not None:
            refused.append(f"{m.name!r}: {why}")
            continue
        _record(m, name, seen, files, needed)
        if name != top:
            members.append(m)
    if refused:
        raise _refused(archive, refused)
    return members


def _refused(archive: Path, refused: list[str]) -> FolderError:
    more = len(refused) - SHOWN_REFUSALS
    shown = "; ".join(refused[:SHOWN_REFUSALS]) + (f"; and {more} more" if more > 0 else "")
    return FolderError(f"refused to unpack {archive.name}: {shown}; nothing was unpacked, "
                       f"the archive is kept at {archive}", why=shown)


def _clash(m: tarfile.TarInfo, name: str, seen: dict[str, str], files: dict[str, str],
           needed: dict[str, str]) -> str | None:
    """Why `m` can't sit beside the members before it: the same name (also where case
    does not count: on such a disk the second would overwrite the first), a name inside
    a file, or a file where a folder is needed. Extraction would otherwise fail midway
    ('Not a directory', naming our private folder) or lose a file."""
    key = name.casefold()
    if key in seen:
        first = seen[key]
        return ("named twice" if first == name
                else f"the same name as {first!r} where case does not count")
    parts = key.split("/")
    for i in range(1, len(parts)):
        if (inside := files.get("/".join(parts[:i]))) is not None:
            return f"inside {inside!r}, which is a file"
    if not m.isdir() and key in needed:
        return f"a file where {needed[key]!r} needs a folder"
    return None


def _record(m: tarfile.TarInfo, name: str, seen: dict[str, str], files: dict[str, str],
            needed: dict[str, str]) -> None:
    key = name.casefold()
    seen[key] = name
    if not m.isdir():
        files[key] = name
    parts = key.split("/")
    for i in range(1, len(parts)):
        needed.setdefault("/".join(parts[:i]), name)


# Times past this are not set: os.utime refuses what does not fit time_t (2**63 s), and a
# float that large rounds past it; no file system stores a time near either.
_MAX_MTIME = 2**62


# tarfile's extraction filters came in Python 3.11.4; Debian 12's python3 is 3.11.2. Without
# them the members `_judge` lets through (plain relative names, regular files and folders
# only) get the same checks and the same attributes from the code below.
_HAS_FILTERS = hasattr(tarfile, "data_filter")


def _unpack_filter(m: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's data filter, and a folder without a time (ours carry none: mtime 0, so
    the content id is the files' alone) keeps the time it is made, not 1970. So does a
    member whose time no file can be given (a base-256 header field or a PAX `mtime` of
    1e30, inf or nan): os.utime raised OverflowError or ValueError from the middle of
    extractall, which no refusal caught."""
    if _HAS_FILTERS:
        out = tarfile.data_filter(m, dest)
    else:
        # The data filter's attributes: no owner from the archive, no set-id, sticky or
        # group/other write bits, a file its owner can read and write. A folder's mode
        # is ignored there; the tarfile before filters sets a mode, so it is 0o755 here.
        out = copy.copy(m)
        out.uid, out.gid, out.uname, out.gname = os.getuid(), os.getgid(), "", ""
        mode = m.mode & 0o755
        if m.isreg():
            out.mode = (mode if mode & 0o100 else mode & ~0o111) | 0o600
        else:
            out.mode = 0o755
    t = out.mtime
    if (out.isdir() and not t) or not (math.isfinite(t) and -_MAX_MTIME < t < _MAX_MTIME):
        if not _HAS_FILTERS:  # no "unset" there: the time it is made
            out.mtime = time.time()
            return out
        return out.replace(mtime=None, deep=False)  # type: ignore[arg-type]  # None: unset
    return out


def _filter_refusal(m: tarfile.TarInfo, dest: str) -> str | None:
    """Why tarfile's data filter refuses `m` (a plain relative name) unpacked in `dest`,
    in words that name no path on this disk; None if it does not."""
    if _HAS_FILTERS:
        try:
            tarfile.data_filter(m, dest)
        except (tarfile.LinkOutsideDestinationError, tarfile.OutsideDestinationError) as exc:
            # tarfile's text names where it would land on this disk: a refusal goes to the
            # sender (a declined receipt), which would learn where we keep our downloads.
            return ("a link that leads outside the folder"
                    if isinstance(exc, tarfile.LinkOutsideDestinationError)
                    else "it would be unpacked outside the folder")
        except tarfile.FilterError as exc:
            return str(exc)  # names the member only
        return None
    # The data filter's checks, in its order and with its texts.
    real = os.path.realpath(dest)

    def outside(path: str) -> bool:
        return os.path.commonpath([os.path.realpath(path), real]) != real

    if outside(os.path.join(real, m.name)):
        return "it would be unpacked outside the folder"
    if not (m.isreg() or m.islnk() or m.isdir() or m.issym()):
        return f"{m.name!r} is a special file"
    if m.islnk() or m.issym():
        if os.path.isabs(m.linkname):
            return f"{m.name!r} is a link to an absolute path"
        base = os.path.dirname(m.name) if m.issym() else ""
        if outside(os.path.join(real, base, m.linkname)):
            return "a link that leads outside the folder"
    return None


def _refusal(m: tarfile.TarInfo, top: str, dest: str) -> str | None:
    """Why member `m` may not be unpacked, or None."""
    name = m.name.rstrip("/")
    # First: a NUL (a PAX name may hold one) makes tarfile's filter raise ValueError.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in m.name + m.linkname):
        return "control character in the name"
    if m.name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute name"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in its name (it would leave the folder)"
    if any(p in ("", ".") for p in parts):
        return "not a plain relative name"
    if (why := _filter_refusal(m, dest)) is not None:
        return why
    if name != top and not name.startswith(top + "/"):
        return f"not inside {top}/"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES or any(
            len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        return "name too long"
    if not (m.isreg() or m.isdir()):
        return "not a regular file or a folder (links and devices are not unpacked)"
    return None


def delete_received(folder: Path) -> bool:
    """Delete a received folder (`rm --delete-file`); False if it is not a folder any more
    (moved, or a symlink put in its place: never followed). Blocking."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
    except FileNotFoundError:
        return False
    shutil.rmtree(folder)  # links inside are removed, never followed
    return True


def _move_into_place(built: Path, dest_dir: Path, name: str,
                     moving: Callable[[Path], None] | None) -> Path:
    """Rename the unpacked folder to the first free `name`, `name (1)`... in `dest_dir`:
    the name is taken by an empty folder first, which the rename then replaces, so a file
    or folder that appears meanwhile is never overwritten. `moving(target)` between."""
    n = 0
    while True:
        target = dest_dir / (numbered(name, n, keep_extension=False) if n else name)
        n += 1
        try:
            target.mkdir()
        except FileExistsError:
            continue
        try:
            if moving is not None:
                moving(target)
            os.rename(built, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                with contextlib.suppress(OSError):
                    target.rmdir()
                raise
            continue  # something was put into it meanwhile: leave it be
        return target


class UnpackRecord:
    """Where a received folder archive is being unpacked, kept on disk between moving the
    folder into place and recording it (ContentStore.add_archive_view, which deletes the
    archive): a node killed in between finds the folder on its next start instead of
    unpacking it again as `NAME (1)`, and deletes an archive the kill left. One small
    JSON file per content in the download folder's private folder (mode 0700)."""

    def __init__(self, dest_dir: Path, content_id: bytes) -> None:
        self.dest_dir = dest_dir
        self.name = f"{content_id.hex()}.unpacking"

    def _path(self) -> Path:
        return private_dir(self.dest_dir) / self.name

    def moving(self, archive: Path) -> Callable[[Path], None]:
        """The `moving` callback of unpack_with_layout: records archive and target."""
        def record(target: Path) -> None:
            blob = memoryview(json.dumps({"archive": str(archive),
                                          "target": str(target)}).encode())
            write_replace(self._path(), lambda fd: pwrite_all(fd, blob, 0))
        return record

    def _read(self) -> dict[str, str] | None:
        try:
            saved = json.loads(self._path().read_bytes())
        except (OSError, ValueError, ContentStoreError):
            return None
        if (not isinstance(saved, dict)
                or not all(isinstance(saved.get(k), str) for k in ("archive", "target"))):
            return None
        return saved

    def resume(self, archive: Path, info: FolderInfo, reader: ArchiveOpener | None = None,
               ) -> tuple[Path, list[ArchiveFile] | None] | None:
        """The folder a kill left moved into place but not recorded, and its layout; None
        if there is none (an empty folder reserved before the move is removed: unpacking
        again gives the same). Blocking; FolderError as unpack."""
        saved = self._read()
        if saved is None or saved["archive"] != str(archive):
            return None
        target = Path(saved["target"])
        try:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                return None
            if not any(target.iterdir()):
                target.rmdir()
                return None
        except OSError:
            return None
        return target, archive_layout(archive, info, reader)

    def finish(self, keep: Path | None = None) -> None:
        """The folder is recorded: delete the archive if a kill left it (never `keep`, the
        folder itself), then the record. Blocking."""
        saved = self._read()
        if (saved is not None and Path(saved["archive"]) != keep
                and same_place(Path(saved["archive"]).parent) == same_place(self.dest_dir)):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(saved["archive"]).st_mode):
                    os.unlink(saved["archive"])
        with contextlib.suppress(OSError, ContentStoreError):
            self._path().unlink(missing_ok=True)

    # A copy the node unpacked of a folder archive it sent to its own address (several
    # paths sent together, or a folder gone since it was sent) is the node's, not the
    # user's: `rm --delete-file` deletes it. The map that told it apart is released once
    # the address has the message, so the copy's place is kept here until the message goes.

    def _copy_path(self) -> Path:
        return private_dir(self.dest_dir) / f"{self.name.removesuffix('.unpacking')}.copy"

    def record_copy(self, target: Path) -> None:
        """`target` is the node's own unpacked copy of what it sent to its own address.
        Blocking; ContentStoreError or OSError if it can't be written."""
        blob = memoryview(json.dumps({"copy": str(target)}).encode())
        write_replace(self._copy_path(), lambda fd: pwrite_all(fd, blob, 0))

    def copy(self) -> Path | None:
        """The copy `record_copy` recorded, None if none was. Blocking."""
        try:
            saved = json.loads(self._copy_path().read_bytes())
        except (OSError, ValueError, ContentStoreError):
            return None
        where = saved.get("copy") if isinstance(saved, dict) else None
        return Path(where) if isinstance(where, str) else None

    def forget_copy(self) -> None:
        """The message of the copy is removed: its record goes. Blocking."""
        with contextlib.suppress(OSError, ContentStoreError):
            self._copy_path().unlink(missing_ok=True)
