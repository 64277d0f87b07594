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
RPCs the looking node sent (overlay only: its `rpc.sent` counter; kademlia doesn't count),
the lookup's hops (overlay only: the longest chain of answers it followed, a node from its
own table being one hop),
and the messages the network delivered meanwhile (with concurrency > 1 those overlap).
The package's known stall (a round waits its full 5 s timeout for a dead node)
shows up in the durations, not in wall time.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sim.network.host import Host
from sim.plots import Plot
from sim.scenario import Progress, ScenarioResult, ScenarioSpec
from sim.simulation import Simulation

PORT = 8468
EPOCH = 1.7e9  # provider records carry wall-clock expiries: a plausible virtual wall clock
COLUMNS = ["lookup", "dead_fraction", "sybil_share", "node", "key", "found", "seconds", "queries",
           "hops", "messages"]
IMPLEMENTATIONS = ("overlay", "kademlia")


@dataclass(frozen=True, slots=True)
class Params:
    """What a dht-lookup run reads from its scenario's sections."""

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
    sybil_shares: tuple[float, ...] = (0.0,)
    sybil_behaviour: str = "eclipse"
    sybil_placement: str = "random"
    churn: dict[str, Any] | None = None  # [churn] when a share of the nodes churns

    @classmethod
    def from_spec(cls, spec: ScenarioSpec) -> Params:
        """topology.hosts, workload.*, churn.dead_share, dht.*, adversaries.sybil_*."""
        w, dht, adv = spec.doc["workload"], spec.doc["dht"], spec.doc["adversaries"]
        shares = adv["sybil_share"]
        return cls(nodes=spec.doc["topology"]["hosts"], keys=w["keys"], lookups=w["lookups"],
                   healthy_lookups=w["healthy_lookups"],
                   dead_fraction=spec.doc["churn"]["dead_share"],
                   bootstrap_batch=dht["bootstrap_batch"], ksize=dht["ksize"],
                   alpha=dht["alpha"], concurrency=w["concurrency"],
                   implementation=dht["implementation"],
                   sybil_shares=tuple(float(x) for x in shares) if isinstance(shares, list)
                   else (float(shares),),
                   sybil_behaviour=adv["sybil_behaviour"],
                   sybil_placement=adv["sybil_placement"],
                   churn=spec.doc["churn"] if spec.doc["churn"]["share"] > 0 else None)


def percentile(values: list[float], q: float) -> float:
    """The value at rank floor(q * n) + 1 of the n values sorted (capped at n): for an
    even count the p50 is the upper middle value, the p90 of 10 values the largest (not
    the nearest-rank definition, ceil(q * n)). NaN for no values."""
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
    hops: Callable[[], int] = staticmethod(lambda: 0)
    peer_id: bytes = b""
    node: Any = None


def _overlay_node(sim: Simulation, p: Params, host: Host, i: int, contents: list[bytes],
                  providers: dict[int, bytes], seed: bytes | None = None) -> _Dht:
    from crypto.identity import DeviceIdentity
    from overlay.dht.node import DhtNode

    identity = DeviceIdentity.from_seed(seed or sim.rng_for(f"dht-id/{i}").randbytes(32))
    node = DhtNode(identity, ksize=p.ksize, alpha=p.alpha, wall=lambda: EPOCH + sim.now,
                   rng=sim.rng_for(f"dht/{i}"))
    d = _Dht()
    d.peer_id, d.node = identity.peer_id, node

    async def start(seeds: list[tuple[str, int]]) -> None:
        await node.listen("0.0.0.0", PORT)
        if seeds:
            await node.bootstrap(seeds)

    async def publish(k: int) -> bool:
        return await node.announce(contents[k], [f"{host.address}:9000"], "sim:4500") > 0

    async def lookup(k: int) -> bool:
        # Found: the real provider's record came back (a Sybil's forged one does not count).
        found = await node.find_providers(contents[k], limit=1)
        return any(r.content_id == contents[k] and r.peer_id == providers[k] for r in found)

    d.start, d.publish, d.lookup, d.stop = start, publish, lookup, node.aclose
    d.sent = lambda: node.protocol.counters["rpc.sent"]
    d.hops = lambda: node.protocol.counters["lookups.hops"]
    return d


def _kademlia_node(sim: Simulation, p: Params, host: Host, i: int, contents: list[bytes],
                   providers: dict[int, bytes], seed: bytes | None = None) -> _Dht:
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


def prefix_bits(nodes: int) -> int:
    """Leading bits a targeted Sybil's id shares with its key: ceil(log2 N), so it is
    expected to be closer to the key than every honest node."""
    return max(1, math.ceil(math.log2(nodes)))


