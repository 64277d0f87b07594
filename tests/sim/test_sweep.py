"""`peerpost-sim sweep`: every combination times every seed is one row, on a local process
pool and on a real Dask cluster (scheduler and two workers as processes on loopback), and a
run's trace hash is the same on a worker as in this process."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from sim.cli import main
from sim.sweep import (
    SweepError,
    document_for,
    load_document,
    parse_grid,
    parse_seeds,
    run_one,
)

# A small dht-lookup: about half a second of wall time per run.
LOOKUPS = ["--grid", "workload.keys=3", "--grid", "workload.lookups=8",
           "--grid", "workload.healthy_lookups=0", "--grid", "dht.bootstrap_batch=10"]
LOOKUP_KEYS = ["workload.keys", "workload.lookups", "workload.healthy_lookups",
               "dht.bootstrap_batch"]
# A small family-video: real nodes, server, DHT and crypto; under a second per run.
CLIP = ["--grid", "workload.size_mb.value=1.0", "--grid", "workload.online.window_s=5.0",
        "--grid", 'workload.co_recipients=["on"]']
TAIL = ["virtual_s", "callback_errors", "trace_hash", "wall_s", "worker", "worker_address",
        "error"]


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


def test_grid_values_are_toml_and_mistakes_name_the_option() -> None:
    assert parse_grid(["topology.hosts=30,50", 'dht.implementation=overlay,"kademlia"',
                       'name="a,b","c"', "topology.loss=0.0,0.1", "x.y=true,false",
                       'workload.co_recipients=["on"],["off","on"]']) == {
        "topology.hosts": [30, 50], "dht.implementation": ["overlay", "kademlia"],
        "name": ["a,b", "c"], "topology.loss": [0.0, 0.1], "x.y": [True, False],
        "workload.co_recipients": [["on"], ["off", "on"]]}
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(SweepError, match=r"--seeds 5-1: an empty range \(write 1-5\)"):
        parse_seeds("5-1")
    for bad, said in [("topology.hosts", "KEY=V1,V2"), ("seed=1,2", "--seeds"),
                      ("topology.hosts=1,1", "given twice"), ("topology..x=1", "dotted path"),
                      ("topology.hosts=1,,2", "empty value")]:
        with pytest.raises(SweepError, match=said):
            parse_grid([bad])
    with pytest.raises(SweepError, match="--seeds"):
        parse_seeds("one")
    original = load_document("dht-lookup").doc
    doc = document_for(original, {"topology.hosts": [30]}, [30])
    assert doc["topology"]["hosts"] == 30 and original["topology"]["hosts"] != 30
    with pytest.raises(SweepError, match="is a table"):
        document_for(original, {"topology": [1]}, [1])
    nat = parse_grid(["topology.nat={none=0.5, symmetric=0.5},{symmetric=1.0}"])
    assert nat == {"topology.nat": [{"none": 0.5, "symmetric": 0.5}, {"symmetric": 1.0}]}
    mixed = load_document("nat-mix").doc
    assert document_for(mixed, nat, [{"symmetric": 1.0}])["topology"]["nat"] == {
        "symmetric": 1.0}  # the whole table, not merged into the file's four shares


def test_local_pool_sweep_writes_a_row_per_run_plots_and_failures_as_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    # A metric the run does not produce fails that run once it has run: those runs are rows.
    measured = '["found","lookup_p90_s","messages_total"],["no_such_metric"]'
    code = main(["sweep", "dht-lookup", "--grid", "topology.hosts=30,40",
                 "--grid", f"measure.metrics={measured}", *LOOKUPS, "--seeds", "1,2",
                 "--workers", "2", "--out", str(out), "--metric", "lookup_p90_s",
                 "--metric", "messages_total", "--metric", "lookup_p09_s"])
    said = capsys.readouterr()
    assert code == 1  # some run failed
    rows = _rows(out)
    assert len(rows) == 2 * 2 * 2
    columns = list(rows[0])
    assert columns[:7] == ["topology.hosts", "measure.metrics", *LOOKUP_KEYS, "seed"]
    assert columns[-len(TAIL):] == TAIL
    assert {"found", "lookup_p90_s", "messages_total"} <= set(columns)
    assert [(r["topology.hosts"], r["seed"]) for r in rows] == [
        (n, s) for n in ("30", "40") for _ in range(2) for s in ("1", "2")]
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 4
    assert all(r["measure.metrics"] == '["no_such_metric"]' for r in failed)
    assert all("'no_such_metric' not produced by this run" in r["error"] for r in failed)
    ok = [r for r in rows if not r["error"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["trace_hash"]) for r in ok)
    assert all(float(r["wall_s"]) > 0 and r["worker"] for r in ok)
    assert len({r["trace_hash"] for r in ok}) == 4  # each host count and seed its own run
    assert "4/8 runs ok, 4 failed" in said.out
    assert "not plotted: lookup_p09_s (no number in any successful run)" in said.out
    assert "run 8/8 done" in said.err and "ETA" in said.err
    plots = {p.name for p in out.glob("*.png")}
    assert plots == {f"{m}-vs-{k}.png" for m in ("lookup-p90-s", "messages-total")
                     for k in ("topology-hosts", "measure-metrics")}
    assert all((out / p).stat().st_size > 10_000 for p in plots)
    assert all(p in said.out for p in plots)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["failed"] == 4 and len(doc["runs"]) == 8 and doc["seeds"] == [1, 2]
    assert doc["grid"]["topology.hosts"] == [30, 40]
    assert doc["versions"]["rpcudp"] == "5.0.1"  # a trace hash depends on it too


def test_without_dask_the_sweep_says_what_to_install(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if absent
    assert main(["sweep", "dht-lookup", "--grid", "topology.hosts=30", "--dask",
                 "tcp://127.0.0.1:1", "--out", str(tmp_path)]) == 2
    assert "install peerpost[dask]" in capsys.readouterr().err


def test_a_wrong_key_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "dht-lookup", "--grid", "topology.latncy=1,2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "topology.latncy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- a real Dask cluster

class _Process:
    """A child process whose stderr is read line by line until a pattern shows up."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first stderr line matching `pattern` (raises after `timeout` s without it)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} from {self.proc.args!r}:\n"
                                     + "".join(self.seen[-30:])) from None
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """tcp://127.0.0.1:PORT of a fresh scheduler, and its two workers' addresses."""
    if importlib.util.find_spec("distributed") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dask.distributed is missing in CI (pip install -e '.[test]')")
        pytest.skip("dask.distributed is not installed (pip install 'peerpost[dask]')")
    started: list[_Process] = []
    try:
        scheduler = _Process([sys.executable, "-m", "distributed.cli.dask_scheduler",
                              "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                             tmp_path, dict(os.environ))
        started.append(scheduler)
        address = scheduler.wait_for(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)").group(1)
        workers = []
        for i in (1, 2):
            # Each worker hashes strings with its own seed: a run's trace must not care.
            env = dict(os.environ, PYTHONHASHSEED=str(100 + i))
            worker = _Process([sys.executable, "-m", "distributed.cli.dask_worker", address,
                               "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                               "--host", "127.0.0.1", "--name", f"w{i}"], tmp_path, env)
            started.append(worker)
            workers.append(worker)
        addresses = [w.wait_for(r"Start worker at:\s+(tcp://127\.0\.0\.1:\d+)").group(1)
                     for w in workers]
        for w in workers:
            w.wait_for(r"Registered to:")
        yield address, addresses
    finally:
        for p in reversed(started):
            p.stop()


@pytest.mark.slow
def test_a_sweep_on_a_dask_cluster_gives_the_in_process_trace_hashes(
        tmp_path: Path, dask_cluster: tuple[str, list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    address, workers = dask_cluster
    out = tmp_path / "sweep"
    assert main(["sweep", "family-video", "--grid", "topology.hosts=2,3", *CLIP,
                 "--seeds", "1,2,3", "--dask", address, "--out", str(out),
                 "--metric", "on: completion p50 s"]) == 0
    assert "6/6 runs ok" in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 6 and not any(r["error"] for r in rows)
    assert all(r["on: completed"] == f"{r['topology.hosts']}/{r['topology.hosts']}"
               and r["on: all bytes equal"] == "True" for r in rows)
    assert {r["worker_address"] for r in rows} == set(workers)  # both workers ran some
    scenario = load_document("family-video")
    grid = parse_grid(["topology.hosts=2,3", *CLIP[1::2]])
    for r in rows:
        values = [int(r["topology.hosts"]), *(v[0] for v in list(grid.values())[1:])]
        here = run_one(document_for(scenario.doc, grid, values), int(r["seed"]),
                       scenario.base, scenario.name)
        assert here["error"] == "" and here["trace_hash"] == r["trace_hash"], r
    assert (out / "on-completion-p50-s-vs-topology-hosts.png").stat().st_size > 10_000


def test_a_sweep_into_an_earlier_sweeps_folder_leaves_none_of_its_plots(
        tmp_path: Path) -> None:
    from sim.sweep import write_outputs

    def rows(key: str) -> list[dict[str, object]]:
        return [{key: x, "seed": 1, "found": 2.0 * x, "error": ""} for x in (1, 2)]

    first, _ = write_outputs(tmp_path, "s", {"dht.alpha": [1, 2]}, [1], rows("dht.alpha"))
    assert (tmp_path / "found-vs-dht-alpha.png") in first
    write_outputs(tmp_path, "s", {"dht.ksize": [1, 2]}, [1], rows("dht.ksize"))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["found-vs-dht-ksize.png"]
