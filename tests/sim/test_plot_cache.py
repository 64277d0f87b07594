"""Drawing a plot in a test run writes nothing into the user's home: matplotlib's font
cache, which it kept in ~/.cache/matplotlib, goes to the run's own folder
(tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_plot_drawn_in_a_test_run_leaves_the_home_folder_alone(tmp_path: Path) -> None:
    """A fresh process with the run's environment and an empty home draws a CDF, as
    `peerpost-sim run` does: the PNG is written and the home stays empty."""
    home = tmp_path / "home"
    home.mkdir()
    code = ("from pathlib import Path\n"
            "from sim.plots import Plot, draw\n"
            "plot = Plot('cdf', 'cdf', 'a CDF', 'time (s)', 'fraction', {'a': [1.0, 2.0]})\n"
            f"print(draw(plot, Path({str(tmp_path)!r})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, HOME=str(home)), cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split()[-1]).stat().st_size > 1000
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
