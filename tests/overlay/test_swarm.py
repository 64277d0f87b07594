"""Tier (c): one receiver, several holders, real TCP on 127.0.0.1 in one process.

Aggregation of rate-limited holders, a holder killed mid-transfer, partial holders with
HAVE updates, the endgame, and a source added while the download runs. The timing targets
(>= 90% of 4R, swarm within 1.3x of ideal) are measured in
`python -m benchmarks swarm`; here the bounds leave room for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent
from overlay.transfer.downloader import (
    ChunkStored,
    Downloader,
    FetchEvent,
    NoSourceReachable,
    SourceFailed,
)
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import connect_tcp

ME = DeviceIdentity.from_seed(b"R" * 32)
MiB = 1 << 20


@dataclass
class Holder:
    label: str
    server: TransferServer
    address: tuple[str, int]

    def source(self) -> Source:
        host, port = self.address

        async def connect() -> Stream:
            return await connect_tcp(host, port, timeout=5)

        return Source(self.label, connect, self.server.identity.peer_id)

    def served(self, content: LocalContent) -> int:
        return self.server.chunks_served(content.content_id)


@dataclass
class Swarm:
    tmp: Path
    content: LocalContent
    data: bytes
    store: ContentStore
    servers: list[TransferServer] = field(default_factory=list)
    stores: list[ContentStore] = field(default_factory=list)

    async def holder(self, label: str, *, store: ContentStore | None = None,
                     rate: int | None = None) -> Holder:
        """A TransferServer over the full store (or `store`), upload-limited to `rate`."""
        n = len(self.servers) + 1
        server = TransferServer(DeviceIdentity.from_seed(bytes([n]) * 32),
                                store or self.store, max_upload_rate=rate)
        self.servers.append(server)
        return Holder(label, server, await server.start("127.0.0.1", 0))

    def partial(self, name: str, held: Callable[[int], bool] = lambda i: False,
                ) -> PartialContent:
        """A co-recipient's partial copy holding the chunks `held` picks (hash list known)."""
        store = ContentStore(self.tmp / name)
        self.stores.append(store)
        c = self.content
        part = store.open_partial(c.content_id, c.size, c.chunk_size, c.key, c.capability,
                                  self.tmp / f"{name}-in", "clip.ts",
                                  scheme=c.scheme)
        if part.leaves is None:
            part.set_leaves(c.leaves)
        for i in range(part.count):
            if held(i):
                part.write_chunk(i, c.read_sealed(i))
        return part

    async def partial_holder(self, name: str, held: Callable[[int], bool]
                             ) -> tuple[Holder, PartialContent]:
        part = self.partial(name, held)
        return await self.holder(name, store=self.stores[-1]), part


# The `swarm` fixture: `await swarm(size, chunk_size)` is a holder store of `size` bytes.
MakeSwarm = Callable[[int, int], Awaitable[Swarm]]


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[MakeSwarm]:
    made: list[Swarm] = []

    async def make(size: int, chunk_size: int) -> Swarm:
        data = random.Random(size).randbytes(size)
        (tmp_path / "clip.ts").write_bytes(data)
        store = ContentStore(tmp_path / "holders")
        content = await store.add_local_file(tmp_path / "clip.ts", chunk_size=chunk_size,
                                             key=b"k" * 32, capability=b"c" * 32)
        made.append(Swarm(tmp_path, content, data, store))
        return made[-1]

    yield make
    for sw in made:
        for s in sw.servers:
            await s.aclose()
        for st in [*sw.stores, sw.store]:
            st.close()


def stored_times(events: list[tuple[float, FetchEvent]]) -> list[float]:
    return [t for t, e in events if isinstance(e, ChunkStored)]


async def test_four_rate_limited_holders_add_up(swarm: MakeSwarm,
                                                tmp_path: Path) -> None:
    """Four holders limited to R each; the receiver gets close to 4R."""
    rate, size, chunk = 4 * MiB, 48 * MiB, 256 << 10
    sw: Swarm = await swarm(size, chunk)
    holders = [await sw.holder(f"h{i}", rate=rate) for i in range(4)]
    loop = asyncio.get_running_loop()
    events: list[tuple[float, FetchEvent]] = []
    d = Downloader(sw.partial("recv"), [h.source() for h in holders], ME, window=32,
                   on_event=lambda e: events.append((loop.time(), e)))
    path = await d.run()
    assert path.read_bytes() == sw.data
    # The steady part: from 10% to 90% of the chunks stored (the start is the limiter's
    # burst and slow start, the end the endgame).
    times = stored_times(events)
    lo, hi = len(times) // 10, len(times) * 9 // 10
    achieved = (hi - lo) * chunk / (times[hi] - times[lo])
    fraction = achieved / (4 * rate)
    # The target is 0.90. Measured here: 0.98 of 4R, also with a CPU hog on one of the
    # two cores; the benchmark asks 0.90 of the whole download.
    assert fraction >= 0.85, f"{achieved / MiB:.1f} MiB/s is {fraction:.0%} of 4R"
    per = [s.chunks for s in d.stats]
    assert sum(per) == len(times) and min(per) >= len(times) // 8, per
    assert all(s.outcome == "done" for s in d.stats)


