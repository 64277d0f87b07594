"""A download on a slow path (the relay, WebRTC) moves to direct TCP when it can.

Real sockets on 127.0.0.1: a real TransferServer as the holder, a real rendezvous server's
relay as the slow path (or a TCP stream that says it is the relay), and the Downloader
trying the fast rungs again (`Source.upgrade`) while it fetches.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from crypto.location import LocationMessage
from overlay.app.fetch import source_views
from overlay.app.fetchmeter import FetchMeter
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent
from overlay.mail.downloads import Activity
from overlay.mail.inbox import InboxEntry
from overlay.transfer.downloader import (
    ChunkStored,
    Downloader,
    FetchEvent,
    SourceBanned,
    SourceConnected,
    SourceFailed,
    SourceStats,
)
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import ConnectionLadder, Holder, Source
from overlay.transports.relay import relay_accept, relay_dial
from overlay.transports.stream import Stream, StreamBroken
from overlay.transports.tcp import TcpStream, connect_tcp
from rendezvous.client import RendezvousClient, is_relay_invite
from rendezvous.limits import Limits
from rendezvous.messages import RelayInvite
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore

CHUNK = 64 << 10
DOMAIN = "example.net"
HOLDER = DeviceIdentity.from_seed(b"\x0b" * 32)  # bob@example.net, who holds the file
ME = DeviceIdentity.from_seed(b"\x0a" * 32)  # alice@example.net, who downloads it


async def held(tmp_path: Path, size: int) -> tuple[ContentStore, LocalContent, bytes]:
    data = random.Random(11).randbytes(size)
    (tmp_path / "clip.ts").write_bytes(data)
    store = ContentStore(tmp_path / "holder")
    content = await store.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK,
                                         key=b"k" * 32, capability=b"c" * 32)
    return store, content, data


def partial_for(tmp_path: Path, content: LocalContent) -> PartialContent:
    return ContentStore(tmp_path / "recv").open_partial(
        content.content_id, content.size, content.chunk_size, content.key,
        content.capability, tmp_path / "inbox", "clip.ts", scheme=content.scheme)


def free_port() -> int:
    """A port nothing listens on yet (the holder's node, starting again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def relayed(stream: TcpStream) -> TcpStream:
    """The TCP stream, saying it is the relay: the path is all the Downloader goes by."""
    stream.path = "relay"
    return stream


def stored_once(events: list[FetchEvent], count: int) -> None:
    """Every chunk stored, none twice; no source failed or was banned."""
    stored = Counter(e.index for e in events if isinstance(e, ChunkStored))
    assert sorted(stored) == list(range(count)) and set(stored.values()) == {1}, stored
    assert not [e for e in events if isinstance(e, SourceFailed | SourceBanned)], events


@asynccontextmanager
async def relaying_server(tmp_path: Path, holder: TransferServer, rate: float
                          ) -> AsyncIterator[RendezvousServer]:
    """A rendezvous server relaying at `rate` bytes/s, alice registered, bob online with
    his control session taking each relay invitation and serving it with `holder`."""
    server = RendezvousServer(DOMAIN, SqliteStore(tmp_path / "rv.sqlite3"),
                              open_registration=True,
                              limits=Limits(relay_rate=rate, relay_daily=0))
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with RendezvousClient(host, port, ME, "alice@example.net", register=True), \
                RendezvousClient(host, port, HOLDER, "bob@example.net",
                                 register=True) as bob, asyncio.TaskGroup() as tg:
            async def accept_relays() -> None:
                async for push in bob.pushes():
                    if is_relay_invite(push) and isinstance(push, RelayInvite):
                        stream = await relay_accept(host, port, HOLDER, "bob@example.net",
                                                    push)
                        tg.create_task(holder.handle_stream(stream))

            accepting = tg.create_task(accept_relays())
            try:
                yield server
            finally:
                accepting.cancel()
    finally:
        await server.aclose()


async def test_a_download_on_the_relay_moves_to_tcp_once_the_holder_listens(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The holder's port refuses at first (its node starting again), so the ladder reaches
    it through the server's relay; once it listens, the download moves to direct TCP
    within the upgrade schedule, and the relay carries only the bytes before the move."""
    caplog.set_level(logging.INFO, logger="overlay.transfer.downloader")
    store, content, data = await held(tmp_path, 10 << 20)
    holder = TransferServer(HOLDER, store)
    port = free_port()
    # 1 MB/s: the relay alone would take 10 s for this file.
    async with relaying_server(tmp_path, holder, 1 << 20) as server:
        assert server.address is not None
        host, rv_port = server.address

        async def relay(h: Holder) -> Stream:
            return await relay_dial(host, rv_port, ME, "alice@example.net", "bob@example.net",
                                    h.peer_id, timeout=10)

        ladder = ConnectionLadder(relay=relay)
        source = ladder.source(Holder(HOLDER.peer_id, "bob@example.net",
                                      (f"127.0.0.1:{port}",)))
        events: list[FetchEvent] = []
        first = asyncio.Event()

        def on_event(ev: FetchEvent) -> None:
            events.append(ev)
            if isinstance(ev, ChunkStored):
                first.set()

        partial = partial_for(tmp_path, content)
        d = Downloader(partial, [source], ME, upgrade_after=0.5, upgrade_max=1.0,
                       on_event=on_event)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
                download = tg.create_task(d.run())
                await first.wait()  # bytes are coming over the relay
                [stats] = d.stats
                assert stats.path == "relay"
                await holder.start("127.0.0.1", port)  # the node listens now
                listening = loop.time()
                path = await download
                took = loop.time() - listening
            relayed = server.relay.snapshot()["relayed_bytes"]
        finally:
            await holder.aclose()
    assert path.read_bytes() == data
    stored_once(events, -(-content.size // CHUNK))
    [stats] = d.stats
    assert stats.outcome == "done" and stats.path == "tcp", stats
    assert list(stats.by_path) == ["relay", "tcp"], stats.by_path
    assert sum(stats.by_path.values()) == stats.bytes >= len(data)
    # Moved at the next attempt (at most 1 s away): the rest at loopback speed, not the
    # 10 s the relay alone needed.
    assert took < 8, took
    assert stats.by_path["relay"] < len(data) // 2, stats.by_path
    # The relay carried the chunks before the move (with their frames, the handshake and
    # the chunks the move dropped: at most a window's worth) and nothing after it.
    assert stats.by_path["relay"] <= relayed < stats.by_path["relay"] + 12 * CHUNK, (
        relayed, stats.by_path)
    assert d.counters["moves"] == 1
    assert ladder.counters == {"relay": 1, "upgrade-tcp": 1}
    # The holder counts both sessions as one requester: the new one is shown every chunk,
    # not a few at a time as to a second requester (superseed.py).
    assert [e.has_all for e in events if isinstance(e, SourceConnected)] == [True, True]
    [moved] = [r.getMessage() for r in caplog.records if " moved from " in r.getMessage()]
    assert f"{source.label} moved from relay to tcp after " in moved, moved
    # What inbox --json's sources show: the bytes each path carried, the rate on tcp.
    act = Activity()
    act.show(source_views(d.stats))
    assert {k: v.bytes for k, v in act.sources.items()} == {
        (source.label, "relay"): stats.by_path["relay"],
        (source.label, "tcp"): stats.by_path["tcp"]}


Address = tuple[str, int]


async def download_on_relay(tmp_path: Path, size: int, rate: int,
                            upgrade: Callable[[Address], Awaitable[Stream]],
                            **kw: Any) -> Downloader:
    """Download `size` bytes from a holder capped at `rate` bytes/s (over any path), first
    over a TCP stream that says it is the relay, its fast rungs `upgrade(its address)`;
    checks the bytes, every chunk stored once and no source failed or banned."""
    store, content, data = await held(tmp_path, size)
    holder = TransferServer(HOLDER, store, max_upload_rate=rate)
    address = await holder.start("127.0.0.1", 0)

    async def connect() -> Stream:
        return relayed(await connect_tcp(*address, timeout=5))

    events: list[FetchEvent] = []
    source = Source("bob", connect, HOLDER.peer_id, upgrade=lambda: upgrade(address))
    d = Downloader(partial_for(tmp_path, content), [source], ME, on_event=events.append,
                   **kw)
    try:
        async with asyncio.timeout(60):
            path = await d.run()
    finally:
        await holder.aclose()
    assert path.read_bytes() == data
    stored_once(events, -(-content.size // CHUNK))
    return d


@pytest.mark.parametrize("window, rate", [(2, 512 << 10), (8, 1 << 20), (16, 2 << 20)])
async def test_chunks_outstanding_when_a_source_moves_are_fetched_exactly_once(
        tmp_path: Path, window: int, rate: int) -> None:
    """The holder is capped (1-4 s for the file), so GETs are outstanding on the slow
    session when the upgrade connects: they go back to the pool and come over tcp; every
    chunk is stored once and the download neither stops nor fails."""
    dials: list[Address] = []

    async def upgrade(address: Address) -> Stream:
        dials.append(address)
        return await connect_tcp(*address, timeout=5)

    d = await download_on_relay(tmp_path, 2 << 20, rate, upgrade, window=window,
                                min_window=window, upgrade_after=0.4, upgrade_left=0.0)
    assert len(dials) == 1 and d.counters["moves"] == 1
    assert d.counters["moved_back_to_pool"] >= 1, d.counters
    [stats] = d.stats
    assert stats.outcome == "done" and stats.path == "tcp"
    assert list(stats.by_path) == ["relay", "tcp"]
    assert sum(stats.by_path.values()) == stats.bytes


async def test_a_holder_reached_only_by_the_relay_is_tried_again_less_and_less_often(
        tmp_path: Path) -> None:
    """Every upgrade fails: the attempts come after 0.2, 0.4, 0.8, 0.8 ... s (doubling to the
    cap), and the download completes on the relay as before."""
    loop = asyncio.get_running_loop()
    tries: list[float] = []

    async def upgrade(address: Address) -> Stream:
        tries.append(loop.time())
        raise StreamBroken("cannot connect to 127.0.0.1:1: Connection refused")

    started = loop.time()
    d = await download_on_relay(tmp_path, 3 << 20, 1 << 20, upgrade,  # about 3 s
                                upgrade_after=0.2, upgrade_max=0.8, upgrade_left=0.0)
    ended = loop.time()
    [stats] = d.stats
    assert stats.outcome == "done" and stats.path == "relay"
    assert list(stats.by_path) == ["relay"] and d.counters["moves"] == 0
    assert len(tries) == d.counters["upgrade_attempts"] >= 3
    gaps = [b - a for a, b in zip([started, *tries], tries, strict=False)]
    for gap, least in zip(gaps, [0.2, 0.4, 0.8], strict=False):
        assert gap >= least - 0.01, gaps
    assert all(g >= 0.79 for g in gaps[3:]), gaps
    # Bounded by the schedule: 0.2 + 0.4 + 0.8 * n seconds for n + 2 attempts.
    assert len(tries) <= 2 + (ended - started) / 0.8 + 1, (len(tries), ended - started)


async def test_no_upgrade_for_a_download_about_to_finish(tmp_path: Path) -> None:
    """A download a few seconds from its end at its current rate is not moved: the move
    costs round trips and a new window for little gain."""
    tries: list[Address] = []

    async def upgrade(address: Address) -> Stream:
        tries.append(address)
        return await connect_tcp(*address, timeout=5)

    d = await download_on_relay(tmp_path, 2 << 20, 1 << 20, upgrade,  # about 2 s
                                upgrade_after=1.0, upgrade_left=1000.0)
    assert tries == [] and d.stats[0].path == "relay"


async def test_an_upgrade_that_reaches_another_peer_is_not_taken(tmp_path: Path) -> None:
    """The fast path's handshake must prove the same holder: one that answers at the
    advertised address with another key is closed, and the download stays where it is."""
    (tmp_path / "impostor").mkdir()
    store, _, _ = await held(tmp_path / "impostor", 64 << 10)
    impostor = TransferServer(DeviceIdentity.from_seed(b"\x0c" * 32), store)
    elsewhere = await impostor.start("127.0.0.1", 0)
    tries: list[Address] = []

    async def upgrade(address: Address) -> Stream:
        tries.append(address)
        return await connect_tcp(*elsewhere, timeout=5)

    try:
        d = await download_on_relay(tmp_path, 2 << 20, 1 << 20, upgrade,
                                    upgrade_after=0.2, upgrade_max=0.4, upgrade_left=0.0)
    finally:
        await impostor.aclose()
    assert tries and d.counters["moves"] == 0
    [stats] = d.stats
    assert list(stats.by_path) == ["relay"] and stats.outcome == "done"


async def test_a_moved_source_shows_the_bytes_of_each_path_and_counts_once_in_the_metrics(
        ) -> None:
    """inbox --json and the web inbox show a row per path (relay, then tcp), the rate on
    tcp only; `--metrics` counts each byte once by path and the source once, on tcp."""
    mb = 1_000_000
    moved = SourceStats("alice", path="tcp", bytes=8 * mb, outcome="active",
                        recent_rate=5e7, by_path={"relay": 3 * mb, "tcp": 5 * mb})
    seen: dict[str, Any] = {}

    async def fetch(entry: InboxEntry, msg: LocationMessage, act: Activity,
                    progress: Callable[[int], None]) -> str:
        act.show(source_views([moved]))
        seen["sources"] = dict(act.sources)
        seen["count"] = meter.sources_by_path()
        return "/tmp/clip.ts"

    meter = FetchMeter(fetch)
    act = Activity()
    await meter(None, None, act, lambda n: None)  # type: ignore[arg-type]
    assert [v.as_dict() for v in seen["sources"].values()] == [
        {"peer": "alice", "path": "relay", "bytes": 3 * mb, "rate": 0.0, "banned": False},
        {"peer": "alice", "path": "tcp", "bytes": 5 * mb, "rate": 5e7, "banned": False}]
    assert seen["count"] == {"tcp": 1, "tcp-punch": 0, "quic": 0, "webrtc": 0, "relay": 0}
    assert meter.bytes_by_path() == {"tcp": 5 * mb, "tcp-punch": 0, "quic": 0, "webrtc": 0,
                                     "relay": 3 * mb}
