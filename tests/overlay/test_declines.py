"""A recipient's declined receipts: queued in node.db by a user's remove or a download that
failed for good (never for a complete, junk or unverified message, never twice), sent by
the receipts loop once the server takes them, and filed by the sender as `declined`."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from crypto.codec import Fields
from crypto.identity import DeviceIdentity
from crypto.location import Description, FolderInfo, Handle, Headers, LocationMessage
from overlay.app.cli import told_text
from overlay.app.fetch import ContentFetch
from overlay.app.holders import HolderFinder
from overlay.app.operations import ControlOperations
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import Contacts
from overlay.mail.db import _MIGRATIONS, NodeDB
from overlay.mail.delivery import Receipts
from overlay.mail.downloads import (
    Activity,
    DownloadFailed,
    DownloadQueue,
    Fetcher,
    NoSourceNow,
    RetryLater,
)
from overlay.mail.folders import FolderError, unpack
from overlay.mail.inbox import Decline, Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import REMOVED_REASON
from overlay.transfer.downloader import WITHDRAWN_FAILURE
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import connect_tcp
from rendezvous.client import RendezvousError
from tests.present import present

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)
S = InboxState


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path / "bob") as opened:
        yield opened


def location(n: int) -> LocationMessage:
    return LocationMessage(
        headers=Headers(message_id=bytes([n]) * 16, sender="alice@example.net",
                        sender_peer_id=ALICE.peer_id, recipients=("bob@example.net",),
                        created=1_700_000_000),
        description=Description(title=f"clip {n}", file_name="clip.ts"),
        handle=Handle(content_id=bytes([n]) * 32, size=3_000_000, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32))


def offer(inbox: Inbox, n: int, **flags: bool) -> bytes:
    msg = location(n)
    inbox.add(id=msg.headers.message_id, sender="alice@example.net",
              sender_peer_id=ALICE.peer_id, title=f"clip {n}", note="", size=3_000_000,
              file_name="clip.ts", media_type="video/mp2t", content_id=msg.handle.content_id,
              chunk_count=3, message=msg.encode(), received_at=1000.0 + n, **flags)
    return msg.headers.message_id


async def never_completes(entry: InboxEntry, msg: LocationMessage) -> None:
    """The download queue's completion hook where every download fails."""
    raise AssertionError("nothing completes")


def owed(inbox: Inbox) -> dict[bytes, str]:
    return {mid: reason for mid, _, reason, _ in inbox.declines_owed()}


def test_one_decline_per_message_and_none_for_complete_junk_or_unverified(
        db: NodeDB, tmp_path: Path) -> None:
    inbox = Inbox(db)
    removed, failed, complete = offer(inbox, 1), offer(inbox, 2), offer(inbox, 3)
    junk, unverified = offer(inbox, 4, junk=True), offer(inbox, 5, unverified=True)

    assert inbox.remove(removed, decline=Decline(REMOVED_REASON, 5.0))
    inbox.transition(failed, S.DOWNLOADING)
    inbox.transition(failed, S.FAILED, error="source changed: ...",
                     decline=Decline("source changed", 6.0))
    inbox.transition(failed, S.DOWNLOADING)  # the user tried again: failed again
    inbox.transition(failed, S.FAILED, error="x", decline=Decline("refused: other", 7.0))
    assert inbox.remove(failed, decline=Decline(REMOVED_REASON, 8.0))
    inbox.transition(complete, S.DOWNLOADING)
    inbox.transition(complete, S.COMPLETE, path="/home/bob/clip.ts")
    for mid in (complete, junk, unverified):
        assert inbox.remove(mid, decline=Decline(REMOVED_REASON, 9.0))
    assert not inbox.remove(removed, decline=Decline(REMOVED_REASON, 9.0))
    assert owed(inbox) == {removed: REMOVED_REASON, failed: "source changed"}
    assert inbox.list(include_junk=True) == []
    raw = inbox.declines_owed()[0][1]
    assert raw == location(1).encode()  # the message outlives the entry

    inbox.mark_decline_sent(removed, 10.0)
    # The server hands the message again (a lost REMOVE): a second rm tells nobody.
    offer(inbox, 1)
    inbox.remove(removed, decline=Decline(REMOVED_REASON, 11.0))
    assert owed(inbox) == {failed: "source changed"}
    db.close()
    with NodeDB.open(tmp_path / "bob") as again:  # queued durably
        assert owed(Inbox(again)) == {failed: "source changed"}
        assert Inbox(again).declined(removed) == (REMOVED_REASON, 10.0)


