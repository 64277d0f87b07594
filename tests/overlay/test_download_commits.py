"""A download writes node.db once at each of its start, first chunk and end: the start
time with the move to downloading, the first chunk's progress with its time, the end time
with the move to complete. Each commit is an fsync on the node's loop, on the way from the
message's arrival to the first chunk and from the last chunk to `fetch --wait` returning;
the times were marked in commits of their own (six where three do). `inbox --json` shows
the same times as before."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crypto.location import LocationMessage
from overlay.mail.db import NodeDB
from overlay.mail.downloads import Activity, DownloadQueue
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.prefs import Prefs
from tests.overlay.test_delivery_rounds import run_until
from tests.overlay.test_download_sources import offer
from tests.present import present


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


async def test_start_first_chunk_and_end_are_one_commit_each(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox)
    commits: list[str] = []
    done = asyncio.Event()
    count = present(inbox.get(mid)).chunk_count

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        commits.append("fetching")
        progress(0)  # resumed from nothing: no first chunk yet
        progress(1)
        progress(count)
        commits.append("fetched")
        return str(Path("clip.ts").absolute())

    async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
        done.set()

    db._conn.set_trace_callback(  # every COMMIT node.db runs from here on
        lambda sql: commits.append("commit") if sql.strip().upper() == "COMMIT" else None)
    q = DownloadQueue(inbox, Prefs(db), fetch, completed, wall=time.time,
                      rng=random.Random(1))
    t0 = time.time()
    try:
        await run_until(q, done)
    finally:
        db._conn.set_trace_callback(None)
    # start; progress 0, the first chunk with its time, the last; the end.
    assert commits == ["commit", "fetching", "commit", "commit", "commit", "fetched", "commit"]
    e = inbox.get(mid)
    assert e is not None and e.state is InboxState.COMPLETE
    assert e.started_at is not None and e.first_byte_at is not None
    assert e.completed_at is not None
    assert t0 <= e.started_at <= e.first_byte_at <= e.completed_at <= time.time()


def test_a_mark_with_a_transition_keeps_the_first_of_its_kind(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox)
    moved = inbox.transition(mid, InboxState.DOWNLOADING, mark=("started", 10.0))
    assert moved.started_at == 10.0 and moved.state is InboxState.DOWNLOADING
    inbox.transition(mid, InboxState.RETRYING, next_attempt=30.0, error="away")
    again = inbox.transition(mid, InboxState.DOWNLOADING, mark=("started", 20.0))
    assert again.started_at == 10.0  # a resumed download still shows when it began
    inbox.set_progress(mid, 1, first_byte=21.0)
    inbox.set_progress(mid, 2, first_byte=22.0)
    assert present(inbox.get(mid)).first_byte_at == 21.0
    with pytest.raises(ValueError, match="unknown download event"):
        inbox.transition(mid, InboxState.COMPLETE, path="/x", mark=("finished", 23.0))
    assert present(inbox.get(mid)).state is InboxState.DOWNLOADING


async def _started_calls(db: NodeDB, steps: list[int]) -> list[bytes]:
    """The `on_started` calls of one download of a 6-chunk message whose fetcher reports
    `steps` (chunks held) as it goes."""
    inbox = Inbox(db)
    offer(inbox)
    started: list[bytes] = []
    done = asyncio.Event()

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        for held in steps:
            progress(held)
        return str(Path("clip.ts").absolute())

    async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
        done.set()

    q = DownloadQueue(inbox, Prefs(db), fetch, completed, wall=time.time,
                      rng=random.Random(1),
                      on_started=lambda e, msg: started.append(msg.headers.message_id))
    await run_until(q, done)
    return started


async def test_the_started_hook_goes_once_at_a_first_chunk_with_more_to_come(
        db: NodeDB, tmp_path: Path) -> None:
    """`on_started` (the sender's `downloading` receipt) is called once, when the first
    chunk is stored and more are to come; not when the first progress is the whole file
    (a message of one chunk, or one held already), whose `downloaded` receipt follows at
    once: a second envelope to the sender for nothing."""
    assert await _started_calls(db, [0, 1, 2, 6]) == [b"m" * 16]
    with NodeDB.open(tmp_path / "whole") as other:
        assert await _started_calls(other, [0, 6]) == []