async def test_a_holder_killed_mid_transfer_does_not_stop_it(
    swarm: MakeSwarm
) -> None:
    sw: Swarm = await swarm(12 * MiB, 128 << 10)
    holders = [await sw.holder(f"h{i}", rate=4 * MiB) for i in range(3)]
    victim = holders[1]
    third = asyncio.Event()
    events: list[FetchEvent] = []

    def on_event(e: FetchEvent) -> None:
        events.append(e)
        if sum(isinstance(x, ChunkStored) for x in events) == 96 // 3:
            third.set()

    d = Downloader(sw.partial("recv"), [h.source() for h in holders], ME, window=16,
                   on_event=on_event)

    async def kill() -> None:
        await third.wait()
        await victim.server.aclose()  # every session of it ends at once, mid-chunk or not

    async with asyncio.TaskGroup() as tg:
        tg.create_task(kill())
        path = await d.run()
    assert path.read_bytes() == sw.data
    [failed] = [e for e in events if isinstance(e, SourceFailed)]
    assert failed.source == "h1"
    stats = {s.label: s for s in d.stats}
    assert stats["h1"].outcome == "failed" and 0 < stats["h1"].chunks < 96 // 2
    # Every chunk stored exactly once; the victim's unfinished requests went elsewhere.
    stored = [e.index for e in events if isinstance(e, ChunkStored)]
    assert sorted(stored) == list(range(96))
    assert stats["h0"].chunks + stats["h2"].chunks == 96 - stats["h1"].chunks


async def test_two_partial_holders_that_together_have_everything(
    swarm: MakeSwarm
) -> None:
    sw: Swarm = await swarm(40 * (64 << 10) + 5, 64 << 10)
    # Overlapping halves: 0..24 and 16..40; 16..24 at both.
    a, _ = await sw.partial_holder("a", lambda i: i <= 24)
    b, _ = await sw.partial_holder("b", lambda i: i >= 16)
    events: list[FetchEvent] = []
    d = Downloader(sw.partial("recv"), [a.source(), b.source()], ME, window=8,
                   rng=random.Random(4), on_event=events.append)
    path = await d.run()
    assert path.read_bytes() == sw.data
    got = {e.index: e.source for e in events if isinstance(e, ChunkStored)}
    assert all(got[i] == "a" for i in range(16)) and all(got[i] == "b" for i in range(25, 41))
    assert a.server.counters["not_held"] == b.server.counters["not_held"] == 0


async def test_have_lets_it_fetch_a_chunk_a_holder_gets_mid_download(
    swarm: MakeSwarm
) -> None:
    """Nobody has chunk 7 at first. When the receiver holds everything else, holder b
    verifies chunk 7 (from elsewhere); its HAVE reaches the receiver, which fetches it."""
    sw: Swarm = await swarm(30 * (64 << 10), 64 << 10)
    a, _ = await sw.partial_holder("a", lambda i: i % 2 == 0 and i != 7)
    b, b_part = await sw.partial_holder("b", lambda i: i % 2 == 1 and i != 7)
    rest = asyncio.Event()
    events: list[FetchEvent] = []

    def on_event(e: FetchEvent) -> None:
        events.append(e)
        if sum(isinstance(x, ChunkStored) for x in events) == 29:
            rest.set()

    d = Downloader(sw.partial("recv"), [a.source(), b.source()], ME, window=8,
                   on_event=on_event)

    async def b_gets_chunk_7() -> None:
        await rest.wait()
        await asyncio.to_thread(b_part.write_chunk, 7, sw.content.read_sealed(7))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(b_gets_chunk_7())
        path = await d.run()
    assert path.read_bytes() == sw.data
    assert ChunkStored(7, "b") in events
    assert d.counters["haves_received"] >= 1 and b.server.counters["haves_sent"] >= 1
    assert a.server.counters["not_held"] == b.server.counters["not_held"] == 0