def _sybil_seeds(sim: Simulation, p: Params, sybils: list[int],
                 contents: list[bytes]) -> dict[int, bytes]:
    """Identity seeds of Sybils placed next to the announced keys (`near_keys`): each is
    ground (keys made until the id's first `prefix_bits` bits match) for one key in turn.
    That is what an attacker who knows the content ids pays: 2^bits key pairs per Sybil."""
    if p.sybil_placement != "near_keys" or not sybils:
        return {}
    import nacl.bindings

    from crypto.identity import peer_id_of
    from overlay.dht.records import dht_key

    bits = prefix_bits(p.nodes)
    targets = [int.from_bytes(dht_key(c), "big") >> (160 - bits) for c in contents]
    out: dict[int, bytes] = {}
    for n, i in enumerate(sybils):
        rng = sim.rng_for(f"dht-id/{i}/ground")
        want = targets[n % len(targets)]
        while True:
            seed = rng.randbytes(32)
            public, _ = nacl.bindings.crypto_sign_seed_keypair(seed)
            if int.from_bytes(peer_id_of(public), "big") >> (160 - bits) == want:
                out[i] = seed
                break
    return out


def _start_churn(sim: Simulation, p: Params, hosts: list[Host], candidates: list[int],
                 churning: list[int]) -> Any:
    """With [churn] share > 0: that share of the nodes (honest, alive, never a provider or
    node 0) goes down and up with the session and off-time distributions while the
    measured lookups run, until churn.until_s after they start; lookups start from the
    other nodes. Returns the `Churn` (None without churn)."""
    if p.churn is None:
        return None
    from sim.churn import Churn
    from sim.scenarios.churn import Spread

    ch = p.churn
    picked = sim.rng_for("dht-lookup/churn").sample(
        candidates, min(len(candidates), int(ch["share"] * p.nodes)))
    churning.extend(sorted(picked))
    churn = Churn([hosts[i] for i in churning],
                  sessions=Spread(ch.get("session") or {"dist": "exponential", "mean": 60.0}),
                  downtimes=Spread(ch.get("off_time") or {"dist": "exponential",
                                                          "mean": 30.0}),
                  rng=sim.rng_for("dht-lookup/churn-flips"))
    churn.start()
    sim.loop.call_later(ch["until_s"], churn.stop)
    return churn


