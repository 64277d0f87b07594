"""Tier (c): a TransferServer on 127.0.0.1 serving downloaders, honest and lying sources."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.first_chunk import DelayLink, TimedSource
from crypto.capability import prove_capability
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import Catalog, ServedContent
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent
from overlay.transfer.core import Event, HandshakeComplete, Role, TransferConnection
from overlay.transfer.downloader import (
    ChunkStored,
    Downloader,
    FetchError,
    FetchEvent,
    NoSourceReachable,
    SourceBanned,
    SourceFailed,
    fetch,
)
from overlay.transfer.errors import RemoteError
from overlay.transfer.frames import Chunk, Error, ErrorCode, Get, Gets, HashesRequest, Open
from overlay.transfer.holder import ServingSession
from overlay.transfer.requester import open_transfer_session
from overlay.transfer.server import TransferServer, _ServedSession
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import TcpStream, connect_tcp, serve_tcp

CHUNK = 16 << 10
ME = DeviceIdentity.from_seed(b"r" * 32)


@dataclass
class Holder:
    server: TransferServer
    address: tuple[str, int]
    content: LocalContent
    data: bytes

    def source(self, label: str, *, before: Callable[[], Awaitable[None]] | None = None,
               peer_id: bytes | None = None) -> Source:
        host, port = self.address

        async def connect() -> Stream:
            if before is not None:
                await before()
            return await connect_tcp(host, port, timeout=5)

        return Source(label, connect, peer_id or self.server.identity.peer_id)


class LyingCatalog:
    """Serves like the real store, but flips one bit of the first chunk it serves (which
    one that is, rarest-first's random order decides) or of a leaf. With `forge`, the bit
    is flipped in the plaintext, sealed again under the content key: a co-recipient's lie
    that the AEAD accepts and only the keyed leaf catches."""

    def __init__(self, store: ContentStore, *, bad_chunk: bool = False,
                 bad_leaf: int | None = None, forge: bool = False) -> None:
        self.store = store
        self.bad_chunk = bad_chunk
        self.bad_leaf = bad_leaf
        self.forge = forge
        self.flipped: list[int] = []

    def lookup(self, content_id: bytes) -> ServedContent | None:
        real = self.store.local(content_id)
        if real is None:
            return None
        if self.bad_leaf is not None:
            leaves = list(real.leaves)
            leaves[self.bad_leaf] = bytes(32)
            real = replace(real, leaves=tuple(leaves))
        return _Flipping(real, self.flipped, self.forge) if self.bad_chunk else real


@dataclass(frozen=True)
class _Flipping:
    real: LocalContent
    flipped: list[int]
    forge: bool = False

    content_id = property(lambda self: self.real.content_id)
    size = property(lambda self: self.real.size)
    chunk_size = property(lambda self: self.real.chunk_size)
    capability = property(lambda self: self.real.capability)
    leaves = property(lambda self: self.real.leaves)

    def have_bitmap(self) -> bytes | None:
        return None

    def has(self, index: int) -> bool:
        return self.real.has(index)

    def read_sealed(self, index: int) -> bytes:
        data = bytearray(self.real.read_sealed(index))
        if not self.flipped or self.flipped[0] == index:
            self.flipped[:] = [index]
            if not self.forge:
                data[len(data) // 2] ^= 0x10
                return bytes(data)
            plain = bytearray(self.real.cipher.open(index, data))
            plain[len(plain) // 2] ^= 0x10
            self.real.cipher.seal_into(index, plain, data)
            assert self.real.cipher.open(index, data) == plain  # the AEAD is fine
        return bytes(data)


World = Callable[..., Awaitable[Holder]]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    data = random.Random(7).randbytes(40 * CHUNK + 123)
    (tmp_path / "clip.ts").write_bytes(data)
    servers: list[TransferServer] = []
    seeds = iter(range(1, 100))

    async def holder(catalog: Callable[[ContentStore], Catalog] | None = None,
                     **kw: Any) -> Holder:
        n = next(seeds)
        store = ContentStore(tmp_path / f"holder{n}")
        content = await store.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK,
                                             key=b"k" * 32, capability=b"c" * 32)
        server = TransferServer(DeviceIdentity.from_seed(bytes([n]) * 32),
                                catalog(store) if catalog else store, **kw)
        servers.append(server)
        return Holder(server, await server.start("127.0.0.1", 0), content, data)

    yield holder
    for s in servers:
        await s.aclose()


def partial_for(tmp_path: Path, content: LocalContent, name: str = "recv") -> PartialContent:
    store = ContentStore(tmp_path / name)
    return store.open_partial(content.content_id, content.size, content.chunk_size,
                              content.key, content.capability, tmp_path / f"{name}-inbox",
                              "clip.ts", scheme=content.scheme)


def ban_gate() -> tuple[list[FetchEvent], Callable[[FetchEvent], None],
                        Callable[[], Awaitable[None]]]:
    """Events list, its recorder, and a gate that opens at the first SourceBanned.

    The honest source connects through the gate, so the liar surely served first and any
    refetch surely came from the honest one."""
    events: list[FetchEvent] = []
    banned = asyncio.Event()

    def on_event(e: FetchEvent) -> None:
        events.append(e)
        if isinstance(e, SourceBanned):
            banned.set()

    async def after_ban() -> None:
        async with asyncio.timeout(10):
            await banned.wait()

    return events, on_event, after_ban


async def test_serves_a_file_bytes_equal_after_rename(world: World, tmp_path: Path) -> None:
    h = await world()
    events: list[FetchEvent] = []
    d = Downloader(partial_for(tmp_path, h.content), [h.source("sender")], ME, window=4,
                   on_event=events.append)
    path = await d.run()
    assert path == tmp_path / "recv-inbox" / "clip.ts"
    assert path.read_bytes() == h.data
    assert sorted(e.index for e in events if isinstance(e, ChunkStored)) == list(range(41))
    [stats] = d.stats
    assert stats.outcome == "done" and stats.path == "tcp" and stats.chunks == 41
    assert h.server.chunks_served(h.content.content_id) == 41
    assert d.chunks_received == 41


async def test_a_source_added_as_the_last_chunk_is_stored_does_not_hold_the_end(
        world: World, tmp_path: Path) -> None:
    # A provider refresh re-adds the sender in the loop turn after its run ended with every
    # chunk in, queued before the supervisor's wake-up: the supervisor retires the new run
    # (nothing is missing) before its task ever ran. The download used to wait for it for
    # ever. The refresh is placed exactly there: just before the wake-up the ended run
    # sends.
    h = await world()
    loop = asyncio.get_running_loop()
    added: list[bool] = []

    class Refreshed(Downloader):
        def _wake_all(self) -> None:
            if not added and any(r.ended for r in self._runs.values()):
                added.append(False)
                loop.call_soon(lambda: added.__setitem__(0, self.add_source(
                    h.source("sender"))))
            super()._wake_all()

    d = Refreshed(partial_for(tmp_path, h.content), [h.source("sender")], ME, window=4)
    path = await asyncio.wait_for(d.run(), 30)
    assert path.read_bytes() == h.data
    assert added == [True]
    [stats] = d.stats
    assert stats.outcome == "done" and stats.reason == "not needed any more"


@pytest.mark.parametrize("forge", [False, True], ids=["flipped", "resealed-by-key-holder"])
async def test_a_lying_source_is_banned_and_its_chunk_refetched(
    world: World, tmp_path: Path, forge: bool
) -> None:
    catalog: list[LyingCatalog] = []

    def lying(store: ContentStore) -> LyingCatalog:
        catalog.append(LyingCatalog(store, bad_chunk=True, forge=forge))
        return catalog[0]

    liar = await world(lying)
    honest = await world(max_upload_rate=2 << 20)
    events, on_event, after_ban = ban_gate()
    d = Downloader(partial_for(tmp_path, liar.content),
                   [liar.source("liar"), honest.source("honest", before=after_ban)], ME,
                   window=4, on_event=on_event)
    path = await d.run()
    assert path.read_bytes() == liar.data
    [bad] = catalog[0].flipped
    [ban] = [e for e in events if isinstance(e, SourceBanned)]
    assert ban.source == "liar" and f"bad chunk {bad}" in ban.reason
    assert ChunkStored(bad, "honest") in events
    # Nothing more is asked of the liar after the ban: it served what was in flight then.
    # Good chunks of those that were already here still verify and are kept.
    served = liar.server.chunks_served(liar.content.content_id)
    assert served <= d.in_flight_bound < 41
    stored_from_liar = {e.index for e in events if isinstance(e, ChunkStored)
                        and e.source == "liar"}
    assert bad not in stored_from_liar and len(stored_from_liar) < served
    [liar_stats, honest_stats] = d.stats
    assert liar_stats.outcome == "banned" and honest_stats.outcome == "done"
    # The liar's server is fine and nothing it holds was touched.
    opened = liar.content.cipher.open
    assert opened(bad, liar.content.read_sealed(bad)) == opened(bad,
                                                                honest.content.read_sealed(bad))


async def test_a_hash_list_liar_is_banned(world: World, tmp_path: Path) -> None:
    liar = await world(lambda s: LyingCatalog(s, bad_leaf=5))
    honest = await world()
    events, on_event, after_ban = ban_gate()
    path = await fetch(partial_for(tmp_path, liar.content),
                       [liar.source("liar"), honest.source("honest", before=after_ban)], ME,
                       on_event=on_event)
    assert path.read_bytes() == liar.data
    assert SourceBanned("liar", "hash list does not match the content id") in events
    # The first window was asked of it with the OPEN and may have been sent, but none of
    # it was filed: nothing is written before the hash list is verified.
    assert liar.server.chunks_served(liar.content.content_id) <= 2
    assert not [e for e in events if isinstance(e, ChunkStored) and e.source == "liar"]


class GoneCopy:
    """A co-recipient whose received copy was deleted: it answers every OPEN with 410."""

    def __init__(self, store: ContentStore) -> None:
        self.store = store

    def lookup(self, content_id: bytes) -> ServedContent | None:
        real = self.store.local(content_id)
        if real is None:
            return None
        copy = replace(real, received=True)
        copy.changed.reason = "its copy was deleted"
        return copy


async def test_only_the_senders_410_fails_a_download_as_source_changed(
        world: World, tmp_path: Path) -> None:
    """The sender is banned (its hash list is wrong) and the one co-recipient's copy is
    gone (410). The download is tried again later, the co-recipient's words in its reason;
    before, it failed for good as "source changed: the sender's file was edited", which
    its recipient would have told the sender."""
    sender = await world(lambda s: LyingCatalog(s, bad_leaf=5))
    co = await world(GoneCopy)
    d = Downloader(partial_for(tmp_path, sender.content),
                   [sender.source("sender"), co.source("co")], ME, sender="sender")
    with pytest.raises(NoSourceReachable,
                       match="co: 410 this holder no longer has the file: its copy was"):
        await d.run()
    assert {s.label: s.outcome for s in d.stats} == {"sender": "banned", "co": "failed"}


async def test_a_refusal_comes_first_in_the_reason_a_download_is_retried(
        world: World, tmp_path: Path) -> None:
    """The sender can't be reached and the one co-recipient's copy is gone. The reason
    names the co-recipient's refusal before the sender's failure: the inbox keeps 500
    characters of it, and a real node's unreachable sender (every rung of the ladder)
    filled them, so `inbox --json` never showed the refusal."""
    dead = await world()
    await dead.server.aclose()
    co = await world(GoneCopy)
    d = Downloader(partial_for(tmp_path, co.content),
                   [dead.source("sender"), co.source("co")], ME, sender="sender")
    with pytest.raises(NoSourceReachable) as caught:
        await d.run()
    assert re.search(r"\(co: 410 this holder no longer has the file: .*; sender: .*cannot "
                     r"connect", str(caught.value)), str(caught.value)


async def test_bad_capability_is_refused_and_the_server_carries_on(
    world: World, tmp_path: Path
) -> None:
    h = await world()
    wrong = replace(h.content, capability=b"w" * 32)
    events: list[FetchEvent] = []
    with pytest.raises(NoSourceReachable, match="403 capability proof rejected"):
        await fetch(partial_for(tmp_path, wrong, "bad"), [h.source("sender")], ME,
                    on_event=events.append)
    assert events == [SourceFailed("sender", "403 capability proof rejected")]
    assert h.server.counters["bad_capability"] == 1
    path = await fetch(partial_for(tmp_path, h.content, "good"), [h.source("sender")], ME)
    assert path.read_bytes() == h.data
    assert h.content.path.read_bytes() == h.data


async def test_a_proof_replayed_from_another_session_is_rejected(world: World) -> None:
    h = await world()
    cid, host, port = h.content.content_id, *h.address
    first = await open_transfer_session(await connect_tcp(host, port), ME)
    proof = prove_capability(h.content.capability, cid, first.transcript)
    second = await open_transfer_session(await connect_tcp(host, port), ME)
    # Replay the proof made on the first session over the second one.
    second._conn.send(Open(cid, proof))
    await second._flush()
    reply = await second._control_reply()
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_CAPABILITY
    with pytest.raises(RemoteError, match="403"):
        await second.open(cid, b"w" * 32)
    info = await first.open(cid, h.content.capability)
    assert info.size == h.content.size
    assert h.server.counters["bad_capability"] == 2
    await first.aclose()
    await second.aclose()


async def test_wrong_peer_unreachable_and_garbage(world: World, tmp_path: Path) -> None:
    h = await world()
    dead = await world()
    await dead.server.aclose()
    with pytest.raises(NoSourceReachable) as info:
        await fetch(partial_for(tmp_path, h.content),
                    [h.source("impostor", peer_id=b"x" * 20), dead.source("dead")], ME)
    assert "expected 7878" in info.value.failures["impostor"]
    assert "cannot connect" in info.value.failures["dead"]
    assert info.value.missing == 41

    # Garbage straight onto the socket: dropped with a counter, the server carries on.
    reader, writer = await asyncio.open_connection(*h.address)
    writer.write(random.Random(3).randbytes(5000))
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    assert h.server.counters["protocol_failed"] == 1
    path = await fetch(partial_for(tmp_path, h.content, "again"), [h.source("sender")], ME)
    assert path.read_bytes() == h.data


async def test_a_holder_answering_no_content_is_recorded_so_and_no_other_failure_is(
    world: World, tmp_path: Path
) -> None:
    """`SourceStats.no_content` (what the fetch's none_serve reads): set for the holder
    without the content, not for one that refused the capability or could not be reached."""
    h = await world()
    other = await world()
    dead = await world()
    await dead.server.aclose()
    # The same file under another key: `other` holds h's content, not this one.
    wanted = await ContentStore(tmp_path / "elsewhere").add_local_file(
        h.content.path, chunk_size=CHUNK, key=b"x" * 32, capability=b"c" * 32)
    wrong = replace(h.content, capability=b"w" * 32)
    d = Downloader(partial_for(tmp_path, wanted),
                   [other.source("lacks"), dead.source("dead")], ME)
    with pytest.raises(NoSourceReachable, match="404 no such content here"):
        await d.run()
    by = {s.label: s for s in d.stats}
    assert by["lacks"].no_content and by["lacks"].reason.startswith("404 no such content here")
    assert not by["dead"].no_content and "cannot connect" in by["dead"].reason

    d = Downloader(partial_for(tmp_path, wrong, "refused"), [h.source("sender")], ME)
    with pytest.raises(NoSourceReachable, match="403"):
        await d.run()
    [stats] = d.stats
    assert stats.reason == "403 capability proof rejected" and not stats.no_content


async def test_a_holder_cut_off_mid_chunk_is_not_called_a_protocol_violation(
        world: World, tmp_path: Path) -> None:
    # A holder whose send timed out (a starved TCP flow) or who went away closes its
    # connection in the middle of a chunk frame: the failure the user reads says so, and
    # does not accuse the holder of breaking the protocol.
    h = await world()
    host, port = h.address
    cut_after = 10_000  # past the handshake and the hashes, inside the first chunk frame

    async def relay(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(host, port)

        async def upstream() -> None:
            while data := await client.read(65536):
                up_w.write(data)
                await up_w.drain()

        pump = asyncio.create_task(upstream())
        sent = 0
        while sent < cut_after and (data := await up_r.read(cut_after - sent)):
            to_client.write(data)
            await to_client.drain()
            sent += len(data)
        pump.cancel()
        up_w.close()
        to_client.close()

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    p_host, p_port = proxy.sockets[0].getsockname()[:2]

    async def connect() -> Stream:
        return await connect_tcp(p_host, p_port, timeout=5)

    try:
        with pytest.raises(NoSourceReachable) as info:
            await fetch(partial_for(tmp_path, h.content),
                        [Source("cut", connect, h.server.identity.peer_id)], ME)
    finally:
        proxy.close()
        await proxy.wait_closed()
    why = info.value.failures["cut"]
    assert "connection closed in the middle of a frame" in why
    assert "protocol violation" not in why


async def test_a_stalling_source_is_dropped_and_its_chunks_reassigned(
    world: World, tmp_path: Path
) -> None:
    slow = await world(max_upload_rate=1)  # one byte a second: stalls after its burst
    # The download takes about 5 s: time for the slow one to be judged stalled even when a
    # loaded machine measured its first burst slowly (at 1.3 s it once was not, and the
    # endgame finished the download first).
    fast = await world(max_upload_rate=128 << 10)
    # The stall floor is 1 s: the fast holder's capped chunks come every 0.125 s, and its
    # rate is measured from its faster burst (0.6-0.7 MB/s), so a floor of 0.2 s dropped it
    # too for a gap of 0.2 s beside two CPU hogs (1 of 10 runs: no source left).
    events: list[FetchEvent] = []
    d = Downloader(partial_for(tmp_path, slow.content), [slow.source("slow"),
                   fast.source("fast")], ME, window=4, min_stall=1.0, on_event=events.append)
    loop = asyncio.get_running_loop()
    started = loop.time()
    path = await d.run()
    assert path.read_bytes() == slow.data
    [failed] = [e for e in events if isinstance(e, SourceFailed)]
    # Judged by its own rate (fast in its first burst), not after the fixed 30 s.
    m = re.fullmatch(r"stalled: nothing for ([\d.]+) s \(its rate was [\d.]+ MB/s\)",
                     failed.reason)
    assert failed.source == "slow" and m is not None and float(m[1]) < 5, failed.reason
    assert loop.time() - started < 15
    slow_stats, fast_stats = d.stats
    assert slow_stats.outcome == "failed" and fast_stats.outcome == "done"
    assert slow_stats.chunks + fast_stats.chunks == 41


async def test_partial_holders_serve_what_they_have(world: World, tmp_path: Path) -> None:
    full = await world()
    # A co-recipient that holds the even chunks only.
    store = ContentStore(tmp_path / "co")
    c = full.content
    part = store.open_partial(c.content_id, c.size, c.chunk_size, c.key, c.capability,
                              tmp_path / "co-inbox", "clip.ts", scheme=c.scheme)
    part.set_leaves(c.leaves)
    for i in range(0, 41, 2):
        part.write_chunk(i, c.read_sealed(i))
    co = TransferServer(DeviceIdentity.from_seed(b"o" * 32), store)
    address = await co.start("127.0.0.1", 0)
    try:
        events: list[FetchEvent] = []
        co_holder = Holder(co, address, c, full.data)
        path = await fetch(partial_for(tmp_path, c), [co_holder.source("co"),
                           full.source("full")], ME, on_event=events.append)
        assert path.read_bytes() == full.data
        from_co = {e.index for e in events if isinstance(e, ChunkStored) and e.source == "co"}
        assert from_co <= set(range(0, 41, 2))
        assert co.counters["not_held"] == 0, "never asked for a chunk it said it lacks"
    finally:
        await co.aclose()


async def test_a_source_sending_unasked_chunks_is_banned(world: World, tmp_path: Path) -> None:
    honest = await world()
    content = honest.content
    hostile_id = DeviceIdentity.from_seed(b"H" * 32)

    async def hostile(stream: TcpStream) -> None:
        """Answers OPEN and HASHES properly, then answers every GET with another chunk."""
        conn = TransferConnection(Role.RESPONDER, hostile_id)
        logic: ServingSession | None = None
        while data := await stream.receive_some():
            conn.receive_data(data)
            while (e := conn.next_event()) is not None:
                if isinstance(e, HandshakeComplete):
                    logic = ServingSession(honest.server.catalog, e.transcript, Counter())
                elif isinstance(e, Get | Gets):
                    first = e.index if isinstance(e, Get) else e.indexes[0]
                    conn.send(Chunk(e.content_id, first + 1000, content.read_sealed(0)))
                elif isinstance(e, Open | HashesRequest) and logic is not None:
                    for reply in logic.handle(e, 0.0):
                        conn.send(reply)
            for buf in conn.data_to_send():
                await stream.send_all(buf)

    server = await serve_tcp(hostile, "127.0.0.1", 0)
    assert server.address is not None
    host, port = server.address
    events, on_event, after_ban = ban_gate()
    try:
        path = await fetch(partial_for(tmp_path, content),
                           [Source("hostile", lambda: connect_tcp(host, port), hostile_id.peer_id),
                            honest.source("honest", before=after_ban)], ME, on_event=on_event)
    finally:
        await server.aclose()
    assert path.read_bytes() == honest.data
    assert SourceBanned("hostile", "sends chunks nobody asked for") in events


async def test_a_disk_that_fails_ends_the_download_with_the_reason(
    world: World, tmp_path: Path
) -> None:
    h = await world()
    partial = partial_for(tmp_path, h.content)
    real = partial.write_chunk
    written: list[int] = []

    def write_chunk(index: int, sealed: bytes | bytearray | memoryview) -> bool:
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(index)
        return real(index, sealed)

    partial.write_chunk = write_chunk  # type: ignore[method-assign]
    d = Downloader(partial, [h.source("sender")], ME, window=4)
    with pytest.raises(FetchError, match=r"cannot write .*No space left on device"):
        await d.run()
    assert partial.held == 5 and all(partial.have(i) for i in written)


async def test_gets_go_out_in_batches_and_every_chunk_still_arrives(
    world: World, tmp_path: Path
) -> None:
    h = await world()
    d = Downloader(partial_for(tmp_path, h.content), [h.source("sender")], ME, window=8,
                   min_window=8, refill=4)
    path = await d.run()
    assert path.read_bytes() == h.data
    # 41 chunks, a window of 8, asked for four (or the last few) at a time.
    assert d.counters["gets"] == 41
    assert d.counters["get_frames"] <= 41 // 4 + 2


@pytest.mark.parametrize("leaves_known", [False, True])
async def test_the_first_chunk_is_stored_two_round_trips_after_connect(
    world: World, tmp_path: Path, leaves_known: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a link that holds every byte `delay` seconds each way, the first chunk is
    stored two round trips after the TCP connect: the handshake's, then OPEN, the HASHES
    requests and the first GETs in one flight, which the holder's first chunk answers.
    Counted in the client's flights as the link sees them (`DelayLink.turns`: a flight
    begins with the first bytes it sends after the holder's reached it), not by a clock:
    elapsed / 2 delay, rounded, came out 3 in 3 of 11 runs beside two CPU hogs, the work
    on both ends taking over 300 ms there. Each of OPEN, HASHES and the GETs waited for its
    reply before: the GETs came in the fourth flight, or the third once the hash list was
    known (a resumed download)."""
    delay = 0.3
    h = await world()
    partial = partial_for(tmp_path, h.content)
    if leaves_known:
        partial.set_leaves(list(h.content.leaves))
    link = DelayLink(delay)
    timed = TimedSource(*await link.start(*h.address), h.server.identity.peer_id)
    d = Downloader(partial, [timed.source], ME, window=8, min_window=8)
    flight_of: dict[type[Event], int] = {}  # each kind of message: the flight it first came in
    on_event = _ServedSession.on_event

    async def served(self: _ServedSession, event: Event) -> bool:
        flight_of.setdefault(type(event), link.turns)
        return await on_event(self, event)

    monkeypatch.setattr(_ServedSession, "on_event", served)
    try:
        path = await d.run()
    finally:
        await link.aclose()
    assert path.read_bytes() == h.data
    assert {kind: flight_of.get(kind) for kind in (Open, HashesRequest, Gets)} == {
        Open: 2, HashesRequest: None if leaves_known else 2, Gets: 2}
    assert d.counters["first_gets"] == 8  # the first window went with the OPEN
