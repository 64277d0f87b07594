"""A contact's device key its server no longer lists (the operator revoked the device) is
retired: never sealed to again, even when the contact's domain is out of reach, and what it
signs (a message, a receipt) is believed no more than a stranger's. A send that leaves no
trusted key fails with the address and what to do, and records nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from crypto.identity import DeviceIdentity
from crypto.vouch import make_vouch
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import Outcome
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.outgoing import MailSender, SendError
from rendezvous.client import Deliver, RendezvousError
from rendezvous.records import DeviceInfo, FingerResult
from rendezvous.status import Status
from tests.present import present

from .test_incoming_trust import ALICE, ALICE1, ALICE2, K1, K2, pushed, receiver
from .test_receipts_hostile import MID, bob, receipt
from .test_receipts_hostile import alice as alice  # the fixture: alice's node, bob pinned

SENDER = DeviceIdentity.from_seed(b"\x01" * 32)
BOB1, BOB2, BOB3 = (DeviceIdentity.from_seed(bytes([n]) * 32) for n in (0x21, 0x22, 0x23))


class _Server:
    """FINGER answers with the devices listed now (or the domain is unreachable), and
    counts them (`answered` is set once one is answered); SENDs are kept; `pushes` hands
    over what `queued` holds, then ends."""

    def __init__(self, *listed: DeviceIdentity) -> None:
        self.listed: tuple[DeviceInfo, ...] = tuple(
            DeviceInfo(d.public.verify_key, True, None, {}) for d in listed)
        self.unreachable = False
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fingers = 0
        self.answered = asyncio.Event()
        self.queued: list[Deliver] = []

    async def finger(self, address: str) -> FingerResult:
        self.fingers += 1
        if self.unreachable:
            raise RendezvousError(Status.UNAVAILABLE, "b.test is unreachable: no server found")
        self.answered.set()
        return FingerResult(address, self.listed)

    async def send(self, message_id: bytes, items: list[Any]) -> None:
        self.sent += items

    async def pushes(self) -> AsyncIterator[Deliver]:
        while self.queued:
            yield self.queued.pop(0)

    async def remove(self, message_id: bytes) -> None:
        return None


async def _sent_once(db: NodeDB, store: ContentStore, tmp_path: Path,
                     *listed: DeviceIdentity, wall: Callable[[], float] = lambda: 1000.0,
                     me: tuple[DeviceIdentity, str] = (SENDER, "alice@a.test"),
                     to: str = "bob@b.test") -> tuple[Path, _Server, MailSender]:
    """A clip, bob's server listing `listed`, and alice's sender, which sent bob the clip
    once (first contact: `listed` are pinned). `me` and `to` name others."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"x" * 5000)
    server = _Server(*listed)
    sender = MailSender(*me, rendezvous=cast(Any, server), store=store,
                        contacts=Contacts(db), outbox=Outbox(db), announce=lambda c: None,
                        direct_addresses=list, home_server="a.test", wall=wall)
    await sender.send(clip, [to], "t", "")
    return clip, server, sender