async def test_the_queue_declines_only_a_download_failed_for_good(db: NodeDB) -> None:
    """A refused archive is declined with the fetcher's short reason; a retry, the
    sender's own withdrawal (declined=None) and a bug of ours tell the sender nothing."""
    inbox = Inbox(db)
    refused, retried, withdrawn, bug = (offer(inbox, n) for n in (1, 2, 3, 4))
    ends = {refused: DownloadFailed("refused to unpack /home/bob/x.tar: ...",
                                    declined="refused: 'top/../x': outside top/"),
            retried: RetryLater("no source reachable"),
            withdrawn: DownloadFailed("withdrawn: the sender cancelled this message"),
            bug: RuntimeError("a bug")}
    woken: list[int] = []

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        raise ends[entry.id]

    q = DownloadQueue(inbox, Prefs(db), fetch, never_completes, wall=time.time,
                      rng=random.Random(1), max_active=4, retry_base=60,
                      on_declined=lambda: woken.append(1))
    runner = asyncio.create_task(q.run())
    try:
        async with asyncio.timeout(10):
            while any(e.state in (S.OFFERED, S.DOWNLOADING) for e in inbox.list()):
                await q.changed().wait()
    finally:
        runner.cancel()
        await asyncio.wait({runner})
    states = {e.id: e.state for e in inbox.list()}
    assert states == {refused: S.FAILED, retried: S.RETRYING, withdrawn: S.FAILED,
                      bug: S.FAILED}
    assert owed(inbox) == {refused: "refused: 'top/../x': outside top/"}
    assert woken == [1]


class _Server:
    """The rendezvous client's SEND: refused while `down`, else kept."""

    def __init__(self) -> None:
        self.down = True
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.tried = asyncio.Event()
        self._up = asyncio.Event()

    @property
    def connected(self) -> bool:
        return not self.down

    async def wait_connected(self) -> None:
        await self._up.wait()

    def come_back(self) -> None:
        """The session is back, as the client's reconnect sets it."""
        self.down = False
        self._up.set()

    async def send(self, mid: bytes, items: list[tuple[str, bytes, bytes]]) -> None:
        self.tried.set()
        if self.down:
            raise RendezvousError(0, "server unreachable")
        self.sent += items


class _Rounds(Inbox):
    """An inbox that says when the receipts loop has looked at the declines (a round)."""

    def __init__(self, db: NodeDB) -> None:
        super().__init__(db)
        self.loop = asyncio.get_running_loop()
        self.round = asyncio.Event()

    def declines_owed(self, limit: int = 100, after: tuple[float, bytes] | None = None,
                      ) -> list[tuple[bytes, bytes, str, float]]:
        self.loop.call_soon_threadsafe(self.round.set)
        return super().declines_owed(limit, after)

    async def next_round(self) -> None:
        self.round.clear()
        await self.round.wait()


