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
received file is compared with the original. The clip is random bytes. Peer hosts sit
behind the NATs `[topology] nat` draws (all public by default).

Each mode runs in its own simulation with the same seed, so both see the same arrival
times and links. Rows: one per recipient and mode. Times are virtual seconds since the
sender's `send` returned: `online_at_s` when the recipient's node started,
`completed_at_s` when the node recorded the download complete (its inbox entry's
`completed_at`), `seconds` the difference. Bytes per source are the receiving node's own
view, every attempt included (`inbox --json` `sources`): file bytes it verified and kept;
"MB from sender" in the summary counts what the sender's transfer server served, chunks
that no one kept included, and "relay MB" every byte the server's relay forwarded (both
directions, the transfer protocol's own bytes included).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.deploy import EPOCH, SimNode, deploy_rendezvous
from sim.network.host import Host
from sim.plots import Plot
from sim.scenario import (
    Peers,
    Progress,
    ScenarioResult,
    ScenarioSpec,
    combine_hashes,
    draw,
    times,
    variant,
    window,
)
from sim.scenarios.dht_lookup import percentile
from sim.simulation import Simulation

DOMAIN = "family.example"
DHT_PORT = 8468
COLUMNS = ["mode", "recipient", "nat", "free_rider", "bad_chunks", "sources_banned",
           "online_at_s", "completed_at_s",
           "seconds", "from_sender_mb", "from_peers_mb", "direct_mb", "punch_mb",
           "quic_mb", "webrtc_mb", "relay_mb", "attempts", "bytes_equal"]
# A stream's path (as `inbox --json` sources show it) -> the column of MB it carried.
PATHS = {"tcp": "direct_mb", "tcp-punch": "punch_mb", "quic": "quic_mb",
         "webrtc": "webrtc_mb", "relay": "relay_mb"}
MB = 1_000_000
MODES = ("off", "on")


@dataclass(frozen=True, slots=True)
class Params:
    """What a family-video run reads from its scenario's sections."""

    recipients: int = 20
    clip_mb: float = 200.0
    online: dict[str, Any] = field(default_factory=lambda: {"process": "uniform",
                                                            "window_s": 600.0})
    modes: tuple[str, ...] = MODES
    free_riders: float = 0.0
    bad_sources: float = 0.0
    sample_s: float = 1.0

    @classmethod
    def from_spec(cls, spec: ScenarioSpec, rng: random.Random) -> Params:
        """topology.hosts recipients; workload.size_mb (one draw), online, co_recipients;
        adversaries.free_rider_share, bad_chunk_share; measure.sample_s."""
        w = spec.doc["workload"]
        size = w.get("size_mb") or {"dist": "fixed", "value": 20.0}
        return cls(recipients=spec.doc["topology"]["hosts"],
                   clip_mb=max(0.001, draw(size, rng)), online=w["online"],
                   modes=tuple(w["co_recipients"]),
                   free_riders=spec.doc["adversaries"]["free_rider_share"],
                   bad_sources=spec.doc["adversaries"]["bad_chunk_share"],
                   sample_s=spec.doc["measure"]["sample_s"])

    @property
    def arrival_window_s(self) -> float:
        """How long recipients take to come online (for titles)."""
        return window(self.online)


def links_label(spec: ScenarioSpec) -> str:
    """The peer links as the summary states them."""
    def one(key: str) -> str:
        d = spec.doc["topology"].get(key)
        if d is None:
            return "unlimited"
        if d["dist"] == "fixed":
            return f"{d['value']:g} Mbit/s"
        return ", ".join(f"{k}={v}" for k, v in d.items()) + " Mbit/s"
    return f"{one('down')} down, {one('up')} up (every peer host, drawn per host)"


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
    """What `deliver` leaves behind: rows, what the sender served, the relay's load, and how
    to stop it all."""

    rows: list[dict[str, Any]]
    sender_mb: float
    close: Callable[[], Awaitable[None]]  # stop every node, then the server
    relay_bytes: int = 0
    relay_circuits: int = 0  # relayed streams spliced, in all
    relay_peak: int = 0  # most relayed streams open at once (sampled)


