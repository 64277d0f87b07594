"""A location message claiming the most chunks a layout allows (crypto.content.MAX_CHUNKS,
64 GiB in 64 KiB chunks) costs the receiver almost nothing before any source is contacted,
and little after: the per-chunk state is bitmaps and a byte per chunk, not objects.
Per-chunk lists, sets and buckets cost 148 MiB and 0.66 s of blocked loop here.
Costs are timed in this thread's CPU time, which is how long the work blocks the loop; the
wall clock adds the other processes of a loaded machine (the three sources' 0.16 s of CPU
took 0.8 s beside two CPU hogs, and 2.2-3.0 s in 5 of 10 runs with the tests' other
worker besides)."""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from crypto.content import MAX_CHUNKS
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.partial import PartialContent
from overlay.transfer.downloader import Downloader
from overlay.transfer.scheduler import Arrival, ChunkScheduler

CHUNK = 64 << 10
NBYTES = MAX_CHUNKS // 8
MiB = 1 << 20


class _Owner:
    def __init__(self, root: Path) -> None:
        self.root = root

    def have_path(self, content_id: bytes) -> Path:
        return self.root / f"{content_id.hex()}.have"

    def save_leaves(self, content_id: bytes, leaves: Sequence[bytes]) -> None:
        raise AssertionError("no source is contacted here")

    def mark_complete(self, partial: PartialContent, final: Path) -> None:
        raise AssertionError("no source is contacted here")


def _open(root: Path, tag: int) -> PartialContent:
    """A fresh partial content of MAX_CHUNKS chunks (its .part sparse, as preallocate
    makes it), opened as the catalog does."""
    part = root / f"big{tag}.part"
    with part.open("wb") as f:
        f.truncate(MAX_CHUNKS * CHUNK)
    return PartialContent(_Owner(root), bytes([tag]) * 32, MAX_CHUNKS * CHUNK, CHUNK,
                          b"\x02" * 32, b"\x03" * 32, part, root / "in", "big.bin", None)


@contextmanager
def _traced() -> Iterator[list[int]]:
    """Yields [extra bytes still allocated, peak extra bytes], filled in on exit."""
    out = [0, 0]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield out
        cur, peak = tracemalloc.get_traced_memory()
        out[:] = [cur - base, peak - base]
    finally:
        tracemalloc.stop()


def test_opening_a_2_20_chunk_offer_for_fetch_costs_little(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    start = time.thread_time()
    partial = _open(tmp_path, 1)
    down = Downloader(partial, [], identity)
    took = time.thread_time() - start
    assert took < 0.1, f"{took:.3f} s of blocked loop"
    assert down.scheduler.remaining == down.scheduler.pool_size == MAX_CHUNKS
    assert partial.missing_count == MAX_CHUNKS and partial.held_snapshot()[1] == 0
    partial.close()

    with _traced() as mem:
        partial = _open(tmp_path, 2)
        down = Downloader(partial, [], identity)
    assert mem[0] < 16 * MiB and mem[1] < 16 * MiB, f"{mem[0] / MiB:.1f} MiB extra"
    partial.close()


def test_three_sources_on_2_20_chunks_cost_little() -> None:
    """A full holder and two partial holders with complementary halves: rarest first
    still holds (the full holder gets chunks no partial holder has, each partial holder
    its own), and sources, HAVEs and a few hundred picks stay cheap."""
    rnd = random.Random(1)
    half = bytes(rnd.getrandbits(8) for _ in range(NBYTES))
    other = bytes(b ^ 0xFF for b in half)
    never = bytearray(NBYTES)  # chunks neither partial holder has: the even ones of 1 byte
    never[0] = 0b0101_0101
    half = bytes([half[0] & 0b1010_1010]) + half[1:]
    other = bytes([other[0] & 0b1010_1010]) + other[1:]
    start = time.thread_time()
    with _traced() as mem:
        sched = ChunkScheduler(count=MAX_CHUNKS, held=bytes(NBYTES), rng=random.Random(2))
        sched.add_source("sender", window=8)
        sched.add_source("p", window=8, have=half)
        sched.add_source("q", window=8, have=other)
        sender: list[int] = []
        for _ in range(200):
            for sid in ("sender", "p", "q"):
                i = sched.next_request(sid)
                assert i is not None
                if sid == "sender" and len(sender) < 4:
                    sender.append(i)  # the four chunks only the sender has come first
                elif sid != "sender":
                    mine = half if sid == "p" else other
                    assert mine[i >> 3] >> (i & 7) & 1
                assert sched.chunk_received(sid, i)[0] is Arrival.ACCEPTED
                sched.chunk_stored(i)
                sched.add_have("p", [i])
                sched.add_have("q", [i])
        assert sorted(sender) == [0, 2, 4, 6]
        assert sched.can_help("p") and not sched.stuck()
        sched.remove_source("p")
        sched.remove_source("q")
        assert sched.availability(1) == 0
    took = time.thread_time() - start
    assert sched.remaining == MAX_CHUNKS - 600
    assert mem[1] < 32 * MiB, f"peak {mem[1] / MiB:.1f} MiB"
    assert took < 2.0, f"{took:.2f} s"


async def test_held_since_after_a_resume_lists_found_chunks_first(tmp_path: Path) -> None:
    """The HAVE log of a resumed partial: chunks found at open (in index order) before the
    ones written since, whatever the cursor; a snapshot's cursor sees only what follows."""
    chunk = 1024
    (tmp_path / "a.bin").write_bytes(random.Random(4).randbytes(10 * chunk))
    src = await ContentStore(tmp_path / "sender").add_local_file(tmp_path / "a.bin",
                                                                 chunk_size=chunk)
    sealed = [src.read_sealed(i) for i in range(10)]

    def receive(store: ContentStore) -> PartialContent:
        return store.open_partial(src.content_id, src.size, chunk, src.key, src.capability,
                                  tmp_path / "in", "a.bin", scheme=src.scheme)

    part = receive(ContentStore(tmp_path / "recv"))
    part.set_leaves(src.leaves)
    for i in (7, 2, 5):
        part.write_chunk(i, sealed[i])
    assert part.held_since(0) == ([7, 2, 5], 3)
    part.close()
    part = receive(ContentStore(tmp_path / "recv"))
    assert part.held_snapshot() == (bytes([0b1010_0100, 0]), 3)
    part.write_chunk(9, sealed[9])
    part.write_chunk(0, sealed[0])
    assert part.held_since(3) == ([9, 0], 5)
    assert part.held_since(0) == ([2, 5, 7, 9, 0], 5)
    assert part.held_since(2) == ([7, 9, 0], 5)
    assert part.held_since(5) == ([], 5)
    assert part.missing() == [1, 3, 4, 6, 8] and part.missing_count == 5
    part.close()
