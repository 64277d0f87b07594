"""`peerpost-sim sweep`: one scenario over a grid of parameter values and seeds.

    peerpost-sim sweep dht-lookup --grid topology.hosts=100,200,400 \\
        --grid churn.dead_share=0,0.2 --seeds 1,2,3 --out results/sweep
    peerpost-sim sweep dht-lookup ... --dask tcp://scheduler:8786

Each KEY is a dotted path into the scenario document (`topology.hosts`, `dht.alpha`), each
value TOML (`0.2`, `true`, `"overlay"`, `[1, 2]`, `{none=0.5, symmetric=0.5}`: a table
replaces the whole table; a bare word is a string). The grid's documents are all checked
before the first run starts. Every combination of the grid times every seed is one run. Runs
go to a local process pool (`--workers`, default one per CPU), or with `--dask ADDRESS` to
an existing Dask cluster. A worker receives the scenario document as plain data, the seed,
and the scenario file's folder (relative file names in the document, such as a latency
matrix, are read from there: on a cluster that folder must be on a filesystem the workers
share), and returns plain data: the summary, the trace hash, the wall time and which worker
ran it.

The sweep writes DIR/sweep.csv (one row per run), DIR/sweep.json (the same rows with the
grid and seeds) and DIR/METRIC-vs-KEY.png for each numeric summary metric and each swept
key: the mean over seeds with min-max bars. A run that raised is a row with its error; the
sweep goes on and exits 1. Ctrl-C stops it: what finished is written, every other run is a
row whose error says it was not run, sweep.json has "interrupted": true; exit status 130.

The trace hash of a run is the simulation's event digest (sim.trace): it depends on the
scenario document and the seed only, so the same run gives the same hash in this process,
in a pool worker or on a Dask worker on another machine.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim import scenario as scenario_module
from sim.scenario import ScenarioError, parse_scenario

DASK_MISSING = ("--dask needs dask.distributed on this machine and on the workers: "
                "install peerpost[dask] (pip install 'peerpost[dask]')")

#: Columns every row has, after the swept keys and before the scenario's summary metrics.
LEAD_COLUMNS = ["seed"]
#: Columns every row has after the summary metrics.
TAIL_COLUMNS = ["virtual_s", "callback_errors", "trace_hash", "wall_s", "worker",
                "worker_address", "error"]


#: The `error` of a run that a Ctrl-C left unrun.
NOT_RUN = "not run: the sweep was interrupted (Ctrl-C)"


class SweepError(ScenarioError):
    """A grid, a seed list or a key is wrong; the message says which."""


@dataclass(frozen=True, slots=True)
class Run:
    """One point of the sweep: the swept values (in grid order) and the seed."""

    values: tuple[Any, ...]
    seed: int


# ---------------------------------------------------------------------------- grid parsing

def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: a string, as `run --set` reads it


def parse_grid_item(item: str) -> tuple[str, list[Any]]:
    """`KEY=V1,V2,...` -> (KEY, values); values are TOML scalars, a bare word a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise SweepError(f"--grid wants KEY=V1,V2,..., got {item!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
        raise SweepError(f"--grid key {key!r} must be a dotted path such as topology.hosts")
    if key == "seed":
        raise SweepError("the seed is swept with --seeds, not --grid")
    try:  # the whole list at once, so that a quoted "a,b" stays one value
        values = list(tomllib.loads(f"v = [{raw}]")["v"])
    except tomllib.TOMLDecodeError:
        values = [_toml_value(part.strip()) for part in raw.split(",")]
    if not values or any(v == "" for v in values):
        raise SweepError(f"--grid {key}: empty value in {raw!r}")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise SweepError(f"--grid {key}: a value is given twice in {raw!r}")
    return key, values


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """Every --grid option, in the order given; a key given twice is an error."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, values = parse_grid_item(item)
        if key in grid:
            raise SweepError(f"--grid {key} is given twice")
        grid[key] = values
    return grid


def parse_seeds(raw: str) -> list[int]:
    """`1,2,3` or `1-5` (inclusive), or a mix: `1-3,10`."""
    seeds: list[int] = []
    for part in raw.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise SweepError(f"--seeds wants integers like 1,2,3 or 1-5, got {raw!r}") from None
        if last < first:
            raise SweepError(f"--seeds {part.strip()}: an empty range (write {last}-{first})")
        seeds.extend(range(first, last + 1))
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds wants distinct integers, got {raw!r}")
    return seeds


def set_path(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` in `doc`, creating missing tables."""
    *tables, leaf = key.split(".")
    node = doc
    for i, name in enumerate(tables):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise SweepError(f"--grid {key}: {'.'.join(tables[:i + 1])} is not a table")
        node = child
    if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
        raise SweepError(f"--grid {key} is a table: give tables ({{a=1, b=2}}) or name a "
                         "value inside it")
    node[leaf] = value  # a table replaces the whole table: shares that must sum to 1 stay so


@dataclass(frozen=True, slots=True)
class Scenario:
    """A scenario document as plain data: what a worker receives besides the seed."""

    doc: dict[str, Any]
    base: str  # absolute folder that relative file names in `doc` are read from
    name: str
    source: str = ""  # the file, or sim/scenarios/NAME.toml for a built-in
    sha256: str = ""  # of the file's text


def load_document(name_or_path: str) -> Scenario:
    """A built-in scenario (by name) or a scenario file (by path), not yet checked."""
    doc, base, stem = scenario_module.load_document(name_or_path)
    where, text = scenario_module.scenario_source(name_or_path)
    return Scenario(doc, str(base.resolve()), str(doc.get("name", stem)), where,
                    hashlib.sha256(text.encode()).hexdigest())


def check(scenario: Scenario, doc: dict[str, Any]) -> None:
    """Validate a document of `scenario` (raises ScenarioError naming the key)."""
    parse_scenario(doc, base=Path(scenario.base), default_name=scenario.name)


def plan(scenario: Scenario, grid: Mapping[str, list[Any]],
         seeds: Sequence[int]) -> list[Run]:
    """Every combination of the grid times every seed, each checked as a scenario first."""
    runs: list[Run] = []
    for values in itertools.product(*grid.values()):
        try:
            check(scenario, document_for(scenario.doc, grid, values))
        except ScenarioError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(grid, values, strict=True))
            raise SweepError(f"{shown}: {exc}") from None
        runs.extend(Run(tuple(values), seed) for seed in seeds)
    return runs


