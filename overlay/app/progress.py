"""Progress-bar columns in the units the inbox shows (MiB, MiB/s), for `fetch --wait` and
the demo."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.progress import ProgressColumn, Task
from rich.text import Text

MiB = 1 << 20


class MiBColumn(ProgressColumn):
    """`12.0/50.0 MiB`: the unit the inbox uses."""

    def render(self, task: Task) -> Text:
        total = task.total or 0
        return Text(f"{task.completed / MiB:.1f}/{total / MiB:.1f} MiB", style="progress.download")


class RateColumn(ProgressColumn):
    """`4.2 MiB/s`: the task's `rate` field once set (`download_rate`, when the download is
    complete), else rich's recent-sample speed, else the average since the bar started
    (bytes already on disk when it started don't count); 0.0 until a byte arrives.

    Without the `rate` field a finished bar showed rich's speed over its samples, which
    counts the wait before the first byte: 85 MiB/s in the demo for a receiver whose
    table row (first byte to complete) said 593."""

    def render(self, task: Task) -> Text:
        speed = task.fields.get("rate") or task.finished_speed or task.speed
        if speed is None:
            elapsed = task.elapsed or 0.0
            done = task.completed - float(task.fields.get("resumed_from", 0))
            speed = done / elapsed if elapsed > 0 else 0.0
        return Text(f"{speed / MiB:.1f} MiB/s", style="progress.data.speed")


def download_rate(entry: Mapping[str, Any]) -> float | None:
    """Bytes per second from an inbox entry's first byte to its completion: what the
    inbox's times and the demo's table say. None until both times are known."""
    first, done = entry.get("first_byte_at"), entry.get("completed_at")
    if first is None or done is None or done <= first:
        return None
    return float(entry["size"]) / (float(done) - float(first))
