"""A sender's node against a recipient's hostile or repeated receipts: the reason is filed
readable wherever it is shown (bidi overrides, zero-width and line-separator characters,
a flood of combining marks), a receipt that changes nothing (replayed, stale,
reordered) is taken as a duplicate, which runs no retention pass, and one signed by a
device not trusted for the recipient (its server forging it) is not filed."""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.envelope import seal_for_recipients
from crypto.identity import DeviceIdentity
from overlay.app.web.server import recipient_text
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.inbox import Inbox
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import MAX_MARKS, MAX_REASON, Receipt
from tests.present import present

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)
BOB_SERVER = DeviceIdentity.from_seed(b"s" * 32)  # a key bob's server registered itself
CAROL = DeviceIdentity.from_seed(b"c" * 32)
MID = b"m" * 16


@pytest.fixture
def alice(tmp_path: Path) -> Iterator[tuple[IncomingMail, Outbox]]:
    with NodeDB.open(tmp_path) as db:
        outbox = Outbox(db)
        outbox.add(id=MID, path="/home/alice/clip.ts", title="clip", size=1,
                   content_id=b"c" * 32, created_at=1.0,
                   recipients=["bob@example.net", "carol@example.net"], message=b"\x93")
        outbox.set_recipient_state(MID, "bob@example.net", RecipientStatus.SENT, 1.0)
        contacts = Contacts(db)
        # sealed to when sent, just now (a lookup older than KEYS_FRESH is made again)
        contacts.pin("bob@example.net", BOB.public.verify_key, time.time())
        yield IncomingMail(ALICE, "alice@example.net", Inbox(db), outbox, Prefs(db),
                           contacts, wall=time.time), outbox


def receipt(state: str, reason: str | None = None, sender: str = "bob@example.net",
            signer: DeviceIdentity = BOB) -> Pushed:
    body = Receipt(MID, state, 1_700_000_000, reason).encode()
    ((_, blob),) = seal_for_recipients(signer, "receipt", body, [ALICE.public])
    return Pushed(b"e" * 16, sender, blob)


def bob(outbox: Outbox) -> tuple[RecipientStatus, str | None]:
    r = next(r for r in present(outbox.get(MID)).recipients
             if r.address == "bob@example.net")
    return r.state, r.reason


@pytest.mark.parametrize("reason", [
    "\u202eti sah\u202c: removed",            # a right-to-left override
    "removed\u200b\u2028by\u2029me\ufeff",    # zero-width, line and paragraph separators
    "e" + "\u0301" * (MAX_REASON - 1),        # one letter under 199 accents
])
def test_a_hostile_reason_is_filed_readable(alice: tuple[IncomingMail, Outbox],
                                            reason: str) -> None:
    mail, outbox = alice
    assert mail.handle(receipt("declined", reason))[0] is Outcome.RECEIPT
    state, filed = bob(outbox)
    assert state is RecipientStatus.DECLINED and filed
    assert all(c.isprintable() for c in filed), ascii(filed)
    assert max(len(run) for run in _marks(filed)) <= MAX_MARKS, ascii(filed)
    shown = recipient_text({"state": "declined", "reason": filed})
    assert shown.startswith("will not download it (") and shown.isprintable()


def _marks(text: str) -> list[str]:
    runs, run = [""], ""
    for c in text:
        run = run + c if unicodedata.combining(c) else ""
        runs.append(run)
    return runs


def test_a_receipt_that_changes_nothing_is_a_duplicate(
        alice: tuple[IncomingMail, Outbox]) -> None:
    """Replayed, stale or out of order: taken (acknowledged, counted), but not a RECEIPT,
    after which the node runs a retention pass over the whole outbox (0.17 CPU s with
    10,000 sent messages): a recipient replaying one could keep the node busy."""
    mail, outbox = alice
    assert mail.handle(receipt("declined", "removed by the recipient"))[0] is Outcome.RECEIPT
    for again in (receipt("declined", "removed by the recipient"),  # replayed
                  receipt("declined", "another reason"),
                  receipt("downloading")):  # stale: declined is final but for downloaded
        assert mail.handle(again)[0] is Outcome.DUPLICATE
    assert bob(outbox) == (RecipientStatus.DECLINED, "removed by the recipient")
    assert mail.handle(receipt("downloaded"))[0] is Outcome.RECEIPT  # downloaded wins
    assert mail.handle(receipt("downloaded"))[0] is Outcome.DUPLICATE
    assert bob(outbox) == (RecipientStatus.DOWNLOADED, None)
    assert mail.counters["receipts"] == 2 and mail.counters["receipts-unchanged"] == 4


@pytest.mark.parametrize(("state", "reason"), [("downloaded", None), ("deleted", None),
                                               ("declined", "removed by the recipient")])
def test_a_receipt_signed_by_a_device_not_trusted_for_the_recipient_is_not_filed(
        alice: tuple[IncomingMail, Outbox], caplog: pytest.LogCaptureFixture,
        state: str, reason: str | None) -> None:
    """Bob's server (or anyone it takes as bob@) signs with a key of its own: filed, a
    "downloaded" let retention delete alice's copy while bob had nothing, a "declined"
    stopped the serving. Bob stays `sent`, and bob's own device's receipt is filed after."""
    caplog.set_level(logging.WARNING, "peerpost.incoming")
    mail, outbox = alice
    assert mail.handle(receipt(state, reason, signer=BOB_SERVER))[0] is Outcome.DROPPED
    assert bob(outbox) == (RecipientStatus.SENT, None)
    # Counted apart from a malformed receipt, which an operator reads differently.
    assert mail.counters["dropped-receipt-untrusted"] == 1 and mail.counters["receipts"] == 0
    assert mail.counters["dropped-receipt"] == 0
    assert (f"receipt: signed by device {BOB_SERVER.public.fingerprint()}, not trusted for "
            "bob@example.net") in caplog.text
    assert mail.handle(receipt(state, reason))[0] is Outcome.RECEIPT
    assert bob(outbox)[0] is not RecipientStatus.SENT


def test_a_receipt_signed_by_another_recipients_device_is_not_filed(
        alice: tuple[IncomingMail, Outbox]) -> None:
    """Carol's trusted device can't speak for bob: trust is per recipient."""
    mail, outbox = alice
    mail.contacts.pin("carol@example.net", CAROL.public.verify_key, 1.0)
    assert mail.handle(receipt("downloaded", signer=CAROL))[0] is Outcome.DROPPED
    assert bob(outbox) == (RecipientStatus.SENT, None)


def test_a_malformed_receipt_is_counted_apart_from_an_untrusted_one(
        alice: tuple[IncomingMail, Outbox]) -> None:
    """Bob's own device sends a receipt that does not decode (a bug, a newer format): it
    is dropped as malformed, not counted with forgeries, so an operator reading the
    counters can tell a server speaking for its users from noise."""
    mail, outbox = alice
    ((_, blob),) = seal_for_recipients(BOB, "receipt", b"\xc1 not msgpack", [ALICE.public])
    assert mail.handle(Pushed(b"e" * 16, "bob@example.net", blob))[0] is Outcome.DROPPED
    assert bob(outbox) == (RecipientStatus.SENT, None)
    assert mail.counters["dropped-receipt"] == 1
    assert mail.counters["dropped-receipt-untrusted"] == 0
