"""A download starts from the sender without waiting for the DHT provider lookup; the
co-recipients the lookup names join it when it returns, and until then a sender that is
gone does not end it with "no source".

Tier (c): real TransferServers on 127.0.0.1 for the sender and a co-recipient, a real
ContentFetch, HolderFinder and ConnectionLadder, and a real DHT of two nodes in which the
co-recipient announced itself. The receiver's lookup answers only once the test sets an
Event: a DHT walk on a real network takes several round trips, and waits out every dead
node in the routing table. The FINGER answers are given (the server is not what is tested).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from crypto.identity import DeviceIdentity
from crypto.location import Description, Handle, Headers, LocationMessage
from overlay.app.fetch import ContentFetch
from overlay.app.holders import HolderFinder
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.dht.directory import ProviderDirectory
from overlay.dht.records import ProviderRecord
from overlay.mail.downloads import Activity, NoSourceNow, SourceView
from overlay.mail.inbox import InboxEntry
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import ConnectionLadder
from rendezvous.client import RendezvousClient
from rendezvous.records import DeviceInfo, FingerResult

CHUNK = 16 << 10
ALICE = DeviceIdentity.from_seed(b"a" * 32)  # the sender
BOB = DeviceIdentity.from_seed(b"b" * 32)  # the recipient downloading
CAROL = DeviceIdentity.from_seed(b"c" * 32)  # a co-recipient holding the file


class HeldLookup(ProviderDirectory):
    """Bob's directory on the real DHT, whose `find` answers only once `go` is set."""

    def __init__(self) -> None:
        super().__init__(BOB, wall=time.time, rng=random.Random(2))
        self.go = asyncio.Event()
        self.ended = asyncio.Event()

    async def find(self, content_id: bytes, *, exclude: set[bytes]) -> list[ProviderRecord]:
        try:
            await self.go.wait()
            return await super().find(content_id, exclude=exclude)
        finally:
            self.ended.set()


@dataclass
class Fingers:
    """The rendezvous server's FINGER answers: each address's one device, and where its
    transfer server listens."""

    where: dict[str, tuple[DeviceIdentity, str]] = field(default_factory=dict)

    async def finger(self, address: str) -> FingerResult:
        identity, at = self.where[address]
        return FingerResult(address, (DeviceInfo(identity.public.verify_key, True, None,
                                                 {"addrs": [at]}),))


class Watched(Activity):
    """The download's live view, with an Event set whenever the sources shown change."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = asyncio.Event()

    def show(self, views: Iterable[SourceView]) -> None:
        super().show(views)
        self.shown.set()


@dataclass
class World:
    tmp: Path
    content: LocalContent
    data: bytes
    alice: TransferServer
    carol: TransferServer
    lookup: HeldLookup
    fingers: Fingers
    fetches: list[asyncio.Task[str]] = field(default_factory=list)

    def message(self, content_id: bytes | None = None) -> LocationMessage:
        c = self.content
        return LocationMessage(
            headers=Headers(message_id=b"m" * 16, sender="alice@example.net",
                            sender_peer_id=ALICE.peer_id,
                            recipients=("bob@example.net", "carol@example.net"),
                            created=1_700_000_000),
            description=Description(title="clip", file_name="clip.ts"),
            handle=Handle(content_id=content_id or c.content_id, size=c.size,
                          chunk_size=c.chunk_size, content_key=c.key, capability=c.capability,
                          scheme=c.scheme))

    def fetcher(self) -> ContentFetch:
        finder = HolderFinder("bob@example.net", cast(RendezvousClient, self.fingers),
                              self.lookup, ConnectionLadder(), co_recipients=True,
                              refresh=60.0)
        return ContentFetch(BOB, ContentStore(self.tmp / "bob"), finder,
                            dest=self.tmp / "received", announce=lambda cid: None, window=4,
                            connect_timeout=5.0)

    def start(self, fetch: ContentFetch, act: Activity, progress: Callable[[int], None],
              content_id: bytes | None = None) -> asyncio.Task[str]:
        entry = cast(InboxEntry, SimpleNamespace(id=b"m" * 16))
        task = asyncio.get_running_loop().create_task(
            fetch(entry, self.message(content_id), act, progress))
        self.fetches.append(task)
        return task

    async def released(self, task: asyncio.Task[str]) -> str:
        """The download `task`, whose sources have all failed, is still running (no "no
        source" while the lookup may name one); the lookup answers; its path once done."""
        done, _ = await asyncio.wait({task}, timeout=0.3)
        assert not done, task.exception()
        self.lookup.go.set()
        async with asyncio.timeout(20):
            return await task


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    data = random.Random(5).randbytes(40 * CHUNK + 99)
    (tmp_path / "clip.ts").write_bytes(data)
    stores = [ContentStore(tmp_path / name) for name in ("alice", "carol")]
    contents = [await s.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK, key=b"k" * 32,
                                       capability=b"p" * 32) for s in stores]
    # Alice's uploads are slow enough that the download is still running after her first
    # chunk: 64 KiB/s, ten seconds for the file.
    alice = TransferServer(ALICE, stores[0], max_upload_rate=64 << 10)
    carol = TransferServer(CAROL, stores[1])
    carol_dht = ProviderDirectory(CAROL, wall=time.time, rng=random.Random(1))
    lookup = HeldLookup()
    try:
        a_host, a_port = await alice.start("127.0.0.1", 0)
        c_host, c_port = await carol.start("127.0.0.1", 0)
        c_dht = await carol_dht.start("127.0.0.1", [])
        await lookup.start("127.0.0.1", [c_dht])
        assert await carol_dht.dht.announce(contents[1].content_id, [f"{c_host}:{c_port}"],
                                            "example.net:4443") >= 1
        fingers = Fingers({"alice@example.net": (ALICE, f"{a_host}:{a_port}"),
                           "carol@example.net": (CAROL, f"{c_host}:{c_port}")})
        world = World(tmp_path, contents[0], data, alice, carol, lookup, fingers)
        yield world
        for task in world.fetches:
            task.cancel()
        if world.fetches:
            await asyncio.wait(world.fetches)
    finally:
        for closing in (alice, carol, carol_dht, lookup):
            await closing.aclose()
        for s in stores:
            s.close()


