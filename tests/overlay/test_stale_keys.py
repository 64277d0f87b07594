"""A contact's pinned device key is believed only as long as a lookup of its address
(FINGER) said, within KEYS_FRESH, that it is still bound. Past that, what it signs waits
for one lookup: a device the operator revoked since is retired then, though bob never
sent to alice again (its message is held unverified, its `downloaded` receipt dropped, so
bob's file stays for alice's real device). Within KEYS_FRESH nothing is looked up (as
before), and a lookup that fails leaves the pinned keys believed: the mail is filed, with
one warning, and the node asks again until its server answers.

Bob's node here is its real pieces (node.db, contacts, inbox, outbox, store, retention,
`Delivery` reading the pushes) on a clock the test moves, against a server that answers
FINGER with the devices it lists now: alice's phone ALICE1 and her laptop ALICE2, which
is stolen."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from crypto.envelope import seal_for_recipients
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import KEYS_FRESH, Contacts
from overlay.mail.db import _MIGRATIONS, SCHEMA_VERSION, NodeDB
from overlay.mail.delivery import Delivery
from overlay.mail.inbox import Inbox
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import RECEIPT_KIND, Receipt
from rendezvous.backoff import Backoff
from rendezvous.client import Deliver, Envelope
from rendezvous.records import DeviceInfo

from .test_incoming_trust import ALICE, ALICE1, ALICE2, BOB, K1, K2, pushed
from .test_retired_keys import _sent_once, _Server

ME = "bob@example.net"


class Clock:
    """The wall clock alice's node reads; the test moves it (and, with `tick`, so does
    each reading)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.tick = 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@dataclass
class BobNode:
    clock: Clock
    server: _Server
    delivery: Delivery
    incoming: IncomingMail
    outbox: Outbox
    inbox: Inbox
    clip: Path
    sent_id: bytes

    async def receive(self, *envelopes: Envelope) -> None:
        """Bob's server pushes `envelopes`; his node reads them all."""
        self.server.queued = [Deliver(e) for e in envelopes]
        await self.delivery.pushes()

    def alice_state(self) -> RecipientStatus:
        entry = self.outbox.get(self.sent_id)
        assert entry is not None
        (alice,) = entry.recipients
        return alice.state


async def bob_sent_to_alice(db: NodeDB, store: ContentStore, tmp_path: Path,
                            *listed: DeviceIdentity) -> BobNode:
    """Bob (retention `delete`) sent alice a clip at 1000.0, pinning `listed` (the send's
    FINGER, not counted)."""
    clock = Clock(1000.0)
    clip, server, _ = await _sent_once(db, store, tmp_path, *listed, wall=clock,
                                       me=(BOB, ME), to=ALICE)
    server.fingers = 0  # the send's own
    server.answered.clear()
    prefs = Prefs(db)
    prefs.retention = "delete"
    inbox, outbox = Inbox(db), Outbox(db)
    incoming = IncomingMail(BOB, ME, inbox, outbox, prefs, Contacts(db), wall=clock)

    async def withdraw(content_id: bytes) -> None:
        return None

    delivery = Delivery(cast(Any, server), incoming, outbox, store, prefs,
                        cast(Any, SimpleNamespace(wake=lambda: None)),
                        archive=tmp_path / "archive", on_pipe=lambda m: False,
                        on_relay=lambda i: None, withdraw=withdraw,
                        lookup_backoff=Backoff(0.01, 0.05), rng=random.Random(1))
    (sent,) = outbox.list()
    return BobNode(clock, server, delivery, incoming, outbox, inbox, clip, sent.id)


def message_from(device: DeviceIdentity, n: int, sender: str = ALICE) -> Envelope:
    """A location message alice's (or `sender`'s) `device` signed, for bob, as his server
    pushes it."""
    p = pushed(n, device, sender)
    return Envelope(p.message_id, p.sender, ME, BOB.peer_id, 0, p.blob, 0.0)


def receipt_from(device: DeviceIdentity, message_id: bytes,
                 state: str = "downloaded") -> Envelope:
    body = Receipt(message_id, state, 1_700_000_000).encode()
    ((_, blob),) = seal_for_recipients(device, RECEIPT_KIND, body, [BOB.public])
    return Envelope(os.urandom(16), ALICE, ME, BOB.peer_id, 0, blob, 0.0)


def state_of(bob: BobNode, n: int) -> InboxState:
    entry = bob.inbox.get(n.to_bytes(16, "big"))
    assert entry is not None
    return entry.state