async def test_a_decline_goes_once_when_the_server_takes_it_and_the_sender_files_it(
        db: NodeDB, tmp_path: Path) -> None:
    inbox = _Rounds(db)
    mid = offer(inbox, 1)
    inbox.remove(mid, decline=Decline(REMOVED_REASON, 1_700_000_100.0))
    server = _Server()
    contacts = SimpleNamespace(trusted_keys=lambda sender: [ALICE.public.verify_key])
    receipts = Receipts(BOB, server, inbox, contacts,  # type: ignore[arg-type]
                        wall=time.time, retry=3600)
    loop = asyncio.create_task(receipts.owed())
    try:
        async with asyncio.timeout(10):
            await server.tried.wait()  # the first round: the server is away
            assert owed(inbox) == {mid: REMOVED_REASON}
            server.down = False
            # Woken as a new decline wakes it, each round comes at once; the third
            # starting means the second (which found nothing owed) has ended.
            for _ in range(3):
                receipts.wake()
                await inbox.next_round()
    finally:
        assert not loop.done(), loop.exception()
        loop.cancel()
        await asyncio.wait({loop})
    assert owed(inbox) == {}
    assert len(server.sent) == 1  # once, though woken again
    to, peer, blob = server.sent[0]
    assert (to, peer) == ("alice@example.net", ALICE.peer_id)

    # Alice's node files it: Bob declined, with his reason.
    with NodeDB.open(tmp_path / "alice") as adb:
        outbox = Outbox(adb)
        outbox.add(id=mid, path="/home/alice/clip.ts", title="clip 1", size=3_000_000,
                   content_id=b"\x01" * 32, created_at=1.0,
                   recipients=["bob@example.net"], message=location(1).encode())
        alice_contacts = Contacts(adb)
        alice_contacts.pin("bob@example.net", BOB.public.verify_key, 1.0)
        incoming = IncomingMail(ALICE, "alice@example.net", Inbox(adb), outbox, Prefs(adb),
                                alice_contacts, wall=lambda: 50.0)
        outcome, _ = incoming.handle(Pushed(b"e" * 16, "bob@example.net", blob))
        assert outcome is Outcome.RECEIPT
        r = present(outbox.get(mid)).recipients[0]
        assert (r.state, r.reason) == (RecipientStatus.DECLINED, REMOVED_REASON)


def test_upgrade_to_v5_keeps_the_outbox_and_allows_declined(tmp_path: Path) -> None:
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 4}
    with NodeDB.open(tmp_path, migrations=steps) as old:
        Outbox(old).add(id=b"m" * 16, path="/home/alice/clip.ts", title="clip", size=1,
                        content_id=b"c" * 32, created_at=1.0,
                        recipients=["bob@example.net", "carol@example.net"], message=b"\x93")
        Outbox(old).set_recipient_state(b"m" * 16, "bob@example.net",
                                        RecipientStatus.DOWNLOADED, 2.0)
    with NodeDB.open(tmp_path) as db:
        outbox = Outbox(db)
        assert [(r.address, r.state) for r in present(outbox.get(b"m" * 16)).recipients] == [
            ("bob@example.net", RecipientStatus.DOWNLOADED),
            ("carol@example.net", RecipientStatus.QUEUED)]
        assert outbox.set_recipient_state(b"m" * 16, "carol@example.net",
                                          RecipientStatus.DECLINED, 3.0, reason="no")
        with pytest.raises(sqlite3.IntegrityError):  # a declined one without its reason
            with db.transaction() as conn:
                conn.execute("UPDATE outbox_recipient SET reason = NULL")
        assert outbox.remove(b"m" * 16)  # the recipients go with it (the foreign key)
        assert db.query("SELECT * FROM outbox_recipient") == []


async def test_a_sender_put_on_the_junk_list_after_its_message_came_is_told_nothing(
        db: NodeDB) -> None:
    """The entry's junk flag says how its sender was classed when it arrived; a sender
    the user puts on the junk list afterwards learns nothing either, from a remove or
    from a download that fails for good."""
    inbox = Inbox(db)
    removed, failed = offer(inbox, 1), offer(inbox, 2)
    prefs = Prefs(db)
    prefs.add_junk("alice@example.net")

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        raise DownloadFailed("source changed: ...", declined="source changed")

    woken: list[int] = []
    q = DownloadQueue(inbox, prefs, fetch, never_completes, wall=time.time,
                      rng=random.Random(1), on_declined=lambda: woken.append(1))
    await q.cancel(removed, remove=True, decline=Decline(REMOVED_REASON, 5.0))
    q.request(failed)
    runner = asyncio.create_task(q.run())
    try:
        async with asyncio.timeout(10):
            while present(inbox.get(failed)).state is not S.FAILED:
                await q.changed().wait()
    finally:
        runner.cancel()
        await asyncio.wait({runner})
    assert inbox.get(removed) is None
    assert owed(inbox) == {}
    assert inbox.declined(removed) is None and inbox.declined(failed) is None
    assert woken == []