def document_for(doc: Mapping[str, Any], grid: Mapping[str, list[Any]],
                 values: Sequence[Any]) -> dict[str, Any]:
    """A copy of `doc` with each swept key set to its value."""
    point = copy.deepcopy(dict(doc))
    for key, value in zip(grid, values, strict=True):
        set_path(point, key, value)
    return point


# ------------------------------------------------------------------------------ one run

def _plain(value: Any) -> Any:
    """A summary value as JSON-able data (numbers, strings, booleans, None, lists)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def simulate(doc: dict[str, Any], seed: int, base: str = ".",
             name: str = "scenario") -> tuple[dict[str, Any], str, float, int]:
    """Run the scenario `doc` with `seed`: (summary, trace hash, virtual s, callback errors)."""
    spec = parse_scenario(doc, base=Path(base), default_name=name)
    result = scenario_module.run(spec, seed)
    return result.summary, result.trace_hash, result.virtual_s, result.callback_errors


def run_one(doc: dict[str, Any], seed: int, base: str = ".", name: str = "scenario",
            on_dask: bool = False) -> dict[str, Any]:
    """One run, as a pool or Dask worker does it: plain data in, plain data out.

    Never raises for a failing scenario: the error text is in "error".
    """
    out: dict[str, Any] = {"seed": seed, "worker": f"{socket.gethostname()}:{os.getpid()}",
                           "worker_address": _dask_address() if on_dask else ""}
    start = time.perf_counter()
    try:
        summary, digest, virtual, errors = simulate(doc, seed, base, name)
    except Exception as exc:  # a failed run is a row, not a failed sweep
        out |= {"error": f"{type(exc).__name__}: {exc}", "summary": {},
                "wall_s": round(time.perf_counter() - start, 3)}
        return out
    metrics = {str(k): _plain(v) for k, v in summary.items()
               if k not in ("trace_hash", "trace_digest")}
    metrics.setdefault("virtual_s", round(virtual, 3))
    out |= {"summary": metrics, "trace_hash": digest, "callback_errors": errors,
            "wall_s": round(time.perf_counter() - start, 3),
            "error": f"{errors} callbacks raised during the run" if errors else ""}
    return out


def _dask_address() -> str:
    try:
        distributed: Any = importlib.import_module("distributed")
        return str(distributed.get_worker().address)
    except (ImportError, ValueError):
        return ""


# -------------------------------------------------------------------------- executors

Submit = Generator[tuple[int, dict[str, Any]], None, None]  # (run index, outcome)


def _local(scenario: Scenario, grid: Mapping[str, list[Any]], runs: Sequence[Run],
           workers: int) -> Submit:
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future[dict[str, Any]], int] = {
            pool.submit(run_one, document_for(scenario.doc, grid, r.values), r.seed,
                        scenario.base, scenario.name): i for i, r in enumerate(runs)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], _outcome(fut.result, runs[futures[fut]])
        finally:
            for fut in futures:
                fut.cancel()


def _dask(scenario: Scenario, grid: Mapping[str, list[Any]], runs: Sequence[Run],
          address: str) -> Submit:
    try:  # typed as Any: dask.distributed's functions carry no annotations
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        raise SweepError(DASK_MISSING) from None
    try:
        client = distributed.Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        futures = {client.submit(run_one, document_for(scenario.doc, grid, r.values), r.seed,
                                 scenario.base, scenario.name, True, pure=False): i
                   for i, r in enumerate(runs)}
        try:
            for fut in distributed.as_completed(list(futures)):
                yield futures[fut], _outcome(fut.result, runs[futures[fut]])
        finally:
            client.cancel(list(futures))
    finally:
        client.close()


def _outcome(result: Callable[[], dict[str, Any]], run: Run) -> dict[str, Any]:
    try:
        return result()
    except Exception as exc:  # a worker that died or raised: a row
        return {"seed": run.seed, "summary": {}, "worker": "", "worker_address": "",
                "error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- results

def row_for(grid: Mapping[str, list[Any]], run: Run, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: the swept values, the seed, the summary metrics, then the run's facts."""
    row: dict[str, Any] = dict(zip(grid, run.values, strict=True))
    row["seed"] = run.seed
    row |= outcome.get("summary", {})
    for column in TAIL_COLUMNS:
        row.setdefault(column, outcome.get(column, ""))
    return row


