"""Chunks named and served from the page cache, mapped under read leases (`leased_chunk`).

What a user would notice if this were wrong: a node killed by SIGBUS when they truncate or
rewrite a file it is sending, a content named differently mapped than read, or chunks that
don't open to the file's bytes. The node ignores SIGIO (`ignore_lease_breaks`); the
fixture does the same here, and puts the default back after.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.content import ChunkCipher, LeafScheme, chunk_count, leaf_key, plain_leaf
from overlay.content.catalog import ContentStore
from overlay.content.diskio import ShortRead, leased_chunk
from overlay.content.interfaces import ContentStoreError

CHUNK = 64 << 10


@pytest.fixture
def leases() -> Iterator[None]:
    """SIGIO ignored, as in the node; leases are then taken where the file allows."""
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGIO, old)


def _file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _leasable(path: Path) -> None:
    """Skip where this file system or kernel grants no read lease (the node then reads)."""
    with open(path, "rb") as f, leased_chunk(f.fileno(), 0, 1) as view:
        if view is None:
            pytest.skip(f"no read lease on {path}'s file system here")


def test_a_mapped_chunk_is_the_file_bytes_at_any_offset(tmp_path: Path, leases: None) -> None:
    data = _file(tmp_path / "a.bin", 3 * CHUNK + 123)
    _leasable(tmp_path / "a.bin")
    with open(tmp_path / "a.bin", "rb") as f:
        for offset, n in ((0, CHUNK), (CHUNK, CHUNK), (1000, 5000), (3 * CHUNK, 123)):
            with leased_chunk(f.fileno(), offset, n) as view:
                assert view is not None
                assert bytes(view) == data[offset : offset + n]
        with pytest.raises(ShortRead), leased_chunk(f.fileno(), 3 * CHUNK, 124):
            pass


def test_without_sigio_ignored_no_lease_is_taken(tmp_path: Path) -> None:
    """A lease break would end a process that still has SIGIO's default action."""
    assert signal.getsignal(signal.SIGIO) is signal.SIG_DFL
    _file(tmp_path / "a.bin", CHUNK)
    with open(tmp_path / "a.bin", "rb") as f, leased_chunk(f.fileno(), 0, CHUNK) as view:
        assert view is None


def test_a_file_open_for_writing_is_read_not_mapped(tmp_path: Path, leases: None) -> None:
    _file(tmp_path / "a.bin", CHUNK)
    _leasable(tmp_path / "a.bin")
    with open(tmp_path / "a.bin", "r+b") as writer, open(tmp_path / "a.bin", "rb") as f:
        with leased_chunk(f.fileno(), 0, CHUNK) as view:
            assert view is None
        writer.write(b"x")


@pytest.mark.parametrize("scheme", [LeafScheme.KEYED_PLAIN, LeafScheme.KEYED_PLAIN_AES])
async def test_named_and_served_mapped_as_when_read(tmp_path: Path, leases: None,
                                                    scheme: LeafScheme) -> None:
    """The same key names the file the same whether its chunks are mapped or read, and
    every served chunk opens to the file's bytes."""
    data = _file(tmp_path / "clip.ts", 9 * CHUNK + 77)
    _leasable(tmp_path / "clip.ts")
    key = bytes(range(32))
    mapped = await ContentStore(tmp_path / "s1").add_local_file(
        tmp_path / "clip.ts", chunk_size=CHUNK, key=key, scheme=scheme)
    signal.signal(signal.SIGIO, signal.SIG_DFL)  # no leases: every chunk read
    read = await ContentStore(tmp_path / "s2").add_local_file(
        tmp_path / "clip.ts", chunk_size=CHUNK, key=key, scheme=scheme)
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    assert mapped.content_id == read.content_id and mapped.leaves == read.leaves
    kl = leaf_key(key)
    assert mapped.leaves[0] == plain_leaf(kl, data[:CHUNK])
    cipher = ChunkCipher(key, scheme)
    for i in range(chunk_count(len(data), CHUNK)):
        assert cipher.open(i, mapped.read_sealed(i)) == data[i * CHUNK : (i + 1) * CHUNK]


async def test_a_file_shrunk_after_it_was_named_is_refused(tmp_path: Path,
                                                           leases: None) -> None:
    _file(tmp_path / "a.bin", 4 * CHUNK)
    _leasable(tmp_path / "a.bin")
    content = await ContentStore(tmp_path / "s").add_local_file(tmp_path / "a.bin",
                                                                chunk_size=CHUNK)
    os.truncate(tmp_path / "a.bin", 2 * CHUNK + 5)
    with pytest.raises(ContentStoreError, match="changed"):
        content.read_sealed(3)


_TRUNCATE = r"""
import os, sys
print("opening", flush=True)
os.truncate(sys.argv[1], 0)
print("truncated", flush=True)
"""


def test_a_truncate_waits_until_the_mapped_chunk_is_read(tmp_path: Path,
                                                          leases: None) -> None:
    """Another process truncating the file while a chunk of it is mapped would kill the
    reader with SIGBUS; under the lease its truncate waits until the chunk is let go."""
    data = _file(tmp_path / "a.bin", 4 * CHUNK)
    _leasable(tmp_path / "a.bin")
    with open(tmp_path / "a.bin", "rb") as f:
        with leased_chunk(f.fileno(), CHUNK, 2 * CHUNK) as view:
            assert view is not None
            writer = subprocess.Popen([sys.executable, "-c", _TRUNCATE, str(tmp_path / "a.bin")],
                                      stdout=subprocess.PIPE, text=True)
            assert writer.stdout is not None
            assert writer.stdout.readline() == "opening\n"
            # The truncate is now in the kernel, held at the lease (45 s by default):
            # it can't finish while the view is read. A bounded wait for the negative.
            with pytest.raises(subprocess.TimeoutExpired):
                writer.wait(timeout=0.3)
            assert os.stat(tmp_path / "a.bin").st_size == 4 * CHUNK
            assert bytes(view) == data[CHUNK : 3 * CHUNK]  # every page, no SIGBUS
        assert writer.stdout.readline() == "truncated\n"
        assert writer.wait(timeout=10) == 0
        assert os.stat(tmp_path / "a.bin").st_size == 0
        # The next chunk is refused as the file now ends before it.
        with pytest.raises(ShortRead), leased_chunk(f.fileno(), CHUNK, CHUNK):
            pass
