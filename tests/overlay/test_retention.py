"""The sender's retention pass (`apply_retention`) over a real node.db and content store:
a copy another message still needs is kept however long the outbox is, and the pass
reads what it settles, never the whole outbox (it listed it once per message settled)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from crypto.identity import DeviceIdentity
from crypto.location import FolderInfo
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.folders import outgoing_dir, plan_pack, release_archives, write_map
from overlay.mail.inbox import Inbox
from overlay.mail.inbox_state import InboxState
from overlay.mail.outbox import (
    ALL_SENT,
    Outbox,
    OutboxEntry,
    RecipientStatus,
    Served,
    Undone,
)
from overlay.mail.outgoing import MailSender
from overlay.mail.prefs import Prefs, Retention
from overlay.mail.retention import apply_retention
from rendezvous.records import DeviceInfo, FingerResult

BOB = "bob@example.net"
BOB_KEY = DeviceIdentity.from_seed(b"b" * 32).public.verify_key


class CountedOutbox(Outbox):
    """An outbox that counts how often it is listed."""

    def __init__(self, db: NodeDB) -> None:
        super().__init__(db)
        self.lists = 0

    def list(self, *, limit: int = 1000) -> list[OutboxEntry]:
        self.lists += 1
        return super().list(limit=limit)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path / "alice") as opened:
        yield opened


def sent(outbox: Outbox, n: int, content_id: bytes, path: Path, *,
         downloaded: bool = True) -> bytes:
    """Message `n` of `content_id` to bob, sent at time `n`, downloaded by him (or not)."""
    mid = n.to_bytes(16, "big")
    outbox.add(id=mid, path=str(path), title=f"clip {n}", size=path.stat().st_size,
               content_id=content_id, created_at=float(n), recipients=[BOB],
               message=b"\x93")
    outbox.set_recipient_state(mid, BOB, RecipientStatus.SENT, float(n))
    if downloaded:
        outbox.set_recipient_state(mid, BOB, RecipientStatus.DOWNLOADED, float(n))
    return mid


def test_a_copy_another_message_needs_is_kept_however_many_were_sent_since(
        db: NodeDB, tmp_path: Path) -> None:
    """The same file sent twice, long ago: the first message is settled, the second not.
    With retention `delete` the copy stays until the second is settled too, though 1,000
    messages were sent since. The pass looked only at the newest 1,000 for another
    message of the content, deleted the user's file and left the second one nothing to
    serve."""
    store = ContentStore(tmp_path / "store")
    clip = tmp_path / "clip.bin"
    clip.write_bytes(os.urandom(100_000))
    cid = store.add_local_file_blocking(clip).content_id
    other = tmp_path / "other.bin"
    other.write_bytes(b"x")
    outbox, prefs = CountedOutbox(db), Prefs(db)
    prefs.retention = "delete"
    first = sent(outbox, 1, cid, clip)
    second = sent(outbox, 2, cid, clip, downloaded=False)
    for n in range(3, 1003):
        sent(outbox, n, os.urandom(32), other, downloaded=False)

    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(first, "keep")]
    assert clip.exists() and store.local(cid) is not None
    assert outbox.lists == 0  # what it settles and the folder maps, not every message

    outbox.set_recipient_state(second, BOB, RecipientStatus.DOWNLOADED, 2000.0)
    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(second, "delete")]
    assert not clip.exists() and store.local(cid) is None
    e = outbox.get(second)
    assert e is not None and e.retention_action == "delete"


def test_the_same_file_sent_again_as_a_new_content_keeps_it_for_that_message(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """The same file sent twice is two contents (each send names it with a fresh key): with
    `delete`, the first message settled deleted the file the second still serves."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(data := os.urandom(50_000))
    outbox, prefs = Outbox(db), Prefs(db)
    prefs.retention = "delete"
    first = sent(outbox, 1, store.add_local_file_blocking(clip).content_id, clip)
    second = sent(outbox, 2, store.add_local_file_blocking(clip).content_id, clip,
                  downloaded=False)
    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(first, "keep")]
    _still_served(store, outbox, second, clip, data)


