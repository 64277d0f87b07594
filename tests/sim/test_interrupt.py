"""Ctrl-C during `peerpost-sim run` or `sweep`: one line and exit status 130, no traceback;
a run writes nothing, a sweep writes the runs that finished and marks the others."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sim.cli
import sim.scenario
import sim.sweep
from sim.cli import main
from sim.simulation import Simulation
from sim.sweep import NOT_RUN


def test_sigint_stops_the_loop_between_two_callbacks_never_inside_one() -> None:
    finished: list[str] = []

    def interrupt_me() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        finished.append("the rest of the callback")

    async def forever() -> None:
        await asyncio.sleep(3600)

    with Simulation(seed=1) as s:
        s.loop.call_at(5.0, interrupt_me)
        with pytest.raises(KeyboardInterrupt):
            s.run(forever())
        assert finished == ["the rest of the callback"]
        assert s.now == 5.0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_run_says_where_it_stopped_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    real_run = sim.scenario.run

    def interrupted_at_5s(*args: Any, on_simulation: Any, **kw: Any) -> Any:
        def hook(s: Simulation) -> None:
            on_simulation(s)
            s.loop.call_at(5.0, setattr, s.loop, "interrupted", True)  # as Ctrl-C does
        return real_run(*args, on_simulation=hook, **kw)

    monkeypatch.setattr(sim.cli, "run", interrupted_at_5s)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(["run", "nat-mix", "--quiet", "--out", str(out),
                     "--set", "topology.hosts=3", "--set", "workload.size_mb.value=2.0"])
    said = capsys.readouterr()
    assert code == 130
    assert "interrupted at virtual time 5.0 s: nothing written" in said.out
    assert "Traceback" not in said.err + said.out
    assert not caplog.records  # the nodes' tasks cut short are not reported as failures
    assert not out.exists()


def test_ctrl_c_during_a_sweep_writes_what_finished_and_marks_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def one_then_ctrl_c(*args: Any) -> Iterator[tuple[int, dict[str, Any]]]:
        yield 0, {"seed": 1, "summary": {"found": 3.0}, "trace_hash": "ab" * 16,
                  "wall_s": 0.5, "worker": "here:1", "error": ""}
        raise KeyboardInterrupt

    monkeypatch.setattr(sim.sweep, "_local", one_then_ctrl_c)
    out = tmp_path / "sweep"
    try:
        code = main(["sweep", "dht-lookup", "--grid", "topology.hosts=30", "--seeds", "1-3",
                     "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback; the finished run was lost")
    said = capsys.readouterr()
    assert code == 130
    assert "1/3 runs ok, 2 not run (interrupted" in said.out
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["found"], r["error"]) for r in rows] == [
        ("1", "3.0", ""), ("2", "", NOT_RUN), ("3", "", NOT_RUN)]
    assert json.loads((out / "sweep.json").read_text())["interrupted"] is True


def test_ctrl_c_in_a_runs_second_simulation_reports_that_ones_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real_run = sim.scenario.run
    seen: list[Simulation] = []

    def interrupt_the_second(*args: Any, on_simulation: Any, **kw: Any) -> Any:
        def hook(s: Simulation) -> None:
            on_simulation(s)  # the progress bar follows the running simulation
            seen.append(s)
            if len(seen) == 2:  # co-recipients "on", after "off" ran to its end
                s.loop.call_at(3.0, setattr, s.loop, "interrupted", True)
        return real_run(*args, on_simulation=hook, **kw)

    monkeypatch.setattr(sim.cli, "run", interrupt_the_second)
    code = main(["run", "nat-mix", "--quiet", "--out", str(tmp_path / "out"),
                 "--set", "topology.hosts=2", "--set", "workload.size_mb.value=1.0",
                 "--set", 'workload.co_recipients=["off", "on"]'])
    assert code == 130
    assert len(seen) == 2 and seen[0].now > 3.0
    assert "interrupted at virtual time 3.0 s, 2 of 4 items done" in capsys.readouterr().out
