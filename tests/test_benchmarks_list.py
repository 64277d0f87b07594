"""`python -m benchmarks` lists the benchmarks it can run, and only those: `__main__` was
listed too, and `python -m benchmarks all` ran it, which printed the list and made the run
exit 2 whatever the benchmarks did."""

from __future__ import annotations

import importlib
import subprocess
import sys


def test_the_list_names_only_benchmarks() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("benchmarks: ")]
    names = line.removeprefix("benchmarks: ").split(", ")
    assert "retention" in names and "paths" in names
    assert "__main__" not in names and "common" not in names
    for name in names:  # each one is a module with the entry point `all` calls
        assert callable(importlib.import_module(f"benchmarks.{name}").main)


def test_list_names_every_benchmark_one_a_line_and_runs_none() -> None:
    # `python -m benchmarks list` (as `peerpost-sim list` is spelled) was taken for a
    # benchmark's name: "unknown benchmark 'list'" and exit 2.
    done = subprocess.run([sys.executable, "-m", "benchmarks", "list"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    names = done.stdout.split()
    assert "hashes" in names and "retention" in names and "paths" in names
    assert "list" not in names and "__main__" not in names and "common" not in names
