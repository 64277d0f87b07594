"""The content store: sender's files, resumable partial downloads, serving, retention."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import random
import sqlite3
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto import content as crypto_content
from crypto.content import (
    DEFAULT_CHUNK_SIZE,
    LARGE_CHUNK_SIZE,
    LARGE_CONTENT,
    LARGE_MEDIA_CHUNK_SIZE,
    ChunkCipher,
    ChunkVerifier,
    LeafScheme,
    chunk_count,
    chunk_size_for,
    cpu_has_aes,
    preferred_scheme,
)
from crypto.errors import VerificationError
from overlay.content.catalog import ContentStore, local_scheme
from overlay.content.diskio import (
    DIRECT_ALIGN,
    HUGE_PAGE,
    SendBuffers,
    direct_aligned,
    direct_buffer,
)
from overlay.content.interfaces import ContentStoreError
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent
from tests.crypto.test_content import _refusing_overlap

CHUNK = 1024


def _file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _sealed(content: LocalContent) -> list[bytearray]:
    return [content.read_sealed(i) for i in range(chunk_count(content.size, content.chunk_size))]


def _opened(content: LocalContent | PartialContent, index: int,
            sealed: bytes | bytearray) -> bytes:
    """A served chunk opened with the content key: what a receiver compares."""
    return ChunkCipher(content.key, content.scheme).open(index, sealed)


def _receive(store: ContentStore, src: LocalContent, dest: Path, name: str) -> PartialContent:
    return store.open_partial(src.content_id, src.size, src.chunk_size, src.key,
                              src.capability, dest, name, scheme=src.scheme)


@pytest.mark.parametrize("scheme", list(LeafScheme))
async def test_added_file_serves_chunks_that_verify_against_its_id(
        tmp_path: Path, scheme: LeafScheme) -> None:
    data = _file(tmp_path / "clip.ts", 5 * CHUNK + 17)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK, scheme=scheme)
    assert content.scheme is scheme
    verifier = ChunkVerifier(content.content_id, content.leaves, content.size, CHUNK,
                             scheme=scheme, key=content.key)
    out = bytearray(CHUNK)
    for i, sealed in enumerate(_sealed(content)):
        plain = verifier.open_verified(content.cipher, i, sealed, out)
        assert plain == data[i * CHUNK : (i + 1) * CHUNK]
    served = store.lookup(content.content_id)
    assert served is not None and served.have_bitmap() is None
    assert not list((tmp_path / "store").rglob("*.ts")), "no sealed or plain copy in the store"
    store.close()
    # Survives a restart, with the same capability.
    again = ContentStore(tmp_path / "store").local(content.content_id)
    assert again == content


async def test_a_store_from_before_keyed_leaves_keeps_its_contents_sealed(
        tmp_path: Path) -> None:
    # A store of schema 1 has no scheme column: every content in it was named SEALED, and
    # a download of one that was under way resumes verifying SEALED chunks.
    data = _file(tmp_path / "a.bin", 3 * CHUNK + 5)
    store = ContentStore(tmp_path / "store")
    sent = await store.add_local_file(tmp_path / "a.bin", chunk_size=CHUNK,
                                      scheme=LeafScheme.SEALED)
    store.close()
    db = sqlite3.connect(tmp_path / "store" / "content.sqlite")
    db.execute("ALTER TABLE content DROP COLUMN scheme")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    old = ContentStore(tmp_path / "store").local(sent.content_id)
    assert old == sent and old.scheme is LeafScheme.SEALED
    recv = ContentStore(tmp_path / "recv")
    part = recv.open_partial(sent.content_id, sent.size, CHUNK, sent.key, sent.capability,
                             tmp_path / "inbox", "a.bin", scheme=LeafScheme.SEALED)
    part.set_leaves(old.leaves)
    for i in range(part.count):
        assert part.write_chunk(i, old.read_sealed(i))
    assert part.complete().read_bytes() == data
    # A resume names the scheme it began with; another one is refused, not mixed.
    other = ContentStore(tmp_path / "recv2")
    other.open_partial(sent.content_id, sent.size, CHUNK, sent.key, sent.capability,
                       tmp_path / "in2", "a.bin", scheme=LeafScheme.SEALED)
    other.close()
    with pytest.raises(ContentStoreError, match="layout differs"):
        ContentStore(tmp_path / "recv2").open_partial(
            sent.content_id, sent.size, CHUNK, sent.key, sent.capability, tmp_path / "in2",
            "a.bin", scheme=LeafScheme.KEYED_PLAIN)


async def test_same_key_same_id_and_capability_kept(tmp_path: Path) -> None:
    _file(tmp_path / "a.bin", 3000)
    store = ContentStore(tmp_path / "store")
    first = await store.add_local_file(tmp_path / "a.bin", chunk_size=CHUNK, key=b"k" * 32)
    second = await store.add_local_file(tmp_path / "a.bin", chunk_size=CHUNK, key=b"k" * 32)
    assert first.content_id == second.content_id
    assert first.capability == second.capability
    other = await store.add_local_file(tmp_path / "a.bin", chunk_size=CHUNK)
    assert other.content_id != first.content_id


async def test_a_changed_file_is_refused_rather_than_served_wrong(tmp_path: Path) -> None:
    _file(tmp_path / "a.bin", 3000)
    store = ContentStore(tmp_path / "store")
    content = await store.add_local_file(tmp_path / "a.bin", chunk_size=CHUNK)
    _file(tmp_path / "a.bin", 3000, seed=9)
    with pytest.raises(ContentStoreError, match="changed"):
        content.read_sealed(1)


async def test_partial_receive_verifies_resumes_and_completes(tmp_path: Path) -> None:
    data = _file(tmp_path / "clip.ts", 7 * CHUNK + 5)
    sender = ContentStore(tmp_path / "sender")
    src = await sender.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK)
    sealed = _sealed(src)
    dest = tmp_path / "inbox"
    store = ContentStore(tmp_path / "recv")
    part = _receive(store, src, dest, "clip.ts")
    assert part.missing() == list(range(8))

    with pytest.raises(ContentStoreError, match="hash list"):
        part.write_chunk(0, sealed[0])
    bad_leaves = list(src.leaves)
    bad_leaves[3] = bytes(32)
    with pytest.raises(VerificationError, match="does not match the content id"):
        part.set_leaves(bad_leaves)
    part.set_leaves(src.leaves)

    corrupt = bytearray(sealed[2])
    corrupt[10] ^= 1
    with pytest.raises(VerificationError):
        part.write_chunk(2, bytes(corrupt))
    with pytest.raises(VerificationError):
        part.write_chunk(2, sealed[3])
    assert not part.have(2)
    for i in (5, 2, 0):
        assert part.write_chunk(i, sealed[i])
    assert not part.write_chunk(2, sealed[2]), "a held chunk is not written twice"
    assert part.have_bitmap() == bytes([0b00100101])
    served = store.lookup(src.content_id)
    assert served is part
    assert _opened(src, 5, served.read_sealed(5)) == _opened(src, 5, sealed[5])

    # "kill -9": drop the objects without any shutdown, reopen from disk.
    del part, store
    store = ContentStore(tmp_path / "recv")
    part = _receive(store, src, dest, "clip.ts")
    assert part.missing() == [1, 3, 4, 6, 7]
    assert part.leaves == src.leaves
    for i in part.missing():
        part.write_chunk(i, sealed[i])
    final = part.complete()
    assert final == dest / "clip.ts" and final.read_bytes() == data
    assert not list(dest.glob("*.part"))
    assert store.lookup(src.content_id) == store.local(src.content_id)
    local = store.local(src.content_id)
    assert local is not None
    assert _opened(src, 7, local.read_sealed(7)) == _opened(src, 7, sealed[7])
    with pytest.raises(ContentStoreError, match="already held"):
        _receive(store, src, dest, "clip.ts")


async def test_complete_never_clobbers_and_name_stays_in_dest(tmp_path: Path) -> None:
    _file(tmp_path / "src.ts", 100)
    sender = ContentStore(tmp_path / "sender")
    src = await sender.add_local_file(tmp_path / "src.ts", chunk_size=CHUNK)
    dest = tmp_path / "inbox"
    dest.mkdir()
    (dest / "clip.ts").write_bytes(b"mine")
    (dest / "clip (1).ts").write_bytes(b"mine too")
    store = ContentStore(tmp_path / "recv")
    part = _receive(store, src, dest, "../../clip.ts")
    part.set_leaves(src.leaves)
    part.write_chunk(0, src.read_sealed(0))
    assert part.complete() == dest / "clip (2).ts"
    assert (dest / "clip.ts").read_bytes() == b"mine"


async def test_two_downloads_completing_one_content_at_once_give_one_file(
        tmp_path: Path) -> None:
    """Two downloads of one content share its partial; both finishing at the same moment
    get the one final path, and the file has one name."""
    data = _file(tmp_path / "src.ts", 3 * CHUNK + 5)
    sender = ContentStore(tmp_path / "sender")
    src = await sender.add_local_file(tmp_path / "src.ts", chunk_size=CHUNK)
    store = ContentStore(tmp_path / "recv")
    dest = tmp_path / "inbox"
    part = _receive(store, src, dest, "clip.ts")
    assert _receive(store, src, dest, "clip.ts") is part
    part.set_leaves(src.leaves)
    for i, sealed in enumerate(_sealed(src)):
        part.write_chunk(i, sealed)
    # Hold the rename until both calls are under way, as two filing threads finishing
    # their downloads' last chunks together would be.
    with ThreadPoolExecutor(2) as pool:
        with part._renaming:
            calls = [pool.submit(part.complete) for _ in range(2)]
            time.sleep(0.2)
        paths = [c.result(timeout=10) for c in calls]
    assert paths == [dest / "clip.ts"] * 2
    assert sorted(p.name for p in dest.iterdir()) == [".peerpost-partial", "clip.ts"]
    assert (dest / "clip.ts").read_bytes() == data


async def test_incomplete_cannot_complete(tmp_path: Path) -> None:
    _file(tmp_path / "src", 3 * CHUNK)
    src = await ContentStore(tmp_path / "s").add_local_file(tmp_path / "src", chunk_size=CHUNK)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "f")
    with pytest.raises(ContentStoreError, match="3 chunks still missing"):
        part.complete()


async def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    src = await ContentStore(tmp_path / "s").add_local_file(tmp_path / "empty", chunk_size=CHUNK)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "empty")
    part.set_leaves(src.leaves)
    assert part.write_chunk(0, src.read_sealed(0))
    assert part.complete().read_bytes() == b""


async def test_remove_and_archive(tmp_path: Path) -> None:
    _file(tmp_path / "a", 2000)
    _file(tmp_path / "b", 2000, seed=1)
    store = ContentStore(tmp_path / "store")
    a = await store.add_local_file(tmp_path / "a", chunk_size=CHUNK)
    b = await store.add_local_file(tmp_path / "b", chunk_size=CHUNK)
    store.remove(a.content_id)
    assert store.lookup(a.content_id) is None and (tmp_path / "a").exists()
    moved = store.archive(b.content_id, tmp_path / "archive")
    assert moved == tmp_path / "archive" / "b" and not (tmp_path / "b").exists()
    assert store.lookup(b.content_id) is None
    with pytest.raises(ContentStoreError, match="unknown content"):
        store.remove(b.content_id)
    # A partial download's files go when it is removed.
    part = _receive(store, a, tmp_path / "in", "a")
    store.remove(a.content_id)
    assert not part.part_path.exists()
    assert not store.have_path(a.content_id).exists()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=0, max_value=9 * CHUNK), seed=st.integers(0, 1000))
def test_any_size_any_order_round_trips(tmp_path: Path, size: int, seed: int) -> None:
    run = tmp_path / f"{size}-{seed}"
    run.mkdir()
    data = _file(run / "f", size, seed)
    src = ContentStore(run / "s").add_local_file_blocking(run / "f", chunk_size=CHUNK)
    part = _receive(ContentStore(run / "r"), src, run / "in", "f")
    part.set_leaves(src.leaves)
    order = part.missing()
    random.Random(seed).shuffle(order)
    for i in order:
        part.write_chunk(i, src.read_sealed(i))
    assert part.complete().read_bytes() == data
    assert os.stat(run / "r" / "content.sqlite").st_mode & 0o077 == 0


@pytest.mark.parametrize("direct", [True, False])
def test_aligned_chunks_go_straight_to_disk_or_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """O_DIRECT for every chunk of a 4 KiB-multiple layout but a short last one; where the
    filesystem refuses it (open or write), the page cache, with the same bytes."""
    chunk = 2 * DIRECT_ALIGN
    data = _file(tmp_path / "f", 5 * chunk + 100)
    src = ContentStore(tmp_path / "s").add_local_file_blocking(tmp_path / "f", chunk_size=chunk)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "f")
    if not direct:
        def refuse(fd: int, view: memoryview, offset: int) -> int:
            if fd == part._direct_fd:
                raise OSError(errno.EINVAL, "no O_DIRECT here")
            return real_pwrite(fd, view, offset)

        real_pwrite = os.pwrite
        monkeypatch.setattr(os, "pwrite", refuse)
    part.set_leaves(src.leaves)
    for i in reversed(part.missing()):
        assert part.write_chunk(i, bytearray(src.read_sealed(i)))
        # A chunk written either way is read back and served as its leaf names it.
        assert _opened(src, i, part.read_sealed(i)) == _opened(src, i, src.read_sealed(i))
    assert (part._direct_fd >= 0) is direct or not hasattr(os, "O_DIRECT")
    assert part.complete().read_bytes() == data


@pytest.mark.parametrize(("n", "lead"), [(1, 0), (DIRECT_ALIGN, 0), ((1 << 20) + 28, 12),
                                         (HUGE_PAGE + 28, 12), (2 * HUGE_PAGE + 7, 100)])
def test_direct_buffer_starts_a_page_at_its_lead(n: int, lead: int) -> None:
    """Received payloads are opened in place and written with O_DIRECT from `lead` on; from
    a huge page's worth on, that byte starts a huge page (pinned as one by each write)."""
    buf = direct_buffer(n, lead)
    assert len(buf) == n and not buf.readonly
    buf[:] = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert direct_aligned(buf[lead:])
    if n - lead >= HUGE_PAGE:
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf[lead:])) % HUGE_PAGE == 0
    with pytest.raises(ValueError, match="within a page"):
        direct_buffer(n, mmap.PAGESIZE)


