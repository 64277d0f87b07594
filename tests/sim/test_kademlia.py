"""The unmodified `kademlia` package on the simulated UDP network."""

from __future__ import annotations

import hashlib
import logging
import random
import time

from kademlia.network import Server

from sim.network.host import Host
from sim.network.latency import CoordinateLatency
from sim.simulation import Simulation

PORT = 8468


def _node_id(sim: Simulation, i: int) -> bytes:
    return hashlib.sha1(sim.rng_for(f"node-id/{i}").randbytes(20)).digest()


async def _start(host: Host, node_id: bytes, seeds: list[tuple[str, int]]) -> Server:
    async def start() -> Server:
        server = Server(node_id=node_id)
        await server.listen(PORT)
        if seeds:
            await server.bootstrap(seeds)
        return server

    return await host.create_task(start())


def test_kademlia_bootstraps_stores_and_finds_even_with_dead_nodes() -> None:
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    logging.getLogger("rpcudp").setLevel(logging.ERROR)
    wall = time.perf_counter()
    with Simulation(seed=5, latency=CoordinateLatency(random.Random(5))) as sim:
        hosts = [sim.add_host(f"n{i}") for i in range(80)]
        results: dict[str, object] = {}

        async def main() -> None:
            servers = [await _start(hosts[0], _node_id(sim, 0), [])]
            for i, host in enumerate(hosts[1:], start=1):
                seed = hosts[(i * 7) % i]
                servers.append(await _start(host, _node_id(sim, i), [(seed.address, PORT)]))
            results["bootstrapped_at"] = sim.now
            results["stored"] = await hosts[3].create_task(servers[3].set("clip", "bytes@n3"))
            results["found"] = await hosts[60].create_task(servers[60].get("clip"))
            for host in hosts[10:26]:  # 20% of the nodes vanish silently
                host.go_offline()
            t0 = sim.now
            results["found_despite_churn"] = await hosts[70].create_task(servers[70].get("clip"))
            results["churn_get_seconds"] = sim.now - t0
            results["missing"] = await hosts[45].create_task(servers[45].get("nothing"))
            for s in servers:
                s.stop()

        sim.run(main())
        assert not sim.errors, sim.errors[:3]
        delivered = sim.trace.messages

    assert results["stored"] is True
    assert results["found"] == "bytes@n3"
    assert results["found_despite_churn"] == "bytes@n3"
    assert results["missing"] is None
    assert delivered > 1000
    # Virtual time pays the package's 5 s per-round stall on dead nodes; wall time does not.
    assert time.perf_counter() - wall < 60