def test_the_outbox_is_not_listed_however_many_are_settled(db: NodeDB,
                                                           tmp_path: Path) -> None:
    """200 messages settled at once (a start after a crash, a burst of receipts): the
    pass listed the whole outbox again for each of them. Two messages of the
    same content (7 and 9): the older keeps the copy for the newer, which applies
    `delete`; each of the others has a file of its own."""
    store = ContentStore(tmp_path / "store")
    outbox, prefs = CountedOutbox(db), Prefs(db)
    prefs.retention = "delete"
    shared = os.urandom(32)
    for n in range(1, 201):
        clip = tmp_path / f"clip{9 if n == 7 else n}.bin"
        clip.write_bytes(b"c")
        sent(outbox, n, shared if n in (7, 9) else os.urandom(32), clip)
    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert outbox.lists == 0
    assert len(done) == 200 and all(e.retention_done for e in outbox.list(limit=ALL_SENT))
    assert [int.from_bytes(e.id, "big") for e, _ in done] == list(range(1, 201))
    assert {int.from_bytes(e.id, "big") for e, action in done if action == "keep"} == {7}


@pytest.mark.parametrize("downloaded", [False, True])
def test_a_folder_nobody_will_fetch_any_more_is_logged(
        db: NodeDB, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        downloaded: bool) -> None:
    """Every recipient declined a folder (or has it): its map goes and the folder is no
    longer served, and the log says so as it does for a file. Nothing was logged when all
    declined, and 'copy deleted' when one had it, though the user's folder stays."""
    store = ContentStore(tmp_path / "store")
    folder_map = outgoing_dir(store.root) / "sunday.map"
    folder_map.parent.mkdir()
    folder_map.write_bytes(b"the map")
    outbox = Outbox(db)
    mid = sent(outbox, 1, os.urandom(32), folder_map, downloaded=downloaded)
    if not downloaded:
        outbox.set_recipient_state(mid, BOB, RecipientStatus.DECLINED, 2.0,
                                   reason="removed by the recipient")
    caplog.set_level(logging.INFO, "peerpost")
    apply_retention(outbox, store, Prefs(db), tmp_path / "archive")
    who = "has it or declined it" if downloaded else "declined it"
    assert (f"message {mid.hex()}: every recipient {who}; the folder is kept and no longer "
            f"served (its map {folder_map} goes)") in caplog.text
    assert "copy deleted" not in caplog.text
    assert f"deleted the folder map {folder_map}" in caplog.text and not folder_map.exists()


class _Server:
    """The rendezvous client as a send uses it: FINGER answered once `answer` is set."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.answer.set()

    async def finger(self, address: str) -> FingerResult:
        self.asked.set()
        await self.answer.wait()
        return FingerResult(address, (DeviceInfo(BOB_KEY, True, None, {}),))

    async def send(self, message_id: bytes, items: list[Any]) -> None:
        pass


class _PausedOutbox(Outbox):
    """An outbox whose retention pass, once it has read what it settles, waits for
    `go_on` (set by the test once a send ran in between)."""

    def __init__(self, db: NodeDB) -> None:
        super().__init__(db)
        self.read, self.go_on = threading.Event(), threading.Event()

    def not_done(self, entries: Iterable[OutboxEntry], served: Served | None = None
                 ) -> Undone:
        counts = super().not_done(entries, served)
        self.read.set()
        if not self.go_on.wait(10):
            raise AssertionError("the test did not let the pass go on")
        return counts


def _sender(db: NodeDB, store: ContentStore, outbox: Outbox) -> tuple[MailSender, _Server]:
    """A real MailSender, its server answering FINGER once `answer` is set."""
    server = _Server()
    sender = MailSender(DeviceIdentity.from_seed(b"a" * 32), "alice@example.net",
                        rendezvous=cast(Any, server), store=store, contacts=Contacts(db),
                        outbox=outbox, announce=lambda cid: None, direct_addresses=list,
                        home_server="example.net", wall=lambda: 1000.0)
    return sender, server


def _sent_once_delete(db: NodeDB, store: ContentStore, outbox: Outbox, clip: Path
                      ) -> tuple[bytes, MailSender, _Server]:
    """`clip` sent once (by hand) and downloaded, retention `delete`; a real MailSender."""
    Prefs(db).retention = "delete"
    first = sent(outbox, 1, store.add_local_file_blocking(clip).content_id, clip)
    return first, *_sender(db, store, outbox)


def _again(clip: Path, by: str) -> Path:
    """The name the file is sent by again: its own, or a symlink to it."""
    if by == "its name":
        return clip
    link = clip.with_name("link.bin")
    link.symlink_to(clip)
    return link


def _still_served(store: ContentStore, outbox: Outbox, mid: bytes, clip: Path,
                  data: bytes) -> None:
    e = outbox.get(mid)
    assert e is not None and e.retention_done is False
    content = store.local(e.content_id)
    assert content is not None and content.path == clip.resolve()
    assert clip.read_bytes() == data


@pytest.mark.parametrize("by", ["its name", "a symlink"])
async def test_a_send_recorded_after_the_pass_read_the_outbox_keeps_the_file(
        db: NodeDB, store: ContentStore, tmp_path: Path, by: str) -> None:
    """The same file sent again (a new content) is recorded after a pass read the outbox
    and before it applies `delete` to the first message: the file stays for the second,
    which decides once it is settled. The pass deleted the file the new message serves
    (by its name; through a symlink, even with the fix for that name)."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(data := os.urandom(100_000))
    outbox = _PausedOutbox(db)
    first, sender, _ = _sent_once_delete(db, store, outbox, clip)
    prefs = Prefs(db)
    passing = asyncio.create_task(asyncio.to_thread(
        apply_retention, outbox, store, prefs, tmp_path / "archive"))
    try:
        async with asyncio.timeout(10):
            assert await asyncio.to_thread(outbox.read.wait, 10)
            second = await sender.send(_again(clip, by), [BOB], "clip again", "")
    finally:
        outbox.go_on.set()
    done = await passing
    assert [(e.id, action) for e, action in done] == [(first, "keep")]
    _still_served(store, outbox, second, clip, data)

    outbox.set_recipient_state(second, BOB, RecipientStatus.DOWNLOADED, 2000.0)
    assert outbox.settle_device(second, BOB, BOB_KEY)  # the send sealed it to bob's key
    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(second, "delete")]
    assert not clip.exists()