def columns_of(grid: Mapping[str, list[Any]], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Swept keys, seed, every summary metric (in order of first appearance), run facts."""
    fixed = [*grid, *LEAD_COLUMNS]
    metrics: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in fixed and key not in TAIL_COLUMNS:
                metrics[key] = None
    tail = [c for c in TAIL_COLUMNS if c not in metrics]
    return [*fixed, *metrics, *tail]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def numeric_metrics(grid: Mapping[str, list[Any]],
                    rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Metrics with a number in some successful run (wall_s and virtual_s included): those
    that vary between runs, and those the same in every run (in the CSV, not plotted)."""
    skip = {*grid, "seed", "callback_errors", "trace_hash", "worker", "worker_address",
            "error"}
    seen: dict[str, set[float]] = {}
    for row in rows:
        if row.get("error"):
            continue
        for key, value in row.items():
            if key not in skip and (number := _number(value)) is not None:
                seen.setdefault(key, set()).add(number)
    varying = [k for k, values in seen.items() if len(values) > 1 or len(rows) == 1]
    return varying, [k for k in seen if k not in varying]


def slug(text: str) -> str:
    """A file-name piece: letters, digits and dashes."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _label(value: Any) -> str:
    if isinstance(value, dict):  # an inline table, as written: {none=0.5, symmetric=0.5}
        return "{" + ", ".join(f"{k}={_label(v)}" for k, v in value.items()) + "}"
    return value if isinstance(value, str) else json.dumps(value)


def draw_plots(title: str, grid: Mapping[str, list[Any]], rows: Sequence[Mapping[str, Any]],
               metrics: Sequence[str], out: Path) -> list[Path]:
    """METRIC-vs-KEY.png: the mean over seeds with min-max bars, one line per combination
    of the other swept keys (all of them pooled when there are more than six)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    taken: set[str] = set()
    ok = [r for r in rows if not r.get("error")]
    # A run on the cheaper stand-in for the DHT's signatures says so in its summary.
    fast = " [fast signatures]" if any(r.get("signatures") for r in ok) else ""
    for metric in metrics:
        for key, xs in grid.items():
            if len(xs) < 2:
                continue  # a key held at one value is a setting, not an axis
            others = [k for k in grid if k != key and len(grid[k]) > 1]
            combos = list(itertools.product(*(grid[k] for k in others)))
            pooled = len(combos) > 6
            numeric_x = all(_number(x) is not None for x in xs)
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
            try:
                for combo in [()] if pooled else combos:
                    pts: list[tuple[float, float, float, float]] = []
                    for i, x in enumerate(xs):
                        ys = [y for r in ok
                              if r[key] == x and (pooled or all(
                                  r[k] == v for k, v in zip(others, combo, strict=True)))
                              and (y := _number(r.get(metric))) is not None]
                        if ys:
                            at = float(x) if numeric_x else float(i)
                            pts.append((at, sum(ys) / len(ys), min(ys), max(ys)))
                    if not pts:
                        continue
                    label = ("all other values pooled" if pooled and others else
                             ", ".join(f"{k}={_label(v)}"
                                       for k, v in zip(others, combo, strict=True)) or None)
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                                marker="o", capsize=4, label=label)
                if numeric_x:
                    spans = [float(x) for x in xs]
                    if min(spans) > 0 and max(spans) >= 20 * min(spans):
                        ax.set_xscale("log")  # e.g. hosts from 100 to 10,000
                        ax.minorticks_off()
                    ax.set_xticks(spans, [_label(x) for x in xs])
                else:
                    ax.set_xticks(range(len(xs)), [_label(x) for x in xs])
                seeds = len({r["seed"] for r in rows})
                ax.set_title(f"{title}: {metric}{fast}\nmean of {seeds} seed"
                             f"{'s' if seeds > 1 else ''}, bars from min to max",
                             fontsize="medium")
                ax.set_xlabel(key)
                ax.set_ylabel(metric)
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[1]:
                    ax.legend(loc="best", fontsize="small")
                fig.tight_layout()
                name = f"{slug(metric)}-vs-{slug(key)}"
                while name in taken:
                    name += "-"
                taken.add(name)
                path = out / f"{name}.png"
                fig.savefig(path)
                paths.append(path)
            finally:
                plt.close(fig)
    return paths


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def check_out(out: Path) -> None:
    """Refuse, before anything runs, an output folder that cannot be written: a file of
    that name, or a parent that is a file or not writable (found only at the end, the
    results were lost)."""
    if out.exists() and not out.is_dir():
        raise ScenarioError(f"--out {out}: a file of that name exists; give a folder")
    first = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not first.is_dir():
        raise ScenarioError(f"--out {out}: {first} is a file, not a folder")
    if not os.access(first, os.W_OK | os.X_OK):
        raise ScenarioError(f"--out {out}: {first} is not writable")