def test_a_refused_archives_reason_names_no_path_of_the_recipient(tmp_path: Path) -> None:
    """What a declined receipt says of a refused folder archive (FolderError.why) goes to
    the sender: a link leading out of the folder is refused without the path it would
    reach on the recipient's disk (tarfile's own text names it: the sender's link,
    resolved where the recipient keeps its downloads, would tell where that is)."""
    received = tmp_path / "bob" / "received"
    received.mkdir(parents=True)
    archive = received / "top.tar"
    with tarfile.open(archive, "w") as tar:
        for name, kind, target in (("top/up", tarfile.SYMTYPE, "../../x"),
                                   ("top/hard", tarfile.LNKTYPE, "top/../../y")):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            tar.addfile(member)
    with pytest.raises(FolderError) as err:
        unpack(archive, FolderInfo("top", 2, 0, 0), received)
    why = err.value.why
    assert why == ("'top/up': a link that leads outside the folder; "
                   "'top/hard': a link that leads outside the folder"), why
    assert str(tmp_path) not in why
    assert f"the archive is kept at {archive}" in str(err.value)  # the user's own text


async def test_declines_a_sender_cannot_take_do_not_hold_up_the_others(db: NodeDB) -> None:
    """A sender with no trusted key any more (or that the server refuses) never takes its
    declines: they stay owed, and go on being tried, but the ones after them go."""
    inbox = _Rounds(db)
    for n, mid in enumerate(_from_a_gone_sender(inbox, 105), 1):
        inbox.remove(mid, decline=Decline(REMOVED_REASON, float(n)))
    latest = offer(inbox, 200)
    inbox.remove(latest, decline=Decline(REMOVED_REASON, 1_000.0))
    assert await _one_round_alice_trusted(inbox) == ["alice@example.net"]
    declined = inbox.declined(latest)
    assert declined is not None and declined[0] == REMOVED_REASON
    assert declined[1] == pytest.approx(time.time(), abs=60)  # sent this round
    assert len(inbox.declines_owed(limit=1000)) == 105  # still owed, tried each round


async def test_downloaded_receipts_a_sender_cannot_take_do_not_hold_up_the_others(
        db: NodeDB) -> None:
    """The same for the receipts of complete downloads: the 100 oldest, to a sender with
    no trusted key, were all the loop read each round, and a later one never went."""
    inbox = _Rounds(db)
    _from_a_gone_sender(inbox, 105)
    latest = offer(inbox, 200)
    for entry in inbox.list(limit=1000):
        inbox.transition(entry.id, S.DOWNLOADING)
        inbox.transition(entry.id, S.COMPLETE, path=f"/home/bob/{entry.id.hex()}.ts")
    assert await _one_round_alice_trusted(inbox) == ["alice@example.net"]
    left = inbox.receipts_owed(limit=1000)
    assert len(left) == 105 and latest not in {mid for mid, _, _ in left}


def _from_a_gone_sender(inbox: Inbox, count: int) -> list[bytes]:
    """`count` messages received (at 1.0, 2.0, ...) from a sender this node has no
    trusted key for any more: more than one page of the oldest."""
    mids = []
    for n in range(1, count + 1):
        msg = location(n)
        gone = replace(msg, headers=replace(msg.headers, sender="gone@example.net"))
        inbox.add(id=gone.headers.message_id, sender="gone@example.net",
                  sender_peer_id=ALICE.peer_id, title="old", note="", size=3_000_000,
                  file_name="clip.ts", media_type="video/mp2t",
                  content_id=gone.handle.content_id, chunk_count=3,
                  message=gone.encode(), received_at=float(n))
        mids.append(gone.headers.message_id)
    return mids


async def _one_round_alice_trusted(inbox: _Rounds, server: _Server | None = None) -> list[str]:
    """Who the receipts loop sent to in its first round, alice's the only trusted key."""
    server = server or _Server()
    server.down = False
    contacts = SimpleNamespace(trusted_keys=lambda sender: [ALICE.public.verify_key]
                               if sender == "alice@example.net" else [])
    receipts = Receipts(BOB, server, inbox, contacts,  # type: ignore[arg-type]
                        wall=time.time, retry=3600)
    loop = asyncio.create_task(receipts.owed())
    try:
        async with asyncio.timeout(10):
            await server.tried.wait()
            receipts.wake()  # the next round starting means the first has ended
            await inbox.next_round()
    finally:
        assert not loop.done(), loop.exception()
        loop.cancel()
        await asyncio.wait({loop})
    return [to for to, _, _ in server.sent]