async def sender_failed(fetch: ContentFetch, act: Watched, content_id: bytes) -> str:
    """Wait until the download shows its sender (its first source) failed; its reason."""
    async with asyncio.timeout(10):
        while True:
            await act.shown.wait()
            act.shown.clear()
            dl = fetch.running.get(content_id)
            if dl is not None and dl.stats[0].outcome == "failed":
                return dl.stats[0].reason


async def test_the_sender_serves_before_the_lookup_returns_and_its_co_recipient_joins(
        world: World) -> None:
    """The first chunk comes from the sender while the lookup is held (on the old code the
    download waited for the lookup, and none came); the sender then goes away, and the
    download waits for the lookup rather than ending with no source; the co-recipient the
    lookup names finishes it, bytes equal."""
    fetch, act = world.fetcher(), Watched()
    first = asyncio.Event()
    task = world.start(fetch, act, lambda held: first.set() if held else None)
    async with asyncio.timeout(10):
        await first.wait()
    assert not world.lookup.ended.is_set()  # the first chunk did not wait for it
    await world.alice.aclose()
    await sender_failed(fetch, act, world.content.content_id)
    path = await world.released(task)
    assert Path(path).read_bytes() == world.data
    assert 0 < world.carol.chunks_served(world.content.content_id) < 41
    shown = {v.peer: v.bytes for v in act.sources.values()}
    assert set(shown) == {ALICE.peer_id.hex()[:16], CAROL.peer_id.hex()[:16]}
    assert all(shown.values())  # both served some of it


async def test_a_lookup_that_never_returns_does_not_hold_the_download(world: World) -> None:
    """The sender serves the whole file while the lookup never answers; the lookup is
    then given up (cancelled), not left running."""
    world.alice.set_upload_rate(None)
    fetch = world.fetcher()
    task = world.start(fetch, Watched(), lambda held: None)
    async with asyncio.timeout(20):
        path = await task
    assert Path(path).read_bytes() == world.data
    assert world.lookup.ended.is_set() and not world.lookup.go.is_set()
    assert world.carol.chunks_served(world.content.content_id) == 0


async def test_an_offline_sender_waits_for_the_co_recipients_of_the_lookup(
        world: World) -> None:
    """The sender cannot be reached at all (as for the demo's dave): the download does
    not end with "no source" while the lookup runs, and the co-recipient it names serves
    every byte."""
    await world.alice.aclose()  # its port refuses from now on
    fetch, act = world.fetcher(), Watched()
    task = world.start(fetch, act, lambda held: None)
    reason = await sender_failed(fetch, act, world.content.content_id)
    assert "cannot connect" in reason, reason
    path = await world.released(task)
    assert Path(path).read_bytes() == world.data
    assert world.carol.chunks_served(world.content.content_id) == 41


async def test_an_offline_sender_and_a_lookup_naming_nobody_is_no_source(
        world: World) -> None:
    """Once the lookup is back with nobody, the download ends as it did: no source, the
    sender's failure named (the queue retries it later)."""
    await world.alice.aclose()
    world.lookup.go.set()
    task = world.start(world.fetcher(), Watched(), lambda held: None,
                       content_id=b"x" * 32)  # a content nobody announced
    async with asyncio.timeout(20):
        with pytest.raises(NoSourceNow) as caught:
            await task
    assert "no source reachable for 41 missing chunks" in str(caught.value)
    assert ALICE.peer_id.hex()[:16] in str(caught.value)
    assert world.lookup.ended.is_set()
