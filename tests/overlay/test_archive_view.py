"""A received folder serves its archive's bytes from the unpacked files (ArchiveView).

Real archives (the sender's own `pack`), a real content store and the real unpacker; the
view's chunks, opened with the content key, must be the archive's bytes exactly. The
end-to-end swarm of a folder is in test_e2e_swarm.py."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.content import ChunkCipher, LeafScheme, chunk_count
from overlay.content.archive import ArchiveFile, ArchiveMap, ArchiveView, view_paths
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.mail.folders import pack, plan_pack, unpack_with_layout


def _tree(root: Path, sizes: list[int]) -> Path:
    """A folder with files of `sizes` bytes, some nested, some with long non-ASCII names
    (a PAX header of their own)."""
    src = root / "sunday"
    src.mkdir()
    for i, n in enumerate(sizes):
        folder = src / ("beach" if i % 3 == 1 else "") / ("ü" * 60 if i % 4 == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IMG_{i:04d}.jpg").write_bytes(os.urandom(n))
    return src


def _received(root: Path, sizes: list[int], chunk_size: int,
              scheme: LeafScheme = LeafScheme.KEYED_PLAIN) -> tuple[ContentStore, bytes,
                                                                      ArchiveView]:
    """Pack a tree, hold its archive complete in a store, unpack it and make the view, as
    a receiver does; the store, the archive's bytes and the view."""
    plan = plan_pack([_tree(root, sizes)])
    archive = pack(plan, root / "sender", lambda n: None)
    want = archive.read_bytes()
    store = ContentStore(root / "store")
    held = store.add_local_file_blocking(archive, chunk_size=chunk_size, scheme=scheme)
    dest = root / "received"
    dest.mkdir()
    folder, files = unpack_with_layout(archive, plan.info(), dest)
    assert files is not None
    view = store.add_archive_view(held.content_id, folder, files)
    return store, want, view


def _plain(view: ArchiveView) -> bytes:
    cipher = ChunkCipher(view.key, view.scheme)
    return b"".join(cipher.open(i, view.read_sealed(i))
                    for i in range(chunk_count(view.size, view.chunk_size)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.one_of(st.integers(0, 3000), st.sampled_from([512, 1024, 10240])),
                      min_size=1, max_size=8),
       chunk_size=st.sampled_from([1024, 1500, 4096, 5000, 65536]),
       scheme=st.sampled_from([LeafScheme.KEYED_PLAIN, LeafScheme.SEALED,
                               LeafScheme.KEYED_PLAIN_AES]))
def test_the_view_is_the_archive_byte_for_byte(sizes: list[int], chunk_size: int,
                                               scheme: LeafScheme) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, want, view = _received(Path(tmp), sizes, chunk_size, scheme)
        try:
            assert view.size == len(want)
            assert _plain(view) == want
            assert not list((Path(tmp) / "received").glob("*.tar"))  # the archive is gone
        finally:
            store.close()


@given(st.lists(st.tuples(st.integers(0, 700), st.integers(1, 3000)), max_size=12),
       st.integers(0, 5000), st.integers(0, 20000), st.integers(1, 9000))
def test_pieces_cover_a_range_once_in_order(layout: list[tuple[int, int]], tail: int,
                                            start: int, length: int) -> None:
    files, at = [], 0
    for i, (gap, size) in enumerate(layout):
        files.append(ArchiveFile(f"f{i}", at + gap, size))
        at += gap + size
    m = ArchiveMap(at + tail, files)
    start = min(start, m.size)
    end = min(m.size, start + length)
    # Each archive byte, as (source, offset into it): a file's, or the gaps file's (-1).
    every: list[tuple[int, int]] = []
    at = 0
    for i, f in enumerate(files):
        every += [(-1, len(every) - sum(g.size for g in files[:i]) + k)
                  for k in range(f.offset - at)]
        every += [(i, k) for k in range(f.size)]
        at = f.offset + f.size
    gaps = at - sum(f.size for f in files)
    every += [(-1, gaps + k) for k in range(m.size - at)]

    got = []
    for into, n, src, off in m.pieces(start, end):
        for k in range(n):
            got.append((into + k, (src if src >= 0 else -1, off + k)))
    assert [g[0] for g in got] == list(range(end - start))
    assert [g[1] for g in got] == every[start:end]
    assert m.gaps_size == m.size - sum(f.size for f in files)


def test_an_edit_that_keeps_size_and_mtime_is_caught_and_nothing_is_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, _, view = _received(tmp_path, [3000, 5000, 200], 1024)
    target = view.path / "IMG_0000.jpg"
    st = target.stat()
    with open(target, "r+b") as f:
        f.seek(100)
        f.write(b"X" * 8)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a careless tool leaves it
    caplog.set_level(logging.WARNING)
    for i in range(chunk_count(view.size, view.chunk_size)):
        try:
            view.read_sealed(i)
        except ContentStoreError as exc:
            assert "sunday/IMG_0000.jpg changed since it was received" in str(exc)
            break
    else:
        pytest.fail("the edited chunk was served")
    assert view.source_changed() is not None and not view.has(0)
    with pytest.raises(ContentStoreError):
        view.read_sealed(0)  # not even the chunks before it, from now on
    assert "no chunk of the folder is served any more" in caplog.text
    store.close()


def test_an_edit_seen_by_its_mtime_names_the_file(tmp_path: Path) -> None:
    store, _, view = _received(tmp_path, [3000, 5000], 1024)
    (view.path / "beach" / "IMG_0001.jpg").write_bytes(os.urandom(5000))
    with pytest.raises(ContentStoreError, match=r"sunday/beach/IMG_0001\.jpg changed since "
                       "it was received"):
        _plain(view)
    store.close()


def test_a_restarted_store_serves_the_view_and_rm_keeps_the_folder(tmp_path: Path) -> None:
    store, want, view = _received(tmp_path, [4000, 0, 7000], 2048)
    cid, folder = view.content_id, view.path
    store.close()
    store = ContentStore(tmp_path / "store")
    again = store.local(cid)
    assert isinstance(again, ArchiveView) and again.path == folder
    assert store.lookup(cid) is again and _plain(again) == want
    store.remove(cid, delete_file=True)  # the caller deletes the user's folder
    assert store.lookup(cid) is None and folder.is_dir()
    assert not any(p.exists() for p in view_paths(store.views, cid))
    store.close()


def test_a_damaged_map_is_not_served(tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    store, _, view = _received(tmp_path, [3000], 1024)
    cid = view.content_id
    store.close()
    map_path, _ = view_paths(tmp_path / "store" / "views", cid)
    map_path.write_bytes(map_path.read_bytes()[:-5])
    store = ContentStore(tmp_path / "store")
    caplog.set_level(logging.WARNING)
    assert store.lookup(cid) is None
    assert "folder map is damaged" in caplog.text
    store.close()


def test_a_file_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    store, _, view = _received(tmp_path, [3000], 1024)
    target = view.path / "IMG_0000.jpg"
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 3000)  # same size: only the link itself tells
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(ContentStoreError, match=r"sunday/IMG_0000\.jpg changed since it "
                       "was received"):
        _plain(view)
    assert view.source_changed() is not None
    store.close()

