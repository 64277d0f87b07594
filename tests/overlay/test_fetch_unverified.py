"""`fetch` of a first contact's message that is `unverified` only while its sender's lookup
(one FINGER) is under way waits for that lookup, and goes on once it let the message
through; it is refused, as before, once the lookup ended without trusting the key, after
the bound (the client's request timeout) if it still runs then, and at once when no
lookup of the sender is under way (it failed, and is asked again later).

Bob's node is its real pieces (node.db, contacts, inbox, download queue, `Delivery` reading
the pushes, the control operations) against a fake server whose FINGER of carol, a first
contact, hangs until the test lets it answer (tests/overlay/test_stale_keys_aside.py)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crypto.codec import Fields
from overlay.app.control import ControlError
from overlay.app.operations import ControlOperations
from overlay.content.catalog import ContentStore
from overlay.mail.db import NodeDB
from overlay.mail.downloads import DownloadQueue
from overlay.mail.inbox_state import InboxState
from overlay.mail.prefs import Prefs
from rendezvous.records import DeviceInfo, FingerResult

from .test_incoming_trust import ALICE1, ALICE2, BOB
from .test_stale_keys import BobNode, bob_sent_to_alice, message_from, state_of
from .test_stale_keys_aside import CAROL, CAROL1, HangingLookups, ids, push

CAROLS = ids(9)[0].hex()
REFUSAL = (f"{CAROLS[:12]} is signed by a device key of {CAROL} that you do not trust yet; "
           f"compare fingerprints (`peerpost contacts`), then "
           f"`peerpost contacts accept {CAROL}`")


def operations(db: NodeDB, bob: BobNode, request_timeout: float = 10.0) -> ControlOperations:
    """Bob's control operations, with the wiring the node gives `fetch`; the network
    parts they don't use left out."""
    prefs = Prefs(db)
    downloads = DownloadQueue(bob.inbox, prefs, fetch=None, on_complete=None,  # type: ignore[arg-type]
                              wall=time.time, rng=random.Random(1))
    none: Any = None
    return ControlOperations(
        BOB, "bob@example.net", listen_addr=None,
        rendezvous=SimpleNamespace(request_timeout=request_timeout),  # type: ignore[arg-type]
        incoming=bob.incoming, sender=none, inbox=bob.inbox, outbox=bob.outbox, prefs=prefs,
        contacts=none, downloads=downloads, transfer=none, max_in_flight=1,
        lookup_ended=bob.delivery.lookup_ended)


def listing(*devices: Any) -> Any:
    async def answer(address: str) -> FingerResult:
        return FingerResult(address, tuple(DeviceInfo(d.public.verify_key, True, None, {})
                                           for d in devices))
    return answer


async def carols_message_unverified(bob: BobNode, hang: HangingLookups
                                    ) -> asyncio.Task[None]:
    """Carol's first message is in bob's inbox, `unverified`, her FINGER hanging."""
    pushing = await push(bob, message_from(CAROL1, 9, CAROL))
    async with asyncio.timeout(10):
        await hang.asked_for(1)
    assert state_of(bob, 9) is InboxState.UNVERIFIED
    return pushing


async def fetch(ops: ControlOperations) -> Any:
    return await ops.fetch(Fields({"id": CAROLS}, "fetch"))


async def started(ops: ControlOperations) -> asyncio.Task[Any]:
    """A `fetch` of carol's message that read it `unverified` and has not answered."""
    fetching = asyncio.create_task(fetch(ops))
    await asyncio.sleep(0)  # its first step: the message read, the lookup found under way
    if fetching.done():
        pytest.fail(f"fetch answered during the lookup: "
                    f"{fetching.exception() or fetching.result()!r}")
    return fetching


async def test_a_fetch_during_the_senders_lookup_waits_and_downloads(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    hang = HangingLookups(bob, {CAROL}, answers=listing(CAROL1))
    pushing = await carols_message_unverified(bob, hang)
    fetching = await started(operations(db, bob))
    assert state_of(bob, 9) is InboxState.UNVERIFIED
    hang.answer.set()  # her server lists the key that signed it
    async with asyncio.timeout(10):
        res = await fetching
        await pushing
    assert res["id"] == CAROLS and res["state"] == "downloading"
    assert state_of(bob, 9) is InboxState.DOWNLOADING and hang.asked == [CAROL]


async def test_a_fetch_during_a_lookup_that_does_not_list_the_key_is_refused_after_it(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    hang = HangingLookups(bob, {CAROL}, answers=listing(ALICE2))  # another key, not CAROL1
    pushing = await carols_message_unverified(bob, hang)
    fetching = await started(operations(db, bob))
    hang.answer.set()
    async with asyncio.timeout(10):
        with pytest.raises(ControlError) as refused:
            await fetching
        await pushing
    assert str(refused.value) == REFUSAL
    assert state_of(bob, 9) is InboxState.UNVERIFIED


async def test_a_fetch_waits_for_the_lookup_no_longer_than_the_request_timeout(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    hang = HangingLookups(bob, {CAROL}, answers=listing(CAROL1))
    pushing = await carols_message_unverified(bob, hang)
    ops = operations(db, bob, request_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(5):
            with pytest.raises(ControlError) as refused:
                await fetch(ops)
        assert 0.2 <= loop.time() - started < 5
        assert str(refused.value) == REFUSAL and hang.hanging == 1  # still under way
    finally:
        hang.answer.set()
        async with asyncio.timeout(10):
            await pushing


async def test_a_fetch_with_no_lookup_of_the_sender_under_way_is_refused_at_once(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    hang = HangingLookups(bob, {CAROL}, answers=listing(CAROL1))
    hang.fail = True  # her domain does not answer: held, looked up again later
    pushing = await carols_message_unverified(bob, hang)
    hang.answer.set()
    async with asyncio.timeout(10):
        await pushing
    assert state_of(bob, 9) is InboxState.UNVERIFIED
    ops = operations(db, bob)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ControlError) as refused:
        await fetch(ops)
    assert loop.time() - started < 1.0  # not the 10 s bound
    assert str(refused.value) == REFUSAL
    assert hang.asked == [CAROL]  # the fetch asked nothing of the server
    assert state_of(bob, 9) is InboxState.UNVERIFIED
