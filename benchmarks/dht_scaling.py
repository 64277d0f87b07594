"""DHT scaling: RPCs and hops per provider lookup against log2 N, on the simulator.

`python -m benchmarks dht_scaling [--sizes 100,300,1000,3000,10000] [--lookups 200]
[--signatures real|fast] [--out PATH]`

Each size runs the built-in `dht-lookup` scenario (sim.scenario.run, the same entry point
as `peerpost-sim run`) with every node alive: N nodes bootstrap in waves of 50, 20
contents are announced, then `--lookups` `find_providers(limit=1)` run 10 at a time from
random nodes. Per lookup: the RPCs the looking node sent and its hops (the longest chain of
answers the lookup followed; a node from its own routing table is one hop). Each size runs
in its own process, so its wall time and peak RSS are its own.

It writes the table and JSON (benchmarks/out/dht_scaling.json, or --out) and a plot beside
the JSON with the same name (dht_scaling.png): hops and RPCs per lookup against N on a log
axis with the log2 N line and each series' least-squares fit a + b * log2 N. With
`--signatures fast` the DHT's Ed25519 is replaced by a keyed hash (sim.fastsig); the table
and the plot title say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report

BATCH = 50


def one(nodes: int, lookups: int, seed: int, signatures: str) -> dict[str, Any]:
    """Run one size in this process; its figures (what `--one` prints as JSON)."""
    from sim.scenario import run

    t0 = time.perf_counter()
    result = run("dht-lookup", seed, {
        "topology.hosts": nodes, "workload.healthy_lookups": 0,
        "workload.lookups": lookups, "churn.dead_share": 0.0,
        "dht.bootstrap_batch": BATCH, "simulation.signatures": signatures})
    wall = time.perf_counter() - t0
    rows = result.rows
    hops = [r["hops"] for r in rows]
    rpcs = [r["queries"] for r in rows]

    def q(values: list[float], x: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(x * len(ordered)))]

    return {
        "nodes": nodes, "log2_n": math.log2(nodes), "lookups": len(rows),
        "success_rate": sum(r["found"] for r in rows) / len(rows),
        "hops_mean": statistics.mean(hops), "hops_p90": q(hops, 0.9),
        "rpcs_mean": statistics.mean(rpcs), "rpcs_p90": q(rpcs, 0.9),
        "lookup_p50_s": q([r["seconds"] for r in rows], 0.5),
        "bootstrap_virtual_s": result.summary.get("bootstrap_virtual_s"),
        "messages_total": result.summary.get("messages_total"),
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trace_hash": result.trace_hash,
        "signatures": signatures,
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, r^2)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def plot(results: list[dict[str, Any]], path: Path, note: str) -> None:
    """Hops and RPCs per lookup against N (log axis), the log2 N line and the fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["nodes"] for r in results]
    logs = [math.log2(n) for n in ns]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "hops_mean", "hops per lookup"),
                           (axes[1], "rpcs_mean", "RPCs per lookup")):
        ys = [r[key] for r in results]
        a, b, r2 = fit(logs, ys)
        ax.plot(ns, ys, "o-", label=f"measured (mean of {results[0]['lookups']})")
        ax.plot(ns, logs, "k--", label="log2 N")
        ax.plot(ns, [a + b * x for x in logs], ":",
                label=f"fit {a:.2f} + {b:.2f} log2 N (r² {r2:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("nodes N")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DHT provider lookups against log2 N (simulated, all nodes alive){note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Run every size (each in a child process), print the table, write JSON and PNG."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks dht_scaling",
                                     description=__doc__)
    parser.add_argument("--sizes", default="100,300,1000,3000,10000")
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--signatures", choices=("real", "fast"), default="real")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.lookups, args.seed, args.signatures)))
        return 0
    load = os.getloadavg()
    results: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks", "dht_scaling", "--one", str(n),
             "--lookups", str(args.lookups), "--seed", str(args.seed),
             "--signatures", args.signatures],
            capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"N={n}: hops {r['hops_mean']:.2f}, RPCs {r['rpcs_mean']:.1f}, "
              f"wall {r['wall_s']:.0f} s, RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    note = " [fast signatures: keyed BLAKE2b, not Ed25519]" if args.signatures == "fast" else ""
    rows: list[dict[str, Any]] = []
    for r in results:
        size = f"N={r['nodes']:,}"
        rows += [
            {"metric": f"{size}: hops per lookup (mean, p90)",
             "value": f"{r['hops_mean']:.2f}, {r['hops_p90']}", "unit": "hops",
             "target": f"log2 N = {r['log2_n']:.1f}"},
            {"metric": f"{size}: RPCs per lookup (mean, p90)",
             "value": f"{r['rpcs_mean']:.1f}, {r['rpcs_p90']}", "unit": "RPCs"},
            {"metric": f"{size}: success, lookup p50", "unit": "s",
             "value": f"{r['success_rate']:.3f}, {r['lookup_p50_s']:.3f}"},
            {"metric": f"{size}: wall, peak RSS", "unit": "s, MB",
             "value": f"{r['wall_s']:.0f}, {r['peak_rss_mb']:.0f}"},
        ]
    if len(results) >= 2:
        logs = [r["log2_n"] for r in results]
        for key, what in (("hops_mean", "hops"), ("rpcs_mean", "RPCs")):
            a, b, r2 = fit(logs, [r[key] for r in results])
            rows.append({"metric": f"{what} per lookup = a + b log2 N: a, b, r²",
                         "value": f"{a:.2f}, {b:.3f}, {r2:.3f}", "unit": "",
                         "target": "b > 0", "ok": b > 0})
    if note:
        rows.insert(0, {"metric": "signatures", "value": note.strip(" []"), "unit": ""})
    out = report("dht_scaling", rows, out=args.out, meta={
        "sizes": [r["nodes"] for r in results], "lookups": args.lookups, "seed": args.seed,
        "signatures": args.signatures, "bootstrap_batch": BATCH,
        "setup": "built-in dht-lookup scenario, every node alive, RTT uniform 20-200 ms, "
                 "ksize 20, alpha 3, 20 keys, lookups 10 at a time",
        "results": results, "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()]})
    png = out.with_suffix(".png")
    plot(results, png, note)
    print(f"wrote {png}")
    return 0 if all(r.get("ok") is not False for r in rows) else 1
