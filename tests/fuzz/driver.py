"""Run fuzz targets one after another, each in its own atheris process, and report.

`python -m tests.fuzz.driver --runs N [TARGET ...]` (what `make fuzz` runs) fuzzes every
target (or the named ones) for N inputs, seeded from `tests/fuzz/corpus/<target>/`, and
prints inputs, execs/s and the outcome per target. New inputs the fuzzer finds go to a
scratch folder that also holds fresh seeds (tests/fuzz/seeds.py); a crashing input is
saved as `tests/fuzz/corpus/<target>/crash-<sha1>`.
Exit status 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.seeds import seeds
from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
INPUT_TIMEOUT_S = 10  # one input running longer than this is a hang, reported as a crash
RSS_LIMIT_MB = 3072


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str
    returncode: int
    inputs: int
    execs_per_s: int
    seconds: float
    artifacts: tuple[Path, ...]
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts


def _stat(log: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s*(\d+)", log)
    return int(m.group(1)) if m else 0


def _artifacts(folder: Path) -> set[Path]:
    return {p for p in folder.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))}


def fuzz(target: str, runs: int, *, max_len: int = 4096, timeout: float | None = None,
         seed: int = 0) -> Outcome:
    """Fuzz `target` for `runs` inputs in a child process; a crash leaves its input saved."""
    corpus = CORPUS / target
    corpus.mkdir(parents=True, exist_ok=True)
    before = _artifacts(corpus)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        # Fresh seeds from today's encoders next to the committed corpus, so the run starts
        # from valid messages even after a wire format changed.
        for label, data in seeds().get(target, []):
            (Path(scratch) / f"seed-{label}").write_bytes(data)
        argv = [sys.executable, "-m", "tests.fuzz.run", target, f"-runs={runs}",
                f"-max_len={max_len}", f"-timeout={INPUT_TIMEOUT_S}",
                f"-rss_limit_mb={RSS_LIMIT_MB}", f"-seed={seed}", "-print_final_stats=1",
                f"-artifact_prefix={corpus}/", scratch, str(corpus)]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                              timeout=timeout)
    seconds = time.monotonic() - started
    after = _artifacts(corpus)
    log = proc.stdout + proc.stderr
    inputs = _stat(log, "number_of_executed_units")
    # libFuzzer's own figure rounds its run time down to whole seconds (0 for short runs).
    rate = _stat(log, "average_exec_per_sec") or round(inputs / seconds)
    return Outcome(target, proc.returncode, inputs, rate, seconds,
                   tuple(sorted(after - before)), log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("targets", nargs="*", metavar="TARGET",
                    help=f"default: all of {', '.join(TARGETS)}")
    args = ap.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}")
    failed = 0
    print(f"{'target':<28}{'inputs':>10}{'execs/s':>9}{'seconds':>9}  result", flush=True)
    for name in names:
        out = fuzz(name, args.runs)
        result = "ok" if out.ok else f"CRASH (exit {out.returncode})"
        print(f"{name:<28}{out.inputs:>10}{out.execs_per_s:>9}{out.seconds:>9.0f}  {result}",
              flush=True)
        if not out.ok:
            failed += 1
            for path in out.artifacts:
                print(f"    input saved: {path.relative_to(REPO)}")
            print("\n".join("    " + line for line in out.log.splitlines()[-40:]))
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
