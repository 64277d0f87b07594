"""One peer's content machinery on a simulated host: the real content store, transfer server,
downloader and DHT node (what `Node` composes, without its rendezvous session, inbox and
control socket, so a scenario can choose the download's sources itself).

The delivery scenarios use this rather than the whole `Node` because co-recipient sourcing
(providers found in the DHT as download sources) is not wired into the node yet; the
bytes still move through the unmodified transfer protocol, verified and sealed for real.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from crypto.identity import DeviceIdentity
from overlay.dht.node import DhtNode
from overlay.fetch import Downloader, FetchError, Source
from overlay.sources import holder_source
from overlay.store import ContentStore, LocalContent
from overlay.transfer.server import TransferServer
from sim.host import Host
from sim.simulation import Simulation

TRANSFER_PORT = 9000
DHT_PORT = 8468
EPOCH = 1.7e9
HOME_SERVER = "rendezvous.example.net:4500"


@dataclass(frozen=True, slots=True)
class Handle:
    """What a location message's handle tells a recipient (content id, key, capability)."""

    content_id: bytes
    size: int
    chunk_size: int
    key: bytes
    capability: bytes
    sender: bytes
    sender_addresses: tuple[str, ...]

    @classmethod
    def of(cls, content: LocalContent, sender: Holder) -> Handle:
        """The handle of `content` as `sender` would send it."""
        return cls(content.content_id, content.size, content.chunk_size, content.key,
                   content.capability, sender.identity.peer_id, (sender.transfer_address,))


@dataclass(slots=True)
class FetchReport:
    """How one download went."""

    completed: bool = False
    attempts: int = 0
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    digest: str = ""


class Holder:
    """Content store + transfer server + DHT node of one host (start and stop as the host)."""

    def __init__(self, sim: Simulation, host: Host, root: Path) -> None:
        self.sim = sim
        self.host = host
        self.root = root
        self.identity = DeviceIdentity.from_seed(sim.rng_for(f"id/{host.name}").randbytes(32))
        self.store = ContentStore(root / "store")
        self.transfer = TransferServer(self.identity, self.store.catalog)
        self.dht = DhtNode(self.identity, wall=lambda: EPOCH + sim.now,
                           rng=sim.rng_for(f"dht/{host.name}"))
        self.transfer_address = f"{host.address}:{TRANSFER_PORT}"

    async def start(self, bootstrap: list[tuple[str, int]]) -> None:
        """Listen for transfers and join the DHT (run as the host)."""
        await self.transfer.start(self.host.address, TRANSFER_PORT)
        await self.dht.listen("0.0.0.0", DHT_PORT)
        if bootstrap:
            await self.dht.bootstrap(bootstrap)

    async def aclose(self) -> None:
        """Stop everything (run as the host)."""
        await self.dht.aclose()
        await self.transfer.aclose()
        await self.store.aclose()

    async def fetch(self, handle: Handle, *, co_recipients: bool, report: FetchReport,
                    retry: float = 5.0, window: int = 8) -> Path:
        """Download until complete: the sender, plus (co_recipients) every provider the DHT
        knows; after a failure (every source gone), wait `retry` and try again."""
        partial = await asyncio.to_thread(
            self.store.open_partial, handle.content_id, handle.size, handle.chunk_size,
            handle.key, handle.capability, self.root / "received", "clip.bin")
        if co_recipients:
            # A partial holder serves what it has: announce at once, not only when done.
            await self.dht.announce(handle.content_id, [self.transfer_address],
                                    HOME_SERVER)
        while True:
            report.attempts += 1
            sources = [holder_source(handle.sender, handle.sender_addresses)]
            if co_recipients:
                sources += await self._co_recipients(handle)
            dl = Downloader(partial, sources, self.identity, window=window)
            try:
                path = await dl.run()
            except FetchError:
                await asyncio.sleep(retry)
                continue
            finally:
                for s in dl.stats:
                    kind = "sender" if s.label == sources[0].label else "peers"
                    report.bytes_by_source[kind] = report.bytes_by_source.get(kind, 0) + s.bytes
            report.completed = True
            report.digest = await asyncio.to_thread(_digest, path)
            return path

    async def _co_recipients(self, handle: Handle) -> list[Source]:
        mine = {self.identity.peer_id, handle.sender}
        try:
            found = await self.dht.find_providers(handle.content_id, limit=20)
        except Exception:  # no DHT contacts right now: the sender alone
            return []
        return [holder_source(r.peer_id, list(r.addresses)) for r in found
                if r.peer_id not in mine]


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file, to compare received bytes with the original."""
    return _digest(path)