async def test_a_receipt_the_server_missed_goes_when_the_session_is_back(
        db: NodeDB) -> None:
    """A download completed while the server was away: its receipt goes as soon as the
    session is back, not at the next round `retry` (an hour here) later. Nothing wakes the
    loop but the reconnect."""
    inbox = _Rounds(db)
    mid = offer(inbox, 1)
    inbox.transition(mid, S.DOWNLOADING)
    entry = inbox.transition(mid, S.COMPLETE, path="/home/bob/clip.ts")
    server = _Server()
    contacts = SimpleNamespace(trusted_keys=lambda sender: [ALICE.public.verify_key])
    receipts = Receipts(BOB, server, inbox, contacts,  # type: ignore[arg-type]
                        wall=time.time, retry=3600)
    await receipts.completed(entry, location(1))  # the server is away: owed
    assert [m for m, _, _ in inbox.receipts_owed()] == [mid]
    server.tried.clear()
    loop = asyncio.create_task(receipts.owed())
    try:
        async with asyncio.timeout(10):
            await server.tried.wait()  # the loop's round: the server is still away
            await inbox.next_round()  # ... and that round has ended
            server.come_back()
            await inbox.next_round()  # a round, though nothing woke the loop
    finally:
        assert not loop.done(), loop.exception()
        loop.cancel()
        await asyncio.wait({loop})
    assert inbox.receipts_owed() == []
    assert [(to, peer) for to, peer, _ in server.sent] == [("alice@example.net",
                                                            ALICE.peer_id)]


NO_SOURCE = NoSourceNow("no source reachable for 3 missing chunks (alice: no content 0101)",
                        none_serve=True)


def _failed_for_good(inbox: Inbox, n: int) -> bytes:
    """Message `n`, failed with `source changed`, its declined receipt queued."""
    mid = offer(inbox, n)
    inbox.transition(mid, S.DOWNLOADING)
    inbox.transition(mid, S.FAILED, error="source changed: ...",
                     decline=Decline("source changed", 5.0))
    return mid


async def _tried_once(db: NodeDB, inbox: Inbox, fetch: Fetcher,
                      mids: tuple[bytes, ...]) -> None:
    """Try again (`fetch`) each of `mids` through a download queue, until none is
    downloading any more."""
    q = DownloadQueue(inbox, Prefs(db), fetch, never_completes, wall=time.time,
                      rng=random.Random(1), max_active=4, retry_base=60)
    for mid in mids:
        q.request(mid)
    runner = asyncio.create_task(q.run())
    try:
        async with asyncio.timeout(20):
            while any(e.state is S.DOWNLOADING for e in inbox.list()):
                await q.changed().wait()
    finally:
        runner.cancel()
        await asyncio.wait({runner})


async def test_try_again_of_a_message_whose_sender_was_told_ends_when_no_source_has_it(
        db: NodeDB) -> None:
    """Every recipient declined, so the sender stopped serving it: Try again of a message
    whose decline the sender has fails, saying so, when no source serves it. It was
    `retrying` for ever, at `no source reachable`. A message it never declined, or whose
    decline did not go (the user took it back by asking again), is tried again later as
    before; so is a full disk."""
    inbox = Inbox(db)
    told, plain, disk = _failed_for_good(inbox, 1), offer(inbox, 2), _failed_for_good(inbox, 3)
    for mid in (told, disk):
        inbox.mark_decline_sent(mid, 6.0)
    ends: dict[bytes, RetryLater] = {told: NO_SOURCE, plain: NO_SOURCE,
                                     disk: RetryLater("the disk is full")}

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Any) -> str:
        raise ends[entry.id]

    await _tried_once(db, inbox, fetch, (told, plain, disk))
    e = inbox.get(told)
    assert e is not None and e.state is S.FAILED
    assert e.error == ("no source has it: alice@example.net was told you would not download "
                       "it (source changed) and may have stopped serving it; ask them to "
                       "send it again (no source reachable for 3 missing chunks (alice: no "
                       "content 0101))")
    assert present(inbox.get(plain)).state is S.RETRYING
    assert present(inbox.get(disk)).state is S.RETRYING
    assert owed(inbox) == {} and inbox.declined(told) == ("source changed", 6.0)