def clear_earlier(out: Path, manifest: str, key: str) -> list[str]:
    """Delete the files an earlier run or sweep wrote into `out`, as its `manifest` (JSON)
    lists them under `key`, so that what `out` holds afterwards is one run's; other files
    stay. Returns the names deleted."""
    try:
        listed = json.loads((out / manifest).read_text()).get(key, [])
    except (OSError, ValueError, AttributeError):
        return []
    gone = []
    for name in listed if isinstance(listed, list) else []:
        path = out / str(name)
        if path.parent == out and path.is_file():  # a plain name, never a path elsewhere
            path.unlink()
            gone.append(str(name))
    return gone


def write_outputs(out: Path, scenario: str, grid: Mapping[str, list[Any]], seeds: Sequence[int],
                  rows: Sequence[Mapping[str, Any]],
                  plot_metrics: Sequence[str] | None = None,
                  meta: Mapping[str, Any] | None = None,
                  ) -> tuple[list[Path], dict[str, str]]:
    """sweep.csv, sweep.json and the plots; returns every path written, and the metrics
    not plotted with the reason. An earlier sweep's plots in `out` are deleted first."""
    out.mkdir(parents=True, exist_ok=True)
    clear_earlier(out, "sweep.json", "plots")
    columns = columns_of(grid, rows)
    csv_path = out / "sweep.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    metrics, constant = numeric_metrics(grid, rows)
    not_plotted = {m: "the same in every run" for m in constant}
    if plot_metrics is not None:
        not_plotted = {m: why for m, why in not_plotted.items() if m in plot_metrics}
        not_plotted |= {m: "no number in any successful run" for m in plot_metrics
                        if m not in metrics and m not in constant}
        metrics = [m for m in metrics if m in plot_metrics]
    pngs = draw_plots(scenario, grid, rows, metrics, out)
    json_path = out / "sweep.json"
    json_path.write_text(json.dumps({
        "scenario": scenario, **(meta or {}), "grid": grid, "seeds": list(seeds),
        "columns": columns,
        "runs": list(rows), "failed": sum(1 for r in rows if r.get("error")),
        "plots": [p.name for p in pngs], "not_plotted": not_plotted}, indent=2, default=str))
    return [csv_path, json_path, *pngs], not_plotted


# ----------------------------------------------------------------------------- command

