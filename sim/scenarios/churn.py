"""churn: a clip delivered to many recipients while a share of the hosts leave and join.

The sender stays up; recipients come online as workload.online says; a churn.share of the
recipients then go offline and back (churn.session and churn.off_time distributions:
exponential, Weibull, ...; or the events of a churn.trace file) until churn.until_s, after
which everyone stays online.
Every host runs the real `Node` with co-recipient sourcing, beside the real rendezvous server
and its DHT bootstrap node (sim.scenarios.family_video.deliver). A host going offline loses
its connections; its node reconnects when it is back, and a download whose sources all
vanished is retried with the node's backoff (capped at 60 s here), resuming with the chunks
it holds.

The claim checked: every recipient online at the end completes, with bytes equal.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.churn import Churn
from sim.plots import Plot
from sim.scenario import Peers, Progress, ScenarioResult, ScenarioSpec, churn_trace, draw, times
from sim.scenarios.dht_lookup import percentile
from sim.scenarios.family_video import (
    MB,
    PATHS,
    Delivery,
    Params,
    adversaries,
    deliver,
    nat_summary,
    path_plot,
    path_summary,
    write_clip,
)
from sim.simulation import Simulation

COLUMNS = ["mode", "recipient", "churning", "nat", "free_rider", "bad_chunks",
           "sources_banned", "online_at_s",
           "completed_at_s", "seconds", "from_sender_mb", "from_peers_mb",
           *PATHS.values(), "attempts", "bytes_equal"]


@dataclass(frozen=True, slots=True)
class Spread:
    """A duration distribution from a scenario table ({dist = "weibull", ...})."""

    table: dict[str, Any]

    def sample(self, rng: random.Random) -> float:
        """One draw, in seconds (at least a millisecond)."""
        return max(0.001, draw(self.table, rng))


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the delivery under churn; rows per recipient, summary, plots."""
    p = Params.from_spec(spec, sim.rng_for("family-video/size"))
    ch = spec.doc["churn"]
    mode = p.modes[0]
    server = sim.add_host("rendezvous")
    peers = Peers(sim, spec, p.recipients + 1)
    sender = peers.add("sender")
    hosts = [peers.add(f"r{i}") for i in range(p.recipients)]
    rng = sim.rng_for("churn/plan")
    online_at = times(p.online, len(hosts), rng)
    events = churn_trace(spec) if "trace" in ch else []
    if events:
        churning = sorted({h for h, _, _ in events})
    else:
        churning = rng.sample(range(p.recipients), int(ch["share"] * p.recipients))
    riders, bad = adversaries(sim, p)
    session = Spread(ch.get("session") or {"dist": "exponential", "mean": 60.0})
    off_time = Spread(ch.get("off_time") or {"dist": "exponential", "mean": 30.0})
    churn = Churn([hosts[i] for i in churning], sessions=session, downtimes=off_time,
                  rng=sim.rng_for("churn/flips"))
    flips = [0]
    done = [0]

    def replay() -> list[asyncio.TimerHandle]:
        def flip(i: int, online: bool) -> None:
            if hosts[i].online != online:
                (hosts[i].go_online if online else hosts[i].go_offline)()
                flips[0] += 1
        return [sim.loop.call_later(at, flip, i, online, context=hosts[i].context)
                for i, at, online in events if at < ch["until_s"]]

    async def main(root: Path) -> Delivery:
        clip = root / "clip.bin"
        write_clip(clip, int(p.clip_mb * MB), f"{sim.seed}/clip")
        stopper: list[asyncio.TimerHandle] = []

        def start_churn() -> None:  # once every address is registered
            if events:
                stopper.extend(replay())
            else:
                churn.start()
            stopper.append(sim.loop.call_later(ch["until_s"], _end_churn, churn, hosts))

        try:
            d = await deliver(sim, server, sender, hosts, root, clip, online_at,
                              co_recipients=mode == "on", done=done, progress=progress,
                              total=p.recipients, mode=mode, after_setup=start_churn,
                              nat_of=peers.nat_of, free_riders=riders, bad_sources=bad,
                              sample_s=p.sample_s)
        finally:
            for handle in stopper:
                handle.cancel()
            _end_churn(churn, hosts)
        await d.close()
        return d

    with tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
        d = sim.run(main(Path(tmp)))
    rows = d.rows
    marked = set(f"r{i}" for i in churning)
    for r in rows:
        r["churning"] = r["recipient"] in marked
    secs = [r["seconds"] for r in rows]
    summary: dict[str, Any] = {
        "recipients": p.recipients, "churning": len(churning),
        "host_flips": churn.changes + flips[0],
        "churn": (f"trace {ch['trace']}" if events else
                  f"sessions {session.table}, off times {off_time.table}")
        + f", until {ch['until_s']:g} s",
        "completed": f"{len(rows)}/{p.recipients}",
        "all bytes equal": all(r["bytes_equal"] for r in rows),
        "completion p50 s": round(percentile(secs, 0.5), 1),
        "completion p90 s": round(percentile(secs, 0.9), 1),
        "retries (attempts beyond the first)": sum(r["attempts"] - 1 for r in rows),
        "hosts_run": "the real Node (peerpost node) per host, the real rendezvous server "
                     "with its DHT bootstrap node",
        "payload": "real bytes: sealed, hashed, verified, written"}
    summary |= nat_summary(spec, peers.nat_of, p)
    summary |= path_summary("", rows, d, spec)
    plots = [Plot("completion-cdf", "cdf",
                  f"{p.clip_mb:g} MB to {p.recipients} recipients, "
                  f"{len(churning)} churning",
                  "completion time after coming online (s, virtual)", "fraction of recipients",
                  {"churning hosts": [r["seconds"] for r in rows if r["churning"]],
                   "steady hosts": [r["seconds"] for r in rows if not r["churning"]]}),
             path_plot(rows, mode)]
    return ScenarioResult(COLUMNS, rows, summary, plots)


def _end_churn(churn: Churn, hosts: list[Any]) -> None:
    churn.stop()
    for h in hosts:
        h.go_online()
