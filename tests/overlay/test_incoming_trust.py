"""Receiving from a device key not trusted for the sender: held `unverified`, never fetched,
until a vouch from a pinned key or the user's acceptance."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.envelope import seal_for_recipients
from crypto.identity import DeviceIdentity
from crypto.location import Description, Handle, Headers, LocationMessage
from crypto.vouch import make_vouch
from overlay.mail.contacts import Contacts
from overlay.mail.db import _MIGRATIONS, NodeDB
from overlay.mail.inbox import Inbox
from overlay.mail.inbox_state import IllegalTransition, InboxState
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox
from overlay.mail.prefs import Prefs
from tests.present import present

ALICE = "alice@example.net"
ALICE1 = DeviceIdentity.from_seed(b"1" * 32)  # pinned
ALICE2 = DeviceIdentity.from_seed(b"2" * 32)  # a new device, maybe a rogue key
BOB = DeviceIdentity.from_seed(b"b" * 32)
K1, K2 = ALICE1.public.verify_key, ALICE2.public.verify_key


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def pushed(n: int, signer: DeviceIdentity, sender: str = ALICE) -> Pushed:
    msg = LocationMessage(
        headers=Headers(message_id=n.to_bytes(16, "big"), sender=sender,
                        sender_peer_id=signer.peer_id, recipients=("bob@example.net",),
                        created=1_700_000_000),
        description=Description(title=f"clip {n}", file_name="clip.ts"),
        handle=Handle(content_id=bytes([n]) * 32, size=1000, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32))
    ((_, blob),) = seal_for_recipients(signer, "location", msg.encode(), [BOB.public])
    return Pushed(msg.headers.message_id, sender, blob)


def receiver(db: NodeDB, *, known: bool = True) -> tuple[IncomingMail, Inbox, Contacts]:
    inbox, contacts = Inbox(db), Contacts(db)
    if known:
        contacts.pin_keys(ALICE, [K1], 1.0)
    return IncomingMail(BOB, "bob@example.net", inbox, Outbox(db), Prefs(db), contacts,
                        wall=lambda: 100.0), inbox, contacts


def offered_ids(inbox: Inbox) -> set[bytes]:
    return {e.id for e in inbox.fetch_order(1e9, include_offered=True)}


def test_a_pinned_key_files_ordinary_mail(db: NodeDB) -> None:
    mail, inbox, _ = receiver(db)
    assert mail.handle(pushed(1, ALICE1))[0] is Outcome.NEW
    assert present(inbox.get((1).to_bytes(16, "big"))).state is InboxState.OFFERED
    assert not mail.key_checks


def test_an_unknown_extra_key_is_held_until_the_user_accepts(db: NodeDB) -> None:
    mail, inbox, contacts = receiver(db)
    mid = (2).to_bytes(16, "big")
    assert mail.handle(pushed(2, ALICE2))[0] is Outcome.UNVERIFIED
    assert present(inbox.get(mid)).state is InboxState.UNVERIFIED
    assert mid not in offered_ids(inbox)  # auto-download never picks it
    assert mail.key_checks == {ALICE}
    with pytest.raises(IllegalTransition):
        inbox.transition(mid, InboxState.DOWNLOADING)
    # FINGER lists the key next to the pinned one, without a vouch: still held
    assert mail.recheck_keys(ALICE, [K1, K2], {}) == []
    assert present(inbox.get(mid)).state is InboxState.UNVERIFIED
    assert present(contacts.get(ALICE)).unvouched_keys == (K2,)
    # the user compares fingerprints and accepts
    contacts.accept(ALICE)
    assert mail.release(ALICE) == [mid]
    assert present(inbox.get(mid)).state is InboxState.OFFERED
    assert mid in offered_ids(inbox)
    assert mail.handle(pushed(3, ALICE2))[0] is Outcome.NEW


def test_a_key_vouched_for_by_a_pinned_one_releases_its_mail(db: NodeDB) -> None:
    mail, _, contacts = receiver(db)
    mail.handle(pushed(4, ALICE2))
    forged = make_vouch(ALICE2, ALICE, K2).to_bytes()  # signs itself: not a pinned key
    assert mail.recheck_keys(ALICE, [K1, K2], {K2: forged}) == []
    good = make_vouch(ALICE1, ALICE, K2).to_bytes()
    assert mail.recheck_keys(ALICE, [K1, K2], {K2: good}) == [(4).to_bytes(16, "big")]
    assert contacts.trusted_keys(ALICE) == {K1, K2}


def test_first_contact_is_trusted_only_when_finger_lists_the_signing_key(db: NodeDB) -> None:
    mail, inbox, contacts = receiver(db, known=False)
    mid = (5).to_bytes(16, "big")
    assert mail.handle(pushed(5, ALICE1))[0] is Outcome.UNVERIFIED
    # the server shows another key for the address than the one that signed
    assert mail.recheck_keys(ALICE, [K2], {}) == []
    assert contacts.trusted_keys(ALICE) == frozenset()
    # FINGER unreachable: stays held
    assert mail.recheck_keys(ALICE, None, {}) == []
    # the server lists no device for the address: nothing to trust, stays held
    assert mail.recheck_keys(ALICE, [], {}) == []
    # the signing key is among those FINGER returns: trust on first use
    assert mail.recheck_keys(ALICE, [K1], {}) == [mid]
    assert present(inbox.get(mid)).state is InboxState.OFFERED


def test_a_first_contact_takes_one_commit_to_file_and_one_to_release(db: NodeDB) -> None:
    """Each commit is an fsync on the node's loop, between the push and the download: the
    new contact's row and its message went in two, the keys FINGER listed and the release
    of the held message in two more."""
    mail, inbox, contacts = receiver(db, known=False)
    commits: list[str] = []
    db._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        assert mail.handle(pushed(1, ALICE1))[0] is Outcome.UNVERIFIED
        assert len(commits) == 1
        assert mail.recheck_keys(ALICE, [K1], {}) == [(1).to_bytes(16, "big")]
        assert len(commits) == 2
    finally:
        db._conn.set_trace_callback(None)
    assert present(inbox.get((1).to_bytes(16, "big"))).state is InboxState.OFFERED
    assert contacts.trusted_keys(ALICE) == {K1}


def test_junk_from_an_unverified_key_stays_junk(db: NodeDB) -> None:
    mail, inbox, contacts = receiver(db)
    Prefs(db).add_junk(ALICE)
    mail.handle(pushed(6, ALICE2))
    entry = inbox.get((6).to_bytes(16, "big"))
    assert entry is not None and entry.junk and entry.state is InboxState.UNVERIFIED
    contacts.accept(ALICE)
    mail.release(ALICE)
    assert present(inbox.get(entry.id)).state is InboxState.OFFERED
    assert entry.id not in offered_ids(inbox)


def test_upgrade_to_v4_keeps_inbox_and_contacts(tmp_path: Path) -> None:
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 3}
    with NodeDB.open(tmp_path, migrations=steps) as old:
        with old.transaction() as conn:  # as the v3 code pinned a key (today's needs v6)
            conn.execute("INSERT INTO contact VALUES (?, 1.0, 1.0, 0)", (ALICE,))
            conn.execute("INSERT INTO contact_key VALUES (?, ?, 'pinned', 1.0)", (ALICE, K1))
            # as the v3 code filed a message (today's needs v8)
            conn.execute(
                "INSERT INTO inbox (id, sender, sender_peer_id, title, note, size, file_name,"
                " media_type, content_id, state, junk, priority, received_at, chunk_count,"
                " message) VALUES (?, ?, ?, 't', '', 1, 'f', 'x/y', ?, 'offered', 0, 0, 1.0,"
                " 1, ?)", (b"m" * 16, ALICE, ALICE1.peer_id, b"c" * 32, b"\x93"))
    with NodeDB.open(tmp_path) as db:
        assert Contacts(db).trusted_keys(ALICE) == {K1}
        assert present(Inbox(db).get(b"m" * 16)).state is InboxState.OFFERED
        Contacts(db).note_signer(ALICE, K2, 2.0)  # the new status is allowed
        with pytest.raises(sqlite3.IntegrityError):
            with db.transaction() as conn:
                conn.execute("UPDATE inbox SET state = 'bogus'")


def test_mail_from_a_new_sender_when_the_contacts_are_full_is_refused(db: NodeDB) -> None:
    """A sender never seen before needs a contact entry. With the contacts full that
    raised out of `handle`, which ended the node, and again at every login (the envelope
    was not acknowledged): anyone could stop a node by writing from enough addresses."""
    inbox, contacts = Inbox(db), Contacts(db, max_contacts=1)
    contacts.pin_keys("carol@example.net", [BOB.public.verify_key], 1.0)
    mail = IncomingMail(BOB, "bob@example.net", inbox, Outbox(db), Prefs(db), contacts,
                        wall=lambda: 100.0)
    assert mail.handle(pushed(1, ALICE1))[0] is Outcome.REFUSED
    assert inbox.get((1).to_bytes(16, "big")) is None
    assert mail.counters["refused-contacts-full"] == 1