@pytest.mark.parametrize("chunk", [LARGE_MEDIA_CHUNK_SIZE, LARGE_CHUNK_SIZE])
def test_huge_page_chunks_reach_the_disk_whole(tmp_path: Path, chunk: int) -> None:
    """Chunks of the large-file layouts (2 and 4 MiB) opened into huge-page buffers and
    written with O_DIRECT read back as the file that was sent."""
    data = _file(tmp_path / "f", 2 * chunk + 4096)
    src = ContentStore(tmp_path / "s").add_local_file_blocking(tmp_path / "f", chunk_size=chunk)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "f")
    part.set_leaves(src.leaves)
    for i in part.missing():
        assert part.write_chunk(i, bytes(src.read_sealed(i)))  # read-only: a buffer of ours
    assert part.complete().read_bytes() == data


def test_a_forged_chunk_writes_nothing_with_reused_buffers(tmp_path: Path) -> None:
    chunk = DIRECT_ALIGN
    _file(tmp_path / "f", 3 * chunk)
    src = ContentStore(tmp_path / "s").add_local_file_blocking(tmp_path / "f", chunk_size=chunk)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "f")
    part.set_leaves(src.leaves)
    assert part.write_chunk(0, src.read_sealed(0))
    forged = bytearray(src.read_sealed(1))
    forged[-1] ^= 1
    with pytest.raises(VerificationError):
        part.write_chunk(1, forged)
    assert not part.have(1)
    assert os.pread(os.open(part.part_path, os.O_RDONLY), chunk, chunk) == bytes(chunk)


