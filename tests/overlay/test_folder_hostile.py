"""Hostile folder archives a stranger can send: each is refused before it costs memory or
writes anything, with the cause named (tests/overlay/test_folders.py has the plain rules).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from crypto.location import FolderInfo
from overlay.mail.folders import (
    MAX_PATH_BYTES,
    FolderError,
    member_info,
    pack,
    plan_pack,
    unpack,
)
from overlay.mail.tarheaders import MAX_EXTENDED_HEADER


def _records(**fields: str) -> bytes:
    """PAX records: `LEN key=value\\n`, LEN counting the whole record."""
    out = b""
    for key, value in fields.items():
        body = f" {key.replace('_', '.')}={value}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def _raw(tar: tarfile.TarFile, name: str, kind: bytes, data: bytes) -> None:
    """A header of type `kind` with `data` as its body, as a hostile writer makes it."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    tar.addfile(info, io.BytesIO(data))


def _file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _unpack_refused(archive: Path, dest: Path) -> tuple[str, int]:
    """The refusal's text and the peak of memory allocated while judging."""
    dest.mkdir(exist_ok=True)
    tracemalloc.start()
    try:
        with pytest.raises(FolderError) as err:
            unpack(archive, FolderInfo("top", 1, 0, 1), dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.listdir(dest) in ([], [".peerpost-partial"])  # nothing written
    assert archive.exists() and f"the archive is kept at {archive}" in str(err.value)
    return str(err.value), peak


def test_a_huge_pax_header_is_refused_without_being_read(tmp_path: Path) -> None:
    # A 4 MiB PAX header: the old code read it whole (and decoded it: 8+ MiB at peak),
    # 200 MB of it cost about 1 GB.
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        _file(tar, "top/a", b"1")
        info = tarfile.TarInfo("top/b")
        info.pax_headers = {"comment": "x" * (4 << 20)}
        tar.addfile(info)
    said, peak = _unpack_refused(archive, tmp_path / "in")
    assert "a PAX header of 4.0 MiB (at most 64 KiB)" in said
    assert peak < 1 << 20


def test_a_huge_gnu_long_name_is_refused_without_being_read(tmp_path: Path) -> None:
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        _file(tar, "top/" + "n" * (3 << 20), b"1")
    said, peak = _unpack_refused(archive, tmp_path / "in")
    assert "a GNU long name header of 3.0 MiB (at most 64 KiB)" in said
    assert peak < 1 << 20


def test_global_headers_are_bounded_in_size_and_number(tmp_path: Path) -> None:
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w", format=tarfile.USTAR_FORMAT) as tar:
        _raw(tar, "g", tarfile.XGLTYPE, _records(comment="x" * (2 << 20)))
        _file(tar, "top/a", b"1")
    said, peak = _unpack_refused(big, tmp_path / "in")
    assert "a global PAX header of 2.0 MiB" in said and peak < 1 << 20
    # Each global header's records are kept for every later member: many small ones add up.
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(9):
            _raw(tar, "g", tarfile.XGLTYPE, _records(**{f"k{i}": "x" * 60_000}))
            _file(tar, f"top/a{i}", b"1")
    said, _ = _unpack_refused(many, tmp_path / "in2")
    assert "more than 8 global PAX headers" in said


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    # tarfile reads a chain recursively, each header kept until the member: 1,000 of
    # 64 KiB would be 64 MB and a RecursionError.
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        for _ in range(5):
            _raw(tar, "x", tarfile.XHDTYPE, _records(comment="x" * 1000))
        _file(tar, "top/a", b"1")
    said, _ = _unpack_refused(archive, tmp_path / "in")
    assert "more than 4 extended headers before one member" in said


@pytest.mark.parametrize("kind", ["gnu", "pax 1.0"])
def test_sparse_members_are_refused(tmp_path: Path, kind: str) -> None:
    # Both build a sparse map from the archive's data as long as the data allows.
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        if kind == "gnu":
            _raw(tar, "top/a", tarfile.GNUTYPE_SPARSE, b"")
        else:
            _raw(tar, "x", tarfile.XHDTYPE, _records(
                GNU_sparse_major="1", GNU_sparse_minor="0", GNU_sparse_name="top/a",
                GNU_sparse_realsize="1000000"))
            _file(tar, "top/GNUSparseFile.0/a", b"100000\n" + b"0\n" * 50_000)
    said, _ = _unpack_refused(archive, tmp_path / "in")
    assert "'top/a': a sparse file (not unpacked)" in said


def test_our_longest_names_take_a_small_pax_header(tmp_path: Path) -> None:
    # What our own sender writes must pass with room to spare: a path of MAX_PATH_BYTES
    # of 3-byte characters, as plan_pack allows.
    name = "top/" + "/".join(["é" * 80] * (MAX_PATH_BYTES // 161))
    assert len(name.encode()) <= MAX_PATH_BYTES
    header = member_info(name, os.stat(__file__)).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING,
                                                        "surrogateescape")
    assert len(header) < MAX_EXTENDED_HEADER // 8


@pytest.mark.parametrize(("members", "said"), [
    # Extraction failed midway on 'Not a directory', naming our private work folder.
    ([("top/a", b"1"), ("top/a/b", b"2")], "'top/a/b': inside 'top/a', which is a file"),
    ([("top/a/b", b"2"), ("top/a", b"1")], "'top/a': a file where 'top/a/b' needs a folder"),
    # On a disk that ignores case the second overwrote the first.
    ([("top/X", b"1"), ("top/x", b"2")],
     "'top/x': the same name as 'top/X' where case does not count"),
    ([("top/Dir", None), ("top/Dir/a", b"1"), ("top/dir/A", b"2")],
     "'top/dir/A': the same name as 'top/Dir/a' where case does not count"),
])
def test_layouts_that_cannot_be_unpacked_as_sent_are_refused(
        tmp_path: Path, members: list[tuple[str, bytes | None]], said: str) -> None:
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            if data is None:
                _raw(tar, name, tarfile.DIRTYPE, b"")
            else:
                _file(tar, name, data)
    text, _ = _unpack_refused(archive, tmp_path / "in")
    assert said in text, text
    assert ".unpack" not in text  # never our private folder's name


def test_names_alike_but_for_case_are_numbered_when_sent(tmp_path: Path) -> None:
    src = tmp_path / "trip"
    src.mkdir()
    for name in ("IMG.jpg", "img.jpg", "img (1).jpg"):
        (src / name).write_text(name)
    plan = plan_pack([src])
    assert [m for _, m in plan.entries] == ["trip", "trip/IMG.jpg", "trip/img (1).jpg",
                                            "trip/img (2).jpg"]
    assert [r.why for r in plan.renamed] == [
        "sent as 'img (2).jpg': another name there differs only in case"]
    dest = tmp_path / "in"
    dest.mkdir()
    got = unpack(pack(plan, tmp_path / "store", lambda n: None), plan.info(), dest)
    assert {p.name: p.read_text() for p in got.iterdir()} == {
        "IMG.jpg": "IMG.jpg", "img (1).jpg": "img (1).jpg", "img (2).jpg": "img.jpg"}


@pytest.mark.parametrize("mtime", ["1e30", "-1e30", "inf", "nan", "9223372036854775808"])
def test_a_member_time_no_file_can_have_is_not_kept(tmp_path: Path, mtime: str) -> None:
    """A PAX `mtime` os.utime can't set (out of time_t's range, infinite, not a number)
    made extractall raise OverflowError or ValueError halfway through the unpack; the
    member is unpacked with the time it is made instead, like our own timeless folders."""
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        _raw(tar, "top", tarfile.DIRTYPE, b"")
        _raw(tar, "pax", tarfile.XHDTYPE, _records(mtime=mtime))
        _file(tar, "top/a.txt", b"hello")
    dest = tmp_path / "in"
    dest.mkdir()
    folder = unpack(archive, FolderInfo("top", 1, 0, 5), dest)
    assert (folder / "a.txt").read_bytes() == b"hello"
    assert abs((folder / "a.txt").stat().st_mtime - time.time()) < 600


def test_a_base256_header_time_out_of_range_is_not_kept(tmp_path: Path) -> None:
    """The same for a ustar header whose mtime field is a base-256 number past time_t."""
    archive = tmp_path / "top.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        _raw(tar, "top", tarfile.DIRTYPE, b"")
        _file(tar, "top/a.txt", b"hello")
    raw = bytearray(archive.read_bytes())
    header = 512  # the file's header, after the folder's
    raw[header + 136:header + 148] = b"\x80" + b"\xff" * 11  # 2**88 - 1 seconds
    block = raw[header:header + 512]
    block[148:156] = b" " * 8
    raw[header + 148:header + 156] = b"%06o\0 " % sum(block)
    archive.write_bytes(bytes(raw))
    assert tarfile.open(archive).getmember("top/a.txt").mtime > 2**64
    dest = tmp_path / "in"
    dest.mkdir()
    folder = unpack(archive, FolderInfo("top", 1, 0, 5), dest)
    assert (folder / "a.txt").read_bytes() == b"hello"
