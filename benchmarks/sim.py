"""Simulator speed: simulated messages handled per wall-clock second.

Workloads (all on the virtual-time loop, real asyncio protocols):
- udp-relay: hosts pass datagrams to random peers (one delivery = one message), with
  latency from coordinates, finite uplinks and downlinks;
- udp-relay-plain: the same with unlimited links and fixed latency (the cheapest path);
- tcp-stream: pairs of hosts stream 64 KiB segments through asyncio streams with drain();
- dht-lookup: the built-in scenario on our `overlay.dht.DhtNode` (signed records, Ed25519
  on every RPC: its rate is bound by that crypto, not by the engine) at each of --dht-sizes
  nodes, RTTs uniform in 20-200 ms: lookups with every node alive, then with 20% silently
  dead; and the unmodified `kademlia` package at --kademlia-nodes for comparison;
- sender upload: the built-in nat-mix (a 5-chunk clip, 16 recipients) and the family case
  (20 MB to 3 recipients online within 30 s), each at --upload-seeds: MB the sender
  uploaded (copies of the clip: super-seeding keeps it near one) and completion p50/p95.
Targets: >= 50,000 simulated messages per wall-clock second; dht-lookup at 10,000
nodes in < 5 min wall and < 8 GiB; lookups p50 < 300 ms with success >= 99.5% (all alive),
p90 < 1.5 s with 20% dead; the nat-mix sender under 3 copies (mean of the seeds).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report
from sim.network.latency import CoordinateLatency, FixedLatency
from sim.scenario import run
from sim.scenarios.dht_lookup import percentile
from sim.simulation import Simulation

TARGET = 50_000


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, rng: random.Random, peers: list[tuple[str, int]]) -> None:
        self.rng = rng
        self.peers = peers
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        hops = data[0]
        if hops:
            self.transport.sendto(bytes([hops - 1]) + data[1:], self.rng.choice(self.peers))


def udp_relay(hosts: int, tokens: int, hops: int, *, plain: bool) -> tuple[int, float, float]:
    """(messages, wall seconds, virtual seconds)."""
    latency = FixedLatency(0.02) if plain else CoordinateLatency(random.Random(1), jitter=0.002)
    with Simulation(seed=1, latency=latency) as sim:
        rng = sim.rng_for("bench")
        rate = None if plain else 1e6
        members = [sim.add_host(f"h{i}", up=rate, down=rate) for i in range(hosts)]
        peers = [(h.address, 9000) for h in members]

        async def bind(h: Any) -> None:
            loop = asyncio.get_running_loop()
            await loop.create_datagram_endpoint(lambda: _Relay(rng, peers),
                                                local_addr=("0.0.0.0", 9000))

        async def main() -> None:
            for h in members:
                await h.create_task(bind(h))
            for i in range(tokens):
                h = members[i % hosts]
                h.udp[9000].sendto(bytes([hops]) + b"x" * 100, rng.choice(peers))
            await asyncio.sleep(3600)

        t0 = time.perf_counter()
        sim.run(main())
        return sim.trace.messages, time.perf_counter() - t0, sim.now


def tcp_stream(pairs: int, megabytes: int) -> tuple[int, float, float]:
    """(segments delivered, wall seconds, virtual seconds)."""
    with Simulation(seed=1, latency=FixedLatency(0.02)) as sim:
        payload = bytes(64 * 1024)

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1 << 20):
                pass
            writer.close()

        async def send(dst: str, port: int) -> None:
            _, writer = await asyncio.open_connection(dst, port)
            for _ in range(megabytes * 16):
                writer.write(payload)
                await writer.drain()
            writer.close()

        async def main() -> None:
            jobs = []
            for i in range(pairs):
                a = sim.add_host(f"a{i}", up=10e6)
                b = sim.add_host(f"b{i}", down=10e6)
                server = await b.create_task(asyncio.start_server(sink, None, 0))
                jobs.append(a.create_task(send(b.address, server.sockets[0].getsockname()[1])))
            await asyncio.gather(*jobs)

        t0 = time.perf_counter()
        sim.run(main())
        return sim.trace.messages, time.perf_counter() - t0, sim.now


def dht_lookup(nodes: int, lookups: int, implementation: str = "overlay"
               ) -> tuple[dict[str, Any], float]:
    """The built-in dht-lookup scenario at `nodes` nodes: (summary, wall seconds)."""
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    result = run("dht-lookup", overrides={
        "topology.hosts": nodes, "workload.lookups": lookups,
        "workload.healthy_lookups": lookups, "dht.bootstrap_batch": max(20, nodes // 50),
        "dht.implementation": implementation, "workload.concurrency": 20})
    return result.summary, time.perf_counter() - t0


# name -> (built-in scenario, overrides): the sender-upload cases.
UPLOAD_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "nat-mix": ("nat-mix", {}),
    "family of 3": ("family-video", {
        "topology.hosts": 3, "workload.size_mb": {"dist": "fixed", "value": 20.0},
        "workload.online": {"process": "uniform", "window_s": 30.0},
        "workload.co_recipients": ["on"]}),
}


def sender_upload(seeds: list[int]) -> list[dict[str, Any]]:
    """Rows: per case and seed, what the sender uploaded and the completion times."""
    rows: list[dict[str, Any]] = []
    for name, (scenario, overrides) in UPLOAD_CASES.items():
        copies = []
        for seed in seeds:
            result = run(scenario, seed=seed, overrides=overrides)
            s = result.summary
            secs = [float(r["seconds"]) for r in result.rows if r.get("mode") == "on"]
            copies.append(s["on: MB from sender"] / float(s["clip_mb"]))
            tag = f"upload {name} seed {seed}"
            rows += [
                {"metric": f"{tag}: MB from sender", "value": float(s["on: MB from sender"]),
                 "unit": f"MB ({copies[-1]:.1f} copies)"},
                {"metric": f"{tag}: completion p50", "value": percentile(secs, 0.5), "unit": "s"},
                {"metric": f"{tag}: completion p95", "value": percentile(secs, 0.95), "unit": "s"},
            ]
        mean = sum(copies) / len(copies)
        target = name == "nat-mix"
        rows.append({"metric": f"upload {name}: copies from sender, mean", "value": mean,
                     "unit": "copies", "target": "< 3" if target else "",
                     "ok": mean < 3 if target else None})
    return rows


def main(argv: list[str]) -> int:
    """Run the workloads and report messages per wall-clock second."""
    p = argparse.ArgumentParser(prog="python -m benchmarks sim", description=__doc__)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--hops", type=int, default=100)
    p.add_argument("--dht-sizes", default="100,1000,10000",
                   help="comma-separated network sizes for our DHT")
    p.add_argument("--dht-lookups", type=int, default=1000,
                   help="lookups per phase (all alive, then 20%% dead)")
    p.add_argument("--kademlia-nodes", type=int, default=1000, help="0: skip the comparison")
    p.add_argument("--upload-seeds", default="1,2,3",
                   help="comma-separated seeds of the sender-upload cases (empty: skip)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for name, (msgs, wall, virtual) in (
            ("udp-relay", udp_relay(args.hosts, args.tokens, args.hops, plain=False)),
            ("udp-relay-plain", udp_relay(args.hosts, args.tokens, args.hops, plain=True)),
            ("tcp-stream", tcp_stream(4, 64))):
        rows.append({"metric": f"{name}: messages", "value": msgs, "unit": "msgs"})
        rows.append({"metric": f"{name}: virtual time", "value": virtual, "unit": "s"})
        rows.append({"metric": f"{name}: rate", "value": msgs / wall, "unit": "msgs/wall s",
                     "target": f">= {TARGET:,}" if name.startswith("udp") else "",
                     "ok": msgs / wall >= TARGET if name.startswith("udp") else None})
    sizes = [int(x) for x in args.dht_sizes.split(",") if x.strip()]
    runs = [(n, "overlay") for n in sizes]
    if args.kademlia_nodes:
        runs.append((args.kademlia_nodes, "kademlia"))
    for n, impl in runs:
        summary, wall = dht_lookup(n, args.dht_lookups, impl)
        big = impl == "overlay" and n == max(sizes)
        tag = f"dht-lookup {impl} {n:,} nodes"
        rows += [
            {"metric": f"{tag}: wall", "value": wall, "unit": "s",
             "target": "< 300" if big else "", "ok": wall < 300 if big else None},
            {"metric": f"{tag}: success, all alive", "value": summary["healthy: success_rate"],
             "unit": "of lookups", "target": ">= 0.995" if impl == "overlay" else "",
             "ok": summary["healthy: success_rate"] >= 0.995 if impl == "overlay" else None},
            {"metric": f"{tag}: p50, all alive", "value": summary["healthy: lookup_p50_s"],
             "unit": "s", "target": "< 0.3" if impl == "overlay" else "",
             "ok": summary["healthy: lookup_p50_s"] < 0.3 if impl == "overlay" else None},
            {"metric": f"{tag}: success, 20% dead", "value": summary["success_rate"],
             "unit": "of lookups"},
            {"metric": f"{tag}: p90, 20% dead", "value": summary["lookup_p90_s"], "unit": "s",
             "target": "< 1.5" if impl == "overlay" else "",
             "ok": summary["lookup_p90_s"] < 1.5 if impl == "overlay" else None},
            {"metric": f"{tag}: RPCs sent per lookup, 20% dead",
             "value": summary["queries_per_lookup"], "unit": "RPCs"},
            {"metric": f"{tag}: network messages while a lookup ran (all traffic), 20% dead",
             "value": summary["messages_per_lookup"], "unit": "msgs"},
            {"metric": f"{tag}: rate", "value": summary["messages_total"] / wall,
             "unit": "msgs/wall s"},
        ]
    upload_seeds = [int(x) for x in args.upload_seeds.split(",") if x.strip()]
    if upload_seeds:
        rows += sender_upload(upload_seeds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows += [
        {"metric": "peak RSS (whole run)", "value": rss, "unit": "MiB",
         "target": "< 8192", "ok": rss < 8192},
    ]
    report("sim", rows, out=args.out, meta=vars(args) | {"out": str(args.out)})
    return 0 if all(r.get("ok") is not False for r in rows) else 1
