"""Many DHT nodes in one process, each on its own UDP socket: for tests, benchmarks, demos."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from kademlia.node import Node

from crypto.identity import DeviceIdentity
from overlay.dht.node import DhtNode

if TYPE_CHECKING:
    import pytest  # benchmarks/dht.py runs without it

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


def routes_to(node: DhtNode, peer_id: bytes) -> bool:
    """Whether `peer_id` is in `node`'s routing table."""
    return any(c.node_id == peer_id for c in node.contacts())


def added_by(nodes: list[DhtNode], peer_id: bytes, want: int,
             monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once `want` of `nodes` have put `peer_id` in their routing tables (a
    protocol adds a node there when it answered and proved its id): to wait on, not poll."""
    adders: set[bytes] = set()
    done = asyncio.Event()

    def watch(node: DhtNode) -> None:
        add = node.protocol.handle_call_response

        def added(contact: Node) -> None:
            add(contact)
            if contact.id == peer_id and routes_to(node, peer_id):
                adders.add(node.peer_id)
                if len(adders) >= want:
                    done.set()

        monkeypatch.setattr(node.protocol, "handle_call_response", added)

    for node in nodes:
        watch(node)
    return done