async def test_missing_chunk_nobody_has_gives_up_after_have_wait(
    swarm: MakeSwarm
) -> None:
    sw: Swarm = await swarm(10 * (64 << 10), 64 << 10)
    a, _ = await sw.partial_holder("a", lambda i: i != 3)
    d = Downloader(sw.partial("recv"), [a.source()], ME, have_wait=0.3)
    with pytest.raises(NoSourceReachable, match="1 missing chunks") as info:
        await d.run()
    assert info.value.failures == {"a": "holds none of the missing chunks"}
    assert d.partial.held == 9


async def test_endgame_duplicates_only_at_the_end_cancelled_on_arrival(
    swarm: MakeSwarm
) -> None:
    """A fast holder and a slow one: when nothing is left to hand out, the fast one is
    asked for what the slow one still owes; the slow one gets CANCELs and sends less."""
    chunk = 16 << 10
    sw: Swarm = await swarm(160 * chunk, chunk)
    fast = await sw.holder("fast", rate=2 * MiB)
    slow = await sw.holder("slow", rate=192 << 10)
    d = Downloader(sw.partial("recv"), [fast.source(), slow.source()], ME, window=16)
    path = await d.run()
    assert path.read_bytes() == sw.data
    c = d.counters
    assert c["duplicate_requests"] >= 1 and c["cancels_sent"] >= 1
    # Duplicates started only once every missing chunk was requested: at most what the
    # windows and the write queue hold was left then.
    assert 0 < c["endgame_at_remaining"] <= d.in_flight_bound
    assert c["duplicate_requests"] <= d.in_flight_bound
    # Each duplicate that lost was cancelled: the slow holder dropped it before sending,
    # or it came late and was dropped here (or was still on its way at the end).
    assert slow.server.counters["cancelled"] >= 1
    assert slow.server.counters["cancelled"] + c["late_chunks"] <= c["cancels_sent"]
    served = fast.served(sw.content) + slow.served(sw.content)
    assert 160 <= served <= 160 + c["duplicate_requests"]


async def test_a_source_added_while_running(swarm: MakeSwarm) -> None:
    sw: Swarm = await swarm(64 * (32 << 10), 32 << 10)
    slow = await sw.holder("slow", rate=256 << 10)
    late = await sw.holder("late")
    some = asyncio.Event()
    events: list[FetchEvent] = []

    def on_event(e: FetchEvent) -> None:
        events.append(e)
        if isinstance(e, ChunkStored):
            some.set()

    d = Downloader(sw.partial("recv"), [slow.source()], ME, on_event=on_event)

    async def found_later() -> None:
        await some.wait()
        assert d.add_source(late.source())
        assert not d.add_source(late.source()), "already in use"
        assert not d.add_source(slow.source())
        assert d.source_labels == ["slow", "late"] and d.is_using("late")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(found_later())
        path = await d.run()
    assert path.read_bytes() == sw.data
    stats = {s.label: s for s in d.stats}
    assert stats["late"].chunks > stats["slow"].chunks > 0
    assert not d.add_source(late.source()), "the download is over"


async def test_receivers_trade_chunks_while_downloading(swarm: MakeSwarm) -> None:
    """One rate-limited sender, three receivers that serve their partial copies to each
    other (HAVE updates) and learn of each other at their first verified chunk, as DHT
    providers: everyone ends with the bytes, and the sender uploads under 1.3 copies (it
    super-seeds: 1.1-1.2 here; 1.4-1.5 before, when each receiver asked it for the chunks
    no other receiver held yet, the same ones)."""
    chunk = 64 << 10
    sw: Swarm = await swarm(48 * chunk, chunk)
    sender = await sw.holder("sender", rate=2 * MiB)
    downloaders: list[Downloader] = []
    peers: list[Source] = []
    for r in range(3):
        part = sw.partial(f"r{r}")
        peers.append((await sw.holder(f"r{r}", store=sw.stores[-1])).source())
        told: list[bool] = []

        def on_event(e: FetchEvent, me: int = r, told: list[bool] = told) -> None:
            if isinstance(e, ChunkStored) and not told:
                told.append(True)
                for other, d in enumerate(downloaders):
                    if other != me:
                        d.add_source(peers[me])

        # Three devices: two sessions of one device are one requester to the sender.
        downloaders.append(Downloader(part, [sender.source()],
                                      DeviceIdentity.from_seed(bytes([r + 101]) * 32),
                                      window=8, rng=random.Random(r), on_event=on_event))
    async with asyncio.TaskGroup() as tg:
        runs = [tg.create_task(d.run()) for d in downloaders]
    for run in runs:
        assert run.result().read_bytes() == sw.data
    assert sender.served(sw.content) < 1.3 * 48, sender.served(sw.content)
    for d in downloaders:
        from_peers = sum(s.chunks for s in d.stats if s.label != "sender")
        assert from_peers > 0 and d.counters["haves_received"] > 0
