"""The numbers a scenario reports mean what docs/simulator.md says, checked against the
network's own record of the run (every trace event, captured as it is hashed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sim.network.host import Host
from sim.scenario import run
from sim.simulation import Simulation
from sim.trace import EventKind, Trace

Event = tuple[float, str, int, int]  # virtual time, host name, EventKind, size
SEGMENT = 64 * 1024  # the simulated network's largest TCP segment (its default)


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Every trace event from now on, with the name of the host it happened at."""
    names: dict[int, str] = {}
    events: list[tuple[float, str, int, int]] = []
    record, add_host = Trace.record, Simulation.add_host

    def recording(self: Trace, when: float, host: int, kind: EventKind, size: int = 0) -> None:
        events.append((when, names.get(host, "?"), int(kind), size))
        record(self, when, host, kind, size)

    def naming(self: Simulation, name: str, **kw: Any) -> Host:
        h = add_host(self, name, **kw)
        names[h.index] = name
        return h

    monkeypatch.setattr(Trace, "record", recording)
    monkeypatch.setattr(Simulation, "add_host", naming)
    return events


def _small_delivery(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Event]]:
    """A 2 MB clip to 3 public recipients, sourcing off; and every trace event."""
    events = _capture(monkeypatch)
    result = run("family-video", seed=1, overrides={
        "topology.hosts": 3, "workload.size_mb": {"dist": "fixed", "value": 2.0},
        "workload.online": {"process": "uniform", "window_s": 10.0},
        "workload.co_recipients": ["off"]})
    return result, events


def test_completion_times_are_the_nodes_own_on_one_clock_from_the_send(
        monkeypatch: pytest.MonkeyPatch) -> None:
    result, events = _small_delivery(monkeypatch)
    last_data: dict[str, float] = {}
    last_size: dict[str, int] = {}
    received: Counter[str] = Counter()
    for when, host, kind, size in events:
        if kind == EventKind.TCP_DATA:
            received[host] += size
            # A chunk's segments, not a control message: full ones, and the one after a
            # full one however small (a 1 MiB chunk ends in a segment of 28 bytes, which
            # on an uplink shared with the other recipients came 0.18 s after the one
            # before it).
            if size > 10_000 or last_size.get(host) == SEGMENT:
                last_data[host] = when
            last_size[host] = size
    rows = result.rows
    assert len(rows) == 3
    for r in rows:
        # Online and completion on the same clock, so the difference is the row's time.
        assert r["completed_at_s"] - r["online_at_s"] == pytest.approx(r["seconds"], abs=0.002)
        # Bytes per source: the file's bytes, as the network carried them (headers aside).
        assert r["from_sender_mb"] == 2.0
        assert 2_000_000 < received[r["recipient"]] < 2_000_000 * 1.005
    # Completion is when the last chunk arrived (the node stores it in zero virtual time),
    # not when a poll of the inbox saw it: the same offset (the send's time) for everyone.
    offsets = [last_data[r["recipient"]] - r["completed_at_s"] for r in rows]
    assert max(offsets) - min(offsets) < 0.01, offsets
    assert result.summary["off: last done at s"] == max(r["completed_at_s"] for r in rows)


def test_a_churn_trace_counts_from_the_send_as_the_rows_do(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("host,at_s,online\n0,1,0\n0,5,1\n")
    (tmp_path / "traced.toml").write_text(
        '[topology]\nhosts = 2\n[workload]\nkind = "files"\n'
        'size_mb = { dist = "fixed", value = 1.0 }\nonline = { process = "at_start" }\n'
        '[churn]\ntrace = "trace.csv"\nuntil_s = 30.0\n')
    events = _capture(monkeypatch)
    result = run(str(tmp_path / "traced.toml"))
    (steady,) = [r for r in result.rows if r["recipient"] == "r1"]
    last = max(when for when, host, kind, size in events
               if host == "r1" and kind == EventKind.TCP_DATA and size > 10_000)
    sent_at = last - steady["completed_at_s"]  # the rows' time 0
    flips = [(round(when - sent_at, 3), kind) for when, host, kind, _ in events
             if host == "r0" and kind in (EventKind.HOST_DOWN, EventKind.HOST_UP)]
    assert flips == [(1.0, EventKind.HOST_DOWN), (5.0, EventKind.HOST_UP)]
