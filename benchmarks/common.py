"""Shared output for benchmarks: a rich table on stdout and a JSON file beside it."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

OUT_DIR = Path(__file__).parent / "out"


def tree_first(tree: Path) -> str:
    """A PYTHONPATH that runs the code in `tree` (a checkout of other code, `--baseline`)
    before what the caller's PYTHONPATH holds (another cryptography, say)."""
    return os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)


def report(name: str, rows: list[dict[str, Any]], *, out: Path | None = None,
           meta: dict[str, Any] | None = None) -> Path:
    """Print `rows` (each with metric, value, unit, target, ok) and write them as JSON."""
    table = Table(title=f"benchmark: {name}")
    for col in ("metric", "value", "unit", "target", "ok"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        v = r.get("value")
        shown = f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
        ok = r.get("ok")
        table.add_row(str(r["metric"]), shown, str(r.get("unit", "")), str(r.get("target", "")),
                      "" if ok is None else ("yes" if ok else "NO"))
    Console().print(table)
    path = out or OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "meta": meta or {}, "results": rows}
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return path