def sweep(scenario: Scenario, grid: Mapping[str, list[Any]], seeds: Sequence[int],
          out: Path, *, workers: int | None = None, dask: str | None = None,
          plot_metrics: Sequence[str] | None = None,
          log: Callable[[str], None] | None = None,
          ) -> tuple[list[dict[str, Any]], list[Path], dict[str, str]]:
    """Run every combination of `grid` times `seeds`; write the results into `out`.

    Returns the rows (in grid order, then seed order), the paths written and the metrics
    not plotted (with the reason).
    """
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    runs = plan(scenario, grid, seeds)
    name = scenario.name
    n = workers or os.cpu_count() or 1
    where = f"the Dask cluster at {dask}" if dask else \
        f"{n} local worker process{'' if n == 1 else 'es'}"
    say(f"sweep {name}: {_count(len(runs), 'run')} ("
        f"{_count(len(runs) // len(seeds), 'combination')} x {_count(len(seeds), 'seed')}) "
        f"on {where}")
    done: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    results = (_dask(scenario, grid, runs, dask) if dask
               else _local(scenario, grid, runs, n))
    interrupted = False
    try:
        for i, outcome in results:
            run = runs[i]
            done[i] = row_for(grid, run, outcome)
            elapsed = time.perf_counter() - start
            eta = elapsed / len(done) * (len(runs) - len(done))
            shown = " ".join(f"{k}={_label(v)}" for k, v in zip(grid, run.values, strict=True))
            status = f"FAILED: {outcome['error']}" if outcome.get("error") else \
                f"{outcome.get('wall_s', 0):.1f} s"
            say(f"run {len(done)}/{len(runs)} done ({shown}{' ' if shown else ''}"
                f"seed={run.seed}) {status}; ETA {eta:.0f} s")
    except KeyboardInterrupt:
        # Ctrl-C: keep the runs that finished; the others are rows marked as not run.
        interrupted = True
        say(f"interrupted: {len(done)} of {len(runs)} runs done; writing those")
    finally:
        results.close()  # cancels what is queued or running
    rows = [done[i] if i in done else row_for(grid, runs[i], {"error": NOT_RUN})
            for i in range(len(runs))]
    from sim.cli import _commit, _versions  # sim.cli imports this module

    meta = {"scenario_file": scenario.source, "scenario_sha256": scenario.sha256,
            "commit": _commit(), "versions": _versions(), "document": scenario.doc,
            "interrupted": interrupted}
    paths, not_plotted = write_outputs(out, name, grid, seeds, rows, plot_metrics, meta)
    return rows, paths, not_plotted


def add_parser(sub: Any) -> None:
    """The `sweep` subcommand's arguments (`sub` is the CLI's subparsers object)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "sweep", help="run a scenario over a grid of values and seeds (process pool or Dask)",
        description=__doc__)
    p.add_argument("scenario", help="a name from `peerpost-sim list`, or a TOML file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a dotted key of the scenario and its values (TOML); repeatable, "
                        "every combination runs")
    p.add_argument("--seeds", default="1", help="seeds, e.g. 1,2,3 or 1-5 (default: 1)")
    p.add_argument("--out", default="results/sweep", help="output folder")
    p.add_argument("--workers", type=int, metavar="N",
                   help="local worker processes (default: one per CPU)")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://scheduler:8786 "
                        "(needs peerpost[dask])")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="plot only this summary metric; repeatable (default: every numeric one)")


def command(args: argparse.Namespace) -> int:
    """`peerpost-sim sweep`: 0 every run ok, 1 some run failed, 2 bad grid or scenario,
    130 interrupted (what finished is written)."""
    try:
        if args.workers is not None and args.workers < 1:
            raise SweepError("--workers wants a positive number")
        if args.dask:
            try:
                import distributed  # noqa: F401
            except ImportError:
                raise SweepError(DASK_MISSING) from None
        scenario = load_document(args.scenario)
        check_out(Path(args.out))
        rows, paths, not_plotted = sweep(scenario, parse_grid(args.grid), parse_seeds(args.seeds),
                            Path(args.out), workers=args.workers, dask=args.dask,
                            plot_metrics=args.metric)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.get("error")]
    unrun = sum(1 for r in failed if r["error"] == NOT_RUN)
    print(f"{len(rows) - len(failed)}/{len(rows)} runs ok"
          + (f", {len(failed) - unrun} failed (see the error column)"
             if len(failed) > unrun else "")
          + (f", {unrun} not run (interrupted; sweep.json says \"interrupted\": true)"
             if unrun else ""))
    for metric, why in not_plotted.items():
        print(f"not plotted: {metric} ({why})")
    csv_path, json_path, *pngs = paths
    print(f"wrote {csv_path}, {json_path}"
          + (f" and {len(pngs)} plot{'s' if len(pngs) > 1 else ''} in {csv_path.parent}: "
             + ", ".join(p.name for p in pngs)
             if pngs else ""))
    return 130 if unrun else 1 if failed else 0