async def deliver(sim: Simulation, server_host: Host, sender_host: Host, hosts: list[Host],
                  root: Path, clip: Path, online_at: list[float], *, co_recipients: bool,
                  done: list[int], progress: Progress | None, total: int,
                  mode: str, retry_max: float = 60.0,
                  after_setup: Callable[[], None] | None = None,
                  nat_of: dict[str, str] | None = None, free_riders: frozenset[int] = frozenset(),
                  bad_sources: frozenset[int] = frozenset(), sample_s: float = 1.0) -> Delivery:
    """Start the server and the sender's node, send, then start each recipient's node at
    its time and wait until it holds the clip. Every address is registered first (as
    `peerpost init` does at install time). `after_setup` runs once `send` has returned
    (churn starts there), so that churn times, online times and completion times all count
    from the send.

    Free riders (indices into `hosts`) download like anyone but their transfer server
    never grants an upload slot: sessions to them open and stall, and the downloader moves
    on. Bad sources (indices into `hosts`) serve every chunk with one bit flipped after
    sealing: their requesters' verification rejects it and bans them. The relay's open
    circuits are sampled every `sample_s` for the peak."""
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
    relay = deployed.server.relay
    peak = [0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], len(relay.splices))
            await asyncio.sleep(sample_s)

    sampler = server_host.create_task(sample())
    sender_node = await sender.start()
    sent = await sender_host.create_task(sender_node.send(
        clip, [n.address for n in nodes], "family video", ""))
    sent_at = sim.now  # time 0 of the rows, and of churn
    if after_setup is not None:
        after_setup()
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
        if i in free_riders:
            running.transfer.upload_slots = asyncio.Semaphore(0)
        if i in bad_sources:
            serve_bad_chunks(running.transfer)
        entries = await node.wait_inbox(holds, every=1.0)
        (entry,) = [e for e in entries if e.id == message_id]
        # The node's own record, not the poll that saw it (up to `every` later).
        done_at = sim.now if entry.completed_at is None else entry.completed_at - EPOCH
        act = running.downloads.active.get(message_id)
        views = list(act.sources.values()) if act else []
        from_sender = sum(v.bytes for v in views if v.peer == sender_label)
        from_peers = sum(v.bytes for v in views if v.peer != sender_label)
        by_path = running.fetch_meter.bytes_by_path()
        rows.append({
            "mode": mode, "recipient": node.host.name,
            "nat": (nat_of or {}).get(node.host.name, "none"), "free_rider": i in free_riders,
            "bad_chunks": i in bad_sources,
            "sources_banned": sum(1 for v in views if v.banned),
            "online_at_s": round(t0 - sent_at, 3), "completed_at_s": round(done_at - sent_at, 3),
            "seconds": round(done_at - t0, 3),
            "from_sender_mb": round(from_sender / MB, 3),
            "from_peers_mb": round(from_peers / MB, 3),
            **{col: round(by_path[path] / MB, 3) for path, col in PATHS.items()},
            "attempts": entry.attempts,
            "bytes_equal": file_digest(Path(str(entry.path))) == original})
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    await asyncio.gather(*(recipient(i) for i in range(len(hosts))))
    # Every chunk the sender's transfer server sent, duplicates and lost attempts included.
    served = sender_node.transfer.counters["bytes_served"] / MB
    sampler.cancel()
    load = (relay.relayed_bytes, relay.sessions_spliced, peak[0])

    async def close() -> None:
        for n in (sender, *nodes):
            await n.stop()
        await server_host.create_task(deployed.server.aclose())

    return Delivery(rows, served, close, *load)


