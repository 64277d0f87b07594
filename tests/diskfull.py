"""A full disk for one process: RLIMIT_FSIZE fails its writes past `max_file` bytes per
file (EFBIG, "File too large"), as ENOSPC would, with no mount or root needed; Python
ignores SIGXFSZ, so the write raises instead of killing the process."""

from __future__ import annotations

import resource
import sqlite3
import subprocess
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
