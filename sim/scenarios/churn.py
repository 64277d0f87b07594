"""churn: a clip delivered to many recipients while a share of the hosts leave and join.

The sender stays up; recipients come online at random times in `arrival_window_s`; a
`churn_fraction` of the recipients then go offline and back (sessions and downtimes
exponential with the given means) until `churn_s` seconds, after which everyone stays online.
Every host runs the real `Node` with co-recipient sourcing, beside the real rendezvous server
and its DHT bootstrap node (sim.scenarios.family_video.deliver). A host going offline loses
its connections; its node reconnects when it is back, and a download whose sources all
vanished is retried with the node's backoff (capped at 60 s here), resuming with the chunks
it holds.

The claim checked: every recipient online at the end completes, with bytes equal.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.churn import Churn, Exponential
from sim.plots import Plot
from sim.scenario import Progress, ScenarioResult, ScenarioSpec
from sim.scenarios.dht_lookup import percentile
from sim.scenarios.family_video import MB, check_params, deliver, write_clip
from sim.simulation import Simulation

COLUMNS = ["mode", "recipient", "churning", "online_at_s", "completed_at_s", "seconds",
           "from_sender_mb", "from_peers_mb", "attempts", "bytes_equal"]


@dataclass(frozen=True, slots=True)
class Params:
    """The [params] table of a churn scenario."""

    recipients: int = 100
    clip_mb: float = 20.0
    arrival_window_s: float = 60.0
    churn_fraction: float = 0.3
    session_mean_s: float = 60.0
    downtime_mean_s: float = 30.0
    churn_s: float = 600.0
    up_mbit: float = 5.0
    down_mbit: float = 20.0

    @classmethod
    def parse(cls, table: dict[str, Any]) -> Params:
        """Check types and ranges; unknown keys are errors."""
        return cls(**check_params(table, {
            "recipients": (1, 10_000), "clip_mb": (0.001, 100_000),
            "arrival_window_s": (0, 1e7), "churn_fraction": (0, 1),
            "session_mean_s": (0.1, 1e7), "downtime_mean_s": (0.1, 1e7),
            "churn_s": (0, 1e7), "up_mbit": (0.01, 1e5), "down_mbit": (0.01, 1e5)},
            ints={"recipients"}))


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the delivery under churn; rows per recipient, summary, plots."""
    p = Params.parse(spec.params)
    up, down = p.up_mbit * 1e6 / 8, p.down_mbit * 1e6 / 8
    server = sim.add_host("rendezvous")
    sender = sim.add_host("sender", up=up, down=down)
    hosts = [sim.add_host(f"r{i}", up=up, down=down) for i in range(p.recipients)]
    rng = sim.rng_for("churn/plan")
    online_at = [rng.uniform(0, p.arrival_window_s) for _ in hosts]
    churning = rng.sample(range(p.recipients), int(p.churn_fraction * p.recipients))
    churn = Churn([hosts[i] for i in churning], sessions=Exponential(p.session_mean_s),
                  downtimes=Exponential(p.downtime_mean_s), rng=sim.rng_for("churn/flips"))
    done = [0]

    async def main(root: Path) -> list[dict[str, Any]]:
        clip = root / "clip.bin"
        write_clip(clip, int(p.clip_mb * MB), f"{sim.seed}/clip")
        stopper: list[asyncio.TimerHandle] = []

        def start_churn() -> None:  # once every address is registered
            churn.start()
            stopper.append(sim.loop.call_later(p.churn_s, _end_churn, churn, hosts))

        try:
            d = await deliver(sim, server, sender, hosts, root, clip, online_at,
                              co_recipients=True, done=done, progress=progress,
                              total=p.recipients, mode="churn", after_setup=start_churn)
        finally:
            for handle in stopper:
                handle.cancel()
            _end_churn(churn, hosts)
        await d.close()
        return d.rows

    with tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
        rows = sim.run(main(Path(tmp)))
    marked = set(f"r{i}" for i in churning)
    for r in rows:
        r["mode"] = "churn"
        r["churning"] = r["recipient"] in marked
    secs = [r["seconds"] for r in rows]
    summary: dict[str, Any] = {
        "recipients": p.recipients, "churning": len(churning), "host_flips": churn.changes,
        "completed": f"{len(rows)}/{p.recipients}",
        "all bytes equal": all(r["bytes_equal"] for r in rows),
        "completion p50 s": round(percentile(secs, 0.5), 1),
        "completion p90 s": round(percentile(secs, 0.9), 1),
        "retries (attempts beyond the first)": sum(r["attempts"] - 1 for r in rows),
        "hosts_run": "the real Node (peerpost node) per host, the real rendezvous server "
                     "with its DHT bootstrap node",
        "payload": "real bytes: sealed, hashed, verified, written",
        "trace_digest": sim.trace.digest()}
    plots = [Plot("completion-cdf", "cdf",
                  f"{p.clip_mb:g} MB to {p.recipients} recipients, "
                  f"{int(p.churn_fraction * 100)}% churning",
                  "completion time after coming online (s, virtual)", "fraction of recipients",
                  {"churning hosts": [r["seconds"] for r in rows if r["churning"]],
                   "steady hosts": [r["seconds"] for r in rows if not r["churning"]]})]
    return ScenarioResult(COLUMNS, rows, summary, plots)


def _end_churn(churn: Churn, hosts: list[Any]) -> None:
    churn.stop()
    for h in hosts:
        h.go_online()
