"""Folder archives without the network: names, packing, and the receiver's rules.

The end-to-end tests (test_e2e_folders.py) send real folders between real nodes; these
check what is cheaper to check here: any set of names gives unique, safe names, an
interrupted pack leaves nothing, and each rule of unpacking refuses with the member named
and writes nothing."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.location import MAX_FILE_NAME_BYTES, FolderInfo
from crypto.location import _file_name as location_file_name
from overlay.content.catalog import ContentStore
from overlay.mail import folders
from overlay.mail.db import NodeDB
from overlay.mail.folders import (
    ORPHAN_AGE,
    FolderError,
    clean_name,
    numbered,
    pack,
    plan_pack,
    sweep_orphans,
    unique_names,
    unpack,
)
from overlay.mail.outbox import Outbox


@given(st.lists(st.text(min_size=0, max_size=300), max_size=30))
def test_any_names_give_unique_safe_names(names: list[str]) -> None:
    out = unique_names(names)
    assert len(out) == len(names)
    # Unique even where case does not count (a receiver's disk may not tell them apart).
    assert len({n.casefold() for n in out}) == len(out)
    for n in out:
        assert location_file_name(n) == n  # a plain name a location message carries
        assert n and "/" not in n and n not in (".", "..") and n == n.strip()
        assert len((n + ".tar").encode()) <= MAX_FILE_NAME_BYTES


def test_long_names_alike_in_their_first_bytes_are_numbered() -> None:
    """Cut to fit, three long names were the same name, and each number added was cut off
    again: the send failed with 'no free name' after a million tries."""
    long = "Ṱ̺̺̕o͞ " * 60  # 600 bytes of UTF-8 with combining marks
    out = unique_names([long + "a.jpg", long + "b.jpg", long.upper() + ".JPG", "short"])
    assert len({n.casefold() for n in out}) == 4
    assert [n.rpartition(".")[2] for n in out[:3]] == ["jpg", "jpg", "JPG"]
    assert out[3] == "short"
    for n in out:
        assert location_file_name(n) == n and n == n.strip()
        assert len((n + ".tar").encode()) <= MAX_FILE_NAME_BYTES
    huge = numbered("x" * 300, 10**9, keep_extension=False)  # more numbers than room
    assert huge.endswith(f" ({10**9})") and len((huge + ".tar").encode()) <= MAX_FILE_NAME_BYTES


@given(st.text(max_size=600))
def test_a_folder_name_is_always_usable(name: str) -> None:
    clean = clean_name(name)
    assert location_file_name(clean) == clean and clean


def _folder(root: Path) -> Path:
    src = root / "trip"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "b" / "x.bin").write_bytes(os.urandom(70_000))
    (src / "zero").write_bytes(b"")
    return src


def test_pack_then_unpack_gives_the_tree_and_a_taken_name_is_kept(tmp_path: Path) -> None:
    plan = plan_pack([_folder(tmp_path)])
    assert [m for _, m in plan.entries] == ["trip", "trip/a", "trip/a/b", "trip/a/b/x.bin",
                                            "trip/empty", "trip/zero"]  # sorted, relative
    archive = pack(plan, tmp_path / "store", lambda n: None)
    with tarfile.open(archive) as tar:
        assert tar.format == tarfile.PAX_FORMAT and all(m.uid == 0 for m in tar)
    dest = tmp_path / "received"
    dest.mkdir()
    (dest / "trip").mkdir()  # taken: never written into
    (dest / "trip" / "mine").write_text("keep")
    got = unpack(archive, plan.info(), dest)
    assert got == dest / "trip (1)"
    assert (got / "a" / "b" / "x.bin").read_bytes() == (
        tmp_path / "trip" / "a" / "b" / "x.bin").read_bytes()
    assert (got / "empty").is_dir() and (got / "zero").read_bytes() == b""
    assert os.listdir(dest / "trip") == ["mine"]


def test_an_interrupted_pack_leaves_nothing(tmp_path: Path) -> None:
    plan = plan_pack([_folder(tmp_path)])

    def interrupt(n: int) -> None:
        if n:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(plan, tmp_path / "store", interrupt)
    assert os.listdir(tmp_path / "store" / "outgoing") == []


def _tar(path: Path, members: Sequence[tuple[str, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("members", "said"), [
    ([("top/a", b"1"), ("top/a", b"2")], "'top/a': named twice"),
    ([("top/a", b"1"), ("other/b", b"2")], "'other/b': not inside top/"),
    ([("top/./a", b"1")], "'top/./a': not a plain relative name"),
    ([("top/a\x1b[2J", b"1")], "control character"),
    ([("top/" + "n" * 300, b"1")], "name too long"),
])
def test_each_rule_refuses_naming_the_member(tmp_path: Path, members: list[tuple[str, bytes]],
                                             said: str) -> None:
    archive = _tar(tmp_path / "top.tar", members)
    dest = tmp_path / "received"
    dest.mkdir()
    with pytest.raises(FolderError) as err:
        unpack(archive, FolderInfo("top", len(members), 0, 2), dest)
    assert said in str(err.value) and f"the archive is kept at {archive}" in str(err.value)
    assert os.listdir(dest) in ([], [".peerpost-partial"])
    assert archive.exists()


def test_devices_and_hard_links_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w") as tar:
        dev = tarfile.TarInfo("top/null")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(dev)
        hard = tarfile.TarInfo("top/shadow")
        hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/shadow"
        tar.addfile(hard)
    with pytest.raises(FolderError) as err:
        unpack(archive, FolderInfo("top", 2, 0, 0), tmp_path)
    assert "'top/null':" in str(err.value) and "'top/shadow':" in str(err.value)
    assert not (tmp_path / "top").exists()


@pytest.fixture(params=["filters", "no filters"])
def tarfile_filters(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking with tarfile's extraction filters and as on Python before 3.11.4 (Debian
    12's python3 is 3.11.2), which has none."""
    if request.param == "filters" and not hasattr(tarfile, "data_filter"):
        pytest.skip("tarfile's extraction filters need Python 3.11.4 or later")
    monkeypatch.setattr(folders, "_HAS_FILTERS", request.param == "filters")


