"""A lookup of one sender does not hold up the others' mail. An envelope signed by a
contact's key whose trust is older than KEYS_FRESH waits for a FINGER of its sender; when
that server is slow or down the FINGER takes up to the link's timeout, and the push loop
waited for it, so every message behind it, from anyone, waited too. Now such an envelope
is set aside and judged when its lookup answers (or fails: the pinned keys believed, as
before); the loop goes on, and so it does past a first contact's lookup. Still: one
sender's envelopes are filed in the order taken, none is believed before the lookup, each
is acknowledged once, after it is stored (a node stopped meanwhile loses nothing), and at
most MAX_LOOKUPS lookups run at once.

Bob's node is its real pieces (node.db, contacts, inbox, `Delivery` reading the pushes)
against a fake server whose FINGER of the stale senders hangs until the test lets it
answer. Carol's keys were confirmed a moment ago: her message needs no lookup, and its
download being woken shows the push loop took it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import KEYS_FRESH, Contacts
from overlay.mail.db import NodeDB
from overlay.mail.delivery import MAX_LOOKUPS
from overlay.mail.inbox_state import InboxState
from rendezvous.client import Deliver, Envelope, RendezvousError
from rendezvous.records import DeviceInfo, FingerResult
from rendezvous.status import Status

from .test_incoming_trust import ALICE, ALICE1, ALICE2
from .test_stale_keys import BobNode, bob_sent_to_alice, message_from, state_of

CAROL = "carol@example.org"
CAROL1 = DeviceIdentity.from_seed(b"c" * 32)


class HangingLookups:
    """FINGER of the addresses in `stale` waits for `answer`, then answers (`answers`, or
    the server's list) or, with `fail`, as an unreachable domain does; counts how many
    wait at once. REMOVEs are recorded."""

    def __init__(self, bob: BobNode, stale: set[str],
                 answers: Callable[[str], Awaitable[FingerResult]] | None = None) -> None:
        self.stale = stale
        self.answer = asyncio.Event()
        self.fail = False
        self.asked: list[str] = []
        self.hanging = self.most = 0
        self.removed: list[bytes] = []
        self._finger = answers or bob.server.finger
        self._asked = asyncio.Event()
        bob.server.finger = self.finger  # type: ignore[method-assign]
        bob.server.remove = self.remove  # type: ignore[method-assign]

    async def finger(self, address: str) -> FingerResult:
        if address in self.stale:
            self.asked.append(address)
            self._asked.set()
            self.hanging += 1
            self.most = max(self.most, self.hanging)
            try:
                await self.answer.wait()
            finally:
                self.hanging -= 1
            if self.fail:
                raise RendezvousError(Status.UNAVAILABLE, "no server found for the domain")
        return await self._finger(address)

    async def asked_for(self, n: int) -> None:
        while len(self.asked) < n:
            self._asked.clear()
            await self._asked.wait()

    async def remove(self, message_id: bytes) -> None:
        self.removed.append(message_id)


async def stale_alice_and_fresh_carol(db: NodeDB, store: ContentStore,
                                      tmp_path: Path) -> BobNode:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    bob.clock.now += KEYS_FRESH + 1  # alice's keys not confirmed for more than KEYS_FRESH
    Contacts(db).pin_keys(CAROL, [CAROL1.public.verify_key], bob.clock.now)
    return bob


@contextmanager
def woken_downloads(bob: BobNode) -> Iterator[asyncio.Event]:
    """Set when the push loop wakes the download queue: a new message is in the inbox."""
    woken = asyncio.Event()
    downloads, bob.delivery.downloads = bob.delivery.downloads, \
        SimpleNamespace(wake=woken.set)  # type: ignore[assignment]
    try:
        yield woken
    finally:
        bob.delivery.downloads = downloads


async def push(bob: BobNode, *envelopes: Envelope) -> asyncio.Task[None]:
    bob.server.queued = [Deliver(e) for e in envelopes]
    return asyncio.create_task(bob.delivery.pushes())


async def until_carols_is_in(bob: BobNode, woken: asyncio.Event,
                             pushing: asyncio.Task[None]) -> None:
    """Carol's message is in the inbox (5 s at most: the parent never got there)."""
    waiting = asyncio.create_task(woken.wait())
    await asyncio.wait({waiting, pushing}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert woken.is_set(), "carol's message waited for another sender's lookup"
    assert state_of(bob, 9) is InboxState.OFFERED


async def finished(pushing: asyncio.Task[None], hang: HangingLookups) -> None:
    """Let the hanging lookups answer; the push loop ends once all it took is judged."""
    hang.answer.set()
    async with asyncio.timeout(10):
        await pushing


def ids(*ns: int) -> list[bytes]:
    return [n.to_bytes(16, "big") for n in ns]


@pytest.mark.parametrize("fails", [False, True])
async def test_a_fresh_senders_message_is_filed_while_a_stale_senders_lookup_hangs(
        db: NodeDB, store: ContentStore, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        fails: bool) -> None:
    bob = await stale_alice_and_fresh_carol(db, store, tmp_path)
    hang = HangingLookups(bob, {ALICE})
    hang.fail = fails
    taken = bob.clock.now
    with woken_downloads(bob) as woken:
        pushing = await push(bob, message_from(ALICE1, 1), message_from(CAROL1, 9, CAROL))
        try:
            await until_carols_is_in(bob, woken, pushing)
            # alice's waits for her lookup: not filed, not acknowledged
            assert hang.asked == [ALICE] and hang.hanging == 1
            assert bob.inbox.get(ids(1)[0]) is None and bob.delivery.waiting == 1
            assert hang.removed == ids(9)
            bob.clock.now += 9  # her server answers 9 s later
        finally:
            await finished(pushing, hang)
    # Both in the inbox at the time they came, alice's not after carol's, which came later.
    received = {e.id: e.received_at for e in bob.inbox.list()}
    assert received == {ids(1)[0]: taken, ids(9)[0]: taken}
    # filed once the lookup answered, or failed (the pinned key believed as before)
    assert state_of(bob, 1) is InboxState.OFFERED
    assert sorted(e.id for e in bob.inbox.list()) == ids(1, 9)  # each once, nothing lost
    assert hang.removed == ids(9, 1) and bob.delivery.waiting == 0
    assert hang.asked == [ALICE]
    warned = caplog.text.count(f"could not look up the keys of {ALICE}: the devices "
                               "trusted for it stay trusted until a lookup succeeds")
    assert warned == (1 if fails else 0)
    contact = Contacts(db).get(ALICE)
    assert contact is not None
    assert (contact.keys_confirmed_at == bob.clock.now) is not fails


async def test_two_envelopes_of_a_stale_sender_wait_for_its_lookup_and_keep_their_order(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """Both signed by alice's stolen laptop, revoked since her keys were last confirmed:
    either believed before the lookup would be offered. Her later message has the lower
    id, so an inbox that got them in the wrong order lists them the wrong way round."""
    bob = await stale_alice_and_fresh_carol(db, store, tmp_path)
    bob.server.listed = bob.server.listed[:1]  # the operator revoked ALICE2
    bob.clock.tick = 1.0  # each filing at its own time
    hang = HangingLookups(bob, {ALICE})
    with woken_downloads(bob) as woken:
        pushing = await push(bob, message_from(ALICE2, 2), message_from(ALICE2, 1),
                             message_from(CAROL1, 9, CAROL))
        try:
            await until_carols_is_in(bob, woken, pushing)
            assert [bob.inbox.get(i) for i in ids(2, 1)] == [None, None]
            assert bob.delivery.waiting == 2 and hang.asked == [ALICE]
            assert hang.removed == ids(9)
        finally:
            await finished(pushing, hang)
    assert (state_of(bob, 2), state_of(bob, 1)) == (InboxState.UNVERIFIED,) * 2
    first, second = (bob.inbox.get(i) for i in ids(2, 1))
    assert first is not None and second is not None
    assert first.received_at < second.received_at
    # Newest first, by the time each came: carol's was taken last, filed first.
    assert [e.id for e in bob.inbox.list()] == ids(9, 1, 2)
    assert sorted(hang.removed) == sorted(ids(1, 2, 9)) and len(hang.removed) == 3
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.retired_keys == (ALICE2.public.verify_key,)


async def test_no_more_than_max_lookups_run_at_once(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Ten stale contacts write at once, their servers slow: eight FINGERs wait, the other
    two lookups wait for a slot, carol's message goes in, and all ten are filed after."""
    caplog.set_level(logging.WARNING)
    bob = await stale_alice_and_fresh_carol(db, store, tmp_path)
    senders = {f"friend{n}@example.com": DeviceIdentity.from_seed(bytes([0x60 + n]) * 32)
               for n in range(10)}
    contacts = Contacts(db)
    for address, device in senders.items():
        contacts.pin_keys(address, [device.public.verify_key], bob.clock.now - KEYS_FRESH - 1)
    listed = {a: (DeviceInfo(d.public.verify_key, True, None, {}),)
              for a, d in senders.items()}

    async def their_servers(address: str) -> FingerResult:
        return FingerResult(address, listed[address])

    hang = HangingLookups(bob, set(senders), their_servers)
    with woken_downloads(bob) as woken:
        pushing = await push(bob, *(message_from(d, 20 + n, a)
                                    for n, (a, d) in enumerate(senders.items())),
                             message_from(CAROL1, 9, CAROL))
        try:
            await until_carols_is_in(bob, woken, pushing)
            async with asyncio.timeout(5):
                await hang.asked_for(MAX_LOOKUPS)
            for _ in range(20):  # the other two had their chance to ask
                await asyncio.sleep(0)
            assert hang.hanging == MAX_LOOKUPS == 8 and bob.delivery.waiting == 10
        finally:
            await finished(pushing, hang)
    assert hang.most == MAX_LOOKUPS
    assert sorted(hang.asked) == sorted(senders)  # each once
    assert {state_of(bob, 20 + n) for n in range(10)} == {InboxState.OFFERED}
    assert sorted(hang.removed) == sorted(ids(9, *range(20, 30)))
    assert "could not look up" not in caplog.text


async def test_a_first_contacts_lookup_that_hangs_holds_up_no_one_else(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """Dave writes for the first time: his message is filed held (unverified) at once and
    acknowledged only after the lookup that may trust his key, which hangs meanwhile."""
    bob = await stale_alice_and_fresh_carol(db, store, tmp_path)
    dave, dave1 = "dave@example.com", DeviceIdentity.from_seed(b"d" * 32)

    async def daves_server(address: str) -> FingerResult:
        return FingerResult(address, (DeviceInfo(dave1.public.verify_key, True, None, {}),))

    hang = HangingLookups(bob, {dave}, daves_server)
    with woken_downloads(bob) as woken:
        pushing = await push(bob, message_from(dave1, 1, dave), message_from(CAROL1, 9, CAROL))
        try:
            await until_carols_is_in(bob, woken, pushing)
            assert hang.asked == [dave] and state_of(bob, 1) is InboxState.UNVERIFIED
            assert hang.removed == ids(9)
        finally:
            await finished(pushing, hang)
    assert state_of(bob, 1) is InboxState.OFFERED  # his server listed the key: trusted
    assert hang.removed == ids(9, 1) and hang.asked == [dave]


async def test_a_node_stopped_while_a_lookup_hangs_loses_nothing(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """The push loop cancelled (the node stops) while alice's lookup hangs: her message
    is neither filed nor acknowledged, so the server pushes it again at the next login,
    and then it is filed once."""
    bob = await stale_alice_and_fresh_carol(db, store, tmp_path)
    hang = HangingLookups(bob, {ALICE})
    with woken_downloads(bob) as woken:
        pushing = await push(bob, message_from(ALICE1, 1), message_from(CAROL1, 9, CAROL))
        try:
            await until_carols_is_in(bob, woken, pushing)
        finally:
            pushing.cancel()
            await asyncio.wait({pushing})
    assert pushing.cancelled() and hang.hanging == 0  # the lookup ended with the loop
    assert bob.inbox.get(ids(1)[0]) is None and hang.removed == ids(9)
    assert bob.delivery.waiting == 0

    hang.answer.set()  # the next login: alice's server answers
    await bob.receive(message_from(ALICE1, 1), message_from(CAROL1, 9, CAROL))
    assert state_of(bob, 1) is InboxState.OFFERED
    assert sorted(e.id for e in bob.inbox.list()) == ids(1, 9)
    assert hang.removed == ids(9, 9, 1)  # carol's again: a duplicate, acknowledged
