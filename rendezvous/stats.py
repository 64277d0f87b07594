"""Live figures of a running server, shared through a small JSON file in its data folder.

`peerpost-rendezvous serve` rewrites `DATA/stats.json` every few seconds (atomically:
write a temporary file, then rename) with the server's `snapshot()`, its pid and the wall
time; when it stops it writes `running: false` (whatever made it stop), and a new `serve`
marks a file left by a killed one the same way before it starts. `peerpost-rendezvous
stats` combines that file (online sessions) with counts read from the SQLite file
(accounts, queued envelopes, bytes stored). The file is trusted only while its pid is alive
and holds the folder's lock (datalock.py), which the kernel drops even on SIGKILL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rendezvous.datalock import holder

STATS_NAME = "stats.json"


def write_stats(data_dir: Path, snapshot: dict[str, Any], *, running: bool, now: float) -> None:
    """Atomically replace DATA/stats.json with this snapshot."""
    doc = {"version": 1, "pid": os.getpid(), "running": running, "updated_at": now, **snapshot}
    path = Path(data_dir) / STATS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def write_stopped(data_dir: Path, *, now: float) -> None:
    """Mark an existing DATA/stats.json as not running (nothing to do if there is none)."""
    try:
        doc = json.loads((Path(data_dir) / STATS_NAME).read_text())
    except (OSError, ValueError):
        return
    if isinstance(doc, dict) and doc.get("running"):
        doc.pop("version", None)
        doc.pop("pid", None)
        doc.pop("running", None)
        doc.pop("updated_at", None)
        write_stats(data_dir, doc, running=False, now=now)


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
    held, holder_pid = holder(Path(data_dir))
    if not held or holder_pid not in (None, pid):
        return None
    return doc
