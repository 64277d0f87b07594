"""server-load: one rendezvous server, many devices connecting and sending.

The real `RendezvousServer` (in-memory inline SQLite store, sim.deploy) on one host; each
device is a real `RendezvousClient` on its own host. Devices log in at random times within
`connect_window_s` (a `late_fraction` of them only after the sends, so their mail queues);
then each online device sends `messages_per_device` envelopes of `blob_bytes` to random
devices at random times within `send_window_s`. Recipients acknowledge (REMOVE) each push.

Measured: push latency (SEND call to DELIVER at the recipient, for recipients online at the
time; late ones separately, from their login) and the server's queue depth (envelopes stored
and not yet removed) sampled every `sample_s`. Crypto and SQLite are real; the server's CPU
time is not modelled (it runs in zero virtual time), so latencies are network-bound.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from crypto.identity import DeviceIdentity
from rendezvous.client import Deliver, RendezvousClient
from sim.deploy import deploy_rendezvous
from sim.plots import Plot
from sim.scenario import Progress, ScenarioResult, ScenarioSpec
from sim.scenarios.dht_lookup import percentile
from sim.simulation import Simulation

COLUMNS = ["message", "sender", "recipient", "recipient_late", "sent_at_s", "delivered_at_s",
           "latency_s"]
DOMAIN = "load.example"


@dataclass(frozen=True, slots=True)
class Params:
    """The [params] table of a server-load scenario."""

    devices: int = 10_000
    messages_per_device: int = 1
    blob_bytes: int = 1024
    connect_window_s: float = 60.0
    send_window_s: float = 60.0
    late_fraction: float = 0.1
    sample_s: float = 1.0

    @classmethod
    def from_spec(cls, spec: ScenarioSpec) -> Params:
        """topology.hosts devices; workload.messages, size_bytes, online, send, late_share;
        measure.sample_s."""
        w = spec.doc["workload"]
        messages = w.get("messages") or {"dist": "fixed", "value": 1}
        return cls(devices=spec.doc["topology"]["hosts"],
                   messages_per_device=int(messages["value"]), blob_bytes=w["size_bytes"],
                   connect_window_s=w["online"]["window_s"],
                   send_window_s=w["send"]["window_s"], late_fraction=w["late_share"],
                   sample_s=spec.doc["measure"]["sample_s"])


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the load; rows per message, summary, plots."""
    from sim.scenario import Peers

    p = Params.from_spec(spec)
    rng = sim.rng_for("server-load")
    rv = sim.add_host("rendezvous")
    peers = Peers(sim, spec, p.devices)
    hosts = [peers.add(f"d{i}", nat=False) for i in range(p.devices)]
    ids = [DeviceIdentity.from_seed(sim.rng_for(f"id/{i}").randbytes(32))
           for i in range(p.devices)]
    late = set(rng.sample(range(p.devices), int(p.late_fraction * p.devices)))
    login_at = [rng.uniform(0, p.connect_window_s) for _ in range(p.devices)]
    # Late devices register, log out before the sends, and come back after them.
    back_at = {i: p.connect_window_s + p.send_window_s + rng.uniform(0, p.connect_window_s)
               for i in late}
    plan = [(rng.uniform(0, p.send_window_s) + p.connect_window_s, i, rng.randrange(p.devices))
            for i in range(p.devices) if i not in late for _ in range(p.messages_per_device)]
    plan = [(t, i, j if j != i else (j + 1) % p.devices) for t, i, j in plan]
    sent_at: dict[bytes, tuple[float, int, int]] = {}
    rows: list[dict[str, Any]] = []
    depth: list[tuple[float, float]] = []
    clients: list[RendezvousClient | None] = [None] * p.devices
    everything = asyncio.Event()

    def tick() -> None:
        if progress is not None:
            progress(len(rows), len(plan))
        if len(rows) == len(plan):
            everything.set()

    async def device(i: int, address: tuple[str, int]) -> None:
        await asyncio.sleep(login_at[i])

        def session() -> RendezvousClient:
            return RendezvousClient(address[0], address[1], ids[i], f"u{i}@{DOMAIN}",
                                    register=True, rng=sim.rng_for(f"client/{i}"))

        client = session()
        await client.start()
        if i in late:
            await client.aclose()
            await asyncio.sleep(back_at[i] - sim.now)
            client = session()
            await client.start()
        clients[i] = client
        async for push in client.pushes():
            if not isinstance(push, Deliver):
                continue
            mid = push.envelope.message_id
            t0, sender, _ = sent_at[mid]
            now = sim.now
            rows.append({"message": mid.hex(), "sender": sender, "recipient": i,
                         "recipient_late": i in late, "sent_at_s": round(t0, 6),
                         "delivered_at_s": round(now, 6),
                         "latency_s": round(now - max(t0, back_at.get(i, 0.0)), 6)})
            await client.remove(mid)
            tick()

    async def send(t: float, i: int, j: int, n: int) -> None:
        await asyncio.sleep(t)
        client = clients[i]
        if client is None:  # not logged in yet (a connect window longer than the RTTs...)
            await asyncio.sleep(p.connect_window_s)
            client = clients[i]
        if client is None:
            raise RuntimeError(f"device {i} never logged in")
        mid = sim.rng_for(f"mid/{n}").randbytes(16)
        sent_at[mid] = (sim.now, i, j)
        blob = bytes(p.blob_bytes)
        await client.send(mid, [(f"u{j}@{DOMAIN}", ids[j].peer_id, blob)])

    async def sampler(server: Any) -> None:
        while True:
            stats = await server.store.stats()
            depth.append((sim.now, stats.queued_envelopes))
            await asyncio.sleep(p.sample_s)

    async def main() -> None:
        deployed = await deploy_rendezvous(sim, rv, DOMAIN)
        tasks = [hosts[i].create_task(device(i, deployed.address)) for i in range(p.devices)]
        watch = rv.create_task(sampler(deployed.server))
        senders = [hosts[i].create_task(send(t, i, j, n)) for n, (t, i, j) in enumerate(plan)]
        await asyncio.gather(*senders)
        if plan:
            await everything.wait()
        for t in tasks:
            t.cancel()
        watch.cancel()
        await asyncio.gather(*tasks, watch, return_exceptions=True)
        await asyncio.gather(*(hosts[i].create_task(c.aclose())
                               for i, c in enumerate(clients) if c is not None))
        await rv.create_task(deployed.server.aclose())

    sim.run(main())
    online = [r["latency_s"] for r in rows if not r["recipient_late"]]
    queued = [r["latency_s"] for r in rows if r["recipient_late"]]

    def q(v: list[float], x: float) -> float | None:
        return round(percentile(v, x) * 1000, 1) if v else None

    summary: dict[str, Any] = {
        "devices": p.devices, "late_devices": len(late), "messages": len(plan),
        "delivered": len(rows), "delivered_once": len({r["message"] for r in rows}) == len(rows),
        "push_latency_p50_ms (online)": q(online, 0.5),
        "push_latency_p99_ms (online)": q(online, 0.99),
        "push_latency_p50_ms (late, from login)": q(queued, 0.5),
        "max_queue_depth": max((d for _, d in depth), default=0),
        "virtual_s": round(sim.now, 3)}
    plots = [
        Plot("push-latency-cdf", "cdf", f"Push latency, {p.devices} devices on one server",
             "SEND to DELIVER (ms)", "fraction of messages",
             {"recipient online": [v * 1000 for v in online],
              "recipient logged in later (from login)": [v * 1000 for v in queued]}),
        Plot("queue-depth", "series", "Envelopes queued on the server",
             "time (s, virtual)", "queued envelopes", {"queue depth": depth}),
    ]
    return ScenarioResult(COLUMNS, rows, summary, plots)
