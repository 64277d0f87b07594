"""Progress-bar columns in the units the inbox shows (MiB, MiB/s), for `fetch --wait` and
the demo."""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text

MiB = 1 << 20


class MiBColumn(ProgressColumn):
    """`12.0/50.0 MiB`: the unit the inbox uses."""

    def render(self, task: Task) -> Text:
        total = task.total or 0
        return Text(f"{task.completed / MiB:.1f}/{total / MiB:.1f} MiB", style="progress.download")


class RateColumn(ProgressColumn):
    """`4.2 MiB/s`: rich's recent-sample speed, else the average since the bar started
    (bytes already on disk when it started don't count); 0.0 until a byte arrives."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            elapsed = task.elapsed or 0.0
            done = task.completed - float(task.fields.get("resumed_from", 0))
            speed = done / elapsed if elapsed > 0 else 0.0
        return Text(f"{speed / MiB:.1f} MiB/s", style="progress.data.speed")
