"""`peerpost-sim`: run a scenario on the simulator and write its results.

    peerpost-sim list
    peerpost-sim run dht-lookup --seed 3 --out results/dht
    peerpost-sim run my.toml --set topology.hosts=1000 --set churn.dead_share=0.1
    peerpost-sim sweep dht-lookup --grid topology.hosts=100,200 --seeds 1,2,3 --out results/s

`run` shows progress (items done, virtual time), then writes DIR/NAME.csv (one row per
measured item), DIR/summary.json (the summary, the scenario with every default filled in,
the seed, the trace hash and the commit: what a citation needs) and the scenario's plots
as DIR/*.png, and prints the summary as a table. Ctrl-C writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from rendezvous.cliutil import (
    ArgumentParser,
    add_completion,
    add_version,
    completion_script,
    reader_may_leave,
)
from sim import sweep
from sim.plots import draw
from sim.scenario import (
    ScenarioError,
    ScenarioResult,
    builtin_names,
    load_scenario,
    run,
    scenario_source,
)
from sim.simulation import Simulation


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set key.path=value, the value read as TOML (numbers, booleans, strings, arrays,
    inline tables); anything else is a string."""
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
    """Write NAME.csv, summary.json and the PNG plots into `out`; returns the CSV path.

    The files an earlier run wrote there (summary.json's `files`) are deleted first: a
    folder holds one run's results, never a CSV or plot left from another beside them.
    """
    out.mkdir(parents=True, exist_ok=True)
    sweep.clear_earlier(out, "summary.json", "files")
    csv_path = out / f"{name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=result.columns)
        writer.writeheader()
        writer.writerows(result.rows)
    files = [csv_path.name, "summary.json", *(f"{p.name}.png" for p in result.plots)]
    (out / "summary.json").write_text(
        json.dumps({"summary": result.summary} | meta | {"files": files}, indent=2,
                   default=str))
    for plot in result.plots:
        draw(plot, out)
    return csv_path


def _commit() -> str | None:
    """The source tree's git commit (with "+dirty" when it has changes), if it is a repo."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "crypto", "rendezvous", "overlay", "sim"], check=True,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _versions() -> dict[str, str]:
    """Python's and the libraries' versions that a trace hash also depends on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("peerpost", "kademlia", "rpcudp", "pynacl", "cryptography"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _validate(args: argparse.Namespace, console: Console) -> int:
    bad = 0
    for name in args.scenario:
        try:
            spec = load_scenario(name, _parse_set(args.set))
        except ScenarioError as exc:
            bad += 1
            console.print(f"{escape(name)}: [red]{len(exc.problems)} problem"
                          f"{'s' if len(exc.problems) > 1 else ''}[/red]", highlight=False)
            for line in exc.problems:
                console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
            continue
        console.print(f"{escape(name)}: OK (runs as {spec.driver}, seed {spec.seed})",
                      highlight=False)
    return 2 if bad else 0


class _VirtualTime(ProgressColumn):
    """The running simulation's virtual time, read at each refresh of the bar."""

    def __init__(self, sims: list[Simulation]) -> None:
        super().__init__()
        self._sims = sims

    def render(self, task: Task) -> Text:
        return Text(f"virtual {self._sims[-1].now:,.1f}s" if self._sims else "virtual 0s")


def _run(args: argparse.Namespace, console: Console) -> int:
    spec = load_scenario(args.scenario, _parse_set(args.set))
    seed = spec.seed if args.seed is None else args.seed
    if not 0 <= seed < 2**63:  # as the scenario's own `seed` (a sweep's --seeds too)
        raise ScenarioError(f"--seed: {seed} is not in [0, 2^63)")
    out = Path(args.out) if args.out else Path("results") / spec.name
    sweep.check_out(out)
    sims: list[Simulation] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               _VirtualTime(sims), TimeElapsedColumn())
    counted = [0, 0]  # items done, of
    with Progress(*columns, console=console, disable=args.quiet) as bar:
        task = bar.add_task(spec.name, total=None)

        def progress(done: int, total: int) -> None:
            counted[:] = [done, total]
            bar.update(task, completed=done, total=total)

        try:
            result = run(spec, seed, progress=progress, on_simulation=sims.append)
        except KeyboardInterrupt:
            when = sims[-1].interrupted_at if sims else None
            at = f" at virtual time {when:,.1f} s" if when is not None else ""
            done = f", {counted[0]} of {counted[1]} items done" if counted[1] else ""
            console.print(f"interrupted{at}{done}: nothing written ({out} is as it was)",
                          highlight=False, markup=False, soft_wrap=True)
            return 130
    where, text = scenario_source(args.scenario)
    meta = {"scenario": spec.name, "runs_as": spec.driver, "seed": seed,
            "trace_hash": result.trace_hash, "commit": _commit(), "versions": _versions(),
            "scenario_file": where,
            "scenario_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "overrides": _parse_set(args.set), "document": spec.doc,
            "wall_s": result.wall_s, "callback_errors": result.callback_errors}
    csv_path = write_results(out, spec.name, result, meta)
    table = Table(title=f"{spec.name} (seed {seed})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        table.add_row(key, str(value))
    table.add_row("wall_s", f"{result.wall_s:.2f}")
    table.add_row("callback_errors", str(result.callback_errors))
    console.print(table)
    pngs = ", ".join(str(out / f"{p.name}.png") for p in result.plots)
    console.print(escape(f"wrote {csv_path}, {out / 'summary.json'}"
                  + (f" and {pngs}" if pngs else "")), soft_wrap=True)  # paths stay whole
    return 0 if result.callback_errors == 0 else 1


@reader_may_leave
def main(argv: list[str] | None = None) -> int:
    """Entry point of `peerpost-sim`."""
    parser: argparse.ArgumentParser = ArgumentParser(
        prog="peerpost-sim", description=__doc__,
        epilog="exit status: 0 ok, 1 callbacks raised during the run (sweep: a run failed), "
               "2 usage error or bad scenario, 130 interrupted (Ctrl-C)")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in scenarios")
    check = sub.add_parser("validate", help="check scenario files against the schema")
    check.add_argument("scenario", nargs="+", help="a TOML file or a built-in name")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set a key path first, e.g. topology.hosts=100; repeatable")
    runp = sub.add_parser("run", help="run a scenario (built-in name or TOML file)")
    runp.add_argument("scenario", help="a name from `peerpost-sim list`, or a TOML file")
    runp.add_argument("--seed", type=int, help="overrides the scenario's seed")
    runp.add_argument("--out", help="output folder (default: results/NAME); the files of "
                                    "an earlier run there are replaced")
    runp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="set a key path, e.g. topology.hosts=100 or "
                           "'topology.up={dist=\"fixed\", value=2.0}'; repeatable")
    runp.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_parser(sub)
    add_completion(sub, parser.prog)
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
        if args.command == "validate":
            return _validate(args, console)
        return _run(args, console)
    except ScenarioError as exc:
        # The text names files and keys as given: never markup, never wrapped mid-path.
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
