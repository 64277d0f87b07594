"""A message is downloaded once, with no error, whatever the order in which it is asked
for: a held message verified (its sender's keys looked up) and auto-download, `fetch`
and Try again (the control op the CLI and the web inbox call), the retry timer, a node
restart in between. The queue's task moved the entry to downloading as the queue saw it
when it spawned the task; a `fetch` in between had moved it already, and the download
the user asked for failed with 'IllegalTransition: cannot go from downloading to
downloading'. These drive the paths in each order on the real queue, inbox, receiving and
control code, the transfer left out (a fetcher that counts its calls)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from crypto.codec import Fields
from crypto.location import LocationMessage
from overlay.app.control_wire import ControlError
from overlay.app.operations import ControlOperations
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.downloads import Activity, DownloadQueue
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail, Outcome
from overlay.mail.outbox import Outbox
from overlay.mail.prefs import Prefs
from tests.overlay.test_incoming_trust import ALICE, ALICE1, BOB, K1, pushed
from tests.present import present

ENDED = (InboxState.COMPLETE, InboxState.FAILED)


class Bob:
    """Bob's node without its network: node.db, receiving, the download queue (its
    fetcher counts the downloads and finishes each when `finish` is set) and the control
    operations."""

    def __init__(self, db: NodeDB, tmp_path: Path) -> None:
        self.inbox = Inbox(db)
        self.prefs = Prefs(db)
        self.incoming = IncomingMail(BOB, "bob@example.net", self.inbox, Outbox(db),
                                     self.prefs, Contacts(db), wall=time.time)
        self.fetched: list[bytes] = []
        self.began = asyncio.Event()
        self.finish = asyncio.Event()
        self.completed: list[bytes] = []
        self.done = asyncio.Event()
        self.path = tmp_path / "clip.ts"
        self.spawning = asyncio.Event()
        self.queue = DownloadQueue(self.inbox, self.prefs, self._fetch, self._completed,
                                   wall=time.time, rng=random.Random(1))
        none: Any = None
        self.ops = ControlOperations(
            BOB, "bob@example.net", listen_addr=None, rendezvous=none,
            incoming=self.incoming, sender=none, inbox=self.inbox, outbox=Outbox(db),
            prefs=self.prefs, contacts=none, downloads=self.queue, transfer=none,
            max_in_flight=1)

    async def _fetch(self, entry: InboxEntry, msg: LocationMessage, act: Activity,
                     progress: Any) -> str:
        self.fetched.append(entry.id)
        self.began.set()
        await self.finish.wait()
        progress(entry.chunk_count)
        return str(self.path)

    async def _completed(self, entry: InboxEntry, msg: LocationMessage) -> None:
        self.completed.append(entry.id)
        self.done.set()

    async def fetch(self, mid: bytes) -> dict[str, Any]:
        """`peerpost fetch ID`, or the web inbox's Download it / Try again."""
        result: dict[str, Any] = await self.ops.fetch(Fields({"id": mid.hex()}, "fetch"))
        return result

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with spawning() as self.spawning:
            runner = asyncio.create_task(self.queue.run())
            try:
                yield
            finally:
                runner.cancel()
                await asyncio.wait({runner})

    async def spawned(self) -> None:
        """Return once the queue has made the download's task, before its first step."""
        async with asyncio.timeout(10):
            await self.spawning.wait()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path / "bob") as opened:
        yield opened


@asynccontextmanager
async def spawning() -> AsyncIterator[asyncio.Event]:
    """An event set as the queue makes a download's task: a waiter on it goes before that
    task's first step (the loop runs its ready callbacks in order, and the waiter's is
    queued first), so the test acts between the spawn and the start."""
    loop = asyncio.get_running_loop()
    made = asyncio.Event()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__qualname__", "") == "DownloadQueue._download":
            made.set()
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield made
    finally:
        loop.set_task_factory(None)


async def downloaded_once(bob: Bob, mid: bytes, caplog: pytest.LogCaptureFixture, *,
                          tries: int = 1) -> None:
    """Let the download finish; the user sees it complete, once, with no error (fetched
    `tries` times: a cancelled try and the one after it)."""
    bob.finish.set()
    async with asyncio.timeout(10):
        while (entry := bob.inbox.get(mid)) is not None and entry.state not in ENDED:
            await bob.queue.changed().wait()
    assert entry is not None
    assert (entry.state, entry.error, entry.path) == (InboxState.COMPLETE, None,
                                                       str(bob.path))
    async with asyncio.timeout(10):
        await bob.done.wait()
    assert bob.fetched == [mid] * tries and bob.completed == [mid]
    assert bob.queue.counters["failed"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "peerpost.downloads"]


