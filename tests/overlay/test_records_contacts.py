"""Contacts: trust on first use, devices vouched for by pinned ones, loud key changes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.vouch import make_vouch
from overlay.mail.contacts import (
    MAX_KEYS_PER_ADDRESS,
    MAX_RETIRED_PER_ADDRESS,
    Contacts,
    PinResult,
)
from overlay.mail.db import _MIGRATIONS, SCHEMA_VERSION, NodeDB, RecordLimitError
from tests.present import present

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
    # a device its server no longer lists (revoked) is retired, with no alarm
    assert c.pin_keys(BOB, [key(2)], 30.0) is PinResult.RETIRED
    assert c.trusted_keys(BOB) == {key(2)}
    contact = c.get(BOB)
    assert contact is not None and not contact.changed and contact.keys == (key(2),)
    assert contact.retired_keys == (key(1),) and contact.retired_at == (30.0,)
    assert contact.retired_fingerprints == (ident(1).public.fingerprint(),)
    assert c.pin_keys(BOB, [key(2)], 40.0) is PinResult.SAME


def test_a_chain_of_vouches_reaches_a_pinned_key(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    # 3 was vouched for by 2, 2 by 1 (listed, so still bound: it may be offline)
    assert c.pin_keys(BOB, [key(3), key(2), key(1)], 20.0,
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
    assert present(c.get(BOB)).unvouched_keys == (key(2),)
    assert c.trusted_keys(BOB) == {key(1)}
    # FINGER shows it vouched for by the pinned key: now trusted
    assert c.pin_keys(BOB, [key(1), key(2)], 13.0, vouches={key(2): vouch(1, 2)},
                      signers=[key(2)]) is PinResult.ADDED
    assert c.trusted_keys(BOB) == {key(1), key(2)}
    assert present(c.get(BOB)).unvouched_keys == ()


def test_first_contact_is_trusted_only_if_finger_lists_the_signer(db: NodeDB) -> None:
    c = Contacts(db)
    assert not c.note_signer(BOB, key(1), 10.0)
    assert c.trusted_keys(BOB) == frozenset()
    # the server lists other keys than the one that signed: nothing is pinned
    assert c.pin_keys(BOB, [key(2)], 11.0, signers=[key(1)]) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == frozenset()
    assert present(c.get(BOB)).unvouched_keys == (key(1),)
    # it lists the signer: trust on first use
    assert c.pin_keys(BOB, [key(1)], 12.0, signers=[key(1)]) is PinResult.NEW
    assert c.trusted_keys(BOB) == {key(1)}
    assert present(c.get(BOB)).unvouched_keys == ()


def test_changed_key_is_not_silently_replaced(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1), key(2)], 10.0)
    assert c.pin_keys(BOB, [key(3)], 20.0) is PinResult.CHANGED
    # nothing is sealed to the new key yet, nor to the old ones, no longer listed
    assert c.trusted_keys(BOB) == frozenset()
    contact = c.get(BOB)
    assert contact is not None and contact.changed and contact.pending_keys == (key(3),)
    assert set(contact.retired_keys) == {key(1), key(2)}
    assert c.pin_keys(BOB, [key(3)], 21.0) is PinResult.CHANGED  # still loud
    c.accept_change(BOB, key(3))
    assert c.trusted_keys(BOB) == {key(3)}
    assert not present(c.get(BOB)).changed
    assert c.pin(BOB, key(3), 30.0) is PinResult.SAME


def test_accepting_each_pending_key_in_turn_is_fine(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    assert c.pin_keys(BOB, [key(4), key(5)], 20.0) is PinResult.CHANGED
    for k in present(c.get(BOB)).pending_keys:
        c.accept_change(BOB, k)
    assert c.trusted_keys(BOB) == {key(4), key(5)}


def test_accepting_a_superseded_key_fails(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin(BOB, key(1), 10.0)
    c.pin(BOB, key(2), 20.0)
    c.pin(BOB, key(3), 30.0)  # the newest presentation replaces the pending set
    with pytest.raises(KeyError, match="no pending key change"):
        c.accept_change(BOB, key(2))
    assert c.trusted_keys(BOB) == frozenset()  # 1 retired, 3 pending


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
    assert not c.note_signer(BOB, key(2), 20.0)
    assert c.pin_keys(BOB, [key(1), key(2)], 21.0, signers=[key(2)]) is PinResult.UNVOUCHED
    contact = c.get(BOB)
    assert contact is not None and not contact.changed
    assert contact.keys == (key(1),) and contact.unvouched_keys == (key(2),)
    assert c.pin_keys(BOB, [key(1), key(2)], 22.0,
                      vouches={key(2): vouch(1, 2)}) is PinResult.ADDED
    assert set(present(c.get(BOB)).keys) == {key(1), key(2)}


def test_bad_keys_and_bounds(db: NodeDB) -> None:
    c = Contacts(db, max_contacts=1)
    with pytest.raises(DecodeError):
        c.pin(BOB, b"short", 1.0)
    with pytest.raises(ValueError, match="device keys"):
        c.pin_keys(BOB, [], 1.0)
    c.pin(BOB, key(1), 1.0)
    with pytest.raises(RecordLimitError):
        c.pin("carol@c.example", key(2), 1.0)
    assert c.remove(BOB)
    assert c.get(BOB) is None and c.trusted_keys(BOB) == frozenset()


def test_more_devices_listed_than_a_contact_holds(
        db: NodeDB, caplog: pytest.LogCaptureFixture) -> None:
    """A server may list more devices than a contact holds (a foreign domain's up to 256):
    the set still retires and confirms; what does not fit is not trusted. ValueError on
    the old code, for every one of these."""
    c = Contacts(db)
    many = [key(n) for n in range(1, MAX_KEYS_PER_ADDRESS + 3)]  # 18, in the server's order
    # first contact, a message signed by the last one listed: it is among those pinned
    assert c.pin_keys(BOB, many, 10.0, signers=[many[-1]]) is PinResult.UNVOUCHED
    contact = c.get(BOB)
    assert contact is not None and set(contact.keys) == {many[-1], *many[:15]}
    assert set(contact.unvouched_keys) == {many[15], many[16]}
    assert f"{BOB}: its server lists 18 devices, more than the 16 a contact holds: 2 of " \
           "them are not trusted" in caplog.text
    # a pinned device revoked: retired and the keys confirmed, nothing else trusted
    listed = [k for k in many if k != key(3)]
    assert c.pin_keys(BOB, listed, 20.0) is PinResult.UNVOUCHED
    contact = c.get(BOB)
    assert contact is not None and contact.retired_keys == (key(3),)
    assert contact.keys_confirmed_at == 20.0 and len(contact.keys) == 15
    # two devices vouched for by a pinned one, room for one: the first listed is pinned
    vouches = {many[15]: vouch(1, 16), key(99): vouch(1, 99)}
    assert c.pin_keys(BOB, [*listed, key(99)], 30.0, vouches=vouches) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == frozenset(listed) - {many[16]}
    assert set(present(c.get(BOB)).unvouched_keys) == {many[16], key(99)}
    # every pinned key gone, 17 others listed: the first 16 wait for the user
    carol = "carol@c.example"
    c.pin(carol, key(1), 40.0)
    others = [key(n) for n in range(100, 100 + MAX_KEYS_PER_ADDRESS + 1)]
    assert c.pin_keys(carol, others, 50.0) is PinResult.CHANGED
    contact = c.get(carol)
    assert contact is not None and contact.retired_keys == (key(1),)
    assert set(contact.pending_keys) == set(others[:16])
    assert c.accept(carol) == frozenset(others[:16])


def test_pins_survive_reopen(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        Contacts(db).pin(BOB, key(1), 1.0)
        Contacts(db).pin(BOB, key(9), 2.0)
    with NodeDB.open(tmp_path) as db:
        contact = Contacts(db).get(BOB)
        assert contact is not None and contact.changed
        assert contact.keys == () and contact.pending_keys == (key(9),)
        assert contact.retired_keys == (key(1),) and contact.retired_at == (2.0,)


def test_a_vouch_by_a_key_retired_now_counts_for_nothing(db: NodeDB) -> None:
    # Bob's laptop (1) is revoked; whoever holds it can vouch for a key of their own (2).
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    assert c.pin_keys(BOB, [key(2)], 20.0, vouches={key(2): vouch(1, 2)}) is PinResult.CHANGED
    assert c.trusted_keys(BOB) == frozenset()
    contact = c.get(BOB)
    assert contact is not None and contact.changed
    assert contact.pending_keys == (key(2),) and contact.retired_keys == (key(1),)


def test_all_keys_retired_is_not_a_first_contact(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 10.0)
    assert c.pin_keys(BOB, [key(2)], 20.0) is PinResult.CHANGED  # 1 retired, 2 pending
    assert c.dismiss_change(BOB)
    assert c.trusted_keys(BOB) == frozenset()
    # no pinned key left, yet nothing presented now is trusted on first use
    for n, at in ((3, 30.0), (1, 40.0), (4, 50.0)):  # 1: the retired key listed again
        assert c.pin_keys(BOB, [key(n)], at, signers=[key(n)]) is PinResult.CHANGED
        assert c.trusted_keys(BOB) == frozenset()
    assert not c.note_signer(BOB, key(1), 60.0)
    # a message from the address is checked the same way
    assert c.pin_keys(BOB, [key(5)], 70.0, signers=[key(5)]) is PinResult.CHANGED
    assert c.trusted_keys(BOB) == frozenset()
    # the user compared fingerprints
    assert c.accept(BOB) == {key(5)}
    assert c.trusted_keys(BOB) == {key(5)}
    assert present(c.get(BOB)).retired_keys == (key(1),)


def test_a_retired_key_listed_again_is_trusted_only_when_accepted(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1), key(2)], 10.0)
    assert c.pin_keys(BOB, [key(1)], 20.0) is PinResult.RETIRED
    # the server lists it again, with a vouch by a pinned key (the one it registered
    # with, kept): not trusted, shown as unvouched, and so at every later lookup
    for at in (30.0, 31.0):
        assert c.pin_keys(BOB, [key(1), key(2)], at,
                          vouches={key(2): vouch(1, 2)}) is PinResult.UNVOUCHED
        assert c.trusted_keys(BOB) == {key(1)}
    contact = c.get(BOB)
    assert contact is not None and contact.unvouched_keys == (key(2),)
    assert contact.retired_keys == (key(2),) and contact.retired_at == (20.0,)
    # nor does a chain through it count: 3 vouched for by the retired 2
    assert c.pin_keys(BOB, [key(1), key(2), key(3)], 32.0,
                      vouches={key(2): vouch(1, 2), key(3): vouch(2, 3)}) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == {key(1)}
    assert not c.note_signer(BOB, key(2), 33.0)
    assert c.accept(BOB) == {key(2), key(3)}
    assert c.trusted_keys(BOB) == {key(1), key(2), key(3)}
    assert present(c.get(BOB)).retired_keys == ()


def test_a_message_signed_by_a_retired_key_is_not_trusted(db: NodeDB) -> None:
    c = Contacts(db)
    c.pin_keys(BOB, [key(1), key(2)], 10.0)
    c.pin_keys(BOB, [key(1)], 20.0)
    assert not c.note_signer(BOB, key(2), 30.0)
    contact = c.get(BOB)
    assert contact is not None and contact.retired_keys == (key(2),)
    assert contact.unvouched_keys == ()  # retired, not a new device to accept
    with pytest.raises(KeyError):
        c.accept(BOB)
    assert c.trusted_keys(BOB) == {key(1)}


def test_retired_keys_are_bounded_by_vouches_stopping(db: NodeDB) -> None:
    # Each device vouches for the next, then goes: past the bound a vouch counts for
    # nothing (a thief's pinned device could otherwise retire keys without end), and the
    # user's accept still pins; no retired key is forgotten.
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 1.0)
    for n in range(2, MAX_RETIRED_PER_ADDRESS + 2):
        assert c.pin_keys(BOB, [key(n - 1), key(n)], float(n),
                          vouches={key(n): vouch(n - 1, n)}) is PinResult.ADDED
        assert c.pin_keys(BOB, [key(n)], n + 0.5) is PinResult.RETIRED
    last = MAX_RETIRED_PER_ADDRESS + 1
    assert c.pin_keys(BOB, [key(last), key(last + 1)], 100.0,
                      vouches={key(last + 1): vouch(last, last + 1)}) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == {key(last)}
    assert c.accept(BOB) == {key(last + 1)}
    assert c.pin_keys(BOB, [key(last + 1)], 101.0) is PinResult.RETIRED
    contact = c.get(BOB)
    assert contact is not None and contact.keys == (key(last + 1),)
    assert set(contact.retired_keys) == {key(n) for n in range(1, last + 1)}


def test_a_retired_key_is_never_forgotten_so_its_old_vouch_stays_void(db: NodeDB) -> None:
    # Bob's laptop (2), vouched for by his phone (1), is stolen and revoked; over the
    # years more devices than the bound come and go. His server (or whoever it answers
    # for) lists the laptop again with the vouch it registered with: it stays untrusted.
    c = Contacts(db)
    c.pin_keys(BOB, [key(1)], 1.0)
    c.pin_keys(BOB, [key(1), key(2)], 2.0, vouches={key(2): vouch(1, 2)})
    assert c.pin_keys(BOB, [key(1)], 3.0) is PinResult.RETIRED
    for n in range(3, MAX_RETIRED_PER_ADDRESS + 4):
        if c.pin_keys(BOB, [key(1), key(n)], float(n),
                      vouches={key(n): vouch(1, n)}) is PinResult.UNVOUCHED:
            c.accept(BOB)
        assert c.pin_keys(BOB, [key(1)], n + 0.5) is PinResult.RETIRED
    assert c.pin_keys(BOB, [key(1), key(2)], 500.0,
                      vouches={key(2): vouch(1, 2)}) is PinResult.UNVOUCHED
    assert c.trusted_keys(BOB) == {key(1)}
    contact = c.get(BOB)
    assert contact is not None and key(2) in contact.retired_keys
    assert contact.unvouched_keys == (key(2),)


def test_upgrade_to_v6_keeps_the_contacts(tmp_path: Path) -> None:
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 5}
    with NodeDB.open(tmp_path, migrations=steps) as old, old.transaction() as conn:
        assert old.schema_version == 5
        # what the v5 code wrote: bob with two pinned keys and an unvouched one, carol
        # flagged with a pending key
        conn.executemany("INSERT INTO contact VALUES (?, ?, ?, ?)",
                         [(BOB, 10.0, 20.0, 0), ("carol@c.example", 30.0, 40.0, 1)])
        conn.executemany("INSERT INTO contact_key VALUES (?, ?, ?, ?)", [
            (BOB, key(1), "pinned", 10.0), (BOB, key(2), "pinned", 10.0),
            (BOB, key(3), "unvouched", 20.0), ("carol@c.example", key(4), "pinned", 30.0),
            ("carol@c.example", key(5), "pending", 40.0)])
    with NodeDB.open(tmp_path) as db:
        assert db.schema_version == SCHEMA_VERSION
        c = Contacts(db)
        bob, carol = c.list()
        assert set(bob.keys) == {key(1), key(2)} and bob.first_seen == 10.0
        assert bob.unvouched_keys == (key(3),) and not bob.changed
        assert carol.changed and carol.keys == (key(4),) and carol.pending_keys == (key(5),)
        assert c.pin_keys(BOB, [key(2)], 50.0) is PinResult.RETIRED
        assert present(c.get(BOB)).retired_keys == (key(1),)


# Keys 1..5 of one address, every vouch among them, and one signed for another address.
_POOL = range(1, 6)
_VOUCHES = {(b, f): vouch(b, f) for b in _POOL for f in _POOL if b != f}
_FOREIGN = {f: vouch(1 if f != 1 else 2, f, "carol@b.example") for f in _POOL}
_keyset = st.sets(st.sampled_from(_POOL), min_size=1, max_size=5)
_op = st.one_of(
    st.tuples(st.just("pin"), _keyset,
              st.dictionaries(st.sampled_from(_POOL),
                              st.one_of(st.sampled_from(_POOL), st.just(0))),
              st.sets(st.sampled_from(_POOL), max_size=2)),
    st.tuples(st.just("signer"), st.sampled_from(_POOL)),
    st.tuples(st.just("accept")),
    st.tuples(st.just("accept_change"), st.sampled_from(_POOL)),
    st.tuples(st.just("dismiss")),
    st.tuples(st.just("none")),  # the server lists no device
)


def _closure(start: set[int], candidates: set[int], vouched_by: dict[int, int]) -> set[int]:
    trusted, grew = set(start), True
    while grew:
        grew = False
        for k in candidates - trusted:
            if vouched_by.get(k) in trusted:
                trusted.add(k)
                grew = True
    return trusted - start


def test_no_sequence_of_presented_sets_trusts_a_key_it_should_not(tmp_path: Path) -> None:
    """Whatever the server presents, in whatever order, and whatever the user does: a key
    becomes trusted only on first contact, by a vouch from a key pinned (and listed) at
    that time and never retired, or by the user's accept of a key shown as waiting; a key
    not listed is not trusted after the lookup; a retired key stays shown as retired until
    the user accepts it."""
    with NodeDB.open(tmp_path) as db:
        c = Contacts(db)
        by_key = {key(n): n for n in _POOL}

        @settings(max_examples=300, deadline=None)
        @given(ops=st.lists(_op, max_size=12))
        def run(ops: list[tuple[Any, ...]]) -> None:
            c.remove(BOB)
            ever_pinned, retired = False, set[int]()
            for now, op in enumerate(ops):
                before = {by_key[k] for k in c.trusted_keys(BOB)}
                shown = c.get(BOB)
                waiting = set() if shown is None else {
                    by_key[k] for k in shown.pending_keys + shown.unvouched_keys}
                if op[0] == "pin":
                    _, presented, chosen, signers = op
                    raw = {key(f): _VOUCHES[(b, f)] if b and b != f else _FOREIGN[f]
                           for f, b in chosen.items()}
                    c.pin_keys(BOB, [key(n) for n in presented], float(now), vouches=raw,
                               signers=[key(n) for n in signers])
                    allowed = _closure(before & presented, presented - retired,
                                       {f: b for f, b in chosen.items() if b and b != f})
                    if not ever_pinned:
                        allowed |= presented
                    retired |= before - presented
                elif op[0] == "signer":
                    c.note_signer(BOB, key(op[1]), float(now))
                    allowed = set()
                elif op[0] == "accept":
                    with contextlib.suppress(KeyError):
                        c.accept(BOB)
                    allowed = waiting
                elif op[0] == "accept_change":
                    with contextlib.suppress(KeyError):
                        c.accept_change(BOB, key(op[1]))
                    allowed = waiting
                elif op[0] == "dismiss":
                    c.dismiss_change(BOB)
                    allowed = set()
                else:
                    c.retire_all(BOB, float(now))
                    allowed = set()
                    retired |= before
                after = {by_key[k] for k in c.trusted_keys(BOB)}
                assert after - before <= allowed, (op, before, after)
                if op[0] in ("pin", "none"):  # never a key the server does not list
                    assert after <= (op[1] if op[0] == "pin" else set())
                retired -= after
                ever_pinned |= bool(after)
                got = c.get(BOB)
                assert {by_key[k] for k in (got.retired_keys if got else ())} == retired

        run()
