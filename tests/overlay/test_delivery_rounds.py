"""The node's mail loops outlive a round whose node.db write fails (its disk full): the
owed receipts go again next round, a sender whose keys could not be re-checked is looked
up again, retention waits for the next receipt, and a download node.db won't start waits
its backoff. Each raised out of its loop before, and a loop of the node that fails ends
the node (its tasks run in one TaskGroup); the download was started again at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crypto.location import LocationMessage
from overlay.mail.db import NodeDB, RecordLimitError
from overlay.mail.delivery import Delivery, Receipts
from overlay.mail.downloads import Activity, DownloadQueue, RetryLater
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.prefs import Prefs
from rendezvous.backoff import Backoff
from tests.overlay.test_download_sources import offer
from tests.present import present
from tests.rendezvous.conftest import disk_full, ident

# No key retired by a lookup (`Contacts.retired` stays 0), so no retention pass follows.
_NO_CONTACTS = SimpleNamespace(retired=0)


class _FailsOnce:
    """A store method that raises `error` at its first call and returns `then` after."""

    def __init__(self, error: Exception, then: Any) -> None:
        self.error, self.then, self.calls = error, then, 0
        self.called, self.again = asyncio.Event(), asyncio.Event()

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self.called.set()
        if self.calls == 1:
            raise self.error
        self.again.set()
        return self.then


async def _until(event: asyncio.Event, task: asyncio.Task[Any], what: str) -> None:
    waiting = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiting, task}, timeout=5,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert not task.done(), f"the loop ended: {task.exception()!r}"
        assert waiting in done, f"no {what} after the failed one"
    finally:
        waiting.cancel()
        task.cancel()
        await asyncio.wait({task})


async def test_owed_receipts_are_tried_again_after_node_db_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "peerpost.node")
    owed = _FailsOnce(disk_full(), [])
    # Stand-ins for the parts this round reaches (the contacts it never does).
    server: Any = SimpleNamespace(connected=True)
    inbox: Any = SimpleNamespace(receipts_owed=owed, declines_owed=lambda *_: [])
    contacts: Any = None
    receipts = Receipts(ident(1), server, inbox, contacts, wall=lambda: 0.0, retry=0.01)
    await _until(owed.again, asyncio.create_task(receipts.owed()), "round")
    assert "owed receipts not sent this round (tried again in 0 s): database or disk is " \
           "full" in caplog.text
    assert "Traceback" not in caplog.text


def _delivery(tmp_path: Path, incoming: Any, downloads: Any, outbox: Any = None,
              finger: Any = None) -> Delivery:
    async def withdraw(content_id: bytes) -> None:
        return None

    return Delivery(SimpleNamespace(finger=finger), incoming, outbox,  # type: ignore[arg-type]
                    None, None, downloads, archive=tmp_path,  # type: ignore[arg-type]
                    on_pipe=lambda m: False, on_relay=lambda i: None, withdraw=withdraw,
                    lookup_backoff=Backoff(0.01, 0.05), rng=random.Random(1))


async def test_a_sender_whose_keys_were_not_rechecked_is_looked_up_again(
        tmp_path: Path) -> None:
    """FINGER answered but node.db refused to apply the keys: the sender's held message
    waited until it sent again or the node restarted (or the node ended, from the loop)."""
    key = ident(2).public.verify_key

    async def finger(sender: str) -> Any:
        return SimpleNamespace(devices=[SimpleNamespace(verify_key=key, vouch=None)])

    recheck = _FailsOnce(sqlite3.OperationalError("database is locked"), [b"m" * 16])
    incoming = SimpleNamespace(
        recheck_keys=recheck, key_checks=[], contacts=_NO_CONTACTS,
        inbox=SimpleNamespace(unverified_senders=lambda: ["alice@example.net"],
                              pending_arrivals=lambda sender=None: []))
    woken = asyncio.Event()
    delivery = _delivery(tmp_path, incoming, SimpleNamespace(wake=woken.set), finger=finger)
    await _until(woken, asyncio.create_task(delivery.lookups()), "look-up")
    assert recheck.calls == 2


async def test_retention_that_node_db_refuses_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Run when a receipt arrives, from the loop that reads the server's pushes."""
    caplog.set_level(logging.INFO, "peerpost.node")
    outbox = SimpleNamespace(sends_seen=0, pending_retention=_FailsOnce(disk_full(), []))
    await _delivery(tmp_path, SimpleNamespace(inbox=None), None, outbox).retention()
    assert "retention step failed (it is retried at the next receipt or start): " \
           "database or disk is full" in caplog.text


