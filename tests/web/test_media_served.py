"""/media/ID against a real web inbox and content store (no node): the file is answered in
every moment of a download's completion, the rename's included."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp

from overlay.app.web.auth import issue_login_token
from overlay.app.web.server import WebInbox
from overlay.content.catalog import ContentStore
from overlay.content.partial import PartialContent

CHUNK = 1024


async def test_a_download_renamed_but_not_yet_recorded_complete_is_served(
        tmp_path: Path) -> None:
    """complete() renames `.part` to the final name, then the store records the content
    full. A /media request between the two found neither a partial to read (it has a final
    name) nor a full content, and answered 404 'not fetched yet'."""
    data = random.Random(3).randbytes(3 * CHUNK + 5)
    (tmp_path / "garden.jpg").write_bytes(data)
    sent = await ContentStore(tmp_path / "sender").add_local_file(tmp_path / "garden.jpg",
                                                                  chunk_size=CHUNK)
    store = ContentStore(tmp_path / "recv")
    part = store.open_partial(sent.content_id, sent.size, CHUNK, sent.key, sent.capability,
                              tmp_path / "inbox", "garden.jpg", scheme=sent.scheme)
    part.set_leaves(sent.leaves)
    for i in range(part.count):
        assert part.write_chunk(i, sent.read_sealed(i))
    entry = SimpleNamespace(media_type="image/jpeg", file_name="garden.jpg",
                            content_id=sent.content_id, path=None)
    ops = SimpleNamespace(find=lambda mid: entry)
    home = tmp_path / "home"
    home.mkdir()
    inbox = WebInbox(home, cast(Any, ops), store, listen="127.0.0.1:0")
    url = await inbox.start()

    # Hold complete() in the gap: renamed, not yet recorded.
    loop = asyncio.get_running_loop()
    in_gap, go_on = asyncio.Event(), threading.Event()
    record = store.mark_complete

    def held_back(partial: PartialContent, final: Path) -> None:
        loop.call_soon_threadsafe(in_gap.set)
        go_on.wait(30)
        record(partial, final)

    store.mark_complete = held_back  # type: ignore[method-assign]
    now = time.time()
    session = inbox.auth.redeem(issue_login_token(home, now), now)
    assert session is not None
    async with asyncio.TaskGroup() as tasks:
        completing = tasks.create_task(asyncio.to_thread(part.complete))
        try:
            await asyncio.wait_for(in_gap.wait(), 30)
            async with aiohttp.ClientSession(cookies={inbox.auth.cookie: session.sid}) as http:
                async with http.get(f"{url}/media/{sent.content_id.hex()}") as resp:
                    got = (resp.status, await resp.read())
        finally:
            go_on.set()
    await inbox.aclose()
    assert got == (200, data)
    assert completing.result().read_bytes() == data
