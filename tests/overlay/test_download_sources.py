"""What a download shows of its sources across attempts, and what `--metrics` counts.

The queue runs a fetcher that shows source views and asks to retry, then completes. The
user's view sums each peer's bytes over both attempts; the metrics count each byte once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from crypto.identity import DeviceIdentity
from crypto.location import Description, Handle, Headers, LocationMessage
from overlay.app.fetchmeter import FetchMeter
from overlay.mail.db import NodeDB
from overlay.mail.downloads import Activity, DownloadQueue, RetryLater, SourceView
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.prefs import Prefs
from tests.present import present

ALICE = DeviceIdentity.from_seed(b"a" * 32)
MB = 1_000_000


def offer(inbox: Inbox) -> bytes:
    msg = LocationMessage(
        headers=Headers(message_id=b"m" * 16, sender="alice@example.net",
                        sender_peer_id=ALICE.peer_id, recipients=("bob@example.net",),
                        created=1_700_000_000),
        description=Description(title="clip", file_name="clip.ts"),
        handle=Handle(content_id=b"c" * 32, size=6 * MB, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32))
    inbox.add(id=msg.headers.message_id, sender="alice@example.net",
              sender_peer_id=ALICE.peer_id, title="clip", note="", size=6 * MB,
              file_name="clip.ts", media_type="x/y", content_id=msg.handle.content_id,
              chunk_count=6, message=msg.encode(), received_at=1000.0)
    return msg.headers.message_id


async def test_bytes_of_an_attempt_that_ended_in_a_retry_still_show_once(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox)
    done = asyncio.Event()
    seen: list[dict[tuple[str, str], SourceView]] = []

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Callable[[int], None]) -> str:
        if not seen:
            act.show([SourceView("alice", "?")])  # connecting
            act.show([SourceView("alice", "tcp", bytes=3 * MB, rate=2e6)])
            seen.append(dict(act.sources))
            raise RetryLater("alice went away")
        act.show([SourceView("alice", "tcp", bytes=2 * MB, rate=4e6),
                  SourceView("carol", "relay", bytes=1 * MB, rate=1e6),
                  SourceView("mallory", "tcp", banned=True)])
        seen.append(dict(act.sources))
        return "/tmp/clip.ts"

    async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
        done.set()

    meter = FetchMeter(fetch)
    q = DownloadQueue(inbox, Prefs(db), meter, completed, wall=time.time,
                      rng=random.Random(1), retry_base=0.01, retry_max=0.02)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(q.run())
        async with asyncio.timeout(10):
            await done.wait()
        runner.cancel()

    assert present(inbox.get(mid)).state is InboxState.COMPLETE
    first, second = seen
    assert [v.as_dict() for v in first.values()] == [
        {"peer": "alice", "path": "tcp", "bytes": 3 * MB, "rate": 2e6, "banned": False}]
    # While the second attempt runs: alice's bytes from both attempts, at today's rate.
    assert {k: (v.bytes, v.rate, v.banned) for k, v in second.items()} == {
        ("alice", "tcp"): (5 * MB, 4e6, False), ("carol", "relay"): (1 * MB, 1e6, False),
        ("mallory", "tcp"): (0, 0.0, True)}
    # Once it has ended: the same bytes, and no source has a rate any more.
    act = q.active[mid]
    assert {k: (v.bytes, v.rate) for k, v in act.sources.items()} == {
        ("alice", "tcp"): (5 * MB, 0.0), ("carol", "relay"): (1 * MB, 0.0),
        ("mallory", "tcp"): (0, 0.0)}
    assert act.attempt == {}
    # The metrics count each byte once: 3 + 2 MB over TCP, 1 MB relayed.
    assert meter.bytes_by_path() == {"tcp": 5 * MB, "tcp-punch": 0, "quic": 0, "webrtc": 0,
                                     "relay": 1 * MB}
    assert meter.outcomes["retry"] == 1 and meter.outcomes["complete"] == 1
    assert sum(meter.sources_by_path().values()) == 0
