"""Fetch one inbox message's content from every holder known (the download queue's fetcher).

The content store opens (or resumes) the partial file, the HolderFinder names the sources,
the Downloader pulls chunks from all of them at once. It starts from the sender once its
FINGER is back; the co-recipients the DHT lookup (sent with that FINGER) names join it when
the lookup returns. While it runs, the providers are looked up again in a task owned by
this download and cancelled when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.location import FolderInfo, LocationMessage
from overlay.app.holders import HolderFinder
from overlay.content.archive import ArchiveFile, ArchiveView
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError, NotEnoughSpace, PartialGone
from overlay.content.partial import PartialContent
from overlay.mail.downloads import (
    Activity,
    DownloadFailed,
    NoSourceNow,
    RetryLater,
    SourceView,
)
from overlay.mail.folders import ArchiveOpener, FolderError, UnpackRecord, unpack_with_layout
from overlay.mail.inbox import InboxEntry
from overlay.transfer.downloader import (
    SOURCE_CHANGED,
    WITHDRAWN_FAILURE,
    ChunkStored,
    DiskFull,
    Downloader,
    FetchError,
    FetchEvent,
    NoSourceReachable,
    SourceChanged,
    SourceFailed,
    SourceStats,
    Stuck,
)
from overlay.transports.ladder import Source
from rendezvous.errors import is_disk_full
from rendezvous.taskset import TaskSet

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between progress writes to node.db (each one fsync'd)
# Media a browser plays whose index may be at the end of the file: a WebM's Cues follow
# the clusters, an MP4 not made "faststart" has its moov box last. A player reads it before
# its first seek, so such a download asks for its first chunk and its last two first.
INDEX_AT_END = frozenset({"video/webm", "audio/webm", "video/x-matroska", "video/mp4",
                          "audio/mp4", "video/quicktime"})
INDEX_SUFFIXES = (".webm", ".mkv", ".mp4", ".m4v", ".m4a", ".mov")
TAIL_CHUNKS = 2


def index_at_end(media_type: str, file_name: str) -> bool:
    """A clip a browser plays that may keep its index at the end (see INDEX_AT_END)."""
    return media_type in INDEX_AT_END or (
        media_type == "application/octet-stream"
        and file_name.lower().endswith(INDEX_SUFFIXES))


def want_ends(dl: Downloader, count: int) -> None:
    """Ask for the first chunk, then the last TAIL_CHUNKS (the last one first), before any
    other. The tail is pinned: kept wanted until stored, never cancelled for the stream's
    later asks. In the playback benchmark the index, left to the seek, cost 1.5 s of it."""
    for i in range(count - 1, max(0, count - TAIL_CHUNKS) - 1, -1):
        dl.want_first(i, i + 1, pinned=True)
    if count:
        dl.want_first(0, 1)


def source_views(stats: list[SourceStats]) -> list[SourceView]:
    """One view per source and path: a source that moved from the relay to tcp shows the
    bytes each carried, the rate on the path it uses now."""
    views = []
    for s in stats:
        current = s.path or "?"
        paths = dict(s.by_path)
        paths.setdefault(current, 0)
        for path, n in paths.items():
            here = path == current
            views.append(SourceView(peer=s.label, path=path, bytes=n,
                                    rate=s.rate if here else 0.0,
                                    banned=here and s.outcome == "banned", left=not here))
    return views


def none_serve(stats: list[SourceStats]) -> bool:
    """Every source answered that it does not have the content ("no content") or no
    longer serves it (its file changed): none will later, unlike one that was unreachable,
    stalled, or held none of the missing chunks yet (`NoSourceNow.none_serve`)."""
    return bool(stats) and all(s.source_changed or s.no_content for s in stats)


class ContentFetch:
    """`await fetch(entry, msg, activity, progress)` -> the path of the finished file.

    `alone`: co-recipient sourcing is off, so every download fetches from the sender only
    and tells it so (`Downloader.alone`)."""

    def __init__(self, identity: DeviceIdentity, store: ContentStore, finder: HolderFinder,
                 *, dest: Path, announce: Callable[[bytes], None], window: int,
                 connect_timeout: float, rng: random.Random | None = None,
                 alone: bool = False) -> None:
        self.identity = identity
        # Each download's chunk order is drawn from here (None: from the OS); the node hands
        # one derived from its own, so a simulated node's seed fixes the order.
        self.rng = rng
        self.store = store
        self.finder = finder
        self.dest = dest
        self.announce = announce
        self.window = window
        self.connect_timeout = connect_timeout
        self.alone = alone
        self.running: dict[bytes, Downloader] = {}  # content id -> its download, while it runs

    def want_first(self, content_id: bytes, first: int, end: int) -> None:
        """A player waits for chunks `first`..`end`-1: the download fetches them first."""
        dl = self.running.get(content_id)
        if dl is not None:
            dl.want_first(first, end)

    async def __call__(self, entry: InboxEntry, msg: LocationMessage, act: Activity,
                       progress: Callable[[int], None]) -> str:
        h = msg.handle

        def open_partial() -> PartialContent:
            # One trip to a thread for both (each trip cost 0.5-5 ms before the first chunk
            # on a busy machine): the folder's errors are the file's (full disk: later).
            self.dest.mkdir(parents=True, exist_ok=True)
            return self.store.open_partial(
                h.content_id, h.size, h.chunk_size, h.content_key, h.capability, self.dest,
                msg.description.file_name or f"{entry.id.hex()}.bin", scheme=h.scheme)

        try:
            partial = await asyncio.to_thread(open_partial)
        except NotEnoughSpace as exc:
            raise RetryLater(f"{exc}: it starts by itself once there is room") from None
        except ContentStoreError as exc:
            # Already held in full (the same content twice, or a crash between the
            # rename and the inbox update): nothing to fetch.
            held = self.store.local(h.content_id)
            if held is None:
                raise DownloadFailed(str(exc)) from None
            return await self._unpacked(msg, held.path)
        except (DecodeError, OSError) as exc:
            if is_disk_full(exc):
                raise RetryLater(f"the disk is full ({exc}): the download starts by itself "
                                 "once there is room") from None
            # A name or layout the disk refuses: retrying as it is can't help. The sender
            # is not told: the user may mend the folder and try again, or remove it (which
            # tells them).
            raise DownloadFailed(f"cannot store the file: {exc}") from None
        async with TaskSet(f"fetch {entry.id.hex()}") as lookups:
            # The co-recipients' lookup goes out with the sender's FINGER; the download
            # starts from the sender once that is back, and the lookup's providers join it.
            found = lookups.spawn(self.finder.co_sources(msg), name="provider-lookup")
            sender = await self.finder.sender_source(msg)
            path = await self._download(entry, msg, act, progress, partial, sender, found)
        return await self._unpacked(msg, path)

    async def _download(self, entry: InboxEntry, msg: LocationMessage, act: Activity,
                        progress: Callable[[int], None], partial: PartialContent,
                        sender: Source, found: asyncio.Task[list[Source]] | None) -> Path:
        """Download into `partial` from `sender`, and from the sources `found` names once
        it is back: until then a sender gone or stuck does not end the download."""
        h = msg.handle
        if partial.held:
            self.announce(h.content_id)  # resumed: we already serve some chunks
        progress(partial.held)
        last = [0.0]
        got_chunk = [False]
        loop = asyncio.get_running_loop()

        stuck = asyncio.Event()

        def on_event(ev: FetchEvent) -> None:
            if isinstance(ev, Stuck):
                stuck.set()  # the refresh looks for co-recipients sooner
                return
            # Progress goes to SQLite (fsync'd), and the source views are rebuilt (5% of the
            # receiving loop's samples when done for each of 512 chunks a GiB): at most a
            # few times a second, not per chunk, except the first chunk, whose time is the
            # "first byte" people see, and events other than a stored chunk.
            now = loop.time()
            stored = isinstance(ev, ChunkStored)
            first = stored and not got_chunk[0]
            if first:
                got_chunk[0] = True
                self.announce(h.content_id)  # partial holders serve what they have
            if isinstance(ev, SourceFailed) and ev.source == sender.label:
                # What FINGER said of the sender may be what failed (a node restarted
                # on another port): the next attempt, or the refresh, asks again.
                self.finder.forget(msg.headers.sender)
            if first or now - last[0] >= PROGRESS_EVERY or partial.is_complete:
                last[0] = now
                progress(partial.held)
            elif stored:
                return
            act.show(source_views(dl.stats))

        # A source's connect() may climb every rung of the ladder, each to its own timeout
        # (a held offer waits for a NATed holder to come back): give it the whole budget.
        dl = Downloader(partial, [sender], self.identity, window=self.window,
                        connect_timeout=self.connect_timeout, on_event=on_event,
                        rng=random.Random(self.rng.getrandbits(64)) if self.rng else None,
                        alone=self.alone, sender=sender.label)
        if found is not None:
            dl.add_found(found)
        d = msg.description
        if index_at_end(d.media_type, d.file_name or ""):
            want_ends(dl, partial.count)
        self.running[h.content_id] = dl
        try:
            async with TaskSet(f"refresh {entry.id.hex()}") as refresher:
                refresher.spawn(self.finder.refresh(dl, msg, stuck), name="provider-refresh")
                path = await dl.run()
        except NoSourceReachable as exc:
            progress(partial.held)
            raise NoSourceNow(str(exc), none_serve=none_serve(dl.stats)) from None
        except DiskFull as exc:
            raise RetryLater(f"{exc}: the download resumes by itself once there is room "
                             "(its verified chunks are kept)") from None
        except PartialGone as exc:
            raise RetryLater(f"{exc}: it starts again") from None
        except SourceChanged as exc:
            # The sender's own cancel needs no answer; a changed file is its to send again.
            raise DownloadFailed(str(exc), declined=None if str(exc) == WITHDRAWN_FAILURE
                                 else SOURCE_CHANGED) from None
        except FetchError as exc:
            raise DownloadFailed(str(exc)) from None
        finally:
            act.show(source_views(dl.stats))  # the bytes of the chunks since the last show
            if self.running.get(h.content_id) is dl:
                del self.running[h.content_id]
        progress(partial.held)
        return path

    async def _unpacked(self, msg: LocationMessage, path: Path) -> str:
        """`path`, or for a folder archive the folder it is unpacked into, the archive
        then deleted: the folder's files serve its bytes to co-recipients from then on
        (an ArchiveView). A refused archive fails the download naming the members (the
        .tar is kept, and is where `inbox` points); no room to unpack: retried later."""
        folder = msg.description.folder
        if folder is None:
            return str(path)
        cid = msg.handle.content_id
        record = UnpackRecord(self.dest, cid)
        if isinstance(held := self.store.local(cid), ArchiveView):
            if held.sent:
                return await self._sent_to_self(held, folder, record)
            # Unpacked before the node stopped; a kill may have left the archive.
            await asyncio.to_thread(record.finish, held.path)
            return str(held.path)
        unpacked, files = await self._unpack(record, path, folder)
        try:
            if files is None:
                raise ContentStoreError("its archive holds a sparse file")
            await asyncio.to_thread(self.store.add_archive_view, cid, unpacked, files)
            await asyncio.to_thread(record.finish, unpacked)
            return str(unpacked)
        except (ContentStoreError, OSError) as exc:
            log.warning("the folder %s is not served to its co-recipients: %s", unpacked, exc)
        try:
            await asyncio.to_thread(self.store.remove, cid, delete_file=True)
        except ContentStoreError:
            pass  # already forgotten
        await asyncio.to_thread(record.finish, unpacked)
        return str(unpacked)

    async def _sent_to_self(self, sent: ArchiveView, folder: FolderInfo,
                            record: UnpackRecord) -> str:
        """A folder this node sent to its own address: the folder itself, as a file mailed
        to oneself is the file sent (its map, which the node deletes once nobody needs
        it, is no place to point at). Several paths sent together are in no one folder:
        they are unpacked into the download folder from the sender's own files, as a
        recipient unpacks them; the content stays the one sent, served from the map."""
        source = sent.layout.source
        if source is not None and await asyncio.to_thread(os.path.isdir, source):
            return str(source)
        unpacked, _ = await self._unpack(record, sent.path, folder, sent.reader)
        try:
            await asyncio.to_thread(record.record_copy, unpacked)
        except (OSError, ContentStoreError) as exc:
            # Unrecorded, `rm --delete-file` keeps the copy as possibly the user's folder.
            log.warning("cannot record %s as the node's own copy: %s", unpacked, exc)
        await asyncio.to_thread(record.finish, unpacked)
        return str(unpacked)

    async def _unpack(self, record: UnpackRecord, path: Path, folder: FolderInfo,
                      reader: ArchiveOpener | None = None,
                      ) -> tuple[Path, list[ArchiveFile] | None]:
        """Unpack the archive at `path` (or read by `reader`) into the download folder,
        or find it there moved into place before a kill; the folder and its layout.
        DownloadFailed, or RetryLater for want of room, saying why."""
        kept = f" (the archive is kept at {path})" if reader is None else ""
        try:
            # A kill after the folder was moved into place: it is there, not unpacked again.
            resumed = await asyncio.to_thread(record.resume, path, folder, reader)
            if resumed is None:
                resumed = await asyncio.to_thread(unpack_with_layout, path, folder, self.dest,
                                                  record.moving(path), reader)
            return resumed
        except FolderError as exc:
            raise DownloadFailed(str(exc), declined=f"refused: {exc.why}" if exc.why else
                                 "refused: the folder archive can't be unpacked") from None
        except NotEnoughSpace as exc:
            raise RetryLater(f"{exc}: it is unpacked once there is room{kept}") from None
        except OSError as exc:
            if is_disk_full(exc):
                raise RetryLater(f"the disk filled up while unpacking {folder.name} ({exc}): "
                                 "it is unpacked again once there is room") from None
            raise DownloadFailed(f"cannot unpack {path.name}: {exc}{kept}") from None
        except ContentStoreError as exc:  # a sent file read through the map changed
            if reader is None:
                raise
            raise DownloadFailed(f"cannot unpack {folder.name}: {exc}") from None