def test_links_and_devices_are_refused_in_the_same_words_with_or_without_filters(
        tmp_path: Path, tarfile_filters: None) -> None:
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w") as tar:
        for name, kind, target in (("top/null", tarfile.CHRTYPE, ""),
                                   ("top/etc", tarfile.SYMTYPE, "/etc"),
                                   ("top/up", tarfile.SYMTYPE, "../../x"),
                                   ("top/hard", tarfile.LNKTYPE, "top/../../y"),
                                   ("top/near", tarfile.SYMTYPE, "etc")):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, target
            tar.addfile(member)
    with pytest.raises(FolderError) as err:
        unpack(archive, FolderInfo("top", 5, 0, 0), tmp_path)
    assert err.value.why == (
        "'top/null': 'top/null' is a special file; "
        "'top/etc': 'top/etc' is a link to an absolute path; "
        "'top/up': a link that leads outside the folder; "
        "'top/hard': a link that leads outside the folder; "
        "'top/near': not a regular file or a folder (links and devices are not unpacked)")
    assert sorted(os.listdir(tmp_path)) == ["top.tar"]


def test_modes_and_owners_are_the_data_filters_with_or_without_filters(
        tmp_path: Path, tarfile_filters: None) -> None:
    """No set-id bit, no group or other write, a file its owner can read and write, no
    owner from the archive, and a folder without a time gets the time it is made."""
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w") as tar:
        for name, mode, data in (("top", 0o777, None), ("top/run", 0o6777, b"#!"),
                                 ("top/ro", 0o444, b"ro"), ("top/sub", 0o700, None)):
            member = tarfile.TarInfo(name)
            member.mode, member.uid, member.gid = mode, 4242, 4242
            member.uname = member.gname = "root"
            if data is None:
                member.type = tarfile.DIRTYPE
                tar.addfile(member)
            else:
                member.size, member.mtime = len(data), 1_000_000_000
                tar.addfile(member, io.BytesIO(data))
    (tmp_path / "in").mkdir()
    before = time.time()
    out = unpack(archive, FolderInfo("top", 2, 1, 4), tmp_path / "in")
    assert (out / "run").read_bytes() == b"#!" and (out / "ro").read_bytes() == b"ro"
    assert stat.S_IMODE((out / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o644
    for path in (out, out / "run", out / "ro", out / "sub"):
        st_ = path.stat()
        assert (st_.st_uid, st_.st_gid) == (os.getuid(), os.getgid())
        assert not st_.st_mode & 0o022
    assert (out / "run").stat().st_mtime == 1_000_000_000
    assert (out / "sub").stat().st_mtime >= before - 1


def test_a_compressed_archive_is_not_opened(tmp_path: Path) -> None:
    """The gzip header holds its time: compressed at 15 of 4,000 seconds tried, its first
    512 bytes passed tarfile's checksum as a header named with control characters (refused
    as well, but for another reason). Compressed at a fixed time, it is what it says."""
    plain = _tar(tmp_path / "plain.tar", [("top/a", bytes(1 << 20))])
    archive = tmp_path / "top.tar"
    archive.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    with pytest.raises(FolderError, match="is not a tar archive"):
        unpack(archive, FolderInfo("top", 1, 0, 1), tmp_path)


def test_at_start_only_old_archives_no_message_names_go(db: NodeDB,
                                                        store: ContentStore) -> None:
    outbox = Outbox(db)
    folder = store.root / "outgoing"
    folder.mkdir()
    old = ORPHAN_AGE + 60
    for name in ("orphan.tar", ".abc.tmp", "sent.tar", "packing.tar"):
        (folder / name).write_bytes(b"x")
    for name in ("orphan.tar", ".abc.tmp", "sent.tar"):
        os.utime(folder / name, (1e9, 1e9))
    outbox.add(id=b"m" * 16, path=str(folder / "sent.tar"), title="t", size=1,
               content_id=b"c" * 32, created_at=0, recipients=["bob@example.net"])
    gone = sweep_orphans(outbox, store, 1e9 + old)
    assert sorted(p.name for p in gone) == [".abc.tmp", "orphan.tar"]
    assert sorted(os.listdir(folder)) == ["packing.tar", "sent.tar"]


def test_a_link_given_by_name_is_followed_and_keeps_its_name(tmp_path: Path) -> None:
    real = tmp_path / "IMG_0001.jpg"
    real.write_bytes(b"jpeg")
    link = tmp_path / "cake.jpg"
    link.symlink_to(real)
    other = tmp_path / "note.txt"
    other.write_text("hi")
    plan = plan_pack([link, other])
    archive = pack(plan, tmp_path / "store", lambda n: None)
    got = unpack(archive, plan.info(), tmp_path)
    assert got.name == "2 files"
    assert (got / "cake.jpg").read_bytes() == b"jpeg" and not (got / "cake.jpg").is_symlink()
    assert (got / "note.txt").read_text() == "hi"


def test_several_paths_arrive_in_a_folder_named_by_what_they_are(tmp_path: Path) -> None:
    # Two folders sent together arrived as `2 files/`, holding no file at its top.
    for name in ("sunday", "monday"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jpg").write_bytes(name.encode())
    (tmp_path / "note.txt").write_text("hi")
    sunday, monday, note = tmp_path / "sunday", tmp_path / "monday", tmp_path / "note.txt"
    assert plan_pack([sunday, monday]).name == "2 folders"
    assert plan_pack([sunday, note, monday]).name == "3 files and folders"
    assert plan_pack([note, sunday / "a.jpg"]).name == "2 files"
    plan = plan_pack([sunday, monday])
    (tmp_path / "in").mkdir()
    got = unpack(pack(plan, tmp_path / "store", lambda n: None), plan.info(), tmp_path / "in")
    assert got.name == "2 folders" and (got / "monday" / "a.jpg").read_bytes() == b"monday"


@pytest.mark.parametrize("named_by", ["a symlinked home", "a path with '..'"])
def test_at_start_a_pending_send_named_by_another_path_is_kept(
        db: NodeDB, tmp_path: Path, named_by: str) -> None:
    # The store is opened through one path, the send recorded the map by another: the
    # same file, which the old text comparison deleted an hour later under a pending send.
    real = tmp_path / "real"
    (real / "store" / "outgoing").mkdir(parents=True)
    link = tmp_path / "home"
    link.symlink_to(real)
    store = ContentStore(link / "store")
    try:
        outgoing = (real / "store" / "outgoing" if named_by == "a symlinked home"
                    else link / "store" / ".." / "store" / "outgoing")
        (real / "store" / "outgoing" / "sunday.map").write_bytes(b"x")
        (real / "store" / "outgoing" / "orphan.map").write_bytes(b"x")
        for name in ("sunday.map", "orphan.map"):
            os.utime(real / "store" / "outgoing" / name, (1e9, 1e9))
        outbox = Outbox(db)
        outbox.add(id=b"m" * 16, path=str(outgoing / "sunday.map"), title="t", size=1,
                   content_id=b"c" * 32, created_at=0, recipients=["bob@example.net"])
        gone = sweep_orphans(outbox, store, 1e9 + ORPHAN_AGE + 60)
        assert [p.name for p in gone] == ["orphan.map"]
        assert os.listdir(real / "store" / "outgoing") == ["sunday.map"]
    finally:
        store.close()
