"""Contacts: trust on first use, several devices per address, loud key changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
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


def test_second_device_next_to_a_pinned_one_is_added(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    assert c.pin_keys(BOB, [key(1), key(2)], 20.0) is PinResult.ADDED
    assert c.trusted_keys(BOB) == {key(1), key(2)}
    # a retired device missing from the set stays pinned and raises no alarm
    assert c.pin_keys(BOB, [key(2)], 30.0) is PinResult.SAME
    assert not c.get(BOB).changed  # type: ignore[union-attr]


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


def test_single_key_change_confirmed_by_a_lookup_becomes_a_device(db: NodeDB) -> None:
    # A receiver sees one signing key per message: a sender's second device looks changed
    # until a FINGER lookup shows it next to the pinned one.
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    assert c.pin(BOB, key(2), 20.0) is PinResult.CHANGED
    assert c.pin_keys(BOB, [key(1), key(2)], 21.0) is PinResult.ADDED
    contact = c.get(BOB)
    assert contact is not None and not contact.changed
    assert set(contact.keys) == {key(1), key(2)}


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