class _Holders:
    """The HolderFinder's part a ContentFetch uses: each message's sources, given."""

    def __init__(self, sources: dict[bytes, list[Source]]) -> None:
        self.given = sources

    async def sender_source(self, msg: LocationMessage) -> Source:
        return self.given[msg.headers.message_id][0]

    async def co_sources(self, msg: LocationMessage) -> list[Source]:
        return self.given[msg.headers.message_id][1:]

    async def refresh(self, dl: Any, msg: LocationMessage,
                      stuck: asyncio.Event | None = None) -> None:
        await asyncio.Event().wait()  # no new holders while a download runs

    def forget(self, address: str) -> None:
        pass  # no FINGER answer is kept: the sources are given


async def test_try_again_after_the_decline_went_fails_only_when_every_source_says_no_content(
        tmp_path: Path, db: NodeDB) -> None:
    """Real transfer servers on 127.0.0.1 behind a real ContentFetch: Try again of a
    message whose decline the sender has fails for good when the sender answers that it
    has no such content, and only then. A sender that can't be reached (offline), or a
    co-recipient that can't be reached while the sender says no content, may serve it
    later: those are retried as before (both failed for good at once on the old code)."""
    serving = TransferServer(ALICE, ContentStore(tmp_path / "alice"))  # holds nothing
    gone = TransferServer(DeviceIdentity.from_seed(b"c" * 32), ContentStore(tmp_path / "c"))
    store = ContentStore(tmp_path / "bob-store")
    try:
        host, port = await serving.start("127.0.0.1", 0)
        gone_host, gone_port = await gone.start("127.0.0.1", 0)
        await gone.aclose()  # offline: its port refuses

        def source(label: str, at: tuple[str, int], peer_id: bytes) -> Source:
            async def connect() -> Stream:
                return await connect_tcp(*at, timeout=5)
            return Source(label, connect, peer_id)

        alice = source("alice", (host, port), ALICE.peer_id)
        alice_offline = source("alice", (gone_host, gone_port), ALICE.peer_id)
        carol_offline = source("carol", (gone_host, gone_port), gone.identity.peer_id)
        inbox = Inbox(db)
        no_content, offline, co_offline = (_failed_for_good(inbox, n) for n in (1, 2, 3))
        for mid in (no_content, offline, co_offline):
            inbox.mark_decline_sent(mid, 6.0)
        finder = _Holders({no_content: [alice], offline: [alice_offline],
                           co_offline: [alice, carol_offline]})
        fetch = ContentFetch(BOB, store, cast(HolderFinder, finder),
                             dest=tmp_path / "received", announce=lambda cid: None,
                             window=4, connect_timeout=5.0)
        await _tried_once(db, inbox, fetch, (no_content, offline, co_offline))
        states = {mid: inbox.get(mid) for mid in (no_content, offline, co_offline)}
        e = states[no_content]
        assert e is not None and e.state is S.FAILED, e and e.error
        assert e.error is not None and e.error.startswith(
            "no source has it: alice@example.net was told you would not download it (source "
            "changed) and may have stopped serving it; ask them to send it again (no source "
            "reachable for 3 missing chunks (alice: 404 no such content here")
        for mid in (offline, co_offline):
            e = states[mid]
            assert e is not None and e.state is S.RETRYING, e and e.error
            assert e.error is not None and "cannot connect" in e.error
        assert owed(inbox) == {}
    finally:
        await serving.aclose()
        store.close()


