"""dht-lookup: provider lookups on the project's DHT (`overlay.dht.DhtNode`, the default)
or on the unmodified `kademlia` package (2.2, `implementation = "kademlia"`, for comparison),
both unchanged on the simulated UDP network.

Steps, all in virtual time:
1. `nodes` public hosts start a node each; they bootstrap in waves of `bootstrap_batch`,
   each through a random node of an earlier wave.
2. `keys` contents are announced as provided (overlay: signed provider records) or keys
   stored (kademlia: `set`), each from a random node.
3. `healthy_lookups` lookups with every node alive (as in step 5), if asked for.
4. A `dead_fraction` of the nodes (never the first, never a provider) go offline silently.
5. `lookups` lookups, `concurrency` at a time, from random live nodes for random keys:
   `find_providers(limit=1)` (overlay) or `get` (kademlia).

One CSV row per lookup: whether the provider (value) came back, the virtual duration, the
RPCs the looking node sent (overlay only: its `rpc.sent` counter; kademlia doesn't count)
and the messages the network delivered meanwhile (with concurrency > 1 those overlap).
The package's known stall (a round waits its full 5 s timeout for a dead node)
shows up in the durations, not in wall time.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sim.network.host import Host
from sim.plots import Plot
from sim.scenario import Progress, ScenarioError, ScenarioResult, ScenarioSpec
from sim.simulation import Simulation

PORT = 8468
EPOCH = 1.7e9  # provider records carry wall-clock expiries: a plausible virtual wall clock
COLUMNS = ["lookup", "dead_fraction", "node", "key", "found", "seconds", "queries",
           "messages"]
IMPLEMENTATIONS = ("overlay", "kademlia")


@dataclass(frozen=True, slots=True)
class Params:
    """The [params] table of a dht-lookup scenario."""

    nodes: int = 200
    keys: int = 10
    lookups: int = 100
    healthy_lookups: int = 0
    dead_fraction: float = 0.2
    bootstrap_batch: int = 20
    ksize: int = 20
    alpha: int = 3
    concurrency: int = 1
    implementation: str = "overlay"

    @classmethod
    def parse(cls, table: dict[str, Any]) -> Params:
        """Check types and ranges; unknown keys are errors."""
        limits: dict[str, tuple[float, float]] = {
            "nodes": (2, 100_000), "keys": (1, 10_000), "lookups": (0, 1_000_000),
            "healthy_lookups": (0, 1_000_000), "dead_fraction": (0.0, 0.9),
            "bootstrap_batch": (1, 10_000), "ksize": (1, 32),
            "alpha": (1, 20), "concurrency": (1, 10_000)}
        unknown = set(table) - set(limits) - {"implementation"}
        if unknown:
            raise ScenarioError(f"unknown dht-lookup params: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        impl = table.get("implementation", "overlay")
        if impl not in IMPLEMENTATIONS:
            raise ScenarioError(f"params.implementation must be one of {IMPLEMENTATIONS}, "
                                f"not {impl!r}")
        values["implementation"] = impl
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


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Dht:
    """What the scenario does with one node, whichever implementation runs it."""

    start: Callable[[list[tuple[str, int]]], Coroutine[Any, Any, None]]
    publish: Callable[[int], Coroutine[Any, Any, bool]]
    lookup: Callable[[int], Coroutine[Any, Any, bool]]
    sent: Callable[[], int]
    stop: Callable[[], Coroutine[Any, Any, None]]


def _overlay_node(sim: Simulation, p: Params, host: Host, i: int,
                  contents: list[bytes]) -> _Dht:
    from crypto.identity import DeviceIdentity
    from overlay.dht.node import DhtNode

    identity = DeviceIdentity.from_seed(sim.rng_for(f"dht-id/{i}").randbytes(32))
    node = DhtNode(identity, ksize=p.ksize, alpha=p.alpha, wall=lambda: EPOCH + sim.now,
                   rng=sim.rng_for(f"dht/{i}"))
    d = _Dht()

    async def start(seeds: list[tuple[str, int]]) -> None:
        await node.listen("0.0.0.0", PORT)
        if seeds:
            await node.bootstrap(seeds)

    async def publish(k: int) -> bool:
        return await node.announce(contents[k], [f"{host.address}:9000"], "sim:4500") > 0

    async def lookup(k: int) -> bool:
        found = await node.find_providers(contents[k], limit=1)
        return any(r.content_id == contents[k] for r in found)

    d.start, d.publish, d.lookup, d.stop = start, publish, lookup, node.aclose
    d.sent = lambda: node.protocol.counters["rpc.sent"]
    return d


def _kademlia_node(sim: Simulation, p: Params, host: Host, i: int,
                   contents: list[bytes]) -> _Dht:
    from kademlia.network import Server

    node_id = hashlib.sha1(sim.rng_for(f"dht-id/{i}").randbytes(20)).digest()
    server = Server(ksize=p.ksize, alpha=p.alpha, node_id=node_id)
    d = _Dht()

    async def start(seeds: list[tuple[str, int]]) -> None:
        await server.listen(PORT)
        if seeds:
            await server.bootstrap(seeds)

    async def publish(k: int) -> bool:
        return bool(await server.set(contents[k].hex(), f"provider-{i}"))

    async def lookup(k: int) -> bool:
        return await server.get(contents[k].hex()) is not None

    async def stop() -> None:
        server.stop()

    d.start, d.publish, d.lookup, d.stop = start, publish, lookup, stop
    d.sent = lambda: 0
    return d


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the scenario on `sim` and return its rows and summary."""
    p = Params.parse(spec.params)
    rng = sim.rng_for("dht-lookup")
    net = spec.network
    hosts = [sim.add_host(f"n{i}", up=net.up, down=net.down) for i in range(p.nodes)]
    contents = [sim.rng_for(f"content/{k}").randbytes(32) for k in range(p.keys)]
    make = _overlay_node if p.implementation == "overlay" else _kademlia_node
    nodes = [make(sim, p, h, i, contents) for i, h in enumerate(hosts)]
    rows: list[dict[str, Any]] = []
    total = p.nodes + p.keys + p.lookups + p.healthy_lookups
    phases: dict[str, float] = {"started": 0, "stored": 0}

    def tick() -> None:
        if progress is not None:
            progress(int(phases["started"] + phases["stored"]) + len(rows), total)

    async def main() -> None:
        await hosts[0].create_task(nodes[0].start([]))
        phases["started"] = 1
        tick()
        for lo in range(1, p.nodes, p.bootstrap_batch):
            wave = range(lo, min(p.nodes, lo + p.bootstrap_batch))
            seeds = [[(hosts[rng.randrange(lo)].address, PORT)] for _ in wave]
            await asyncio.gather(*(hosts[i].create_task(nodes[i].start(s))
                                   for i, s in zip(wave, seeds, strict=True)))
            phases["started"] = wave[-1] + 1
            tick()
        phases["bootstrapped"] = sim.now
        stored = 0
        providers: set[int] = set()
        for k in range(p.keys):
            i = rng.randrange(p.nodes)
            providers.add(i)
            stored += await hosts[i].create_task(nodes[i].publish(k))
            phases["stored"] = k + 1
            tick()
        phases["keys_stored_ok"] = stored
        gate = asyncio.Semaphore(p.concurrency)

        async def one(n: int, i: int, k: int, dead: float) -> None:
            async with gate:
                t0, m0, q0 = sim.now, sim.trace.messages, nodes[i].sent()
                found = await hosts[i].create_task(nodes[i].lookup(k))
                rows.append({"lookup": n, "dead_fraction": dead, "node": i, "key": k,
                             "found": found, "seconds": round(sim.now - t0, 6),
                             "queries": nodes[i].sent() - q0,
                             "messages": sim.trace.messages - m0})
                tick()

        async def lookups(first: int, count: int, dead: float) -> None:
            live = [i for i in range(p.nodes) if hosts[i].online]
            plan = [(first + n, rng.choice(live), rng.randrange(p.keys)) for n in range(count)]
            await asyncio.gather(*(one(n, i, k, dead) for n, i, k in plan))

        await lookups(0, p.healthy_lookups, 0.0)
        candidates = [i for i in range(1, p.nodes) if i not in providers]
        dead = rng.sample(candidates, min(len(candidates), int(p.dead_fraction * p.nodes)))
        for i in dead:
            hosts[i].go_offline()
        phases["lookups_start"] = sim.now
        await lookups(p.healthy_lookups, p.lookups, p.dead_fraction)
        rows.sort(key=lambda r: r["lookup"])
        for i, node in enumerate(nodes):
            if hosts[i].online:
                await hosts[i].create_task(node.stop())

    sim.run(main())
    label = f"{p.implementation}, {p.nodes} nodes"
    fractions = sorted({r["dead_fraction"] for r in rows})

    def by(f: float, col: str) -> list[float]:
        return [r[col] for r in rows if r["dead_fraction"] == f]

    plots = [
        Plot("lookup-latency-cdf", "cdf", f"Provider lookup latency ({label})",
             "lookup time (s, virtual)", "fraction of lookups",
             {f"{int(f * 100)}% dead": by(f, "seconds") for f in fractions}),
        Plot("lookup-messages-cdf", "cdf", f"Messages delivered per lookup ({label})",
             "messages delivered during the lookup", "fraction of lookups",
             {f"{int(f * 100)}% dead": by(f, "messages") for f in fractions}),
    ]
    main_rows = [r for r in rows if r["dead_fraction"] == p.dead_fraction]
    summary = _summary(sim, p, main_rows, phases, len(dead_of(sim)))
    healthy = [r for r in rows if r["dead_fraction"] == 0.0]
    if p.healthy_lookups and p.dead_fraction:
        ok = sum(r["found"] for r in healthy)
        secs = [r["seconds"] for r in healthy]
        summary |= {"healthy: lookups": len(healthy),
                    "healthy: success_rate": round(ok / len(healthy), 4),
                    "healthy: lookup_p50_s": round(percentile(secs, 0.5), 3),
                    "healthy: lookup_p90_s": round(percentile(secs, 0.9), 3)}
    return ScenarioResult(COLUMNS, rows, summary, plots)


