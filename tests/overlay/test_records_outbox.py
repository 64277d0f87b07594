"""The outbox: per-recipient progress from acks and receipts, and retention bookkeeping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.identity import DeviceIdentity
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB, RecordLimitError
from overlay.mail.outbox import Outbox, RecipientStatus
from tests.present import present

R = RecipientStatus
MID = b"m" * 16


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def send(outbox: Outbox, mid: bytes = MID, to: tuple[str, ...] = ("bob@b.example",
         "carol@c.example"), at: float = 100.0) -> None:
    outbox.add(id=mid, path="/home/alice/clip.ts", title="holiday", size=5_000_000,
               content_id=b"c" * 32, created_at=at, recipients=to, message=b"signed body")


def test_add_then_get_shows_everyone_queued(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox, to=("Carol@C.example", "bob@b.example", "bob@b.example"))
    e = outbox.get(MID)
    assert e is not None
    assert (e.path, e.title, e.size, e.content_id, e.message) == (
        "/home/alice/clip.ts", "holiday", 5_000_000, b"c" * 32, b"signed body",
    )
    assert [(r.address, r.state, r.updated_at) for r in e.recipients] == [
        ("bob@b.example", R.QUEUED, 100.0), ("carol@c.example", R.QUEUED, 100.0),
    ]
    assert not e.retention_done and not e.all_downloaded
    assert outbox.get(b"x" * 16) is None


def test_add_is_idempotent(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    outbox.set_recipient_state(MID, "bob@b.example", R.SENT, 101.0)
    before = outbox.get(MID)
    assert outbox.add(id=MID, path="/other", title="x", size=1, content_id=b"", created_at=0,
                      recipients=["eve@e.example"]) is False
    assert outbox.get(MID) == before


def test_list_is_newest_first(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox, b"1" * 16, at=1.0)
    send(outbox, b"3" * 16, at=3.0)
    send(outbox, b"2" * 16, at=2.0)
    assert [e.id for e in outbox.list()] == [b"3" * 16, b"2" * 16, b"1" * 16]


def test_awaited_pages_through_every_message_someone_may_still_fetch(db: NodeDB) -> None:
    """Messages with a recipient `sent` or `downloading`, page by page in `list`'s order
    (two sent at the same time by id), past the newest `list` holds."""
    outbox = Outbox(db)
    states = {b"a": R.SENT, b"b": R.DOWNLOADED, b"c": R.DOWNLOADING, b"d": R.QUEUED,
              b"e": R.SENT, b"f": R.SENT}
    for n, (key, state) in enumerate(states.items()):
        mid = key * 16
        send(outbox, mid, to=("bob@b.example",), at=float(n // 2))  # a+b, c+d, e+f tie
        outbox.set_recipient_state(mid, "bob@b.example", state, 10.0)
    want = [e.id for e in outbox.list() if any(
        r.state in (R.SENT, R.DOWNLOADING) for r in e.recipients)]
    assert want == [b"e" * 16, b"f" * 16, b"c" * 16, b"a" * 16]
    got: list[bytes] = []
    after = None
    while page := outbox.awaited(after=after, limit=1):
        got += [e.id for e in page]
        after = (page[-1].created_at, page[-1].id)
    assert got == want
    # Older than the newest two `list` gives: those alone.
    last = outbox.list(limit=2)[-1]
    assert [e.id for e in outbox.awaited(after=(last.created_at, last.id))] == want[2:]


def test_receipts_move_forward_and_late_ones_are_ignored(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    bob = "bob@b.example"
    assert outbox.set_recipient_state(MID, bob, R.SENT, 101.0)
    assert outbox.set_recipient_state(MID, bob, R.DOWNLOADED, 105.0)
    # the "downloading" receipt overtaken by "downloaded", and a duplicate, change nothing
    assert not outbox.set_recipient_state(MID, bob, R.DOWNLOADING, 106.0)
    assert not outbox.set_recipient_state(MID, bob, R.DOWNLOADED, 107.0)
    assert not outbox.set_recipient_state(MID, bob, R.FAILED, 108.0, reason="too late")
    r = present(outbox.get(MID)).recipients[0]
    assert (r.state, r.updated_at) == (R.DOWNLOADED, 105.0)


def test_lost_ack_is_skipped_over(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    assert outbox.set_recipient_state(MID, "carol@c.example", R.DOWNLOADED, 110.0)


def test_failed_needs_a_reason_and_can_be_resent(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    carol = "carol@c.example"
    with pytest.raises(ValueError, match="reason"):
        outbox.set_recipient_state(MID, carol, R.FAILED, 101.0)
    assert outbox.set_recipient_state(MID, carol, R.FAILED, 101.0, reason="unknown address")
    r = present(outbox.get(MID)).recipients[1]
    assert (r.state, r.reason) == (R.FAILED, "unknown address")
    assert not outbox.set_recipient_state(MID, carol, R.SENT, 102.0)
    assert outbox.set_recipient_state(MID, carol, R.QUEUED, 103.0)
    r = present(outbox.get(MID)).recipients[1]
    assert (r.state, r.reason) == (R.QUEUED, None)


def test_unknown_message_or_recipient_is_a_key_error(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    with pytest.raises(KeyError, match=r"no recipient eve@e\.example"):
        outbox.set_recipient_state(MID, "eve@e.example", R.SENT, 1.0)
    with pytest.raises(KeyError):
        outbox.all_downloaded(b"x" * 16)
    with pytest.raises(KeyError):
        outbox.mark_retention_done(b"x" * 16, "keep")


def test_retention_after_everyone_downloaded(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    send(outbox, b"n" * 16, to=("bob@b.example",))
    outbox.set_recipient_state(MID, "bob@b.example", R.DOWNLOADED, 110.0)
    assert not outbox.all_downloaded(MID)
    assert outbox.pending_retention() == []
    outbox.set_recipient_state(MID, "carol@c.example", R.DOWNLOADED, 111.0)
    assert outbox.all_downloaded(MID)
    assert [e.id for e in outbox.pending_retention()] == [MID]
    with pytest.raises(ValueError, match="retention action"):
        outbox.mark_retention_done(MID, "shred")
    outbox.mark_retention_done(MID, "archive")
    e = outbox.get(MID)
    assert e is not None and e.retention_done and e.retention_action == "archive"
    assert outbox.pending_retention() == []


def test_outbox_is_bounded_and_checks_recipients(db: NodeDB) -> None:
    outbox = Outbox(db, max_entries=1)
    send(outbox)
    with pytest.raises(RecordLimitError, match="outbox is full"):
        send(outbox, b"n" * 16)
    assert outbox.remove(MID)
    with pytest.raises(ValueError, match="recipients"):
        send(outbox, to=())
    with pytest.raises(ValueError, match="not a valid address"):
        send(outbox, to=("no-at-sign",))
    assert outbox.list() == []


def test_survives_reopen(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        send(Outbox(db))
        Outbox(db).set_recipient_state(MID, "bob@b.example", R.SENT, 101.0)
    with NodeDB.open(tmp_path) as db:
        assert present(Outbox(db).get(MID)).recipients[0].state is R.SENT


@settings(max_examples=40, deadline=None)
@given(reports=st.lists(st.sampled_from(list(RecipientStatus)), max_size=12))
def test_reports_in_any_order_only_move_forward(tmp_path_factory: pytest.TempPathFactory,
                                                reports: list[RecipientStatus]) -> None:
    rank = {R.QUEUED: 0, R.SENT: 1, R.DOWNLOADING: 2, R.DECLINED: 3, R.DOWNLOADED: 4}
    with NodeDB.open(tmp_path_factory.mktemp("outbox")) as db:
        outbox = Outbox(db)
        send(outbox, to=("bob@b.example",))
        state = R.QUEUED
        for t, report in enumerate(reports):
            changed = outbox.set_recipient_state(MID, "bob@b.example", report, float(t),
                                                 reason="r")
            now = present(outbox.get(MID)).recipients[0].state
            assert changed == (now is not state)
            if state is R.DOWNLOADED:
                assert now is R.DOWNLOADED  # final
            elif state is R.DECLINED:
                assert now in (R.DECLINED, R.DOWNLOADED)  # final but for downloaded
            elif state is not R.FAILED and now is not R.FAILED:
                assert rank[now] >= rank[state]
            state = now


def test_declined_is_final_but_for_a_later_downloaded(db: NodeDB) -> None:
    """A recipient that declined keeps its reason; a repeat, a late `downloading`, the
    sender's own cancel do not move it; a `downloaded` does (it fetched it after all),
    and nothing moves a recipient that downloaded to declined."""
    outbox = Outbox(db)
    send(outbox)
    bob, carol = "bob@b.example", "carol@c.example"
    with pytest.raises(ValueError, match="a declined recipient needs a reason"):
        outbox.set_recipient_state(MID, bob, R.DECLINED, 101.0)
    assert outbox.set_recipient_state(MID, bob, R.SENT, 101.0)
    assert outbox.set_recipient_state(MID, bob, R.DECLINED, 102.0,
                                      reason="removed by the recipient")
    for late in (R.DECLINED, R.DOWNLOADING, R.SENT, R.FAILED, R.QUEUED):
        assert not outbox.set_recipient_state(MID, bob, late, 103.0, reason="other")
    r = present(outbox.get(MID)).recipients[0]
    assert (r.state, r.reason, r.updated_at) == (R.DECLINED, "removed by the recipient",
                                                 102.0)
    assert outbox.set_recipient_state(MID, bob, R.DOWNLOADED, 104.0)
    r = present(outbox.get(MID)).recipients[0]
    assert (r.state, r.reason) == (R.DOWNLOADED, None)
    assert outbox.set_recipient_state(MID, carol, R.DOWNLOADED, 105.0)
    assert not outbox.set_recipient_state(MID, carol, R.DECLINED, 106.0, reason="late")
    assert present(outbox.get(MID)).recipients[1].state is R.DOWNLOADED


def test_a_send_whose_ack_was_lost_takes_a_declined_receipt(db: NodeDB) -> None:
    from overlay.mail.outbox import NOT_SENT, WITHDRAWN_REASON

    outbox = Outbox(db)
    send(outbox)
    outbox.set_recipient_state(MID, "bob@b.example", R.FAILED, 101.0, reason=NOT_SENT)
    assert outbox.set_recipient_state(MID, "bob@b.example", R.DECLINED, 102.0,
                                      reason="source changed")
    # The sender withdrew it from carol: her receipt changes nothing.
    outbox.set_recipient_state(MID, "carol@c.example", R.FAILED, 101.0,
                               reason=WITHDRAWN_REASON)
    assert not outbox.set_recipient_state(MID, "carol@c.example", R.DECLINED, 102.0,
                                          reason="removed by the recipient")


def test_retention_waits_for_everyone_to_download_or_decline(db: NodeDB) -> None:
    outbox = Outbox(db)
    send(outbox)
    outbox.set_recipient_state(MID, "bob@b.example", R.DECLINED, 110.0,
                               reason="removed by the recipient")
    e = outbox.get(MID)
    assert e is not None and not e.settled and not e.anyone_downloaded
    assert outbox.pending_retention() == []
    outbox.set_recipient_state(MID, "carol@c.example", R.DOWNLOADED, 111.0)
    e = outbox.get(MID)
    assert e is not None and e.settled and e.anyone_downloaded and not e.all_downloaded
    assert [e.id for e in outbox.pending_retention()] == [MID]
    # Nobody downloaded: settled all the same (what retention then does is its own test).
    send(outbox, b"n" * 16, to=("bob@b.example",))
    outbox.set_recipient_state(b"n" * 16, "bob@b.example", R.DECLINED, 112.0,
                               reason="source changed")
    outbox.mark_retention_done(MID, "keep")
    assert [e.id for e in outbox.pending_retention()] == [b"n" * 16]
    assert not outbox.pending_retention()[0].anyone_downloaded


def test_send_batches_fit_the_server_limits_and_keep_every_item() -> None:
    from overlay.mail.outgoing import send_batches

    items = [(f"r{i}@example.net", bytes([i]) * 20, b"x" * (9000 + i)) for i in range(40)]
    batches = send_batches(items, max_items=16, max_bytes=100_000)
    assert [it for b in batches for it in b] == items  # nothing lost, order kept
    assert all(len(b) <= 16 for b in batches)
    assert all(sum(len(x[2]) for x in b) <= 100_000 for b in batches)
    assert len(batches) == 4  # ten items of ~9 KB fill 100 KB
    # An item bigger than a batch goes alone, for the server to judge.
    big = [("a@x.net", b"1" * 20, b"y" * 200_000), ("b@x.net", b"2" * 20, b"z")]
    assert send_batches(big, max_bytes=100_000) == [[big[0]], [big[1]]]
    assert send_batches([]) == []


def test_a_device_that_has_not_fetched_keeps_a_downloaded_message_awaited(
        db: NodeDB) -> None:
    """bob's laptop has the message (bob shows `downloaded`) but his phone, also sealed
    to, has not: the message is still awaited and bob's phone owed, until the phone's
    receipt settles it or the phone's key is retired (revoked at bob's server)."""
    outbox, contacts = Outbox(db), Contacts(db)
    bob = "bob@b.example"
    laptop, phone = (DeviceIdentity.generate().public.verify_key for _ in range(2))
    contacts.pin_keys(bob, [laptop, phone], 1.0)
    outbox.add(id=MID, path="/home/alice/clip.ts", title="holiday", size=5_000_000,
               content_id=b"c" * 32, created_at=100.0, recipients=(bob,),
               message=b"signed body", devices=[(bob, laptop), (bob, phone)])
    outbox.set_recipient_state(MID, bob, R.DOWNLOADED, 105.0)
    assert outbox.settle_device(MID, bob, laptop)
    assert outbox.devices_owed([MID]) == {MID: {bob: 1}}
    assert [e.id for e in outbox.awaited()] == [MID]
    contacts.pin_keys(bob, [laptop], 200.0)  # bob's server no longer lists the phone
    assert outbox.devices_owed([MID]) == {} and outbox.awaited() == []


def test_devices_owed_counts_each_listed_messages_devices_in_one_call(db: NodeDB) -> None:
    """`status` reads the devices still to fetch of every message it lists at once: per
    message, per address, the devices sealed to with no settling receipt and a key still
    pinned; a settled device, a retired key and a message not asked about don't count."""
    outbox, contacts = Outbox(db), Contacts(db)
    bob, carol = "bob@b.example", "carol@c.example"
    laptop, phone, tablet, desk = (DeviceIdentity.generate().public.verify_key
                                   for _ in range(4))
    contacts.pin_keys(bob, [laptop, phone, tablet], 1.0)
    contacts.pin_keys(carol, [desk], 1.0)
    bobs = [(bob, laptop), (bob, phone), (bob, tablet)]
    sent = {"both": (b"1" * 16, [*bobs, (carol, desk)]), "all of bob's": (b"2" * 16, bobs),
            "settled": (b"3" * 16, bobs), "not asked": (b"4" * 16, bobs),
            "no devices kept": (b"5" * 16, [])}
    for n, (mid, devices) in enumerate(sent.values()):
        outbox.add(id=mid, path=f"/home/alice/{n}.bin", title=str(n), size=1,
                   content_id=bytes([n]) * 32, created_at=100.0 + n,
                   recipients={a for a, _ in devices} or {bob}, message=b"signed body",
                   devices=devices)
    both, bobs_all, settled, not_asked, none = (mid for mid, _ in sent.values())
    assert outbox.settle_device(both, bob, laptop)
    for key in (laptop, phone, tablet):
        assert outbox.settle_device(settled, bob, key)
    # More ids than one query binds: the messages asked about past the first batch count.
    unknown = [n.to_bytes(16, "big") for n in range(600)]
    assert outbox.devices_owed([*unknown, both, bobs_all, settled, none]) == {
        both: {bob: 2, carol: 1}, bobs_all: {bob: 3}}
    contacts.pin_keys(bob, [laptop, phone], 200.0)  # bob's server no longer lists the tablet
    assert outbox.devices_owed([both, bobs_all, not_asked]) == {
        both: {bob: 1, carol: 1}, bobs_all: {bob: 2}, not_asked: {bob: 2}}
    assert outbox.devices_owed([]) == {}
