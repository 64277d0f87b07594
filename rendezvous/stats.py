"""Live figures of a running server, shared through a small JSON file in its data folder.

`peerpost-rendezvous serve` rewrites `DATA/stats.json` every few seconds (atomically:
write a temporary file, then rename) with the server's `snapshot()`, its pid and the wall
time; on a clean shutdown it writes `running: false`. `peerpost-rendezvous stats` combines
that file (online sessions) with counts read from the SQLite file (accounts, queued
envelopes, bytes stored). The file is trusted only while its pid is alive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATS_NAME = "stats.json"


def write_stats(data_dir: Path, snapshot: dict[str, Any], *, running: bool, now: float) -> None:
    """Atomically replace DATA/stats.json with this snapshot."""
    doc = {"version": 1, "pid": os.getpid(), "running": running, "updated_at": now, **snapshot}
    path = Path(data_dir) / STATS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read_live_stats(data_dir: Path) -> dict[str, Any] | None:
    """The running server's last snapshot, or None when no server is running there."""
    path = Path(data_dir) / STATS_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc.get("running"):
        return None
    pid = doc.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return doc
