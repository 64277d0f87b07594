"""`/media/ID`: a message's file over HTTP Range, answered from the partial download.

A range is answered from the chunks already held (the `.part` file until the download
completes). A range that starts in a chunk not yet held waits up to `WAIT_S` for it while
the downloader is asked to fetch from there first (the playhead), then gets a 503 with
Retry-After; once the first chunk is there the response streams, each later chunk waited
for the same way, so a `<video>` plays while the rest is still arriving. A request whose
client has gone (a player that seeked elsewhere drops its old request) stops asking: its
chunks would otherwise be wanted before the ones the player waits for now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from overlay.content.partial import PartialContent

WAIT_S = 20.0  # how long one request waits for a chunk not yet held
# Chunks from the playhead the downloader fetches first. Each one still asked for when the
# player seeks goes before the seek's target (0.26 s a chunk at 4 MB/s): two, not more.
PLAYHEAD_CHUNKS = 2
READ_STEP = 256 * 1024  # bytes read and written per step

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

# want(content_id, first_chunk, end_chunk): fetch these chunks before any other.
Wanter = Callable[[bytes, int, int], None]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, clipped to the file; None when the
    header is absent; ValueError when it can't be satisfied or isn't one range."""
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise ValueError("one bytes=FIRST-LAST range only")
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        raise ValueError("range outside the file")
    return first, min(last, size - 1)


class ChunkWait:
    """Wakes an asyncio waiter whenever the partial content stores a chunk (the writer
    runs in a thread, hence call_soon_threadsafe)."""

    def __init__(self, partial: PartialContent) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._stop = partial.watch(self._notify)

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self, within: float) -> None:
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), within)

    def close(self) -> None:
        self._stop()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _held(partial: PartialContent, index: int, wait: ChunkWait, want: Wanter | None,
                within: float, request: web.Request) -> bool:
    """Wait until chunk `index` is held (or the download completed); False on timeout or
    when the client has gone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    asked = False
    while not (partial.have(index) or partial.final_path is not None):
        left = deadline - loop.time()
        if left <= 0 or _gone(request):
            return False
        if not asked and want is not None:
            want(partial.content_id, index, min(partial.count, index + PLAYHEAD_CHUNKS))
            asked = True
        await wait.wait(min(left, 1.0))
    return True


def _open(partial: PartialContent) -> int:
    for path in (partial.part_path, partial.final_path):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    raise FileNotFoundError(partial.part_path)


async def serve_partial(request: web.Request, partial: PartialContent, content_type: str,
                        want: Wanter | None, *, within: float = WAIT_S) -> web.StreamResponse:
    """Answer a GET for a content still being received (see the module docstring)."""
    size, cs = partial.size, partial.chunk_size
    try:
        rng = parse_range(request.headers.get("Range"), size)
    except ValueError:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    first, last = rng if rng is not None else (0, size - 1)
    wait = ChunkWait(partial)
    try:
        if size and not await _held(partial, first // cs, wait, want, within, request):
            return web.Response(status=503, headers={"Retry-After": "2"},
                                text="that part of the file has not arrived yet\n")
        headers = {"Accept-Ranges": "bytes", "Content-Type": content_type,
                   "Cache-Control": "no-store", "Content-Length": str(last - first + 1)}
        if rng is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        resp = web.StreamResponse(status=206 if rng is not None else 200, headers=headers)
        resp.force_close()  # a body cut short by a timeout must end the connection too
        await resp.prepare(request)
        fd = await asyncio.to_thread(_open, partial)
        try:
            pos = first
            while pos <= last:
                if not await _held(partial, pos // cs, wait, want, within, request):
                    break  # the reader sees a short body and asks again
                end = min(last + 1, (pos // cs + 1) * cs, pos + READ_STEP)
                data = await asyncio.to_thread(os.pread, fd, end - pos, pos)
                if not data:
                    break
                await resp.write(data)
                pos += len(data)
        finally:
            os.close(fd)
        return resp
    finally:
        wait.close()


def file_response(path: Path, content_type: str) -> web.FileResponse:
    """A complete file: aiohttp answers Range itself."""
    return web.FileResponse(path, headers={"Content-Type": content_type,
                                           "Cache-Control": "no-store"})
