"""A folder is sent from the user's own files through a map: no archive is written.

The map's bytes (headers, padding, end blocks) and the files it names, read through the
sender's ArchiveView, must be tarfile's own archive of the same members byte for byte;
an edit after sending stops the serving with the file named; the map is the only thing
written. The end-to-end sends are in test_e2e_folders.py."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.content import ChunkCipher, chunk_count
from overlay.content.archive import ArchiveMap, ArchiveView
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.mail.folders import pack, plan_pack, write_map

# Names a camera, a phone or a person gives: ASCII, accents, CJK, emoji, spaces; some long
# enough (over 100 bytes of path) to need a PAX header of their own.
_NAME = st.text(st.characters(codec="utf-8", exclude_characters="/\x00",
                              exclude_categories=("Cs", "Cc")),
                min_size=1, max_size=80).filter(lambda n: n.strip() not in ("", ".", ".."))


def _plain(view: ArchiveView) -> bytes:
    cipher = ChunkCipher(view.key, view.scheme)
    return b"".join(cipher.open(i, view.read_sealed(i))
                    for i in range(chunk_count(view.size, view.chunk_size)))


def _sent(root: Path, src: Path) -> tuple[ContentStore, Path, ArchiveView]:
    store = ContentStore(root / "store")
    map_path = write_map(plan_pack([src]), store.root)[0]
    return store, map_path, store.add_sent_archive_blocking(map_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.lists(_NAME, min_size=1, max_size=3),
                                st.one_of(st.integers(0, 3000),
                                          st.sampled_from([512, 1024, 10240]))),
                      min_size=1, max_size=8))
def test_the_sent_view_is_tarfiles_archive_byte_for_byte(
        files: list[tuple[list[str], int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "sunday"
        src.mkdir()
        for parts, size in files:
            path = src.joinpath(*parts)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.write_bytes(os.urandom(size))
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                pass  # a name already taken by a file or folder of another draw
            except OSError as exc:  # a name over the file system's 255 bytes
                if exc.errno != 36:
                    raise
        want = pack(plan_pack([src]), root / "tar", lambda n: None).read_bytes()
        store, map_path, view = _sent(root, src)
        try:
            assert view.sent and view.size == len(want)
            assert _plain(view) == want
            # What a node that mailed it to itself unpacks from: the same bytes, any seek.
            with view.reader() as f:
                assert f.read() == want
                assert f.seek(len(want) // 3) == len(want) // 3
                assert f.read(700) == want[len(want) // 3:len(want) // 3 + 700]
            # Only the map was written: the gap bytes and the files' paths, no file data.
            assert os.listdir(store.sent_maps) == ["sunday.map"] == [map_path.name]
            assert map_path.stat().st_size <= view.layout.gaps_size + sum(
                len(f.name.encode()) + 32 for f in view.layout.files) + 512
        finally:
            store.close()


def test_the_map_holds_no_file_data(tmp_path: Path) -> None:
    src = tmp_path / "trip"
    src.mkdir()
    for i in range(3):
        (src / f"IMG_{i}.jpg").write_bytes(os.urandom(300_000))
    store, map_path, view = _sent(tmp_path, src)
    try:
        assert view.size > 900_000 and map_path.stat().st_size < 16_000  # 10 KiB: the end
        assert _plain(view) == pack(plan_pack([src]), tmp_path / "t",
                                    lambda n: None).read_bytes()
    finally:
        store.close()


def _tree(root: Path) -> Path:
    src = root / "sunday"
    (src / "beach").mkdir(parents=True)
    (src / "beach" / "IMG_0001.jpg").write_bytes(os.urandom(5000))
    (src / "IMG_0000.jpg").write_bytes(os.urandom(5000))
    return src


def test_an_edit_after_sending_stops_the_serving_and_names_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _tree(tmp_path)
    store = ContentStore(tmp_path / "store")
    try:
        view = store.add_sent_archive_blocking(write_map(plan_pack([src]), store.root)[0])
        store.close()
        # After a restart the row names the map: the same view, over the same files.
        store = ContentStore(tmp_path / "store")
        again = store.local(view.content_id)
        assert isinstance(again, ArchiveView) and again.sent
        assert _plain(again) == _plain(view)
        edited = src / "beach" / "IMG_0001.jpg"
        data = bytearray(edited.read_bytes())
        data[10] ^= 1
        edited.write_bytes(bytes(data))
        caplog.set_level(logging.WARNING)
        with pytest.raises(ContentStoreError, match="changed since it was sent"):
            for i in range(chunk_count(again.size, again.chunk_size)):
                again.read_sealed(i)
        assert f"{edited} changed since it was sent" in caplog.text
        assert again.source_changed() == f"{edited} changed since it was sent"
        assert not again.has(0)  # no chunk of it is offered any more
    finally:
        store.close()


def test_an_edit_between_the_map_and_the_naming_refuses_the_send(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    store = ContentStore(tmp_path / "store")
    try:
        map_path = write_map(plan_pack([src]), store.root)[0]
        (src / "IMG_0000.jpg").write_bytes(os.urandom(4000))  # a new, shorter version
        with pytest.raises(ContentStoreError, match=r"IMG_0000\.jpg changed since it was sent"):
            store.add_sent_archive_blocking(map_path)
    finally:
        store.close()


def test_forgetting_a_sent_folder_deletes_the_map_and_never_the_files(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    store = ContentStore(tmp_path / "store")
    try:
        map_path = write_map(plan_pack([src]), store.root)[0]
        view = store.add_sent_archive_blocking(map_path)
        store.remove(view.content_id, delete_file=True)
        assert not map_path.exists()
        assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    finally:
        store.close()


def test_only_a_map_in_the_outgoing_folder_is_taken(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    store = ContentStore(tmp_path / "store")
    try:
        elsewhere = tmp_path / "sunday.map"
        os.replace(write_map(plan_pack([src]), store.root)[0], elsewhere)
        with pytest.raises(ContentStoreError, match="is not a folder map in"):
            store.add_sent_archive_blocking(elsewhere)
    finally:
        store.close()


def test_the_map_names_the_folder_sent_and_none_for_several_files(tmp_path: Path) -> None:
    """A node that mails a folder to its own address points its inbox at the folder the
    map names, also after a restart; several files are in no one folder."""
    src = _tree(tmp_path)
    store = ContentStore(tmp_path / "store")
    try:
        view = store.add_sent_archive_blocking(write_map(plan_pack([src]), store.root)[0])
        files = store.add_sent_archive_blocking(write_map(plan_pack(
            [src / "IMG_0000.jpg", src / "beach" / "IMG_0001.jpg"]), store.root)[0])
        store.close()
        store = ContentStore(tmp_path / "store")
        again, several = store.local(view.content_id), store.local(files.content_id)
        assert isinstance(again, ArchiveView) and isinstance(several, ArchiveView)
        assert again.layout.source == src.resolve() and several.layout.source is None
    finally:
        store.close()


@pytest.mark.parametrize("source", [b"relative/sunday", b"", b"/a\x00b", b"/" * 5000, 7])
def test_a_map_naming_no_usable_folder_is_refused(tmp_path: Path, source: object) -> None:
    map_path = write_map(plan_pack([_tree(tmp_path)]), tmp_path / "store")[0]
    saved = msgpack.unpackb(map_path.read_bytes())
    saved["source"] = source
    with pytest.raises(ContentStoreError, match="folder map"):
        ArchiveMap.decode(msgpack.packb(saved, use_bin_type=True))