async def run_until(q: DownloadQueue, done: asyncio.Event) -> None:
    """Run the queue's loop until `done` is set (10 s at most), then stop it."""
    runner = asyncio.create_task(q.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        runner.cancel()
        await asyncio.wait({runner})


async def test_a_download_node_db_will_not_start_waits_its_backoff(
        db: NodeDB, caplog: pytest.LogCaptureFixture) -> None:
    """node.db refuses the download's start mark for 0.6 s: the queue tries again after
    0.1, 0.2, 0.4 s (about), then the download runs. It started it again at once, a
    traceback each time, as long as the disk stayed full."""
    starts: list[float] = []
    full_until = time.monotonic() + 0.6

    def start(event: str, when: float) -> None:
        if event == "started":
            starts.append(when)
            if time.monotonic() < full_until:
                raise disk_full()

    class FullAtStart(Inbox):  # the start mark goes with the move to downloading
        def mark_time(self, id: bytes, event: str, when: float) -> None:
            start(event, when)
            super().mark_time(id, event, when)

        def transition(self, id: bytes, new_state: InboxState, **kw: Any) -> InboxEntry:
            if kw.get("mark") is not None:
                start(*kw["mark"])
            return super().transition(id, new_state, **kw)

    inbox = FullAtStart(db)
    mid = offer(inbox)
    done = asyncio.Event()

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        return str(Path("clip.ts").absolute())

    async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
        done.set()

    q = DownloadQueue(inbox, Prefs(db), fetch, completed, wall=time.time,
                      rng=random.Random(1), retry_base=0.1, retry_max=0.4)
    await run_until(q, done)
    assert present(inbox.get(mid)).state is InboxState.COMPLETE
    assert 2 <= len(starts) <= 8, f"{len(starts)} starts in 0.6 s"
    assert "not started (node.db did not take it: database or disk is full)" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_hold_that_comes_due_while_the_queue_looks_is_not_forgotten(
        db: NodeDB) -> None:
    """node.db refuses a download's move to retrying (its disk full): the queue holds the
    message off for its backoff. If that hold came due while the queue was reading what to
    start (passed over as not due yet), the loop then waited for a wake with no timeout,
    and the download never resumed (seen in the disk-full e2e test under load)."""
    held: list[DownloadQueue] = []

    class Slow(Inbox):
        refused = False

        def transition(self, id: bytes, new_state: InboxState, **kw: Any) -> InboxEntry:
            if new_state is InboxState.RETRYING and not self.refused:
                self.refused = True
                raise disk_full()
            return super().transition(id, new_state, **kw)

        def fetch_order(self, now: float, **kw: Any) -> list[InboxEntry]:
            out = super().fetch_order(now, **kw)
            hold = held[0]._holds.get(mid) if held else None
            if hold is not None and hold.until > time.time():
                time.sleep(hold.until - time.time() + 0.01)  # a slow read under load
            return out

    inbox = Slow(db)
    mid = offer(inbox)
    done = asyncio.Event()
    attempts = []

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        attempts.append(entry.id)
        if len(attempts) == 1:
            raise RetryLater("the disk is full")
        return str(Path("clip.ts").absolute())

    async def completed(entry: InboxEntry, msg: LocationMessage) -> None:
        done.set()

    q = DownloadQueue(inbox, Prefs(db), fetch, completed, wall=time.time,
                      rng=random.Random(1), retry_base=0.1, retry_max=0.1)
    held.append(q)
    await run_until(q, done)
    assert len(attempts) == 2
    assert present(inbox.get(mid)).state is InboxState.COMPLETE


async def test_a_sender_with_more_devices_than_a_contact_pins_is_not_looked_up_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sender's server lists more vouched devices than a contact may pin: the limit
    raised out of the look-up loop (and the push loop) and ended the node. Logged; the
    same answer would come again, so it is not asked again."""
    caplog.set_level(logging.INFO, "peerpost.node")
    key = ident(2).public.verify_key

    async def finger(sender: str) -> Any:
        return SimpleNamespace(devices=[SimpleNamespace(verify_key=key, vouch=None)])

    recheck = _FailsOnce(
        RecordLimitError("alice@example.net would have more than 16 pinned devices"), [])
    incoming = SimpleNamespace(
        recheck_keys=recheck, key_checks=[], contacts=_NO_CONTACTS,
        inbox=SimpleNamespace(unverified_senders=lambda: ["alice@example.net"],
                              pending_arrivals=lambda sender=None: []))
    delivery = _delivery(tmp_path, incoming, None, finger=finger)
    looking = asyncio.create_task(delivery.lookups())
    try:
        try:
            await asyncio.wait_for(recheck.called.wait(), 10)
        except TimeoutError:
            raise AssertionError("the sender was not looked up") from None
        # Several backoffs (0.01-0.05 s) in which a look-up again would come.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recheck.again.wait(), 0.3)
        assert not looking.done(), looking.exception()
        assert recheck.calls == 1
    finally:
        looking.cancel()
        await asyncio.wait({looking})
    assert "the keys of alice@example.net not checked: alice@example.net would have more " \
           "than 16 pinned devices" in caplog.text
