"""A node killed while it records a received folder: on its next start the folder is
found where it was moved, not unpacked again as `NAME (1)`, and an archive the kill left
is deleted. The kill is simulated by an exception no handler catches, raised at each
step; the restart is a new ContentStore on the same root and a new fetcher."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.identity import DeviceIdentity
from crypto.location import Description, FolderInfo, Handle, Headers, LocationMessage
from overlay.app import fetch as fetch_module
from overlay.app.fetch import ContentFetch
from overlay.content.archive import ArchiveView
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.mail.downloads import DownloadFailed
from overlay.mail.folders import UnpackRecord, pack, plan_pack, write_map


class Killed(BaseException):
    """The node's end at this point (kill -9): nothing after it runs."""


@pytest.fixture
def received(tmp_path: Path) -> Iterator[tuple[Path, Path, LocationMessage]]:
    """A complete folder archive in the download folder, held by the store at tmp/store."""
    src = tmp_path / "sunday"
    (src / "beach").mkdir(parents=True)
    (src / "beach" / "a.jpg").write_bytes(os.urandom(5000))
    (src / "b.txt").write_text("hi")
    plan = plan_pack([src])
    dest = tmp_path / "received"
    dest.mkdir()
    archive = pack(plan, tmp_path / "sender", lambda n: None).rename(dest / "sunday.tar")
    store = ContentStore(tmp_path / "store")
    try:
        held = store.add_local_file_blocking(archive)
    finally:
        store.close()
    yield archive, dest, _message(held, plan.info(), "bob@example.net")


def _message(held: LocalContent, folder: FolderInfo, to: str) -> LocationMessage:
    """alice's message of the folder archive `held` to `to`."""
    me = DeviceIdentity.generate()
    return LocationMessage(
        headers=Headers(message_id=os.urandom(16), sender="alice@example.net",
                        sender_peer_id=me.peer_id, recipients=(to,), created=1_700_000_000),
        description=Description(file_name=f"{folder.name}.tar",
                                media_type="application/x-tar", folder=folder),
        handle=Handle(content_id=held.content_id, size=held.size, chunk_size=held.chunk_size,
                      content_key=held.key, capability=held.capability))


async def _unpacked(root: Path, dest: Path, msg: LocationMessage, path: Path) -> Path:
    """One start of the node: the fetcher's last step, as a download that ends runs it."""
    store = ContentStore(root)
    try:
        fetch = ContentFetch(DeviceIdentity.generate(), store, None,  # type: ignore[arg-type]
                             dest=dest, announce=lambda cid: None, window=1,
                             connect_timeout=1.0)
        held = store.local(msg.handle.content_id)
        # After a restart a held folder is handed over as the store has it.
        return Path(await fetch._unpacked(msg, held.path if isinstance(held, ArchiveView)
                                          else path))
    finally:
        store.close()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


async def test_a_kill_after_the_move_finds_the_folder_on_restart(
        tmp_path: Path, received: tuple[Path, Path, LocationMessage],
        monkeypatch: pytest.MonkeyPatch) -> None:
    archive, dest, msg = received
    want = _tree(tmp_path / "sunday")

    def killed(*args: object) -> None:
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(ContentStore, "add_archive_view", killed)
        with pytest.raises(Killed):
            await _unpacked(tmp_path / "store", dest, msg, archive)
    assert (dest / "sunday").is_dir() and archive.exists()  # moved, not recorded

    got = await _unpacked(tmp_path / "store", dest, msg, archive)
    assert got == dest / "sunday" and _tree(got) == want
    assert sorted(os.listdir(dest)) == [".peerpost-partial", "sunday"]  # no `sunday (1)`
    assert os.listdir(dest / ".peerpost-partial") == []
    store = ContentStore(tmp_path / "store")
    try:
        assert isinstance(store.local(msg.handle.content_id), ArchiveView)
    finally:
        store.close()


async def test_a_kill_before_the_archive_is_deleted_deletes_it_on_restart(
        tmp_path: Path, received: tuple[Path, Path, LocationMessage],
        monkeypatch: pytest.MonkeyPatch) -> None:
    archive, dest, msg = received
    unlink = Path.unlink

    def killed_at_archive(self: Path, missing_ok: bool = False) -> None:
        if self == archive.resolve():
            raise Killed
        unlink(self, missing_ok=missing_ok)
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", killed_at_archive)
        with pytest.raises(Killed):
            await _unpacked(tmp_path / "store", dest, msg, archive)
    assert archive.exists()  # recorded as the folder, the archive left

    got = await _unpacked(tmp_path / "store", dest, msg, archive)
    assert got == dest / "sunday" and _tree(got) == _tree(tmp_path / "sunday")
    assert sorted(os.listdir(dest)) == [".peerpost-partial", "sunday"]  # the .tar gone
    assert os.listdir(dest / ".peerpost-partial") == []


async def test_a_folder_this_disk_refuses_fails_and_tells_the_sender_nothing(
        tmp_path: Path, received: tuple[Path, Path, LocationMessage],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A download folder the user can't write to (EACCES, as for a non-root user; simulated,
    since the tests may run as root): the download fails with the path, the archive is kept,
    and no declined receipt is asked for: the user may mend the folder and try again."""
    archive, dest, msg = received

    def refused(*args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(dest / "sunday"))
    monkeypatch.setattr(fetch_module, "unpack_with_layout", refused)
    with pytest.raises(DownloadFailed, match="Permission denied") as failed:
        await _unpacked(tmp_path / "store", dest, msg, archive)
    assert failed.value.declined is None
    assert archive.exists() and str(archive) in str(failed.value)


async def test_several_files_mailed_to_oneself_are_not_unpacked_twice_after_a_kill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several files a node sent to its own address are unpacked from the sender's files
    through the map; a kill after the move finds that folder on restart (no `2 files
    (1)`), and the content stays the one sent, its map and files untouched."""
    one, two = tmp_path / "a.bin", tmp_path / "b.bin"
    one.write_bytes(os.urandom(5000))
    two.write_bytes(os.urandom(3000))
    plan = plan_pack([one, two])
    store = ContentStore(tmp_path / "store")
    try:
        sent = store.add_sent_archive_blocking(write_map(plan, store.root)[0])
    finally:
        store.close()
    msg = _message(sent, plan.info(), "alice@example.net")
    dest = tmp_path / "received"
    dest.mkdir()

    def killed(*args: object) -> None:
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(UnpackRecord, "finish", killed)
        with pytest.raises(Killed):
            await _unpacked(tmp_path / "store", dest, msg, sent.path)
    assert (dest / "2 files").is_dir()

    got = await _unpacked(tmp_path / "store", dest, msg, sent.path)
    assert got == dest / "2 files"
    assert _tree(got) == {"a.bin": one.read_bytes(), "b.bin": two.read_bytes()}
    assert sorted(os.listdir(dest)) == [".peerpost-partial", "2 files"]
    # What is left: the record that the folder is the node's copy, for `rm --delete-file`.
    assert os.listdir(dest / ".peerpost-partial") == [f"{sent.content_id.hex()}.copy"]
    assert UnpackRecord(dest, sent.content_id).copy() == got
    store = ContentStore(tmp_path / "store")
    try:
        held = store.local(sent.content_id)
        assert isinstance(held, ArchiveView) and held.sent and held.path == sent.path
        assert held.path.exists() and held.source_changed() is None
    finally:
        store.close()