@pytest.mark.parametrize("by", ["its name", "a symlink"])
async def test_a_send_running_while_the_pass_decides_keeps_the_file(
        db: NodeDB, store: ContentStore, tmp_path: Path, by: str) -> None:
    """A send of the same file (by its name or through a symlink) has started (it waits
    for the recipient's keys) while a pass applies `delete` to the first message: the file
    stays, and the send goes out with it. The pass deleted it, and the send failed on the
    missing file."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(data := os.urandom(100_000))
    outbox = Outbox(db)
    first, sender, server = _sent_once_delete(db, store, outbox, clip)
    server.answer.clear()
    sending = asyncio.create_task(sender.send(_again(clip, by), [BOB], "clip again", ""))
    try:
        async with asyncio.timeout(10):
            await server.asked.wait()
            done = await asyncio.to_thread(apply_retention, outbox, store, Prefs(db),
                                           tmp_path / "archive")
            server.answer.set()
            second = await sending
    finally:
        sending.cancel()
    assert [(e.id, action) for e, action in done] == [(first, "keep")]
    _still_served(store, outbox, second, clip, data)


def _names(tmp_path: Path, how: str) -> tuple[Path, Path, Path]:
    """The file `clip` and two names it is sent by, first and second, the way `how` says:
    a symlink to it (after or before its own path), its path spelt through `..`, or
    through a symlinked folder."""
    real = tmp_path / "Videos"
    real.mkdir()
    clip = real / "clip.bin"
    if how in ("link second", "link first"):
        link = tmp_path / "link.bin"
        link.symlink_to(clip)
        return clip, *((clip, link) if how == "link second" else (link, clip))
    if how == "dotdot":
        return clip, clip, Path(f"{real}/../{real.name}/{clip.name}")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    return clip, clip, tmp_path / "linked" / clip.name


def _sent_twice(db: NodeDB, store: ContentStore, first_name: Path, second_name: Path
                ) -> tuple[Outbox, bytes, bytes, list[tuple[bytes, str]]]:
    """A file sent by `first_name`, downloaded, then by `second_name`, not yet, retention
    `delete`; then a pass: the outbox, both message ids and what the pass did."""
    outbox = Outbox(db)
    Prefs(db).retention = "delete"
    first = sent(outbox, 1, store.add_local_file_blocking(first_name).content_id,
                 first_name)
    second = sent(outbox, 2, store.add_local_file_blocking(second_name).content_id,
                  second_name, downloaded=False)
    done = apply_retention(outbox, store, Prefs(db), store.root.parent / "archive")
    return outbox, first, second, [(e.id, action) for e, action in done]


def _second_settled(db: NodeDB, store: ContentStore, outbox: Outbox, second: bytes) -> None:
    """The second message downloaded too: the pass deletes its copy."""
    outbox.set_recipient_state(second, BOB, RecipientStatus.DOWNLOADED, 2000.0)
    done = apply_retention(outbox, store, Prefs(db), store.root.parent / "archive")
    assert [(e.id, action) for e, action in done] == [(second, "delete")]


@pytest.mark.parametrize("how", ["link second", "link first", "dotdot", "linked folder"])
def test_the_same_file_sent_by_two_names_is_kept_until_both_are_settled(
        db: NodeDB, store: ContentStore, tmp_path: Path, how: str) -> None:
    """The same file sent twice by two names (as the CLI records them: absolute, not
    resolved), with `delete`: the first message settled keeps it for the second, which
    deletes it. The names were two files: the first settled deleted the file the second
    still serves. What goes is the file; a symlink sent by name is left (dangling): it
    is the user's name for the file, not a copy of it."""
    clip, first_name, second_name = _names(tmp_path, how)
    clip.write_bytes(data := os.urandom(50_000))
    outbox, first, second, done = _sent_twice(db, store, first_name, second_name)
    assert done == [(first, "keep")]
    _still_served(store, outbox, second, second_name, data)

    _second_settled(db, store, outbox, second)
    assert not clip.exists()  # the file, not only a name for it
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_symlink()) == (
        ["link.bin"] if how.startswith("link ") else ["linked"] if how == "linked folder"
        else [])