def test_send_buffers_are_reused_only_when_nothing_else_holds_them() -> None:
    pool = SendBuffers(limit=2)
    a = pool.take(100)
    view = memoryview(a)  # as a transport's write queue holds it
    b = pool.take(100)
    assert b is not a
    del view
    assert pool.take(100) is not b  # b is still ours
    b_id = id(b)
    del b
    assert id(pool.take(100)) == b_id  # nothing holds it any more: reused
    assert len(pool.take(50)) == 50


def test_memory_kept_for_serving_does_not_grow_with_the_files_sent(tmp_path: Path) -> None:
    """Each content kept its own chunk buffers for as long as the node ran: a node that
    had sent 600 small files held 1.6 GB. The store's contents now share two bounded
    pools, so serving 30 files keeps what serving one does."""
    store = ContentStore(tmp_path / "s")
    size = DEFAULT_CHUNK_SIZE + DEFAULT_CHUNK_SIZE // 2  # two chunks, 1 MiB and 0.5 MiB

    def serve_all(content: LocalContent, data: bytes) -> None:
        with ThreadPoolExecutor(2) as pool:  # as the serving threads read
            sealed = list(pool.map(content.read_sealed, range(len(content.leaves))))
        assert [_opened(content, i, c) for i, c in enumerate(sealed)] == [
            data[i * DEFAULT_CHUNK_SIZE:(i + 1) * DEFAULT_CHUNK_SIZE]
            for i in range(len(sealed))]

    tracemalloc.start()
    try:
        for k in range(30):
            data = _file(tmp_path / f"f{k}", size, seed=k)
            content = store.add_local_file_blocking(tmp_path / f"f{k}")
            serve_all(content, data)
            (tmp_path / f"f{k}").unlink()  # the node forgets nothing; the file may go
            if k == 0:
                after_one = tracemalloc.get_traced_memory()[0]
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < after_one + 4 * DEFAULT_CHUNK_SIZE, (after_one, kept)
    served = [store.local(cid) for cid in store.content_ids()]
    assert len(served) == 30
    assert all(c is not None and c.outgoing is content.outgoing for c in served)