def dead_of(sim: Simulation) -> list[Host]:
    """Hosts that are offline at the end."""
    return [h for h in sim.network.hosts if not h.online]


def _summary(sim: Simulation, p: Params, rows: list[dict[str, Any]], phases: dict[str, float],
             dead: int) -> dict[str, Any]:
    seconds = [r["seconds"] for r in rows]
    found = sum(r["found"] for r in rows)
    ok = [r["seconds"] for r in rows if r["found"]]

    def q(values: list[float], x: float) -> float | None:
        return round(percentile(values, x), 3) if values else None

    return {
        "implementation": p.implementation,
        "nodes": p.nodes,
        "dead": dead,
        "bootstrap_virtual_s": round(phases["bootstrapped"], 3),
        "keys_stored": f"{int(phases['keys_stored_ok'])}/{p.keys}",
        "lookups": len(rows),
        "found": found,
        "success_rate": round(found / len(rows), 4) if rows else None,
        "lookup_p50_s": q(seconds, 0.5),
        "lookup_p90_s": q(seconds, 0.9),
        "lookup_p99_s": q(seconds, 0.99),
        "lookup_max_s": round(max(seconds), 3) if rows else None,
        "found_p50_s": q(ok, 0.5),
        "queries_per_lookup": (round(statistics.mean(r["queries"] for r in rows), 1)
                               if rows and p.implementation == "overlay" else None),
        "messages_per_lookup": (round(statistics.mean(r["messages"] for r in rows), 1)
                                if rows else None),
        "virtual_s": round(sim.now, 3),
        "messages_total": sim.trace.messages,
        "trace_digest": sim.trace.digest(),
    }