def test_a_file_replaced_at_its_path_is_kept_for_the_message_of_the_new_one(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """A file sent, then replaced at its path by a new one (another inode, another size)
    that is sent too, with `delete`: the path is the same file as before, so the first
    message settled keeps the new file for the second."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(os.urandom(50_000))
    outbox, prefs = Outbox(db), Prefs(db)
    prefs.retention = "delete"
    first = sent(outbox, 1, store.add_local_file_blocking(clip).content_id, clip)
    new = tmp_path / "new.bin"
    new.write_bytes(data := os.urandom(60_000))
    new.replace(clip)
    second = sent(outbox, 2, store.add_local_file_blocking(clip).content_id, clip,
                  downloaded=False)
    done = apply_retention(outbox, store, prefs, tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(first, "keep")]
    _still_served(store, outbox, second, clip, data)


def test_a_hard_link_sent_keeps_the_file_for_its_message(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """The same file sent by two hard links, with `delete`: the first message settled
    deletes its own name only, the file stays under the second's, which still serves it
    (the same inode, its bytes unchanged); the second settled deletes the file."""
    first_name, second_name = tmp_path / "clip.bin", tmp_path / "again.bin"
    first_name.write_bytes(data := os.urandom(50_000))
    os.link(first_name, second_name)
    inode = second_name.stat().st_ino
    outbox, first, second, done = _sent_twice(db, store, first_name, second_name)
    assert done == [(first, "delete")]
    assert not first_name.exists()
    _still_served(store, outbox, second, second_name, data)
    assert second_name.stat().st_ino == inode

    _second_settled(db, store, outbox, second)
    assert not second_name.exists()


@pytest.mark.parametrize("how", ["first's link removed", "first's link re-pointed",
                                 "second's link removed"])
def test_a_file_sent_by_a_symlink_changed_since_is_kept_for_the_other_message(
        db: NodeDB, store: ContentStore, tmp_path: Path, how: str) -> None:
    """A file sent by a symlink and by its own name, with `delete`; the symlink removed
    since, or pointed at another file of the same size. Each message serves, and delete
    removes, the file its path resolved to when it was sent: the first message settled
    keeps it for the second. The symlink's name as it is now was compared, which names
    nothing (or the other file), so the first settled deleted the file the second serves."""
    clip, link = tmp_path / "clip.bin", tmp_path / "link.bin"
    clip.write_bytes(data := os.urandom(50_000))
    link.symlink_to(clip)
    outbox = Outbox(db)
    Prefs(db).retention = "delete"
    first_name, second_name = (clip, link) if how.startswith("second") else (link, clip)
    first = sent(outbox, 1, store.add_local_file_blocking(first_name).content_id,
                 first_name)
    second = sent(outbox, 2, store.add_local_file_blocking(second_name).content_id,
                  second_name, downloaded=False)
    link.unlink()
    other = tmp_path / "other.bin"
    if how == "first's link re-pointed":
        other.write_bytes(os.urandom(50_000))
        link.symlink_to(other)

    done = apply_retention(outbox, store, Prefs(db), tmp_path / "archive")
    assert [(e.id, action) for e, action in done] == [(first, "keep")]  # delete: parent
    _still_served(store, outbox, second, clip, data)

    _second_settled(db, store, outbox, second)
    assert not clip.exists()
    assert other.exists() == (how == "first's link re-pointed")


class _PausedReleaseOutbox(Outbox):
    """An outbox whose first reading of the folder maps' messages (a release's) waits for
    `go_on` (set by the test once a send ran in between)."""

    def __init__(self, db: NodeDB) -> None:
        super().__init__(db)
        self.read, self.go_on = threading.Event(), threading.Event()

    def ending_with(self, suffixes: tuple[str, ...]) -> list[OutboxEntry]:
        entries = super().ending_with(suffixes)
        if not self.read.is_set():
            self.read.set()
            if not self.go_on.wait(10):
                raise AssertionError("the test did not let the release go on")
        return entries


def _settled_folder(outbox: Outbox, store: ContentStore, tmp_path: Path
                    ) -> tuple[Path, FolderInfo]:
    """A folder's map, sent once (by hand) and downloaded: nobody needs it any more."""
    src = tmp_path / "sunday"
    src.mkdir()
    (src / "a.jpg").write_bytes(os.urandom(1000))
    map_path, info = write_map(plan_pack([src]), store.root)
    sent(outbox, 1, os.urandom(32), map_path)
    return map_path, info


