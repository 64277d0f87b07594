"""family-video: one sender on a home link sends a clip to recipients who come online at
random times; completion times with co-recipient sourcing off and on.

Every host runs the real `Node` (`peerpost node`: rendezvous session, inbox, content store,
transfer server, DHT, download queue; sim.deploy), and the domain's real rendezvous server
runs with its DHT bootstrap node, as `peerpost-rendezvous serve --dht-port` does. The
sender's node sends one location message to every recipient; each recipient's node starts
at its time, reads its mailbox and downloads as it would at home. With co-recipient
sourcing on (the default `NodeOptions.co_recipients`), the node also fetches from the
co-recipients the DHT names and looks again every `provider_refresh` seconds; off, from the
sender alone. Chunks are really sealed, hashed, verified, decrypted and written, and every
received file is compared with the original. The clip is random bytes. All hosts are
public (direct TCP).

Each mode runs in its own simulation with the same seed, so both see the same arrival
times and links. Rows: one per recipient and mode. Bytes per source are the receiving
node's own view of its last download attempt (`inbox --json` `sources`); "MB from sender"
in the summary counts what the sender's transfer server served, every attempt included.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.content import DEFAULT_CHUNK_SIZE
from sim.deploy import SimNode, deploy_rendezvous
from sim.network.host import Host
from sim.plots import Plot
from sim.scenario import (
    Progress,
    ScenarioError,
    ScenarioResult,
    ScenarioSpec,
    build_simulation,
)
from sim.scenarios.dht_lookup import percentile
from sim.simulation import Simulation

DOMAIN = "family.example"
DHT_PORT = 8468
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


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file, to compare received bytes with the original."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class Delivery:
    """What `deliver` leaves behind: rows, what the sender served, and how to stop it all."""

    rows: list[dict[str, Any]]
    sender_mb: float
    close: Callable[[], Awaitable[None]]  # stop every node, then the server


async def deliver(sim: Simulation, server_host: Host, sender_host: Host, hosts: list[Host],
                  root: Path, clip: Path, online_at: list[float], *, co_recipients: bool,
                  done: list[int], progress: Progress | None, total: int,
                  mode: str, retry_max: float = 60.0,
                  after_setup: Callable[[], None] | None = None) -> Delivery:
    """Start the server and the sender's node, send, then start each recipient's node at
    its time and wait until it holds the clip. Every address is registered first (as
    `peerpost init` does at install time); `after_setup` runs then (churn starts there)."""
    from overlay.app.node import NodeOptions
    from overlay.mail.inbox_state import InboxState

    deployed = await deploy_rendezvous(sim, server_host, DOMAIN, dht_port=DHT_PORT)
    options = NodeOptions(co_recipients=co_recipients, retry_max=retry_max)
    sender = SimNode(sim, sender_host, root / sender_host.name, f"sender@{DOMAIN}",
                     deployed.address, options=options)
    nodes = [SimNode(sim, h, root / h.name, f"{h.name}@{DOMAIN}", deployed.address,
                     options=options) for h in hosts]
    for n in (sender, *nodes):
        await n.init()
    if after_setup is not None:
        after_setup()
    sender_node = await sender.start()
    sent = await sender_host.create_task(sender_node.send(
        clip, [n.address for n in nodes], "family video", ""))
    message_id = bytes.fromhex(sent["id"])
    sender_label = sender_node.identity.peer_id.hex()[:16]
    original = file_digest(clip)
    rows: list[dict[str, Any]] = []

    def holds(entries: list[Any]) -> bool:
        return any(e.id == message_id and e.state is InboxState.COMPLETE for e in entries)

    async def recipient(i: int) -> None:
        await asyncio.sleep(online_at[i])
        node = nodes[i]
        t0 = sim.now
        running = await node.start()
        entries = await node.wait_inbox(holds, every=1.0)
        (entry,) = [e for e in entries if e.id == message_id]
        act = running.downloads.active.get(message_id)
        views = list(act.sources.values()) if act else []
        from_sender = sum(v.bytes for v in views if v.peer == sender_label)
        from_peers = sum(v.bytes for v in views if v.peer != sender_label)
        rows.append({
            "mode": mode, "recipient": node.host.name,
            "online_at_s": round(online_at[i], 3), "completed_at_s": round(sim.now, 3),
            "seconds": round(sim.now - t0, 3),
            "from_sender_mb": round(from_sender / MB, 3),
            "from_peers_mb": round(from_peers / MB, 3),
            "attempts": entry.attempts,
            "bytes_equal": file_digest(Path(str(entry.path))) == original})
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    await asyncio.gather(*(recipient(i) for i in range(len(hosts))))
    # Every chunk the sender's transfer server sent, duplicates and lost attempts included.
    served = sender_node.transfer.counters["chunks_served"] * DEFAULT_CHUNK_SIZE / MB

    async def close() -> None:
        for n in (sender, *nodes):
            await n.stop()
        await server_host.create_task(deployed.server.aclose())

    return Delivery(rows, served, close)


def _run_mode(sim: Simulation, p: Params, mode: str, root: Path, done: list[int],
              progress: Progress | None, total: int) -> tuple[list[dict[str, Any]], float]:
    up, down = p.up_mbit * 1e6 / 8, p.down_mbit * 1e6 / 8
    server_host = sim.add_host("rendezvous")  # an ISP's server: a well-connected link
    sender_host = sim.add_host("sender", up=up, down=down)
    hosts = [sim.add_host(f"r{i}", up=up, down=down) for i in range(p.recipients)]
    rng = sim.rng_for("family-video/arrivals")
    online_at = [rng.uniform(0, p.arrival_window_s) for _ in hosts]
    clip = root / "clip.bin"
    write_clip(clip, int(p.clip_mb * MB), f"{sim.seed}/clip")

    async def main() -> tuple[list[dict[str, Any]], float]:
        d = await deliver(sim, server_host, sender_host, hosts, root, clip, online_at,
                          co_recipients=mode == "on", done=done, progress=progress,
                          total=total, mode=mode)
        await d.close()
        return d.rows, d.sender_mb

    return sim.run(main())


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run each mode (its own simulation, same seed) and return rows, summary and plots."""
    p = Params.parse(spec.params)
    rows: list[dict[str, Any]] = []
    sender_mb: dict[str, float] = {}
    done = [0]
    total = p.recipients * len(p.modes)
    for n, mode in enumerate(p.modes):
        s = sim if n == 0 else build_simulation(spec.network, sim.seed)
        try:
            with tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
                got, sender_mb[mode] = _run_mode(s, p, mode, Path(tmp), done, progress, total)
                rows += got
            if s is not sim:
                sim.errors.extend(s.errors)
        finally:
            if s is not sim:
                s.close()
    summary: dict[str, Any] = {
        "recipients": p.recipients, "clip_mb": p.clip_mb,
        "links": f"{p.down_mbit:g} Mbit/s down, {p.up_mbit:g} up (every host)",
        "hosts_run": "the real Node (peerpost node) per host, the real rendezvous server "
                     "with its DHT bootstrap node",
        "co_recipients_found_by": "the node's own DHT provider lookups (NodeOptions."
                                  "co_recipients on/off)",
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
        summary[f"{mode}: MB from sender"] = round(sender_mb.get(mode, 0.0), 1)
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