@pytest.mark.parametrize("more", [0, 16])
async def test_a_device_revoked_since_the_last_lookup_is_retired_by_what_it_signs(
        db: NodeDB, store: ContentStore, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        more: int) -> None:
    """`more`: alice's server lists that many other devices too, none vouched for. 16 (17
    listed, more than a contact holds: a foreign domain's server may list up to 256) was
    taken as a failed lookup: the stolen laptop believed for ever, alice never confirmed."""
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    bob.server.listed = bob.server.listed[:1] + tuple(  # the operator revoked ALICE2 (stolen)
        DeviceInfo(DeviceIdentity.from_seed(bytes([0x40 + n]) * 32).public.verify_key,
                   True, None, {}) for n in range(more))
    bob.clock.now += KEYS_FRESH + 1  # bob never sent to alice again

    await bob.receive(message_from(ALICE2, 1), receipt_from(ALICE2, bob.sent_id))
    assert state_of(bob, 1) is InboxState.UNVERIFIED  # OFFERED on the old code
    # the thief's "downloaded": dropped, and bob's file stays for alice's real device
    assert bob.alice_state() is RecipientStatus.SENT  # DOWNLOADED on the old code
    assert bob.clip.exists()
    assert bob.incoming.counters["dropped-receipt-untrusted"] == 1
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.keys == (K1,)
    assert contact.retired_keys == (K2,)
    assert contact.keys_confirmed_at == bob.clock.now
    assert len(contact.unvouched_keys) == more  # shown, not trusted
    assert bob.server.fingers == 1  # one lookup for both envelopes
    assert f"{ALICE}: its server no longer lists some device key(s) you trusted" \
        in caplog.text
    assert "not confirmed" not in caplog.text and "not checked" not in caplog.text
    if more:
        assert f"{ALICE}: its server lists 17 devices, more than the 16 a contact holds: " \
               "16 of them are not trusted" in caplog.text

    # alice's remaining device: believed without another lookup within KEYS_FRESH;
    # retention runs
    bob.clock.now += KEYS_FRESH - 1
    await bob.receive(message_from(ALICE1, 2), receipt_from(ALICE1, bob.sent_id))
    assert state_of(bob, 2) is InboxState.OFFERED
    assert bob.alice_state() is RecipientStatus.DOWNLOADED and not bob.clip.exists()
    assert bob.server.fingers == 1


async def test_a_revoked_only_device_is_retired_when_its_server_lists_none(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1)
    bob.server.listed = ()  # alice's only device revoked: FINGER lists no device
    bob.clock.now += KEYS_FRESH + 1

    await bob.receive(message_from(ALICE1, 1), receipt_from(ALICE1, bob.sent_id))
    assert state_of(bob, 1) is InboxState.UNVERIFIED
    assert bob.alice_state() is RecipientStatus.SENT and bob.clip.exists()
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.keys == ()
    assert contact.retired_keys == (K1,)