async def test_fetch_takes_back_a_decline_not_sent_and_says_when_the_sender_has_it(
        db: NodeDB) -> None:
    """`fetch` (Try again) of a message failed for good: a decline still queued does not
    go (the user wants it after all); one the sender has is in the answer, which the CLI
    and the web show at once."""
    inbox = Inbox(db)
    queued, sent = _failed_for_good(inbox, 1), _failed_for_good(inbox, 2)
    inbox.mark_decline_sent(sent, 6.0)
    ops = _operations(db, inbox)
    res = await ops.fetch(Fields({"id": queued.hex()}, "fetch"))
    assert res["state"] == "downloading" and res["declined"] is None
    assert owed(inbox) == {} and inbox.declined(queued) is None
    res = await ops.fetch(Fields({"id": sent.hex()}, "fetch"))
    assert res["declined"] == {"reason": "source changed", "sent": True}
    assert inbox.declined(sent) == ("source changed", 6.0)


def _operations(db: NodeDB, inbox: Inbox) -> ControlOperations:
    """Bob's control operations over `inbox`; the network parts they don't use left out."""
    prefs = Prefs(db)
    downloads = DownloadQueue(inbox, prefs, fetch=None, on_complete=None,  # type: ignore[arg-type]
                              wall=time.time, rng=random.Random(1))
    none: Any = None
    return ControlOperations(
        BOB, "bob@example.net", listen_addr=None, rendezvous=none,
        incoming=SimpleNamespace(counters={"refused-inbox-full": 0}),  # type: ignore[arg-type]
        sender=none, inbox=inbox, outbox=Outbox(db), prefs=prefs, contacts=none,
        downloads=downloads, transfer=none, max_in_flight=1)


async def test_rm_says_what_the_sender_hears(db: NodeDB) -> None:
    """`rm` of a message unread tells its sender; of one whose download failed for good,
    the decline was queued then, with that reason (and may have gone): `rm` said 'is told
    you will not download it' of each, as though the remove were the news."""
    inbox = Inbox(db)
    unread, queued, sent = offer(inbox, 1), _failed_for_good(inbox, 2), _failed_for_good(inbox, 3)
    inbox.mark_decline_sent(sent, 6.0)
    ops = _operations(db, inbox)
    said = {}
    for mid in (unread, queued, sent):
        (r,) = (await ops.rm(Fields({"id": mid.hex()}, "rm")))["removed"]
        said[mid] = told_text(r)
    assert said == {
        unread: "alice@example.net is told you will not download it",
        queued: "alice@example.net is told you will not download it (source changed)",
        sent: "alice@example.net was already told you will not download it (source changed)"}
    assert owed(inbox) == {unread: REMOVED_REASON, queued: "source changed"}
    # Fetched after all (Try again, from a co-recipient): its sender has 'downloaded' last.
    got = _failed_for_good(inbox, 4)
    inbox.mark_decline_sent(got, 6.0)
    inbox.transition(got, S.DOWNLOADING)
    inbox.transition(got, S.COMPLETE, path="/home/bob/clip.ts")
    (r,) = (await ops.rm(Fields({"id": got.hex()}, "rm")))["removed"]
    assert r["sender_told"] is None
    # Withdrawn by its sender (`cancel`): nothing to tell, and nothing is sent.
    gone = offer(inbox, 5)
    inbox.transition(gone, S.DOWNLOADING)
    inbox.transition(gone, S.FAILED, error=WITHDRAWN_FAILURE)
    (r,) = (await ops.rm(Fields({"id": gone.hex()}, "rm")))["removed"]
    assert r["sender_told"] is None
    assert gone not in owed(inbox)


async def test_a_decline_taken_back_while_on_its_way_is_known_as_sent(db: NodeDB) -> None:
    """The user presses Try again while the receipts loop hands the decline to the
    server: taken back, yet the sender has it. It is recorded as sent, so the retry knows
    the sender may have stopped serving (NoSourceNow); it was forgotten, and the retry
    could wait for ever again."""
    inbox = _Rounds(db)
    mid = _failed_for_good(inbox, 1)

    class TakenBackOnItsWay(_Server):
        async def send(self, to: bytes, items: list[tuple[str, bytes, bytes]]) -> None:
            assert inbox.take_back_decline(mid)  # `fetch` meanwhile
            await super().send(to, items)

    assert await _one_round_alice_trusted(inbox, TakenBackOnItsWay()) == ["alice@example.net"]
    assert owed(inbox) == {}
    told = inbox.declined(mid)
    assert told is not None and told[0] == "source changed" and told[1] is not None
