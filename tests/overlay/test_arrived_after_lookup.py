"""`Delivery.on_arrived` (what runs `node --on-message`'s `arrived`) tells of a first
contact's message once the lookup of its sender ended, with the state it has then: the
lookup answers (`offered`), fails (`unverified`) or is cancelled as the node stops
(`unverified`: told all the same, since the server's next push of it is a duplicate and
tells nothing). Once each, and a message that needs no lookup is told at once.

Bob's node is its real pieces against a fake server whose FINGER of carol, a first
contact, hangs until the test lets it answer (tests/overlay/test_stale_keys_aside.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from overlay.content.catalog import ContentStore
from overlay.mail.db import NodeDB
from overlay.mail.inbox_state import InboxState
from rendezvous.records import DeviceInfo, FingerResult

from .test_incoming_trust import ALICE1
from .test_stale_keys import BobNode, bob_sent_to_alice, message_from
from .test_stale_keys_aside import CAROL, CAROL1, HangingLookups, ids, push


def told(bob: BobNode) -> tuple[list[tuple[bytes, InboxState]], asyncio.Event]:
    """What `on_arrived` is told, with each message's state at that moment, and an event
    set at each call."""
    calls: list[tuple[bytes, InboxState]] = []
    called = asyncio.Event()

    def arrived(message_id: bytes) -> None:
        entry = bob.inbox.get(message_id)
        assert entry is not None
        calls.append((message_id, entry.state))
        called.set()
    bob.delivery.on_arrived = arrived
    return calls, called


async def carols(address: str) -> FingerResult:
    return FingerResult(address, (DeviceInfo(CAROL1.public.verify_key, True, None, {}),))


@pytest.mark.parametrize("end", ["answers", "fails", "cancelled"])
async def test_a_first_contacts_message_is_told_once_its_lookup_ended(
        db: NodeDB, store: ContentStore, tmp_path: Path, end: str) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    calls, called = told(bob)
    hang = HangingLookups(bob, {CAROL}, answers=carols)
    pushing = await push(bob, message_from(CAROL1, 9, CAROL), message_from(ALICE1, 1))
    async with asyncio.timeout(10):
        await hang.asked_for(1)
        await called.wait()  # alice's, a pinned key's: no lookup, told at once
    assert calls == [(ids(1)[0], InboxState.OFFERED)]  # carol's not yet: looked up
    if end == "cancelled":
        pushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pushing
    else:
        hang.fail = end == "fails"
        hang.answer.set()
        async with asyncio.timeout(10):
            await pushing
    want = InboxState.OFFERED if end == "answers" else InboxState.UNVERIFIED
    assert calls == [(ids(1)[0], InboxState.OFFERED), (ids(9)[0], want)]