def _turn_sybil(node: Any, behaviour: str, sybils: list[Any], sim: Simulation) -> None:
    """Make one overlay DHT node a Sybil: its protocol answers as `behaviour` says.

    eclipse: every FIND_NODE / FIND_PROVIDERS gets the `ksize` Sybils closest to the key,
    never a record, and a STORE is acknowledged and thrown away; drop: it asks but never
    answers; lie: honest contacts, but FIND_PROVIDERS gets a provider record of its own
    (validly signed by itself, naming an address nobody listens on), and STOREs vanish.
    """
    from overlay.dht.errors import RemoteProtocolError
    from overlay.dht.records import ProviderRecord, dht_key
    from overlay.dht.wire import Contact, FindNode, FindProviders, Nodes, Ping, Pong, Stored

    protocol = node.protocol
    honest_answer = protocol._answer
    loop_time = protocol._loop.time

    def closest_sybils(key: bytes) -> tuple[Any, ...]:
        target = int.from_bytes(key, "big")
        ranked = sorted(sybils, key=lambda c: int.from_bytes(c.node_id, "big") ^ target)
        return tuple(ranked[:protocol.ksize])

    def answer(body: Any, source: tuple[str, int]) -> Any:
        protocol.counters["sybil.answered"] += 1
        if isinstance(body, Ping):
            return Pong()
        token = protocol.tokens.issue(*source, loop_time())
        if behaviour == "eclipse":
            if isinstance(body, FindNode):
                return Nodes(closest_sybils(body.target), token)
            if isinstance(body, FindProviders):
                return Nodes(closest_sybils(dht_key(body.content_id)), token)
            return Stored()
        # lie
        if isinstance(body, FindProviders):
            honest = honest_answer(body, source)
            forged = ProviderRecord.create(node.identity, body.content_id,
                                           ["192.0.2.1:9"], "sim:4500", EPOCH + sim.now)
            return Nodes(honest.contacts, token, (forged.encode(),))
        if isinstance(body, FindNode):
            return honest_answer(body, source)
        return Stored()

    if behaviour == "drop":
        def drop(msg: Any, source: tuple[str, int], size: int) -> None:
            protocol.counters["sybil.dropped"] += 1
            raise RemoteProtocolError("not_serving")

        protocol._on_request = drop
    else:
        protocol._answer = answer
    _ = Contact  # the contacts handed out are the Sybils' own


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the scenario (one simulation per Sybil share, same seed); rows, summary, plots."""
    from sim.scenario import combine_hashes, variant

    p = Params.from_spec(spec)
    rows: list[dict[str, Any]] = []
    digests: list[str] = []
    summaries: dict[float, dict[str, Any]] = {}
    total = (p.nodes + p.keys + p.lookups + p.healthy_lookups) * len(p.sybil_shares)
    for n, share in enumerate(p.sybil_shares):
        with variant(sim, spec, n, digests) as s:
            got, summaries[share] = _run_share(s, spec, p, share, progress, len(rows), total)
            rows += got
    label = f"{p.implementation}, {p.nodes} nodes"
    if p.sybil_shares == (0.0,):
        summary = summaries[0.0]
        curves = {f"{int(f * 100)}% dead": f for f in sorted({r["dead_fraction"] for r in rows})}

        def pick(col: str, f: float) -> list[float]:
            return [r[col] for r in rows if r["dead_fraction"] == f]
    else:
        summary = {"implementation": p.implementation, "nodes": p.nodes,
                   "sybil_behaviour": p.sybil_behaviour,
                   "sybil_placement": p.sybil_placement if p.sybil_placement == "random"
                   else f"near_keys ({prefix_bits(p.nodes)}-bit prefix of a key)"}
        for share, part in summaries.items():
            for key in ("sybils", "success_rate", "lookup_p50_s", "lookup_p90_s",
                        "found_p50_s", "queries_per_lookup"):
                summary[f"sybil {share:g}: {key}"] = part.get(key)
        label += f", Sybils {p.sybil_behaviour}" + (
            ", near the keys" if p.sybil_placement == "near_keys" else "")
        curves = {f"{int(f * 100)}% Sybils": f for f in p.sybil_shares}

        def pick(col: str, f: float) -> list[float]:
            return [r[col] for r in rows if r["sybil_share"] == f
                    and r["dead_fraction"] == p.dead_fraction]
    plots = [
        Plot("lookup-latency-cdf", "cdf", f"Provider lookup latency ({label})",
             "lookup time (s, virtual)", "fraction of lookups",
             {name: pick("seconds", f) for name, f in curves.items()}),
        Plot("lookup-messages-cdf", "cdf",
             f"Messages the network delivered while each lookup ran ({label})",
             "messages delivered network-wide during the lookup (concurrent lookups and "
             "upkeep included)", "fraction of lookups",
             {name: pick("messages", f) for name, f in curves.items()}),
    ]
    if p.sybil_shares != (0.0,):
        plots += [
            Plot("sybil-success", "line", f"Lookup success as Sybils grow ({label})",
                 "share of DHT nodes that are Sybils", "lookups finding the real provider",
                 {"success rate": [(f, summaries[f]["success_rate"] or 0.0)
                                   for f in p.sybil_shares]}),
            Plot("sybil-latency", "line", f"Lookup latency as Sybils grow ({label})",
                 "share of DHT nodes that are Sybils", "lookup time (s, virtual)",
                 {q: [(f, summaries[f][f"lookup_{q}_s"] or 0.0) for f in p.sybil_shares]
                  for q in ("p50", "p90")})]
    return ScenarioResult(COLUMNS, rows, summary, plots, trace_hash=combine_hashes(digests))


def _run_share(sim: Simulation, spec: ScenarioSpec, p: Params, share: float,
               progress: Progress | None, before: int,
               total: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from sim.scenario import Peers

    rng = sim.rng_for("dht-lookup")
    peers = Peers(sim, spec, p.nodes)
    hosts = [peers.add(f"n{i}", nat=False) for i in range(p.nodes)]
    contents = [sim.rng_for(f"content/{k}").randbytes(32) for k in range(p.keys)]
    # Sybils: never node 0 (everyone's first contact), drawn from their own generator so the
    # rest of the plan is the same for every share.
    sybil_ids = set(sim.rng_for("dht-lookup/sybils").sample(range(1, p.nodes),
                                                            int(share * p.nodes)))
    honest = [i for i in range(p.nodes) if i not in sybil_ids]
    churning: list[int] = []  # filled when the measured lookups start
    providers: dict[int, bytes] = {}
    make = _overlay_node if p.implementation == "overlay" else _kademlia_node
    seeds = _sybil_seeds(sim, p, sorted(sybil_ids), contents)
    nodes = [make(sim, p, h, i, contents, providers, seeds.get(i))
             for i, h in enumerate(hosts)]
    rows: list[dict[str, Any]] = []
    phases: dict[str, float] = {"started": 0, "stored": 0}

    def tick() -> None:
        if progress is not None:
            progress(before + int(phases["started"] + phases["stored"]) + len(rows), total)

    async def main() -> None:
        from overlay.dht.wire import Contact

        sybil_contacts = [Contact(nodes[i].peer_id, hosts[i].address, PORT)
                          for i in sorted(sybil_ids)]
        await hosts[0].create_task(nodes[0].start([]))
        phases["started"] = 1
        tick()
        for lo in range(1, p.nodes, p.bootstrap_batch):
            wave = range(lo, min(p.nodes, lo + p.bootstrap_batch))
            seeds = [[(hosts[rng.randrange(lo)].address, PORT)] for _ in wave]
            await asyncio.gather(*(hosts[i].create_task(nodes[i].start(s))
                                   for i, s in zip(wave, seeds, strict=True)))
            for i in wave:
                if i in sybil_ids:
                    _turn_sybil(nodes[i].node, p.sybil_behaviour, sybil_contacts, sim)
            phases["started"] = wave[-1] + 1
            tick()
        phases["bootstrapped"] = sim.now
        stored = 0
        chosen: set[int] = set()
        for k in range(p.keys):
            i = honest[rng.randrange(len(honest))]
            chosen.add(i)
            providers[k] = nodes[i].peer_id
            stored += await hosts[i].create_task(nodes[i].publish(k))
            phases["stored"] = k + 1
            tick()
        phases["keys_stored_ok"] = stored
        gate = asyncio.Semaphore(p.concurrency)

        async def one(n: int, i: int, k: int, dead: float) -> None:
            async with gate:
                t0, m0, q0, h0 = sim.now, sim.trace.messages, nodes[i].sent(), nodes[i].hops()
                found = await hosts[i].create_task(nodes[i].lookup(k))
                rows.append({"lookup": n, "dead_fraction": dead, "sybil_share": share,
                             "node": i, "key": k, "found": found,
                             "seconds": round(sim.now - t0, 6),
                             "queries": nodes[i].sent() - q0,
                             "hops": nodes[i].hops() - h0,
                             # every node's, concurrent lookups' included
                             "messages": sim.trace.messages - m0})
                tick()

        async def lookups(first: int, count: int, dead: float) -> None:
            moving = set(churning)  # sets: at 100,000 nodes a list scan per node took minutes
            live = [i for i in honest if hosts[i].online and i not in moving]
            plan = [(first + n, rng.choice(live), rng.randrange(p.keys)) for n in range(count)]
            await asyncio.gather(*(one(n, i, k, dead) for n, i, k in plan))

        await lookups(0, p.healthy_lookups, 0.0)
        candidates = [i for i in honest[1:] if i not in chosen]
        dead = rng.sample(candidates, min(len(candidates), int(p.dead_fraction * p.nodes)))
        for i in dead:
            hosts[i].go_offline()
        gone = set(dead)
        churn = _start_churn(sim, p, hosts, [i for i in candidates if i not in gone],
                             churning)
        phases["lookups_start"] = sim.now
        await lookups(p.healthy_lookups, p.lookups, p.dead_fraction)
        if churn is not None:
            churn.stop()
            phases["host_flips"] = churn.changes
            for i in churning:
                hosts[i].go_online()
        rows.sort(key=lambda r: r["lookup"])
        for i, node in enumerate(nodes):
            if hosts[i].online:
                await hosts[i].create_task(node.stop())

    sim.run(main())
    main_rows = [r for r in rows if r["dead_fraction"] == p.dead_fraction]
    summary = _summary(sim, p, main_rows, phases, len(dead_of(sim)))
    if p.churn is not None:
        summary |= {"churning": len(churning), "host_flips": int(phases.get("host_flips", 0))}
    if share or len(p.sybil_shares) > 1:
        summary = {"sybils": len(sybil_ids), "sybil_behaviour": p.sybil_behaviour,
                   "sybil_placement": p.sybil_placement} | summary
    healthy = [r for r in rows if r["dead_fraction"] == 0.0]
    if p.healthy_lookups and p.dead_fraction:
        ok = sum(r["found"] for r in healthy)
        secs = [r["seconds"] for r in healthy]
        summary |= {"healthy: lookups": len(healthy),
                    "healthy: success_rate": round(ok / len(healthy), 4),
                    "healthy: lookup_p50_s": round(percentile(secs, 0.5), 3),
                    "healthy: lookup_p90_s": round(percentile(secs, 0.9), 3)}
    return rows, summary


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
        "hops_per_lookup": (round(statistics.mean(r["hops"] for r in rows), 2)
                            if rows and p.implementation == "overlay" else None),
        "messages_per_lookup": (round(statistics.mean(r["messages"] for r in rows), 1)
                                if rows else None),
        "virtual_s": round(sim.now, 3),
        "messages_total": sim.trace.messages,
    }