def test_served_chunks_stay_intact_while_held(tmp_path: Path) -> None:
    """Buffer reuse on the serving side never rewrites a chunk something still holds."""
    _file(tmp_path / "f", 6 * CHUNK + 5)
    src = ContentStore(tmp_path / "s").add_local_file_blocking(tmp_path / "f", chunk_size=CHUNK)
    held = [src.read_sealed(i) for i in range(7)]
    expected = [bytes(h) for h in held]
    for i in range(7):  # more reads while all of those are held
        assert _opened(src, i, src.read_sealed(i)) == _opened(src, i, expected[i])
    assert [bytes(h) for h in held] == expected
    del held
    assert [_opened(src, i, src.read_sealed(i)) for i in range(7)] == [
        _opened(src, i, e) for i, e in enumerate(expected)]


def test_large_files_are_named_in_larger_chunks(tmp_path: Path) -> None:
    """From LARGE_CONTENT up, LARGE_CHUNK_SIZE chunks (2 MiB for media); below it,
    1 MiB chunks. Sparse files: nothing is written, the hashing reads zeros."""
    store = ContentStore(tmp_path / "s")
    sizes = {"just-below": LARGE_CONTENT - 1, "at": LARGE_CONTENT}
    for name, size in sizes.items():
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    below = store.add_local_file_blocking(tmp_path / "just-below")
    at = store.add_local_file_blocking(tmp_path / "at")
    assert (below.chunk_size, at.chunk_size) == (DEFAULT_CHUNK_SIZE, LARGE_CHUNK_SIZE)
    assert len(at.leaves) == LARGE_CONTENT // LARGE_CHUNK_SIZE
    assert chunk_size_for(10) == DEFAULT_CHUNK_SIZE and chunk_size_for(1 << 40) == LARGE_CHUNK_SIZE
    media = store.name_local_file_blocking(tmp_path / "at", media=True)
    assert len(media.leaves) == LARGE_CONTENT // LARGE_MEDIA_CHUNK_SIZE
    assert chunk_size_for(LARGE_CONTENT - 1, media=True) == DEFAULT_CHUNK_SIZE


