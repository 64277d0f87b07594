"""Contacts: trust on first use, devices vouched for by pinned ones, loud key changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.vouch import make_vouch
from overlay.mail.contacts import MAX_KEYS_PER_ADDRESS, Contacts, PinResult
from overlay.mail.db import NodeDB, RecordLimitError

BOB = "bob@b.example"


def key(n: int) -> bytes:
    return DeviceIdentity.from_seed(bytes([n]) * 32).public.verify_key


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def test_first_use_pins_then_same(db: NodeDB) -> None:
    c = Contacts(db)
    assert c.pin("Bob@B.example", key(1), 10.0) is PinResult.NEW
    assert c.pin(BOB, key(1), 20.0) is PinResult.SAME
    (contact,) = c.list()
    assert contact.address == BOB and contact.keys == (key(1),)
    assert contact.fingerprints == (DeviceIdentity.from_seed(bytes([1]) * 32).public.fingerprint(),)
    assert contact.first_seen == 10.0 and not contact.changed
    assert c.trusted_keys(BOB) == {key(1)}


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([n]) * 32)


def vouch(by: int, for_: int, address: str = BOB) -> bytes:
    return make_vouch(ident(by), address, key(for_)).to_bytes()


def test_second_device_vouched_for_by_a_pinned_one_is_added(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    assert c.pin_keys(BOB, [key(1), key(2)], 20.0,
                      vouches={key(2): vouch(1, 2)}) is PinResult.ADDED
    assert c.trusted_keys(BOB) == {key(1), key(2)}
    # a retired device missing from the set stays pinned and raises no alarm
    assert c.pin_keys(BOB, [key(2)], 30.0) is PinResult.SAME
    assert not c.get(BOB).changed  # type: ignore[union-attr]


def test_a_chain_of_vouches_reaches_a_pinned_key(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    # 3 was vouched for by 2, 2 by 1; the voucher of 2 need not be online (presented)
    assert c.pin_keys(BOB, [key(3), key(2)], 20.0,
                      vouches={key(2): vouch(1, 2), key(3): vouch(2, 3)}) is PinResult.ADDED
    assert c.trusted_keys(BOB) == {key(1), key(2), key(3)}


def test_rogue_key_next_to_a_pinned_one_is_not_trusted(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    for vouches in ({}, {key(2): vouch(3, 2)},          # none; by a key we never pinned
                    {key(2): vouch(1, 2, "carol@b.example")},  # for another address
                    {key(2): vouch(1, 4)}):             # for another key
        assert c.pin_keys(BOB, [key(1), key(2)], 20.0, vouches=vouches) is PinResult.UNVOUCHED
        assert c.trusted_keys(BOB) == {key(1)}
    contact = c.get(BOB)
    assert contact is not None and contact.unvouched_keys == (key(2),) and not contact.changed
    assert contact.unvouched_fingerprints == (ident(2).public.fingerprint(),)
    # the user compared fingerprints and accepts
    assert c.accept(BOB) == {key(2)}
    assert c.trusted_keys(BOB) == {key(1), key(2)}
    with pytest.raises(KeyError):
        c.accept(BOB)


def test_note_signer_holds_an_unknown_key_until_settled(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    assert c.note_signer(BOB, key(1), 11.0)
    assert not c.note_signer(BOB, key(2), 12.0)
    assert c.get(BOB).unvouched_keys == (key(2),)  # type: ignore[union-attr]
    assert c.trusted_keys(BOB) == {key(1)}
    # FINGER shows it vouched for by the pinned key: now trusted
    assert c.pin_keys(BOB, [key(1), key(2)], 13.0, vouches={key(2): vouch(1, 2)},
                      signers=[key(2)]) is PinResult.ADDED
    assert c.trusted_keys(BOB) == {key(1), key(2)}
    assert c.get(BOB).unvouched_keys == ()  # type: ignore[union-attr]


def test_first_contact_is_trusted_only_if_finger_lists_the_signer(db: NodeDB) -> None:
    c = Contacts(db)
    assert not c.note_signer(BOB, key(1), 10.0)
    assert c.trusted_keys(BOB) == frozenset()
    # the server lists other keys than the one that signed: nothing is pinned
    assert c.pin_keys(BOB, [key(2)], 11.0, signers=[key(1)]) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == frozenset()
    assert c.get(BOB).unvouched_keys == (key(1),)  # type: ignore[union-attr]
    # it lists the signer: trust on first use
    assert c.pin_keys(BOB, [key(1)], 12.0, signers=[key(1)]) is PinResult.NEW
    assert c.trusted_keys(BOB) == {key(1)}
    assert c.get(BOB).unvouched_keys == ()  # type: ignore[union-attr]


def test_changed_key_is_not_silently_replaced(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1), key(2)], 10.0)
    assert c.pin_keys(BOB, [key(3)], 20.0) is PinResult.CHANGED
    assert c.trusted_keys(BOB) == {key(1), key(2)}  # nothing sealed to the new key yet
    contact = c.get(BOB)
    assert contact is not None and contact.changed and contact.pending_keys == (key(3),)
    assert c.pin_keys(BOB, [key(3)], 21.0) is PinResult.CHANGED  # still loud
    c.accept_change(BOB, key(3))
    assert c.trusted_keys(BOB) == {key(3)}
    assert not c.get(BOB).changed  # type: ignore[union-attr]
    assert c.pin(BOB, key(3), 30.0) is PinResult.SAME


def test_accepting_each_pending_key_in_turn_is_fine(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    assert c.pin_keys(BOB, [key(4), key(5)], 20.0) is PinResult.CHANGED
    for k in c.get(BOB).pending_keys:  # type: ignore[union-attr]
        c.accept_change(BOB, k)
    assert c.trusted_keys(BOB) == {key(4), key(5)}


def test_accepting_a_superseded_key_fails(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    c.pin(BOB, key(2), 20.0)
    c.pin(BOB, key(3), 30.0)  # the newest presentation replaces the pending set
    with pytest.raises(KeyError, match="no pending key change"):
        c.accept_change(BOB, key(2))
    assert c.trusted_keys(BOB) == {key(1)}


def test_dismiss_keeps_the_old_keys(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    c.pin(BOB, key(2), 20.0)
    assert c.dismiss_change(BOB)
    contact = c.get(BOB)
    assert contact is not None and not contact.changed and contact.pending_keys == ()
    assert not c.dismiss_change(BOB)


def test_single_key_seen_next_to_the_pinned_one_waits_for_a_vouch(db: NodeDB) -> None:
    # A receiver sees one signing key per message: a sender's second device looks changed
    # until a FINGER lookup shows it next to the pinned one, and it is trusted only with a
    # vouch from the pinned one (or the user's acceptance).
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    assert c.pin(BOB, key(2), 20.0) is PinResult.CHANGED
    assert c.pin_keys(BOB, [key(1), key(2)], 21.0) is PinResult.UNVOUCHED
    contact = c.get(BOB)
    assert contact is not None and not contact.changed
    assert contact.keys == (key(1),) and contact.unvouched_keys == (key(2),)
    assert c.pin_keys(BOB, [key(1), key(2)], 22.0,
                      vouches={key(2): vouch(1, 2)}) is PinResult.ADDED
    assert set(c.get(BOB).keys) == {key(1), key(2)}  # type: ignore[union-attr]


def test_bad_keys_and_bounds(db: NodeDB) -> None:
    c = Contacts(db, max_contacts=1)
    with pytest.raises(DecodeError):
        c.pin(BOB, b"short", 1.0)
    with pytest.raises(ValueError, match="device keys"):
        c.pin_keys(BOB, [], 1.0)
    with pytest.raises(ValueError, match="device keys"):
        c.pin_keys(BOB, [key(n) for n in range(MAX_KEYS_PER_ADDRESS + 1)], 1.0)
    c.pin(BOB, key(1), 1.0)
    with pytest.raises(RecordLimitError):
        c.pin("carol@c.example", key(2), 1.0)
    assert c.remove(BOB)
    assert c.get(BOB) is None and c.trusted_keys(BOB) == frozenset()


def test_pins_survive_reopen(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        Contacts(db).pin(BOB, key(1), 1.0)
        Contacts(db).pin(BOB, key(9), 2.0)
    with NodeDB.open(tmp_path) as db:
        contact = Contacts(db).get(BOB)
        assert contact is not None and contact.changed
        assert contact.keys == (key(1),) and contact.pending_keys == (key(9),)
