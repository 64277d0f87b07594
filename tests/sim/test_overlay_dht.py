"""The project's own DHT (overlay.dht, signed provider records) runs unmodified in the sim."""

from __future__ import annotations

import random

from crypto.identity import DeviceIdentity
from overlay.dht.node import DhtNode
from overlay.dht.records import ProviderRecord
from sim.network.host import Host
from sim.network.latency import CoordinateLatency
from sim.simulation import Simulation

PORT = 4000
EPOCH = 1.7e9  # provider records carry wall-clock expiry: give them a plausible virtual one


def test_providers_are_found_with_a_fifth_of_the_nodes_gone() -> None:
    with Simulation(seed=3, latency=CoordinateLatency(random.Random(3))) as sim:
        rng = sim.rng_for("identities")
        hosts = [sim.add_host(f"n{i}") for i in range(40)]
        nodes: list[DhtNode] = []
        content_id = bytes(range(32))

        async def start(host: Host, i: int) -> DhtNode:
            node = DhtNode(DeviceIdentity.from_seed(rng.randbytes(32)),
                           wall=lambda: EPOCH + sim.now, rng=sim.rng_for(f"dht/{i}"))
            await node.listen("0.0.0.0", PORT)
            if i:
                await node.bootstrap([(hosts[0].address, PORT)])
            return node

        async def main() -> tuple[int, list[ProviderRecord]]:
            for i, host in enumerate(hosts):
                nodes.append(await host.create_task(start(host, i)))
            stored = await hosts[5].create_task(
                nodes[5].announce(content_id, [f"{hosts[5].address}:9000"], "example.net:4433"))
            for host in hosts[20:28]:
                host.go_offline()
            found = await hosts[35].create_task(nodes[35].find_providers(content_id))
            for host, node in zip(hosts, nodes, strict=True):
                await host.create_task(node.aclose())
            return stored, found

        stored, found = sim.run(main())
        assert not sim.errors, sim.errors[:3]
    assert stored >= 10
    assert [r.peer_id for r in found] == [nodes[5].peer_id]
    assert found[0].addresses == (f"{hosts[5].address}:9000",)
