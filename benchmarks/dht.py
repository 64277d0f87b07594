"""DHT provider lookups at 200 nodes on loopback, with 0% and 20% of nodes silently dead.

`python -m benchmarks dht [--nodes 200] [--lookups 60] [--no-baseline] [--out PATH]`

Ours: 200 `DhtNode`s in one process, one event loop, each on its own 127.0.0.1 UDP
socket; 30 content ids announced, then `--lookups` sequential `find_providers` from
random live nodes. "Messages per lookup" counts the requests the querying node sent.
Baseline: the unmodified `kademlia.network.Server` on the same setup (`set`/`get`), its
lookups run 10 at a time because each one can take ~10 s when nodes are dead; its
message count is the request datagrams the querying server sent during its `get`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kademlia.network import Server
from kademlia.protocol import KademliaProtocol

from benchmarks.common import report
from overlay.dht import DhtNode
from tests.overlay.dht_swarm import close_all, start_swarm

HOME = "rv.example.net:7000"
P90_TARGET = 1.5
SUCCESS_TARGET = 0.99


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rows(label: str, hits: int, total: int, latencies: list[float], messages: list[int],
          *, targets: bool) -> list[dict[str, Any]]:
    rate = hits / total
    p90 = _quantile(latencies, 0.9)
    return [
        {"metric": f"{label}: success rate", "value": rate, "unit": "",
         "target": f">= {SUCCESS_TARGET}" if targets else "",
         "ok": rate >= SUCCESS_TARGET if targets else None},
        {"metric": f"{label}: p50 lookup", "value": _quantile(latencies, 0.5), "unit": "s"},
        {"metric": f"{label}: p90 lookup", "value": p90, "unit": "s",
         "target": f"< {P90_TARGET}" if targets and "20%" in label else "",
         "ok": p90 < P90_TARGET if targets and "20%" in label else None},
        {"metric": f"{label}: messages per lookup", "value": statistics.mean(messages),
         "unit": "requests"},
    ]


async def _ours(nodes_n: int, lookups: int, rng: random.Random) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    nodes = await start_swarm(nodes_n, seed=rng.randrange(2**32))
    joined = time.perf_counter() - t0
    rows: list[dict[str, Any]] = [
        {"metric": "ours: join of all nodes", "value": joined, "unit": "s"}]
    try:
        cids = [rng.randbytes(32) for _ in range(30)]
        for cid in cids:
            await rng.choice(nodes[1:]).announce(cid, ["127.0.0.1:4000"], HOME)

        async def measure(alive: list[DhtNode], label: str) -> None:
            hits, lat, msgs = 0, [], []
            for _ in range(lookups):
                querier, cid = rng.choice(alive), rng.choice(cids)
                sent = querier.stats().get("rpc.sent", 0)
                start = time.perf_counter()
                found = await querier.find_providers(cid)
                lat.append(time.perf_counter() - start)
                msgs.append(querier.stats().get("rpc.sent", 0) - sent)
                hits += any(r.content_id == cid for r in found)
            rows.extend(_rows(label, hits, lookups, lat, msgs, targets=True))

        await measure(nodes, "ours, 0% dead")
        shuffled = nodes[1:]
        rng.shuffle(shuffled)
        dead = shuffled[: nodes_n // 5]
        await close_all(dead)
        await measure(shuffled[nodes_n // 5:], "ours, 20% dead")
    finally:
        await close_all(nodes)
    return rows


class _CountingProtocol(KademliaProtocol):  # type: ignore[misc]
    """The package's protocol, unchanged except that it counts the requests it sends."""

    requests_sent = 0

    def connection_made(self, transport: Any) -> None:
        proto = self

        class Counting:
            def sendto(self, data: bytes, addr: Any) -> None:
                if data[:1] == b"\x00":
                    proto.requests_sent += 1
                transport.sendto(data, addr)

            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

        super().connection_made(Counting())


class _CountingServer(Server):  # type: ignore[misc]
    protocol_class = _CountingProtocol


async def _baseline(nodes_n: int, lookups: int, rng: random.Random) -> list[dict[str, Any]]:
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    servers: list[Server] = []
    try:
        for _ in range(nodes_n):
            s = _CountingServer(node_id=rng.randbytes(20))
            await s.listen(0, interface="127.0.0.1")
            servers.append(s)
        first = servers[0].transport.get_extra_info("sockname")[:2]
        for i in range(1, nodes_n, 10):
            await asyncio.gather(*(s.bootstrap([first]) for s in servers[i:i + 10]))
        keys = [f"clip-{i}" for i in range(30)]
        for key in keys:
            await rng.choice(servers[1:]).set(key, f"provider-of-{key}")

        rows: list[dict[str, Any]] = []

        async def measure(alive: list[Server], label: str) -> None:
            hits, lat, msgs = 0, [], []

            async def one(querier: Server, key: str) -> None:
                nonlocal hits
                sent = querier.protocol.requests_sent
                start = time.perf_counter()
                value = await querier.get(key)
                lat.append(time.perf_counter() - start)
                msgs.append(querier.protocol.requests_sent - sent)
                hits += value == f"provider-of-{key}"

            for start in range(0, lookups, 10):
                queriers = rng.sample(alive, min(10, lookups - start))
                await asyncio.gather(*(one(q, rng.choice(keys)) for q in queriers))
            rows.extend(_rows(label, hits, lookups, lat, msgs, targets=False))

        await measure(servers, "kademlia 2.2.3, 0% dead")
        shuffled = servers[1:]
        rng.shuffle(shuffled)
        for s in shuffled[: nodes_n // 5]:
            s.stop()
        await measure(shuffled[nodes_n // 5:], "kademlia 2.2.3, 20% dead")
        return rows
    finally:
        for s in servers:
            s.stop()


def main(argv: list[str]) -> int:
    """Run the benchmark; non-zero exit if our success rate or p90 misses its target."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks dht", description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--lookups", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = asyncio.run(_ours(args.nodes, args.lookups, rng))
    if not args.no_baseline:
        rows += asyncio.run(_baseline(args.nodes, args.lookups, rng))
    report("dht", rows, out=args.out, meta={
        "nodes": args.nodes, "lookups": args.lookups, "seed": args.seed,
        "setup": "one process, one event loop, every node on its own 127.0.0.1 UDP socket",
        "dead": "20% of nodes closed silently after records were published",
    })
    return 0 if all(r.get("ok") is not False for r in rows) else 1