def _sends_the_map(outbox: Outbox, store: ContentStore, mid: bytes, map_path: Path) -> None:
    """The message `mid` names the map, which is there, and its folder is served."""
    e = outbox.get(mid)
    assert e is not None and e.path == str(map_path) and map_path.exists()
    assert store.local(e.content_id) is not None


async def test_a_folder_sent_again_while_its_map_is_released_keeps_the_map(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """A folder's message is settled and the folder is sent again from its map
    (`resend`): a release running while that send waits for the recipient's keys keeps
    the map, which goes once the new message is settled too. The release deleted the map
    under the send, which failed on it."""
    outbox = Outbox(db)
    map_path, info = _settled_folder(outbox, store, tmp_path)
    sender, server = _sender(db, store, outbox)
    server.answer.clear()
    sending = asyncio.create_task(sender.send(map_path, [BOB], "sunday again", "", info))
    try:
        async with asyncio.timeout(10):
            await server.asked.wait()
            gone = await asyncio.to_thread(release_archives, outbox, store)
            server.answer.set()
            second = await sending
    finally:
        sending.cancel()
    assert gone == []
    _sends_the_map(outbox, store, second, map_path)
    outbox.set_recipient_state(second, BOB, RecipientStatus.DOWNLOADED, 2000.0)
    assert release_archives(outbox, store) == [str(map_path)] and not map_path.exists()


async def test_a_folder_sent_again_after_a_release_read_the_outbox_keeps_the_map(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    """The folder sent again is recorded after a release read the outbox and before it
    deletes the map: the map stays for the new message. The release deleted the map the
    new message serves its folder from."""
    outbox = _PausedReleaseOutbox(db)
    map_path, info = _settled_folder(outbox, store, tmp_path)
    sender, _ = _sender(db, store, outbox)
    releasing = asyncio.create_task(asyncio.to_thread(release_archives, outbox, store))
    try:
        async with asyncio.timeout(10):
            assert await asyncio.to_thread(outbox.read.wait, 10)
            second = await sender.send(map_path, [BOB], "sunday again", "", info)
    finally:
        outbox.go_on.set()
    assert await releasing == []
    _sends_the_map(outbox, store, second, map_path)


@pytest.mark.parametrize("retention", ["delete", "archive"])
def test_a_file_mailed_to_oneself_stays_where_the_inbox_points(
        db: NodeDB, store: ContentStore, tmp_path: Path, retention: Retention) -> None:
    """A file sent to bob and to one's own address: in the sender's inbox the message
    received is the file sent, so `delete` and `archive` keep it while that message is
    there (they deleted or moved it, and the inbox pointed at nothing); removed from the
    inbox, the next message of it goes as the preference says."""
    clip = tmp_path / "clip.bin"
    clip.write_bytes(data := os.urandom(50_000))
    outbox, prefs, inbox = Outbox(db), Prefs(db), Inbox(db)
    prefs.retention = retention
    cid = store.add_local_file_blocking(clip).content_id
    mid = sent(outbox, 1, cid, clip)
    got = (2).to_bytes(16, "big")
    inbox.add(id=got, sender="alice@example.net", sender_peer_id=b"a" * 20, title="clip",
              note="", size=len(data), file_name="clip.bin",
              media_type="application/octet-stream", content_id=cid, chunk_count=1,
              message=b"", received_at=1.0)
    inbox.transition(got, InboxState.DOWNLOADING)
    inbox.transition(got, InboxState.COMPLETE, path=str(clip))

    done = apply_retention(outbox, store, prefs, tmp_path / "archive", inbox)
    assert [(e.id, action) for e, action in done] == [(mid, "keep")]
    assert clip.read_bytes() == data and not (tmp_path / "archive").exists()

    assert inbox.remove(got)
    again = sent(outbox, 3, store.add_local_file_blocking(clip).content_id, clip)
    done = apply_retention(outbox, store, prefs, tmp_path / "archive", inbox)
    assert [(e.id, action) for e, action in done] == [(again, retention)]
    assert not clip.exists()
