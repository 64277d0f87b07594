"""`peerpost-sim run`: the dht-lookup scenario end to end, CSV and summary, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from sim.cli import main
from sim.scenario import ScenarioError, load_scenario

SMALL = ["--set", "topology.hosts=40", "--set", "workload.lookups=8", "--set", "workload.keys=3",
         "--set", "workload.healthy_lookups=0", "--quiet"]


def _run(out: Path, seed: int) -> dict[str, Any]:
    assert main(["run", "dht-lookup", "--seed", str(seed), "--out", str(out), *SMALL]) == 0
    doc = json.loads((out / "summary.json").read_text())
    summary: dict[str, Any] = doc["summary"]
    assert doc["seed"] == seed and doc["document"]["topology"]["hosts"] == 40
    assert doc["trace_hash"] == doc["summary"]["trace_hash"]
    assert doc["versions"]["kademlia"] == "2.2.3" and doc["versions"]["python"]
    return summary


def test_dht_lookup_runs_writes_csv_and_is_deterministic(tmp_path: Path) -> None:
    first = _run(tmp_path / "a", 7)
    with (tmp_path / "a" / "dht-lookup.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {"lookup", "dead_fraction", "sybil_share", "node", "key", "found", "seconds",
            "queries", "messages"} <= set(rows[0])
    assert (tmp_path / "a" / "lookup-latency-cdf.png").stat().st_size > 10_000
    assert first["keys_stored"] == "3/3"
    assert first["found"] == sum(r["found"] == "True" for r in rows)
    assert first["found"] >= 6
    again = _run(tmp_path / "b", 7)
    assert again == first
    assert _run(tmp_path / "c", 8)["trace_hash"] != first["trace_hash"]
    assert "trace_digest" not in first  # one hash per run, under one name


def test_scenario_mistakes_are_reported_not_run(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[workload]\nkind = "lookups"\n[topology]\nlatncy = { model = "fixed" }\n')
    assert main(["run", str(bad), "--out", str(tmp_path), "--quiet"]) == 2
    assert "topology.latncy: unknown key (did you mean latency?)" in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()
    assert main(["run", "dht-lookup", "--set", "topology.hostz=3", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "topology.hostz: unknown key (did you mean hosts?)" in capsys.readouterr().out
    assert main(["run", "dht-lookup", "--seed", "-1", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--seed: -1 is not in [0, 2^63)" in capsys.readouterr().out
    with pytest.raises(ScenarioError, match="no scenario file or built-in"):
        load_scenario("no-such-scenario")


def test_a_results_folder_named_like_a_built_in_does_not_hide_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sim.scenario import load_scenario

    monkeypatch.chdir(tmp_path)
    (tmp_path / "churn").mkdir()  # `peerpost-sim run churn --out churn`, then again
    assert load_scenario("churn").driver == "churn"


def test_the_last_line_names_every_file_written_with_its_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _run(out, 3)
    last = " ".join(capsys.readouterr().out.split()).rsplit("wrote ", 1)[1]
    for name in ("dht-lookup.csv", "summary.json", "lookup-latency-cdf.png"):
        assert str(out / name) in last and (out / name).exists(), last


def test_a_folder_run_into_again_holds_only_the_new_runs_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "dht-lookup"  # the default folder: one per scenario
    assert main(["run", "dht-lookup", *SMALL]) == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "lookup-messages-cdf.png").exists()
    assert main(["run", "dht-lookup", *SMALL, "--set",
                 'measure.plots=["lookup-latency-cdf"]']) == 0
    # The earlier run's plot that this run did not draw is gone; what it never wrote stays.
    assert sorted(p.name for p in out.iterdir()) == [
        "dht-lookup.csv", "lookup-latency-cdf.png", "notes.txt", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["files"] == [
        "dht-lookup.csv", "summary.json", "lookup-latency-cdf.png"]


def test_a_missing_file_is_named_as_typed_on_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["run", "sweep[bold]-of-seed-3-with-a-long-name.toml"]) == 2
    assert capsys.readouterr().out == (
        "error: cannot read scenario 'sweep[bold]-of-seed-3-with-a-long-name.toml': "
        "No such file or directory\n")
    assert main(["validate", "nat-mix.toml"]) == 2
    assert "(the built-in is named 'nat-mix', without .toml)" in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_one_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["run", "dht-lookup", *SMALL, "--out", str(taken)]) == 2
    assert f"--out {taken}: a file of that name exists" in capsys.readouterr().out
    assert main(["sweep", "dht-lookup", "--out", str(taken / "sub")]) == 2
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err
