"""`rm --delete-file` of a message whose received folder another inbox entry also uses
(the same content received twice is kept once): the folder stays, and the answer says
why, until the last entry goes. The control op over a real node.db and real folders; the
network parts it does not touch are left out."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from crypto.codec import Fields
from crypto.identity import DeviceIdentity
from crypto.location import Description, FolderInfo, Handle, Headers, LocationMessage
from overlay.app.operations import ControlOperations
from overlay.mail.db import NodeDB
from overlay.mail.downloads import DownloadQueue
from overlay.mail.folders import UnpackRecord
from overlay.mail.inbox import Inbox
from overlay.mail.inbox_state import InboxState
from overlay.mail.outbox import Outbox
from overlay.mail.prefs import Prefs


def _receive(inbox: Inbox, sender: DeviceIdentity, n: int, content_id: bytes,
             folder: Path) -> bytes:
    """An entry of the folder message `n`, complete, its path the received folder."""
    mid = n.to_bytes(16, "big")
    msg = LocationMessage(
        headers=Headers(message_id=mid, sender="alice@example.net",
                        sender_peer_id=sender.peer_id, recipients=("bob@example.net",),
                        created=1_700_000_000),
        description=Description(title=f"sunday {n}", file_name="sunday.tar",
                                media_type="application/x-tar",
                                folder=FolderInfo("sunday", 1, 0, 3)),
        handle=Handle(content_id=content_id, size=10_240, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32))
    inbox.add(id=mid, sender="alice@example.net", sender_peer_id=sender.peer_id,
              title=f"sunday {n}", note="", size=10_240, file_name="sunday.tar",
              media_type="application/x-tar", content_id=content_id, chunk_count=1,
              message=msg.encode(), received_at=1_700_000_000 + n)
    inbox.transition(mid, InboxState.DOWNLOADING)
    inbox.transition(mid, InboxState.COMPLETE, path=str(folder))
    return mid


def _operations(db: NodeDB, address: str, received: Path | None = None,
                ) -> tuple[ControlOperations, Inbox, Outbox]:
    """The control operations of a node of `address` over `db` (its download folder
    `received`), with its inbox and outbox."""
    inbox, outbox, prefs = Inbox(db), Outbox(db), Prefs(db)
    downloads = DownloadQueue(inbox, prefs, fetch=None, on_complete=None,  # type: ignore[arg-type]
                              wall=time.time, rng=random.Random(1))
    none: Any = None
    ops = ControlOperations(
        DeviceIdentity.generate(), address, listen_addr=None, rendezvous=none,
        incoming=SimpleNamespace(counters={"refused-inbox-full": 0}),  # type: ignore[arg-type]
        sender=none, inbox=inbox, outbox=outbox, prefs=prefs, contacts=none,
        downloads=downloads, transfer=none, max_in_flight=1, received=received)
    return ops, inbox, outbox


async def test_a_folder_two_messages_share_goes_with_the_last(tmp_path: Path) -> None:
    folder = tmp_path / "received" / "sunday"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"jpg")
    with NodeDB.open(tmp_path / "node") as db:
        ops, inbox, _ = _operations(db, "bob@example.net")
        alice = DeviceIdentity.generate()
        cid = os.urandom(32)
        first = _receive(inbox, alice, 1, cid, folder)
        second = _receive(inbox, alice, 2, cid, folder)

        res = await ops.rm(Fields({"id": first.hex(), "delete_file": True}, "rm"))
        (gone,) = res["removed"]
        assert gone["deleted_file"] is None
        assert gone["kept_file"] == (f"{folder} is kept: message {second.hex()[:12]} "
                                     "(sunday 2) uses it too")
        assert (folder / "a.jpg").read_bytes() == b"jpg" and inbox.get(first) is None

        res = await ops.rm(Fields({"id": second.hex(), "delete_file": True}, "rm"))
        assert res["removed"][0]["deleted_file"] == str(folder) and not folder.exists()


async def test_mail_to_oneself_keeps_the_sent_file_and_says_so(tmp_path: Path) -> None:
    # A node that mails its own address holds the content already: the inbox entry is
    # complete at once, at the path of the file it sent.
    sent = tmp_path / "clip.webm"
    sent.write_bytes(b"clip")
    with NodeDB.open(tmp_path / "node") as db:
        ops, inbox, outbox = _operations(db, "alice@example.net")
        cid = os.urandom(32)
        sent_id = (7).to_bytes(16, "big")
        assert outbox.add(id=sent_id, path=str(sent), title="clip.webm", size=4,
                          content_id=cid, created_at=1_700_000_000,
                          recipients=["alice@example.net"])
        mid = (8).to_bytes(16, "big")
        inbox.add(id=mid, sender="alice@example.net", sender_peer_id=b"a" * 20,
                  title="clip.webm", note="", size=4, file_name="clip.webm",
                  media_type="video/webm", content_id=cid, chunk_count=1, message=b"",
                  received_at=1_700_000_001)
        inbox.transition(mid, InboxState.DOWNLOADING)
        inbox.transition(mid, InboxState.COMPLETE, path=str(sent))

        res = await ops.rm(Fields({"id": mid.hex(), "delete_file": True}, "rm"))
        (gone,) = res["removed"]
        assert gone["deleted_file"] is None
        assert gone["kept_file"] == (f"{sent} is kept: it is the file you sent as message "
                                     f"{sent_id.hex()[:12]}")
        assert sent.read_bytes() == b"clip" and inbox.get(mid) is None


async def test_a_folder_mailed_to_oneself_is_kept_behind_a_thousand_newer_sends(
        tmp_path: Path) -> None:
    """The inbox entry of a folder a node sent to its own address is the user's folder:
    `rm --delete-file` keeps it, however many messages were sent since: the sent message
    is looked up by its content, not among the newest 1,000 sent only, past which the
    folder would be deleted as a received one is."""
    sent = tmp_path / "photos"
    (sent / "beach").mkdir(parents=True)
    (sent / "beach" / "a.jpg").write_bytes(b"jpg")
    with NodeDB.open(tmp_path / "node") as db:
        ops, inbox, outbox = _operations(db, "alice@example.net")
        cid = os.urandom(32)
        sent_id = (7).to_bytes(16, "big")
        assert outbox.add(id=sent_id, path=str(tmp_path / "store" / "outgoing" / "photos.map"),
                          title="photos/: 1 file, 3 B", size=10_240, content_id=cid,
                          created_at=1_700_000_000, recipients=["alice@example.net"])
        for n in range(1000):
            assert outbox.add(id=(100 + n).to_bytes(16, "big"), path=f"/x/{n}", title="x",
                              size=1, content_id=os.urandom(32),
                              created_at=1_700_000_100 + n, recipients=["bob@example.net"])
        mid = _receive(inbox, DeviceIdentity.generate(), 8, cid, sent)

        res = await ops.rm(Fields({"id": mid.hex(), "delete_file": True}, "rm"))
        (gone,) = res["removed"]
        assert gone["deleted_file"] is None
        assert gone["kept_file"] == (f"{sent} is kept: it is the folder you sent as message "
                                     f"{sent_id.hex()[:12]}")
        assert (sent / "beach" / "a.jpg").read_bytes() == b"jpg" and inbox.get(mid) is None


async def test_once_the_map_is_gone_the_unpack_record_tells_the_copy_from_your_folder(
        tmp_path: Path) -> None:
    """With no map of what it sent to its own address left, the node still knows its own
    unpacked copy by the record the unpack left: `rm --delete-file` deletes that copy,
    and keeps a folder in received/ it has no record of (the user's, sent as it lay)."""
    received = tmp_path / "received"
    copy, mine = received / "2 files", received / "from bob"
    for folder in (copy, mine):
        folder.mkdir(parents=True)
        (folder / "a.bin").write_bytes(b"abc")
    with NodeDB.open(tmp_path / "node") as db:
        ops, inbox, outbox = _operations(db, "alice@example.net", received)
        gone = {}
        for n, folder in ((1, copy), (2, mine)):
            cid = os.urandom(32)
            assert outbox.add(id=(10 + n).to_bytes(16, "big"),
                              path=str(tmp_path / "store" / "outgoing" / f"{n}.map"),
                              title=folder.name, size=10_240, content_id=cid,
                              created_at=1_700_000_000 + n, recipients=["alice@example.net"])
            mid = _receive(inbox, DeviceIdentity.generate(), n, cid, folder)
            if folder == copy:
                UnpackRecord(received, cid).record_copy(copy)
            res = await ops.rm(Fields({"id": mid.hex(), "delete_file": True}, "rm"))
            (gone[folder],) = res["removed"]
    assert gone[copy]["deleted_file"] == str(copy) and not copy.exists()
    assert gone[mine]["deleted_file"] is None
    assert gone[mine]["kept_file"] == (f"{mine} is kept: it is the folder you sent as "
                                       f"message {(12).to_bytes(16, 'big').hex()[:12]}")
    assert (mine / "a.bin").read_bytes() == b"abc"
    assert os.listdir(received / ".peerpost-partial") == []  # the copy's record went too