def _on_a_page(sealed: bytes | bytearray, lead: int) -> memoryview:
    """`sealed` as a transfer session receives it after align_payloads(lead)."""
    import mmap
    start = -lead % mmap.PAGESIZE
    view = memoryview(mmap.mmap(-1, start + len(sealed)))[start:]
    view[:] = sealed
    return view


def _sender_and_receiver(tmp_path: Path, size: int, chunk: int, scheme: LeafScheme,
                         ) -> tuple[bytes, LocalContent, PartialContent]:
    """A file of `size` random bytes added to one store and opened for receiving in
    another, its hash list known."""
    data = _file(tmp_path / "f", size)
    src = ContentStore(tmp_path / "s").add_local_file_blocking(tmp_path / "f", chunk_size=chunk,
                                                               scheme=scheme)
    part = _receive(ContentStore(tmp_path / "r"), src, tmp_path / "in", "f")
    part.set_leaves(src.leaves)
    return data, src, part


@pytest.mark.parametrize("scheme", list(LeafScheme))
def test_chunks_on_a_page_are_opened_where_they_lie(tmp_path: Path, scheme: LeafScheme) -> None:
    """A chunk whose ciphertext starts a page is opened in place (no second buffer) and
    written from there; one that fails its AEAD or its leaf writes nothing and leaves no
    plaintext in its buffer."""
    chunk = 2 * DIRECT_ALIGN
    data, src, part = _sender_and_receiver(tmp_path, 4 * chunk + 100, chunk, scheme)
    # Where the installed cryptography can't open in place (51 and later) every chunk is
    # opened into the one reused aligned buffer instead.
    in_place = part._cipher.in_place
    lead = scheme.seal_lead
    forged = _on_a_page(src.read_sealed(1), lead)
    forged[-1] ^= 1  # the tag
    with pytest.raises(VerificationError):
        part.write_chunk(1, forged)
    if scheme.plain_leaves:  # a key holder that sealed other plaintext: the leaf catches it
        other = bytearray(chunk + scheme.seal_overhead)
        ChunkCipher(src.key, scheme).seal_into(2, bytes(chunk), other)
        lie = _on_a_page(bytes(other), lead)
        with pytest.raises(VerificationError, match="does not match its hash"):
            part.write_chunk(2, lie)
        opened = lie[lead : lead + chunk] if in_place else part._buffers[-1][:chunk]
        assert bytes(opened) == bytes(chunk)  # no plaintext left behind
    assert part.held == 0
    for i in part.missing():
        assert part.write_chunk(i, _on_a_page(src.read_sealed(i), lead))
    assert len(part._buffers) == (0 if in_place else 1)  # opened where it lies, or not
    assert part.complete().read_bytes() == data