def _run_mode(sim: Simulation, spec: ScenarioSpec, p: Params, mode: str, root: Path,
              done: list[int], progress: Progress | None,
              total: int) -> tuple[Delivery, dict[str, str]]:
    server_host = sim.add_host("rendezvous")  # an ISP's server: a well-connected link
    peers = Peers(sim, spec, p.recipients + 1)
    sender_host = peers.add("sender")
    hosts = [peers.add(f"r{i}") for i in range(p.recipients)]
    rng = sim.rng_for("family-video/arrivals")
    online_at = times(p.online, len(hosts), rng)
    riders, bad = adversaries(sim, p)
    clip = root / "clip.bin"
    write_clip(clip, int(p.clip_mb * MB), f"{sim.seed}/clip")

    async def main() -> Delivery:
        d = await deliver(sim, server_host, sender_host, hosts, root, clip, online_at,
                          co_recipients=mode == "on", done=done, progress=progress,
                          total=total, mode=mode, nat_of=peers.nat_of, free_riders=riders,
                          bad_sources=bad, sample_s=p.sample_s)
        await d.close()
        return d

    return sim.run(main()), peers.nat_of


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run each mode (its own simulation, same seed) and return rows, summary and plots."""
    p = Params.from_spec(spec, sim.rng_for("family-video/size"))
    rows: list[dict[str, Any]] = []
    runs: dict[str, Delivery] = {}
    digests: list[str] = []
    nat_of: dict[str, str] = {}
    done = [0]
    total = p.recipients * len(p.modes)
    for n, mode in enumerate(p.modes):
        with variant(sim, spec, n, digests) as s, \
                tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
            runs[mode], nat_of = _run_mode(s, spec, p, mode, Path(tmp), done, progress, total)
            rows += runs[mode].rows
    summary: dict[str, Any] = {
        "recipients": p.recipients, "clip_mb": round(p.clip_mb, 3),
        "links": links_label(spec),
        "hosts_run": "the real Node (peerpost node) per host, the real rendezvous server "
                     "with its DHT bootstrap node",
        "co_recipients_found_by": "the node's own DHT provider lookups (NodeOptions."
                                  "co_recipients on/off)",
        "payload": "real bytes: sealed, hashed, verified, written (no reference mode)"}
    summary |= nat_summary(spec, nat_of, p)
    for mode in p.modes:
        mine = [r for r in rows if r["mode"] == mode]
        secs = [r["seconds"] for r in mine]
        summary[f"{mode}: completed"] = f"{len(mine)}/{p.recipients}"
        summary[f"{mode}: all bytes equal"] = all(r["bytes_equal"] for r in mine)
        summary[f"{mode}: completion p50 s"] = round(percentile(secs, 0.5), 1)
        summary[f"{mode}: completion p90 s"] = round(percentile(secs, 0.9), 1)
        summary[f"{mode}: last done at s"] = max((r["completed_at_s"] for r in mine),
                                                  default=None)
        summary[f"{mode}: MB from sender"] = round(runs[mode].sender_mb, 1)
        summary |= path_summary(f"{mode}: ", mine, runs[mode], spec)
    plots = [
        Plot("completion-cdf", "cdf",
             f"{p.clip_mb:g} MB clip to {p.recipients} recipients ({links_label(spec)})",
             "completion time after coming online (s, virtual)",
             "fraction of recipients",
             {f"co-recipient sourcing {m}": [r["seconds"] for r in rows if r["mode"] == m]
              for m in p.modes}),
        Plot("completed-over-time", "series", "Recipients holding the whole clip",
             "time since the send (s, virtual)", "recipients complete",
             {f"co-recipient sourcing {m}": _cumulative(
                 [r["completed_at_s"] for r in rows if r["mode"] == m]) for m in p.modes}),
        path_plot(rows, p.modes[-1]),
    ]
    return ScenarioResult(COLUMNS, rows, summary, plots, trace_hash=combine_hashes(digests))


def adversaries(sim: Simulation, p: Params) -> tuple[frozenset[int], frozenset[int]]:
    """(free riders, bad-chunk sources) among the recipients, each from its own generator;
    a recipient is never both (bad sources are drawn from the others)."""
    riders = frozenset(sim.rng_for("family-video/free-riders").sample(
        range(p.recipients), int(p.free_riders * p.recipients)))
    rest = [i for i in range(p.recipients) if i not in riders]
    bad = frozenset(sim.rng_for("family-video/bad-chunks").sample(
        rest, min(len(rest), int(p.bad_sources * p.recipients))))
    return riders, bad


class _Corrupted:
    """A served content whose sealed chunks come out with one bit flipped."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read_sealed(self, index: int) -> bytes | bytearray:
        data = bytearray(self._inner.read_sealed(index))
        data[len(data) // 2] ^= 0x01
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def serve_bad_chunks(transfer: Any) -> None:
    """Make a node's transfer server corrupt every chunk it serves (after sealing, so the
    requester's hash check against the Merkle leaf is what catches it)."""
    from dataclasses import replace as _replace

    sealers = transfer.sealers
    submit = sealers.submit

    def corrupting(job: Any) -> None:
        submit(_replace(job, content=_Corrupted(job.content)))

    sealers.submit = corrupting


def nat_summary(spec: ScenarioSpec, nat_of: dict[str, str], p: Params) -> dict[str, Any]:
    """The NAT mix as drawn (only when it is not all public) and the adversaries."""
    out: dict[str, Any] = {}
    kinds = [k for k in nat_of.values()]
    if any(k != "none" for k in kinds):
        from sim.scenario import NAT_KINDS

        out["nat mix (hosts)"] = ", ".join(f"{k} {kinds.count(k)}" for k in NAT_KINDS
                                           if kinds.count(k))
        out["sender's NAT"] = nat_of.get("sender", "none")
    if p.free_riders:
        out["free riders"] = int(p.free_riders * p.recipients)
    if p.bad_sources:
        out["bad-chunk sources"] = int(p.bad_sources * p.recipients)
    return out


def path_summary(prefix: str, rows: list[dict[str, Any]], d: Delivery,
                 spec: ScenarioSpec) -> dict[str, Any]:
    """Bytes by path (direct TCP, TCP punch, QUIC, WebRTC, relay), by NAT kind when NATs are in
    the mix, and the relay's load."""
    out: dict[str, Any] = {}
    total = sum(r[c] for r in rows for c in PATHS.values()) or 1.0
    for path, col in PATHS.items():
        out[f"{prefix}share via {path}"] = round(sum(r[col] for r in rows) / total, 4)
    kinds = sorted({r["nat"] for r in rows})
    if kinds != ["none"]:
        for kind in kinds:
            mine = [r for r in rows if r["nat"] == kind]
            t = sum(r[c] for r in mine for c in PATHS.values()) or 1.0
            out[f"{prefix}{kind}: share via direct/punch/quic/webrtc/relay"] = "/".join(
                f"{sum(r[c] for r in mine) / t:.2f}" for c in PATHS.values())
            out[f"{prefix}{kind}: completion p50 s"] = round(
                percentile([r["seconds"] for r in mine], 0.5), 1)
    if any(r["bad_chunks"] for r in rows):
        out[f"{prefix}sources banned (by recipients)"] = sum(r["sources_banned"] for r in rows)
    out[f"{prefix}relay MB"] = round(d.relay_bytes / MB, 3)
    out[f"{prefix}relay circuits"] = d.relay_circuits
    out[f"{prefix}relay peak concurrent circuits"] = d.relay_peak
    return out


def path_plot(rows: list[dict[str, Any]], mode: str) -> Plot:
    """MB received by each path, per NAT kind of the recipient (one series per path)."""
    from sim.scenario import NAT_KINDS

    kinds = [k for k in NAT_KINDS if any(r["nat"] == k for r in rows)]
    return Plot("bytes-by-path", "line",
                f"MB received by path, by the recipient's NAT (co-recipients {mode})",
                "recipient's NAT", "MB received (all recipients of that NAT)",
                {path: [(i, sum(r[col] for r in rows if r["nat"] == k and r["mode"] == mode))
                        for i, k in enumerate(kinds)]
                 for path, col in PATHS.items()}, xticklabels=tuple(kinds))


def _cumulative(times: list[float]) -> list[tuple[float, float]]:
    return [(0.0, 0.0)] + [(t, i + 1) for i, t in enumerate(sorted(times))]
