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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

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


# A FUSE file system of one file, f.bin, with the bytes of a backing file; while the
# backing file's name + ".eio" exists, every read of it fails with EIO (a disk's bad
# sector, a network file system whose server went away). No attribute or page caching.
_EIO_FS = r"""
import errno, os, stat, sys
from fusepy import FUSE, FuseOSError, Operations
BACK = sys.argv[2]

class FS(Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path != "/f.bin":
            raise FuseOSError(errno.ENOENT)
        st = os.stat(BACK)
        return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=st.st_size,
                    st_mtime=st.st_mtime, st_uid=os.getuid(), st_gid=os.getgid())

    def readdir(self, path, fh):
        return [".", "..", "f.bin"]

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        if os.path.exists(BACK + ".eio"):
            raise FuseOSError(errno.EIO)
        with open(BACK, "rb") as f:
            f.seek(offset)
            return f.read(size)

FUSE(FS(), sys.argv[1], foreground=True, nothreads=True, attr_timeout=0, entry_timeout=0)
"""

FUSE_SUPER_MAGIC = 0x65735546

# In a process of its own: on the old code it never came back from mmap. A FUSE file is
# read, never mapped (it can change unseen by a lease); here it is mapped as a local file
# would be, as it is the failing file system a test can make: a local disk's bad sector
# meets the same mapping.
_READ_FAILING = r"""
import asyncio, errno, os, signal, sys
from pathlib import Path
from overlay.content import diskio
from overlay.content.catalog import ContentStore
from overlay.content.diskio import leased_chunk
from overlay.content.interfaces import ContentStoreError
signal.signal(signal.SIGIO, signal.SIG_IGN)
path, flag, store = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
diskio._LEASE_COVERS = diskio._LEASE_COVERS | {int(sys.argv[4])}
with open(path, "rb") as f, leased_chunk(f.fileno(), 0, 1) as view:
    print("leased" if view is not None else "no lease", flush=True)
content = asyncio.run(ContentStore(store).add_local_file(path, chunk_size=64 << 10))
flag.touch()
with open(path, "rb") as f:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
try:
    content.read_sealed(1)
except ContentStoreError as exc:
    print("served:", exc, flush=True)
try:
    asyncio.run(ContentStore(store).add_local_file(path, chunk_size=64 << 10))
except OSError as exc:
    print("named:", errno.errorcode[exc.errno], flush=True)
"""


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the FUSE tests, but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def fuse_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the FUSE file, its backing file); skips without FUSE or fusepy, which under
    CI=true is an error (.ci/run installs python3-fusepy)."""
    system_python = "/usr/bin/python3"
    if not os.path.exists("/dev/fuse") or subprocess.run(
            [system_python, "-c", "import fusepy"], capture_output=True).returncode != 0:
        _missing("needs /dev/fuse and the system Python's fusepy (python3-fusepy)")
    back, mnt = tmp_path / "back.bin", tmp_path / "mnt"
    _file(back, 8 * CHUNK)
    mnt.mkdir()
    server = subprocess.Popen([system_python, "-c", _EIO_FS, str(mnt), str(back)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                _missing(f"no FUSE mount here: {server.communicate()[1].strip()}")
            time.sleep(0.02)
        yield mnt / "f.bin", back
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        server.terminate()
        server.wait(timeout=10)


def test_a_file_whose_reads_fail_gives_the_error(tmp_path: Path,
                                                 fuse_file: tuple[Path, Path]) -> None:
    """A chunk the file system can't read (EIO) is refused with that error, when named and
    when served, as when it is read: mmap(MAP_POPULATE) retried it in the kernel for as
    long as the error lasted, a thread stuck and a core busy, and a mapped page read
    without it would have been SIGBUS."""
    path, back = fuse_file
    flag = Path(f"{back}.eio")
    child = subprocess.Popen([sys.executable, "-c", _READ_FAILING, str(path), str(flag),
                              str(tmp_path / "store"), str(FUSE_SUPER_MAGIC)],
                             stdout=subprocess.PIPE, text=True)
    try:
        out, _ = child.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        pytest.fail(f"reading a file whose reads fail hung: {out!r}")
    if out.startswith("no lease"):
        pytest.skip("no read lease on a FUSE file here: such a file is read, never mapped")
    assert child.returncode == 0, out
    assert out.splitlines() == [
        "leased",
        f"served: cannot read {path}: Input/output error",
        "named: EIO",
    ]


_SHRUNK_BEHIND = r"""
import os, signal, sys
from overlay.content.diskio import leased_chunk
signal.signal(signal.SIGIO, signal.SIG_IGN)
path, back = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
with leased_chunk(fd, 4 << 16, 4 << 16) as view:
    os.truncate(back, 4096)  # at the file system's server: no lease sees it
    os.stat(path)  # anyone's stat: the kernel learns the new size
    got = bytes(view) if view is not None else os.pread(fd, 4 << 16, 4 << 16)
print("mapped" if view is not None else "read", len(got), flush=True)
"""


def test_a_file_that_can_change_unseen_by_the_lease_is_read(
        fuse_file: tuple[Path, Path]) -> None:
    """A FUSE (or network) file shrunk at its server while a chunk of it is mapped: no
    lease is broken, and the mapped page past the new end killed the reader with SIGBUS.
    Such a file is read, and the chunk is then short (the store refuses it as changed)."""
    path, back = fuse_file
    child = subprocess.run([sys.executable, "-c", _SHRUNK_BEHIND, str(path), str(back)],
                           capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout == "read 0\n"