async def test_a_revoked_device_is_not_sealed_to_even_while_its_domain_is_away(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    clip, server, sender = await _sent_once(db, store, tmp_path, BOB1, BOB2)
    assert {peer for _, peer, _ in server.sent} == {BOB1.peer_id, BOB2.peer_id}

    server.listed, server.sent = server.listed[:1], []  # the operator revoked BOB2
    await sender.send(clip, ["bob@b.test"], "t", "")
    assert [peer for _, peer, _ in server.sent] == [BOB1.peer_id]
    contact = Contacts(db).get("bob@b.test")
    assert contact is not None and contact.keys == (BOB1.public.verify_key,)
    assert contact.retired_fingerprints == (BOB2.public.fingerprint(),)
    assert contact.retired_at == (1000.0,)

    # b.test out of reach: sealed to the pinned keys, the retired one not among them
    # (sealed to both on the old code)
    server.unreachable, server.sent = True, []
    await sender.send(clip, ["bob@b.test"], "t", "")
    assert [peer for _, peer, _ in server.sent] == [BOB1.peer_id]


async def test_a_send_with_no_trusted_key_left_fails_and_records_nothing(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    clip, server, sender = await _sent_once(db, store, tmp_path, BOB1)
    # BOB1 revoked; the server lists a new key, vouched for by the revoked one (whoever
    # holds the lost device can make that vouch)
    vouch = make_vouch(BOB1, "bob@b.test", BOB3.public.verify_key).to_bytes()
    server.listed = (DeviceInfo(BOB3.public.verify_key, True, None, {}, vouch),)
    server.sent = []
    before = Outbox(db).list()
    with pytest.raises(SendError) as err:
        await sender.send(clip, ["bob@b.test"], "t", "")
    text = str(err.value)
    assert "bob@b.test" in text and "CHANGED" in text and "no longer lists" in text
    assert "`peerpost contacts`" in text and "`peerpost contacts accept bob@b.test`" in text
    assert "nothing was sent" in text
    assert server.sent == [] and Outbox(db).list() == before
    assert Contacts(db).trusted_keys("bob@b.test") == frozenset()
    # the domain away now: nothing pinned is left to seal to either
    server.unreachable = True
    with pytest.raises(SendError) as err:
        await sender.send(clip, ["bob@b.test"], "t", "")
    assert "no key of bob@b.test is trusted" in str(err.value)
    assert "`peerpost contacts accept bob@b.test`" in str(err.value)
    assert server.sent == [] and Outbox(db).list() == before


def test_mail_signed_by_a_retired_key_is_held_unverified(db: NodeDB) -> None:
    mail, inbox, contacts = receiver(db, known=False)
    contacts.pin_keys(ALICE, [K1, K2], 1.0)
    mail.recheck_keys(ALICE, [K1])  # FINGER: ALICE2 is no longer listed
    outcome, _ = mail.handle(pushed(1, ALICE2))
    assert outcome is Outcome.UNVERIFIED  # NEW on the old code
    held = inbox.get((1).to_bytes(16, "big"))
    assert held is not None and held.state is InboxState.UNVERIFIED
    assert mail.key_checks == {ALICE}
    assert mail.recheck_keys(ALICE, [K1]) == []  # looked up: still not listed, still held
    assert present(inbox.get((1).to_bytes(16, "big"))).state is InboxState.UNVERIFIED
    assert mail.handle(pushed(2, ALICE1))[0] is Outcome.NEW
    c = contacts.get(ALICE)
    assert c is not None and c.retired_keys == (K2,) and c.unvouched_keys == ()


def test_a_receipt_signed_by_a_retired_key_is_dropped(alice: Any) -> None:
    mail, outbox = alice
    bob1, bob2 = DeviceIdentity.from_seed(b"b" * 32), DeviceIdentity.from_seed(b"B" * 32)
    vouch = make_vouch(bob1, "bob@example.net", bob2.public.verify_key).to_bytes()
    contacts = mail.contacts
    contacts.pin_keys("bob@example.net", [bob1.public.verify_key, bob2.public.verify_key],
                      mail.wall(), vouches={bob2.public.verify_key: vouch})
    assert contacts.trusted_keys("bob@example.net") == {bob1.public.verify_key,
                                                        bob2.public.verify_key}
    contacts.pin_keys("bob@example.net", [bob1.public.verify_key], mail.wall())  # bob2 revoked
    # whoever holds bob2 (with bob's server) forges "downloaded": alice's copy stays
    assert mail.handle(receipt("downloaded", signer=bob2))[0] is Outcome.DROPPED
    assert bob(outbox) == (RecipientStatus.SENT, None)
    assert mail.counters["dropped-receipt-untrusted"] == 1
    assert mail.handle(receipt("downloaded", signer=bob1))[0] is Outcome.RECEIPT
    assert bob(outbox)[0] is RecipientStatus.DOWNLOADED
    assert MID in {m.id for m in outbox.list()}


async def test_an_address_with_no_device_left_retires_every_key(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    clip, server, sender = await _sent_once(db, store, tmp_path, BOB1, BOB2)
    server.listed, server.sent = (), []  # both revoked: the account lists no device
    with pytest.raises(SendError, match="no device is registered for this address "
                                        r"\(the keys you trusted for it are retired\)"):
        await sender.send(clip, ["bob@b.test"], "t", "")
    contact = Contacts(db).get("bob@b.test")
    assert contact is not None and contact.keys == ()
    assert set(contact.retired_keys) == {BOB1.public.verify_key, BOB2.public.verify_key}
    server.unreachable = True  # nothing is sealed to them while the domain is away
    with pytest.raises(SendError, match=r"no key of bob@b\.test is trusted"):
        await sender.send(clip, ["bob@b.test"], "t", "")
    assert server.sent == []
    # an address never seen that lists no device is not made a contact
    server.unreachable = False
    with pytest.raises(SendError, match=r"no device is registered for this address$"):
        await sender.send(clip, ["carol@b.test"], "t", "")
    assert Contacts(db).get("carol@b.test") is None


async def test_a_send_to_an_address_listing_more_devices_than_a_contact_holds(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Bob's server (a foreign domain's may list up to 256) lists 17 devices, BOB2 revoked:
    the send raised ValueError and bob's retired device was never retired."""
    clip, server, sender = await _sent_once(db, store, tmp_path, BOB1, BOB2)
    more = tuple(DeviceInfo(DeviceIdentity.from_seed(bytes([0x50 + n]) * 32).public.verify_key,
                            True, None, {}) for n in range(16))
    server.listed, server.sent = server.listed[:1] + more, []
    await sender.send(clip, ["bob@b.test"], "t", "")
    assert [peer for _, peer, _ in server.sent] == [BOB1.peer_id]  # the rest not vouched for
    contact = Contacts(db).get("bob@b.test")
    assert contact is not None and contact.keys == (BOB1.public.verify_key,)
    assert contact.retired_keys == (BOB2.public.verify_key,)
    assert set(contact.unvouched_keys) == {d.verify_key for d in more}
    # `contacts accept` can't pin past the limit, so the sender is not told to run it.
    sent = [r.getMessage() for r in caplog.records if r.name == "peerpost.send"]
    assert any("not sealing to 16 of the 17 device keys its server lists: a contact holds "
               "at most 16" in m for m in sent), sent
    assert not any("contacts accept" in m for m in sent), sent
