"""family-video: one sender on a home link sends a clip to recipients who come online at
random times; completion times with co-recipient sourcing off and on.

Each host runs the real content store, transfer server, downloader and DHT node
(sim.scenarios.holders; not the whole `Node`: co-recipient sourcing is not wired into the
node yet, so here a recipient announces itself in the DHT when it starts and adds every
provider it finds there as a `Source`). Chunks are really sealed, hashed, verified,
decrypted and written; every received file is compared with the original. The clip is
random bytes (no media probing is involved). All hosts are public (direct TCP).

Each mode runs in its own simulation with the same seed, so both see the same arrival
times and links. Rows: one per recipient and mode.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.host import Host
from sim.plots import Plot
from sim.scenario import (
    Progress,
    ScenarioError,
    ScenarioResult,
    ScenarioSpec,
    build_simulation,
)
from sim.scenarios.dht_lookup import percentile
from sim.scenarios.holders import DHT_PORT, FetchReport, Handle, Holder, file_digest
from sim.simulation import Simulation

COLUMNS = ["mode", "recipient", "online_at_s", "completed_at_s", "seconds", "from_sender_mb",
           "from_peers_mb", "attempts", "bytes_equal"]
MB = 1_000_000
MODES = ("off", "on")


@dataclass(frozen=True, slots=True)
class Params:
    """The [params] table of a family-video scenario."""

    recipients: int = 20
    clip_mb: float = 200.0
    arrival_window_s: float = 600.0
    up_mbit: float = 5.0
    down_mbit: float = 20.0
    modes: tuple[str, ...] = MODES

    @classmethod
    def parse(cls, table: dict[str, Any]) -> Params:
        """Check types and ranges; unknown keys are errors."""
        return cls(**check_params(table, {
            "recipients": (1, 10_000), "clip_mb": (0.001, 100_000),
            "arrival_window_s": (0, 1e7), "up_mbit": (0.01, 1e5), "down_mbit": (0.01, 1e5)},
            ints={"recipients"}, modes=True))


def check_params(table: dict[str, Any], limits: dict[str, tuple[float, float]], *,
                 ints: set[str], modes: bool = False) -> dict[str, Any]:
    """Numbers within `limits` (integers for `ints`), and `modes` ("off"/"on") if allowed."""
    unknown = set(table) - set(limits) - ({"modes"} if modes else set())
    if unknown:
        raise ScenarioError(f"unknown params: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, (lo, hi) in limits.items():
        if key not in table:
            continue
        v = table[key]
        kind = int if key in ints else int | float
        if isinstance(v, bool) or not isinstance(v, kind):
            what = "an integer" if key in ints else "a number"
            raise ScenarioError(f"params.{key} must be {what}")
        if not lo <= v <= hi:
            raise ScenarioError(f"params.{key} must be in [{lo:g}, {hi:g}], got {v}")
        values[key] = v
    if modes and "modes" in table:
        m = table["modes"]
        if not isinstance(m, list) or not m or any(x not in MODES for x in m):
            raise ScenarioError('params.modes must be a list of "off" and/or "on"')
        values["modes"] = tuple(m)
    return values


def write_clip(path: Path, size: int, seed: str) -> None:
    """`size` random bytes (deterministic for `seed`), written in 1 MiB pieces."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


async def deliver(sim: Simulation, sender_host: Host, hosts: list[Host], root: Path,
                  clip: Path, online_at: list[float], *, co_recipients: bool,
                  done: list[int], progress: Progress | None,
                  total: int) -> tuple[list[dict[str, Any]], list[Holder], str]:
    """Start the sender, then each recipient at its time; fetch until complete."""
    sender = Holder(sim, sender_host, root / sender_host.name)
    await sender_host.create_task(sender.start([]))
    content = await sender_host.create_task(sender.store.add_local_file(clip))
    handle = Handle.of(content, sender)
    original = file_digest(clip)
    holders = [Holder(sim, h, root / h.name) for h in hosts]
    rows: list[dict[str, Any]] = []

    async def recipient(i: int) -> None:
        await asyncio.sleep(online_at[i])
        h, holder = hosts[i], holders[i]
        await h.create_task(holder.start([(sender_host.address, DHT_PORT)]))
        report = FetchReport()
        t0 = sim.now
        await h.create_task(holder.fetch(handle, co_recipients=co_recipients, report=report))
        rows.append({
            "mode": "on" if co_recipients else "off", "recipient": h.name,
            "online_at_s": round(online_at[i], 3), "completed_at_s": round(sim.now, 3),
            "seconds": round(sim.now - t0, 3),
            "from_sender_mb": round(report.bytes_by_source.get("sender", 0) / MB, 3),
            "from_peers_mb": round(report.bytes_by_source.get("peers", 0) / MB, 3),
            "attempts": report.attempts, "bytes_equal": report.digest == original})
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    await asyncio.gather(*(recipient(i) for i in range(len(hosts))))
    return rows, [sender, *holders], original