async def test_within_keys_fresh_the_pinned_keys_are_believed_without_a_lookup(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    bob.server.listed = bob.server.listed[:1]  # revoked, but bob can't know yet
    bob.clock.now += KEYS_FRESH - 1

    await bob.receive(message_from(ALICE2, 1), receipt_from(ALICE2, bob.sent_id))
    assert state_of(bob, 1) is InboxState.OFFERED
    # Alice's other device, still trusted, may fetch it yet: the clip stays for it.
    assert bob.alice_state() is RecipientStatus.DOWNLOADED and bob.clip.exists()
    assert bob.server.fingers == 0
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.retired_keys == ()


async def test_a_lookup_that_retires_the_device_retention_waited_for_lets_it_go(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """Alice's second device has bob's clip, her first not yet: bob's `delete` waits for
    it. Her server stops listing the first (revoked); past KEYS_FRESH a message from the
    second makes bob look her up, which retires the first's key, and the clip goes then.
    It stayed (nothing else ran the retention pass) before a retiring lookup ran one."""
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    await bob.receive(receipt_from(ALICE2, bob.sent_id))
    assert bob.alice_state() is RecipientStatus.DOWNLOADED and bob.clip.exists()

    bob.server.listed = bob.server.listed[1:]  # ALICE1 revoked
    bob.clock.now += KEYS_FRESH + 1
    await bob.receive(message_from(ALICE2, 1))
    assert bob.server.fingers == 1 and state_of(bob, 1) is InboxState.OFFERED
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.retired_keys == (K1,)
    assert not bob.clip.exists()


async def test_a_lookup_that_fails_leaves_the_pinned_keys_believed_and_is_asked_again(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    bob.clock.now += KEYS_FRESH + 1
    bob.server.unreachable = True  # alice's domain down

    await bob.receive(message_from(ALICE2, 1), message_from(ALICE1, 2),
                      receipt_from(ALICE2, bob.sent_id))
    # filed as before, not held, not lost; one lookup tried, one warning
    assert (state_of(bob, 1), state_of(bob, 2)) == (InboxState.OFFERED, InboxState.OFFERED)
    assert bob.alice_state() is RecipientStatus.DOWNLOADED
    assert bob.server.fingers == 1
    assert caplog.text.count(f"could not look up the keys of {ALICE}: the devices "
                             "trusted for it stay trusted until a lookup succeeds") == 1

    # the domain is back, ALICE2 revoked meanwhile: the node's own retry of the lookup,
    # with nothing more from alice, retires it
    bob.server.unreachable = False
    bob.server.listed = bob.server.listed[:1]
    looking = asyncio.create_task(bob.delivery.lookups())
    try:
        async with asyncio.timeout(10):
            await bob.server.answered.wait()
    finally:
        looking.cancel()
        await asyncio.wait({looking})
    contact = Contacts(db).get(ALICE)
    assert contact is not None and contact.retired_keys == (K2,)
    assert not bob.incoming.unconfirmed
    await bob.receive(message_from(ALICE2, 3))
    assert state_of(bob, 3) is InboxState.UNVERIFIED


def test_an_older_node_db_opens_with_its_contacts_taken_as_not_confirmed(
        tmp_path: Path) -> None:
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 6}
    with NodeDB.open(tmp_path, migrations=steps) as old, old.transaction() as conn:
        assert old.schema_version == 6
        conn.execute("INSERT INTO contact VALUES (?, ?, ?, ?)", (ALICE, 10.0, 20.0, 0))
        conn.execute("INSERT INTO contact_key VALUES (?, ?, ?, ?)", (ALICE, K1, "pinned", 10.0))
    with NodeDB.open(tmp_path) as db:
        assert db.schema_version == SCHEMA_VERSION
        contacts = Contacts(db)
        contact = contacts.get(ALICE)
        assert contact is not None and contact.keys == (K1,)
        assert contact.keys_confirmed_at is None
        assert contacts.needs_confirming(ALICE, K1, 30.0)  # when it was confirmed: unknown
        contacts.pin_keys(ALICE, [K1], 50.0)
        assert not contacts.needs_confirming(ALICE, K1, 50.0 + KEYS_FRESH)
        assert contacts.needs_confirming(ALICE, K1, 50.0 + KEYS_FRESH + 1)
        assert contacts.needs_confirming(ALICE, K1, 50.0 - KEYS_FRESH - 1)  # clock set back
        # a key not pinned needs no confirming: it is not believed anyway
        assert not contacts.needs_confirming(ALICE, K2, 1e9)


async def test_an_envelope_taken_while_another_waits_for_the_lookup_waits_for_it_too(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """The push loop and the retry of an envelope left at the server (`unstored`) take
    envelopes at once. The thief's message waits for alice's lookup; his `downloaded`
    receipt, taken meanwhile, was believed at once without one (the lookup in flight was
    taken for its own, failed): counted, and bob's file deleted before alice had it. It
    waits for that lookup (one per sender at a time), then is judged on its answer."""
    bob = await bob_sent_to_alice(db, store, tmp_path, ALICE1, ALICE2)
    bob.server.listed = bob.server.listed[:1]  # the operator revoked ALICE2 (stolen)
    bob.clock.now += KEYS_FRESH + 1
    answer = asyncio.Event()
    asked: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]  # first, second FINGER
    finger = bob.server.finger

    async def slow_finger(address: str) -> Any:
        for ask in asked:
            if not ask.is_set():
                ask.set()
                break
        await answer.wait()
        return await finger(address)

    bob.server.finger = slow_finger  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        first = asyncio.create_task(bob.delivery._take(message_from(ALICE2, 1)))
        await asked[0].wait()  # the message waits for its lookup
        second = asyncio.create_task(bob.delivery._take(receipt_from(ALICE2, bob.sent_id)))
        # the receipt taken meanwhile, at its first step: judged at once, asking a lookup
        # of its own, or waiting for the one that runs
        await asyncio.sleep(0)
        assert not second.done() and not asked[1].is_set()
        assert bob.delivery.waiting == 2
        answer.set()
        await asyncio.gather(first, second)
    assert bob.server.fingers == 1 and bob.delivery.waiting == 0
    assert state_of(bob, 1) is InboxState.UNVERIFIED
    assert bob.alice_state() is RecipientStatus.SENT  # DOWNLOADED on the parent
    assert bob.clip.exists()
    assert bob.incoming.counters["dropped-receipt-untrusted"] == 1
