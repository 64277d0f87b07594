"""`peerpost-sim`: run a scenario on the simulator and write its results.

    peerpost-sim list
    peerpost-sim run dht-lookup --seed 3 --out results/dht
    peerpost-sim run my.toml --set nodes=1000 --set dead_fraction=0.1
    peerpost-sim sweep dht-lookup --grid params.nodes=100,200 --seeds 1,2,3 --out results/s

`run` shows progress (steps done, virtual time), then writes DIR/NAME.csv (one row per
measured item), DIR/summary.json (the summary, the scenario and the seed) and prints the
summary as a table, and draws the scenario's plots as DIR/*.png (CDFs and time series).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import tomllib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rendezvous.cliutil import add_completion, add_version, completion_script, finish
from sim import sweep
from sim.plots import draw
from sim.scenario import (
    ScenarioError,
    ScenarioResult,
    build_simulation,
    builtin_names,
    load_scenario,
)
from sim.scenarios import runner_for


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value, with value read as a TOML value (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set wants key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out


def write_results(out: Path, name: str, result: ScenarioResult, meta: dict[str, Any]) -> Path:
    """Write NAME.csv, summary.json and the PNG plots into `out`; returns the CSV path."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=result.columns)
        writer.writeheader()
        writer.writerows(result.rows)
    (out / "summary.json").write_text(
        json.dumps({"summary": result.summary} | meta, indent=2, default=str))
    for plot in result.plots:
        draw(plot, out)
    return csv_path


def _run(args: argparse.Namespace, console: Console) -> int:
    spec = load_scenario(args.scenario)
    if args.set:
        spec = replace(spec, params=spec.params | _parse_set(args.set))
    seed = spec.seed if args.seed is None else args.seed
    # Lost RPCs are what a scenario measures; the packages would print each one. The real
    # nodes and servers log as they do at home (a node waiting for its server, a source
    # gone): hundreds of hosts would bury the progress bar, and the CSV has the outcome.
    for noisy in ("kademlia", "rpcudp"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    for chatty in ("peerpost", "overlay", "rendezvous", "aioice"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    runner = runner_for(spec.kind)
    sim = build_simulation(spec.network, seed)
    wall = time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("virtual {task.fields[vt]}"), TimeElapsedColumn())
    with sim, Progress(*columns, console=console, disable=args.quiet) as bar:
        task = bar.add_task(spec.name, total=None, vt="0s")

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, vt=f"{sim.now:,.1f}s")

        result = runner(sim, spec, progress)
        errors = len(sim.errors)
    elapsed = time.perf_counter() - wall
    meta = {"scenario": spec.name, "kind": spec.kind, "seed": seed,
            "network": asdict(spec.network), "params": spec.params,
            "wall_s": round(elapsed, 3), "callback_errors": errors}
    csv_path = write_results(Path(args.out), spec.name, result, meta)
    table = Table(title=f"{spec.name} (seed {seed})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        table.add_row(key, str(value))
    table.add_row("wall_s", f"{elapsed:.2f}")
    table.add_row("callback_errors", str(errors))
    console.print(table)
    pngs = ", ".join(f"{p.name}.png" for p in result.plots)
    console.print(f"wrote {csv_path}, {Path(args.out) / 'summary.json'}"
                  + (f" and {pngs}" if pngs else ""))
    return 0 if errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `peerpost-sim`."""
    parser = argparse.ArgumentParser(prog="peerpost-sim", description=__doc__,
                                     epilog="exit status: 0 ok, 1 callbacks raised during the run, "
                                            "2 usage error or bad scenario")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in scenarios")
    run = sub.add_parser("run", help="run a scenario (built-in name or TOML file)")
    run.add_argument("scenario", help="a name from `peerpost-sim list`, or a TOML file")
    run.add_argument("--seed", type=int, help="overrides the scenario's seed")
    run.add_argument("--out", default="results", help="output folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a [params] value; repeatable")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_parser(sub)
    add_completion(sub, parser.prog)
    finish(parser)
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    console = Console()
    if args.command == "sweep":
        return sweep.command(args)
    if args.command == "list":
        for name in builtin_names():
            console.print(name)
        return 0
    try:
        return _run(args, console)
    except ScenarioError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