@pytest.mark.parametrize("scheme", list(LeafScheme))
def test_where_chunks_cant_be_sealed_or_opened_in_place_none_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: LeafScheme) -> None:
    """Under a cryptography that refuses input and output sharing memory (51 and later),
    a served chunk is read into a reused plaintext buffer and sealed from there into the
    one that goes out, and a received one is opened from where it arrived into a reused
    aligned buffer: the bytes arrive whole and no chunk is copied on the way (sealing or
    opening in place copied each chunk first)."""
    monkeypatch.setattr(crypto_content, "_AESGCM", _refusing_overlap(AESGCM))
    monkeypatch.setattr(crypto_content, "_ChaCha20Poly1305", _refusing_overlap(ChaCha20Poly1305))
    monkeypatch.setattr(crypto_content, "in_place_aead", lambda: False)
    chunk = 64 * DIRECT_ALIGN
    data, src, part = _sender_and_receiver(tmp_path, 6 * chunk + 100, chunk, scheme)
    assert not src.cipher.in_place and not part._cipher.in_place
    lead = scheme.seal_lead

    def deliver(i: int) -> None:  # a served chunk received on a page, as a session does
        sealed = src.read_sealed(i)
        page = _on_a_page(sealed, lead)
        del sealed  # the transport let go of it: its buffer is reused
        assert part.write_chunk(i, page)

    deliver(0)  # the reused buffers are made
    tracemalloc.start()
    try:
        for i in range(1, len(src.leaves)):
            deliver(i)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < chunk // 4
    assert part.complete().read_bytes() == data


def test_send_names_with_the_scheme_this_cpu_prefers() -> None:
    try:
        cpuinfo: str | None = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    assert local_scheme() is preferred_scheme(cpuinfo, platform.machine())
    if cpu_has_aes(cpuinfo, platform.machine()):
        assert local_scheme() is LeafScheme.KEYED_PLAIN_AES
