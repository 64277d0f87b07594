"""dht-lookup: the unmodified `kademlia` package (2.2) on the simulated UDP network.

Steps, all in virtual time:
1. `nodes` public hosts start a `kademlia.network.Server` each; they bootstrap in waves of
   `bootstrap_batch`, each through a random node of an earlier wave.
2. `keys` keys are stored from random nodes.
3. A `dead_fraction` of the nodes (never the first) go offline silently.
4. `lookups` gets, one after another, from random live nodes for random keys.

One CSV row per lookup: whether the value came back, its virtual duration and the messages
the network delivered meanwhile. The package's known stall (a round waits its full 5 s
timeout for a dead node, NOTES.md) shows up in the durations, not in wall time.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
from dataclasses import dataclass
from typing import Any

from kademlia.network import Server

from sim.host import Host
from sim.scenario import Progress, ScenarioError, ScenarioResult, ScenarioSpec
from sim.simulation import Simulation

PORT = 8468
COLUMNS = ["lookup", "node", "key", "found", "seconds", "messages"]


@dataclass(frozen=True, slots=True)
class Params:
    """The [params] table of a dht-lookup scenario."""

    nodes: int = 200
    keys: int = 10
    lookups: int = 100
    dead_fraction: float = 0.2
    bootstrap_batch: int = 20
    ksize: int = 20
    alpha: int = 3

    @classmethod
    def parse(cls, table: dict[str, Any]) -> Params:
        """Check types and ranges; unknown keys are errors."""
        limits: dict[str, tuple[float, float]] = {
            "nodes": (2, 100_000), "keys": (1, 10_000), "lookups": (0, 1_000_000),
            "dead_fraction": (0.0, 0.9), "bootstrap_batch": (1, 10_000), "ksize": (1, 100),
            "alpha": (1, 20)}
        unknown = set(table) - set(limits)
        if unknown:
            raise ScenarioError(f"unknown dht-lookup params: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, (lo, hi) in limits.items():
            if key not in table:
                continue
            v = table[key]
            want_int = key != "dead_fraction"
            if isinstance(v, bool) or not isinstance(v, int if want_int else int | float):
                what = "an integer" if want_int else "a number"
                raise ScenarioError(f"params.{key} must be {what}")
            if not lo <= v <= hi:
                raise ScenarioError(f"params.{key} must be in [{lo:g}, {hi:g}], got {v}")
            values[key] = v
        return cls(**values)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the scenario on `sim` and return its rows and summary."""
    p = Params.parse(spec.params)
    rng = sim.rng_for("dht-lookup")
    net = spec.network
    hosts = [sim.add_host(f"n{i}", up=net.up, down=net.down) for i in range(p.nodes)]
    servers: list[Server] = []
    rows: list[dict[str, Any]] = []
    total = p.nodes + p.keys + p.lookups
    phases: dict[str, float] = {}

    def tick() -> None:
        if progress is not None:
            progress(len(servers) + len(rows) + int(phases.get("stored", 0)), total)

    async def start(host: Host, i: int, seeds: list[tuple[str, int]]) -> Server:
        node_id = hashlib.sha1(rng.randbytes(20)).digest()

        async def go() -> Server:
            server = Server(ksize=p.ksize, alpha=p.alpha, node_id=node_id)
            await server.listen(PORT)
            if seeds:
                await server.bootstrap(seeds)
            return server

        return await host.create_task(go(), name=f"kademlia-{i}")

    async def main() -> None:
        servers.append(await start(hosts[0], 0, []))
        tick()
        for lo in range(1, p.nodes, p.bootstrap_batch):
            wave = range(lo, min(p.nodes, lo + p.bootstrap_batch))
            seeds = [[(hosts[rng.randrange(lo)].address, PORT)] for _ in wave]
            servers.extend(await asyncio.gather(
                *(start(hosts[i], i, s) for i, s in zip(wave, seeds, strict=True))))
            tick()
        phases["bootstrapped"] = sim.now
        stored = 0
        for k in range(p.keys):
            i = rng.randrange(p.nodes)
            stored += bool(await hosts[i].create_task(servers[i].set(f"key-{k}", f"value-{k}")))
            phases["stored"] = k + 1
            tick()
        phases["keys_stored_ok"] = stored
        dead = rng.sample(range(1, p.nodes), int(p.dead_fraction * p.nodes))
        for i in dead:
            hosts[i].go_offline()
        live = [i for i in range(p.nodes) if hosts[i].online]
        phases["lookups_start"] = sim.now
        for n in range(p.lookups):
            i = rng.choice(live)
            k = rng.randrange(p.keys)
            t0, m0 = sim.now, sim.trace.messages
            value = await hosts[i].create_task(servers[i].get(f"key-{k}"))
            rows.append({"lookup": n, "node": i, "key": k, "found": value == f"value-{k}",
                         "seconds": round(sim.now - t0, 6),
                         "messages": sim.trace.messages - m0})
            tick()
        for server in servers:
            server.stop()

    sim.run(main())
    seconds = [r["seconds"] for r in rows]
    found = sum(r["found"] for r in rows)
    summary: dict[str, Any] = {
        "nodes": p.nodes,
        "dead": int(p.dead_fraction * p.nodes),
        "bootstrap_virtual_s": round(phases["bootstrapped"], 3),
        "keys_stored": f"{phases['keys_stored_ok']}/{p.keys}",
        "lookups": len(rows),
        "found": found,
        "success_rate": round(found / len(rows), 4) if rows else None,
        "lookup_p50_s": round(_percentile(seconds, 0.5), 3) if rows else None,
        "lookup_p90_s": round(_percentile(seconds, 0.9), 3) if rows else None,
        "lookup_max_s": round(max(seconds), 3) if rows else None,
        "messages_per_lookup": (round(statistics.mean(r["messages"] for r in rows), 1)
                                if rows else None),
        "virtual_s": round(sim.now, 3),
        "messages_total": sim.trace.messages,
        "trace_digest": sim.trace.digest(),
    }
    return ScenarioResult(COLUMNS, rows, summary)