async def close_all(holders: list[Holder]) -> None:
    """Stop every holder, each as its host."""
    for holder in holders:
        await holder.host.create_task(holder.aclose())


def _run_mode(sim: Simulation, p: Params, mode: str, root: Path, done: list[int],
              progress: Progress | None, total: int) -> list[dict[str, Any]]:
    up, down = p.up_mbit * 1e6 / 8, p.down_mbit * 1e6 / 8
    sender_host = sim.add_host("sender", up=up, down=down)
    hosts = [sim.add_host(f"r{i}", up=up, down=down) for i in range(p.recipients)]
    rng = sim.rng_for("family-video/arrivals")
    online_at = [rng.uniform(0, p.arrival_window_s) for _ in hosts]
    clip = root / "clip.bin"
    write_clip(clip, int(p.clip_mb * MB), f"{sim.seed}/clip")

    async def main() -> list[dict[str, Any]]:
        rows, holders, _ = await deliver(sim, sender_host, hosts, root, clip, online_at,
                                         co_recipients=mode == "on", done=done,
                                         progress=progress, total=total)
        await close_all(holders)
        return rows

    return sim.run(main())


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run each mode (its own simulation, same seed) and return rows, summary and plots."""
    p = Params.parse(spec.params)
    rows: list[dict[str, Any]] = []
    done = [0]
    total = p.recipients * len(p.modes)
    for n, mode in enumerate(p.modes):
        s = sim if n == 0 else build_simulation(spec.network, sim.seed)
        try:
            with tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
                rows += _run_mode(s, p, mode, Path(tmp), done, progress, total)
            if s is not sim:
                sim.errors.extend(s.errors)
        finally:
            if s is not sim:
                s.close()
    summary: dict[str, Any] = {
        "recipients": p.recipients, "clip_mb": p.clip_mb,
        "links": f"{p.down_mbit:g} Mbit/s down, {p.up_mbit:g} up (every host)",
        "hosts_run": "content store + transfer server + downloader + DHT node (not Node)",
        "co_recipients_found_by": "DHT provider records, added as Sources by the scenario",
        "payload": "real bytes: sealed, hashed, verified, written (no reference mode)"}
    for mode in p.modes:
        mine = [r for r in rows if r["mode"] == mode]
        secs = [r["seconds"] for r in mine]
        summary[f"{mode}: completed"] = f"{len(mine)}/{p.recipients}"
        summary[f"{mode}: all bytes equal"] = all(r["bytes_equal"] for r in mine)
        summary[f"{mode}: completion p50 s"] = round(percentile(secs, 0.5), 1)
        summary[f"{mode}: completion p90 s"] = round(percentile(secs, 0.9), 1)
        summary[f"{mode}: last done at s"] = max((r["completed_at_s"] for r in mine),
                                                  default=None)
        summary[f"{mode}: MB from sender"] = round(sum(r["from_sender_mb"] for r in mine), 1)
    plots = [
        Plot("completion-cdf", "cdf",
             f"{p.clip_mb:g} MB clip to {p.recipients} recipients (sender {p.up_mbit:g} "
             "Mbit/s up)", "completion time after coming online (s, virtual)",
             "fraction of recipients",
             {f"co-recipient sourcing {m}": [r["seconds"] for r in rows if r["mode"] == m]
              for m in p.modes}),
        Plot("completed-over-time", "series", "Recipients holding the whole clip",
             "time since the send (s, virtual)", "recipients complete",
             {f"co-recipient sourcing {m}": _cumulative(
                 [r["completed_at_s"] for r in rows if r["mode"] == m]) for m in p.modes}),
    ]
    return ScenarioResult(COLUMNS, rows, summary, plots)


def _cumulative(times: list[float]) -> list[tuple[float, float]]:
    return [(0.0, 0.0)] + [(t, i + 1) for i, t in enumerate(sorted(times))]