def held(bob: Bob) -> bytes:
    """A first contact's message, held (unverified) until its keys are looked up."""
    p = pushed(1, ALICE1)
    outcome, _ = bob.incoming.handle(p)
    assert outcome is Outcome.UNVERIFIED
    return p.message_id


def verified(bob: Bob) -> None:
    """The FINGER's answer lists the signing key: the held message is offered (the node
    then wakes its queue, as `Delivery` does)."""
    assert bob.incoming.recheck_keys(ALICE, [K1])
    bob.queue.wake()


@pytest.mark.parametrize("when", ["before the queue's task", "the task spawned, not run",
                                  "while it runs"])
async def test_a_held_message_verified_and_fetched_is_downloaded_once(
        db: NodeDB, tmp_path: Path, caplog: pytest.LogCaptureFixture, when: str) -> None:
    """The helper's case: '1 held message(s) from alice are verified now', auto-download
    starts it, and `peerpost fetch` asks for it at the same time. With the fetch between
    the queue's spawn and its task's first step it failed with IllegalTransition."""
    caplog.set_level(logging.INFO)
    bob = Bob(db, tmp_path)
    mid = held(bob)
    async with bob.running():
        with pytest.raises(ControlError, match="do not trust yet"):
            await bob.fetch(mid)  # still held: the user is told why
        verified(bob)
        if when == "before the queue's task":
            await bob.fetch(mid)
        await bob.spawned()
        if when == "the task spawned, not run":
            await bob.fetch(mid)
        if when == "while it runs":
            async with asyncio.timeout(10):
                await bob.began.wait()
            for _ in range(2):  # fetch, then Try again
                assert (await bob.fetch(mid))["state"] == "downloading"
        await downloaded_once(bob, mid, caplog)
    assert "1 held message(s) from alice@example.net are verified now" in caplog.text


@pytest.mark.parametrize("auto", [True, False])
async def test_a_retry_due_and_fetched_is_downloaded_once(
        db: NodeDB, tmp_path: Path, caplog: pytest.LogCaptureFixture, auto: bool) -> None:
    """The retry timer comes due and the user fetches (or the node restarts a download
    cut by a network change, `Node._restart_cut_downloads`) as the queue starts it."""
    bob = Bob(db, tmp_path)
    bob.prefs.auto_download = auto
    mid = held(bob)
    verified(bob)
    bob.inbox.transition(mid, InboxState.DOWNLOADING)
    bob.inbox.transition(mid, InboxState.RETRYING, next_attempt=time.time() - 1,
                         error="no source reachable")
    async with bob.running():
        await bob.spawned()
        await bob.fetch(mid)
        await downloaded_once(bob, mid, caplog)


async def test_a_fetch_before_a_restart_is_downloaded_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`fetch` moved the message to downloading and the node stopped before its queue
    started it; after the restart the queue starts it as the user fetches it again."""
    with NodeDB.open(tmp_path / "bob") as db:
        before = Bob(db, tmp_path)
        before.prefs.auto_download = False
        mid = held(before)
        verified(before)
        await before.fetch(mid)
    with NodeDB.open(tmp_path / "bob") as db:
        after = Bob(db, tmp_path)
        assert present(after.inbox.get(mid)).state is InboxState.DOWNLOADING
        async with after.running():
            await after.spawned()
            await after.fetch(mid)
            await downloaded_once(after, mid, caplog)


async def test_try_again_while_a_cancel_stops_the_download(
        db: NodeDB, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Cancel, then Try again before the cancelled task has ended: the fetch moved the
    message back to downloading, but the queue, woken as the task ended, passed it over
    as still being stopped, and nothing woke it after: it showed downloading for ever."""
    bob = Bob(db, tmp_path)
    mid = held(bob)
    async with bob.running():
        verified(bob)
        async with asyncio.timeout(10):
            await bob.began.wait()
        cancel = asyncio.create_task(bob.ops.cancel(Fields({"id": mid.hex()}, "cancel")))
        await asyncio.sleep(0)  # the cancel has marked it failed and waits for the task
        assert present(bob.inbox.get(mid)).state is InboxState.FAILED
        assert (await bob.fetch(mid))["state"] == "downloading"
        assert (await cancel)["state"] == "downloading"
        await downloaded_once(bob, mid, caplog, tries=2)
