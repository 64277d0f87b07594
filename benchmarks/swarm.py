"""Multi-source downloads at the transfer level: real TCP on 127.0.0.1, one event loop.

`python -m benchmarks swarm [--rate MIB_S] [--mib SIZE] [--chunk-kib K] [--quick]`

- aggregate: four holders, each upload-limited to R by `TransferServer(max_upload_rate=R)`,
  serve one receiver. Achieved rate as a fraction of 4R, over the whole download (connect,
  hash list, slow start and endgame included) and over its steady part (10% to 90% of the
  chunks). Target >= 0.90.
- swarm: one sender limited to R and four receivers starting together. Each receiver
  serves what it holds to the others while it downloads (a TransferServer over its own
  store, whose partial content is served with HAVE updates), and each receiver's
  Downloader gets a co-recipient as an extra source as soon as that co-recipient holds a
  verified chunk (what the node does when it finds a provider in the DHT). Ideal: the
  sender's upload is the only limit, size / R; target <= 1.3x ideal. Also reported: how
  many times the sender uploaded the content (1.0 is ideal).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import report
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.content.partial import PartialContent
from overlay.transfer.downloader import ChunkStored, Downloader, FetchEvent
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import connect_tcp

MiB = 1 << 20


def tcp_source(label: str, server: TransferServer, address: tuple[str, int]) -> Source:
    host, port = address

    async def connect() -> Stream:
        return await connect_tcp(host, port, timeout=5)

    return Source(label, connect, server.identity.peer_id)


def open_partial(root: Path, name: str, c: LocalContent) -> tuple[ContentStore, PartialContent]:
    store = ContentStore(root / name)
    return store, store.open_partial(c.content_id, c.size, c.chunk_size, c.key, c.capability,
                                     root / f"{name}-in", "clip.bin", scheme=c.scheme)


async def add_file(root: Path, size: int, chunk: int) -> tuple[ContentStore, LocalContent]:
    path = root / "clip.bin"
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    store = ContentStore(root / "sender")
    return store, await store.add_local_file(path, chunk_size=chunk)


async def aggregate(root: Path, size: int, chunk: int, rate: int) -> dict[str, Any]:
    store, content = await add_file(root, size, chunk)
    servers = [TransferServer(DeviceIdentity.from_seed(bytes([i + 1]) * 32), store,
                              max_upload_rate=rate) for i in range(4)]
    try:
        sources = [tcp_source(f"h{i}", s, await s.start()) for i, s in enumerate(servers)]
        loop = asyncio.get_running_loop()
        times: list[float] = []
        recv_store, partial = open_partial(root, "recv", content)

        def on_event(e: FetchEvent) -> None:
            if isinstance(e, ChunkStored):
                times.append(loop.time())

        d = Downloader(partial, sources, DeviceIdentity.from_seed(b"r" * 32), window=64,
                       on_event=on_event)
        t0 = loop.time()
        await d.run()
        elapsed = loop.time() - t0
        lo, hi = len(times) // 10, len(times) * 9 // 10
        steady = (hi - lo) * chunk / (times[hi] - times[lo])
        recv_store.close()
        return {"elapsed": elapsed, "overall": size / elapsed / (4 * rate),
                "steady": steady / (4 * rate), "dups": d.counters["duplicate_requests"],
                "late": d.counters["late_chunks"],
                "per_source": [s.chunks for s in d.stats]}
    finally:
        for s in servers:
            await s.aclose()
        store.close()


async def swarm(root: Path, size: int, chunk: int, rate: int, receivers: int = 4,
                ) -> dict[str, Any]:
    store, content = await add_file(root, size, chunk)
    sender = TransferServer(DeviceIdentity.from_seed(b"S" * 32), store, max_upload_rate=rate)
    servers = [sender]
    stores: list[ContentStore] = [store]
    try:
        sender_source = tcp_source("sender", sender, await sender.start())
        loop = asyncio.get_running_loop()
        downloaders: list[Downloader] = []
        peer_sources: list[Source] = []
        finished: list[float] = []
        for r in range(receivers):
            rstore, partial = open_partial(root, f"r{r}", content)
            stores.append(rstore)
            server = TransferServer(DeviceIdentity.from_seed(bytes([r + 1]) * 32), rstore)
            servers.append(server)
            peer_sources.append(tcp_source(f"r{r}", server, await server.start()))
            downloaders.append(Downloader(partial, [sender_source],
                                          DeviceIdentity.from_seed(bytes([r + 101]) * 32),
                                          window=32, rng=random.Random(r),
                                          on_event=announce(r, downloaders, peer_sources)))

        async def one(d: Downloader) -> None:
            await d.run()
            finished.append(loop.time())

        t0 = loop.time()
        async with asyncio.TaskGroup() as tg:
            for d in downloaders:
                tg.create_task(one(d))
        elapsed = max(finished) - t0
        ideal = size / rate
        from_sender = sender.counters["bytes_served"]
        return {"elapsed": elapsed, "ideal": ideal, "ratio": elapsed / ideal,
                "first": min(finished) - t0, "sender_copies": from_sender / size,
                "dups": sum(d.counters["duplicate_requests"] for d in downloaders),
                "haves": sum(d.counters["haves_received"] for d in downloaders)}
    finally:
        for s in servers:
            await s.aclose()
        for st in stores:
            st.close()


def announce(me: int, downloaders: list[Downloader], peers: list[Source],
             ) -> Callable[[FetchEvent], None]:
    """At receiver `me`'s first verified chunk, the others learn of it as a provider."""
    told = [False]

    def on_event(e: FetchEvent) -> None:
        if isinstance(e, ChunkStored) and not told[0]:
            told[0] = True
            for other, d in enumerate(downloaders):
                if other != me:
                    d.add_source(peers[me])

    return on_event


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    size, chunk, rate = int(args.mib * MiB), args.chunk_kib << 10, int(args.rate * MiB)
    with tempfile.TemporaryDirectory(prefix="peerpost-swarm-") as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "s").mkdir()
        agg = await aggregate(root / "a", size, chunk, rate)
        sw = await swarm(root / "s", size, chunk, rate)
    return [
        {"metric": "aggregate: 4 holders at R, receiver rate / 4R (whole download)",
         "value": agg["overall"], "unit": "", "target": ">= 0.90",
         "ok": agg["overall"] >= 0.90},
        {"metric": "aggregate: steady part (10%..90% of chunks) / 4R",
         "value": agg["steady"], "unit": "", "target": ">= 0.90", "ok": agg["steady"] >= 0.90},
        {"metric": "aggregate: time", "value": agg["elapsed"], "unit": "s"},
        {"metric": "aggregate: chunks per holder", "value": str(agg["per_source"])},
        {"metric": "aggregate: endgame duplicates / late copies",
         "value": f"{agg['dups']} / {agg['late']}"},
        {"metric": "swarm: 1 sender at R, 4 receivers, all done / ideal (size / R)",
         "value": sw["ratio"], "unit": "x", "target": "<= 1.3", "ok": sw["ratio"] <= 1.3},
        {"metric": "swarm: all done", "value": sw["elapsed"], "unit": "s"},
        {"metric": "swarm: ideal", "value": sw["ideal"], "unit": "s"},
        {"metric": "swarm: first receiver done", "value": sw["first"], "unit": "s"},
        {"metric": "swarm: sender uploaded the content", "value": sw["sender_copies"],
         "unit": "times", "target": "~1"},
        {"metric": "swarm: endgame duplicates / HAVE frames received",
         "value": f"{sw['dups']} / {sw['haves']}"},
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks swarm")
    ap.add_argument("--rate", type=float, default=8.0, help="R, MiB/s per holder (sender)")
    ap.add_argument("--mib", type=float, default=128.0, help="content size, MiB")
    ap.add_argument("--chunk-kib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="32 MiB, 256 KiB chunks")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.chunk_kib = 32.0, 256
    load = os.getloadavg()[0]
    started = time.time()
    rows = asyncio.run(run(args))
    report("swarm", rows, out=args.out,
           meta={"rate_mib_s": args.rate, "size_mib": args.mib, "chunk_kib": args.chunk_kib,
                 "loadavg_before": load, "wall_s": round(time.time() - started, 1)})
    return 0 if all(r.get("ok", True) for r in rows) else 1
