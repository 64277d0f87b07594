"""Many DHT nodes in one process, each on its own UDP socket: for tests, benchmarks, demos."""

from __future__ import annotations

import asyncio
import random

from crypto.identity import DeviceIdentity
from overlay.dht.node import DhtNode

JOIN_BATCH = 10


async def start_swarm(count: int, *, seed: int, host: str = "127.0.0.1",
                      client_only: frozenset[int] = frozenset()) -> list[DhtNode]:
    """Start `count` nodes with seeded identities; node 0 is the bootstrap node the rest
    join through, `JOIN_BATCH` at a time. Indexes in `client_only` join as NAT'd clients."""
    rng = random.Random(seed)
    nodes: list[DhtNode] = []
    try:
        for i in range(count):
            node = DhtNode(DeviceIdentity.from_seed(rng.randbytes(32)),
                           client_only=i in client_only, rng=random.Random(rng.random()),
                           source_rate=1e6, source_burst=1e6)  # all share 127.0.0.1
            nodes.append(node)
            await node.listen(host, 0)
        seed_addr = nodes[0].address
        for start in range(1, count, JOIN_BATCH):
            await asyncio.gather(*(n.bootstrap([seed_addr])
                                   for n in nodes[start:start + JOIN_BATCH]))
    except BaseException:
        await close_all(nodes)
        raise
    return nodes


async def close_all(nodes: list[DhtNode]) -> None:
    """Close every node (silently, as a crash looks to the others)."""
    for node in nodes:
        await node.aclose()
