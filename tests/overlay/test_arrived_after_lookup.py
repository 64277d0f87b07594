"""`Delivery.on_arrived` (what runs `node --on-message`'s `arrived`) tells of a first
contact's message once the lookup of its sender ended, with the state it has then: the
lookup answers (`offered`) or fails (`unverified`). Once each, and a message that needs no
lookup is told at once. A node stopped while that lookup runs tells nothing (it told
`unverified`, and never again): the envelope stays at the server, and its push at the next
start runs the lookup again and tells it then. A message told but whose command the stop
cut short is told again at the next start (`tell_due`), and one told to the end never.
`info`'s counter `unverified` counts a message held once it settled, not a first
contact's that went on to `offered`.

Bob's node is its real pieces against a fake server whose FINGER of carol, a first
contact, hangs until the test lets it answer (tests/overlay/test_stale_keys_aside.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from overlay.content.catalog import ContentStore
from overlay.mail.db import NodeDB
from overlay.mail.inbox import InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import Pushed
from rendezvous.records import DeviceInfo, FingerResult

from .test_incoming_trust import ALICE1
from .test_stale_keys import BobNode, bob_sent_to_alice, message_from, state_of
from .test_stale_keys_aside import CAROL, CAROL1, HangingLookups, ids, push


def told(bob: BobNode) -> tuple[list[tuple[bytes, InboxState]], asyncio.Event]:
    """What `on_arrived` is told, with each message's state as told and as stored at that
    moment (they must agree), and an event set at each call. Not marked told: the node
    marks it once the command ran."""
    calls: list[tuple[bytes, InboxState]] = []
    called = asyncio.Event()

    def arrived(entry: InboxEntry) -> None:
        stored = bob.inbox.get(entry.id)
        assert stored is not None and stored.state is entry.state
        calls.append((entry.id, entry.state))
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
        assert calls == [(ids(1)[0], InboxState.OFFERED)]  # carol's: not settled
        assert hang.removed == ids(1)  # carol's left at the server
        # The next start: the server pushes carol's again, and her server answers now.
        hang.answer.set()
        async with asyncio.timeout(10):
            await (await push(bob, message_from(CAROL1, 9, CAROL)))
    else:
        hang.fail = end == "fails"
        hang.answer.set()
        async with asyncio.timeout(10):
            await pushing
    want = InboxState.OFFERED if end in ("answers", "cancelled") else InboxState.UNVERIFIED
    assert calls == [(ids(1)[0], InboxState.OFFERED), (ids(9)[0], want)]
    assert sorted(hang.removed) == sorted(ids(1, 9))
    # Counted once, as it settled: carol's `unverified` only while her lookup fails.
    assert bob.incoming.counters["unverified"] == (end == "fails")
    assert bob.incoming.counters["received"] == 2


async def test_an_arrival_cut_short_is_told_again_at_the_next_start_and_one_told_never(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    calls, _ = told(bob)
    HangingLookups(bob, set())
    await bob.receive(message_from(ALICE1, 1), message_from(ALICE1, 2))
    assert calls == [(i, InboxState.OFFERED) for i in ids(1, 2)]
    bob.inbox.arrival_told(ids(1)[0])  # 1's command ran; the node stopped during 2's

    calls.clear()
    bob.delivery.tell_due()  # the next start
    assert calls == [(ids(2)[0], InboxState.OFFERED)]
    # Pushed again (its REMOVE lost): a duplicate, told nothing.
    await bob.receive(message_from(ALICE1, 1), message_from(ALICE1, 2))
    bob.inbox.arrival_told(ids(2)[0])
    bob.delivery.tell_due()
    assert calls == [(ids(2)[0], InboxState.OFFERED)]


@pytest.mark.parametrize("fails", [False, True])
async def test_info_counts_a_first_contacts_message_once_in_the_state_it_settled_in(
        db: NodeDB, store: ContentStore, tmp_path: Path, fails: bool) -> None:
    """`peerpost info` showed `unverified 1` for every first contact's message that went
    on to `offered` as its sender's lookup answered."""
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    hang = HangingLookups(bob, {CAROL}, answers=carols)
    hang.fail = fails
    hang.answer.set()
    async with asyncio.timeout(10):
        await bob.receive(message_from(CAROL1, 9, CAROL))
    entry = bob.inbox.get(ids(9)[0])
    assert entry is not None
    assert entry.state is (InboxState.UNVERIFIED if fails else InboxState.OFFERED)
    assert dict(bob.incoming.counters) == (
        {"received": 1, "unverified": 1, "key-check-failed": 1} if fails
        else {"received": 1})


async def test_an_arrival_whose_envelope_is_not_pushed_again_is_told_at_the_next_start(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """Filed, then the node stopped before it was settled, and the server will not push
    the envelope again (it expired there): told all the same, once, as it settles."""
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    for envelope in (message_from(CAROL1, 9, CAROL), message_from(ALICE1, 1)):
        bob.incoming.handle(Pushed(envelope.message_id, envelope.sender, envelope.blob))
    assert state_of(bob, 9) is InboxState.UNVERIFIED
    calls, called = told(bob)
    hang = HangingLookups(bob, {CAROL}, answers=carols)
    hang.answer.set()

    bob.delivery.tell_due()  # the next start: alice's is settled already
    assert calls == [(ids(1)[0], InboxState.OFFERED)]
    called.clear()
    looking = asyncio.create_task(bob.delivery.lookups())
    try:
        async with asyncio.timeout(10):
            await called.wait()
    finally:
        looking.cancel()
    assert calls == [(ids(1)[0], InboxState.OFFERED), (ids(9)[0], InboxState.OFFERED)]
