"""A full disk for one process: RLIMIT_FSIZE fails its writes past `max_file` bytes per
file (EFBIG, "File too large"), as ENOSPC would, with no mount or root needed; Python
ignores SIGXFSZ, so the write raises instead of killing the process."""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import sys
from pathlib import Path


def run(argv: list[str], *, max_file: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv`, its files capped at `max_file` bytes when given."""

    def limit() -> None:
        if max_file is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          preexec_fn=limit)


def rows(db: Path) -> int:
    """The rows of table `t` in the SQLite file `db` (its WAL replayed)."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


# Runs a CLI's main with os.replace ended, as by a kill, before the call numbered argv[1]
# (or, with argv[2] "fail", that call failing with EIO).
_KILLED_BEFORE_RENAME = """
import errno, importlib, os, sys
stop, fail, real, seen = int(sys.argv[1]), sys.argv[2] == "fail", os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if seen[0] == stop:
        if fail:
            seen[0] += 1
            raise OSError(errno.EIO, "Input/output error (injected)")
        os._exit(9)
    seen[0] += 1
    return real(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(importlib.import_module(sys.argv[3]).main(sys.argv[4:]))
"""


def run_killed_before_rename(stop: int, cli_module: str, args: list[str], *,
                             fail: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `cli_module`.main(args) in a process that exits with 9, as if killed, just
    before its os.replace call numbered `stop` (from 0); with `fail`, that call raises
    EIO instead and the process goes on."""
    return subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RENAME, str(stop),
                           "fail" if fail else "kill", cli_module, *args],
                          capture_output=True, text=True, timeout=60)
