"""The simulated half of the fidelity comparison: one sender, N recipients, one file.

    times = simulate(FidelitySetup(recipients=5, size=20_000_000, up=625_000,
                                   down=2_500_000, one_way=0.0001), co_recipients=True)

The same run as the real one on shaped Linux links (benchmarks/fidelity.py): the real
rendezvous server with its DHT bootstrap node on an unshaped host, a sender and the
recipients on hosts whose uplink and downlink have the given rates, every host public.
Every node runs first, then the sender's node sends the file to all recipients at once;
a recipient's time is its inbox entry's `completed_at` minus the moment `send` returned
(the node's own clock, virtual here, so no polling granularity enters).
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.deploy import EPOCH, SimNode, deploy_rendezvous
from sim.network.latency import FixedLatency
from sim.network.net import WIRE_HEADERS
from sim.scenarios.family_video import write_clip
from sim.simulation import Simulation

DOMAIN = "example.net"
DHT_PORT = 8468


@dataclass(frozen=True, slots=True)
class FidelitySetup:
    """Capacities in bytes/s (None: unshaped), one-way latency in seconds."""

    recipients: int = 5
    size: int = 20_000_000
    up: float | None = 625_000.0
    down: float | None = 2_500_000.0
    one_way: float = 0.0001
    seed: int = 1
    timeout: float = 3600.0  # virtual seconds before the run is declared stuck
    # Charge Ethernet/IP/TCP headers on the links as `tc tbf` does (sim.network.net's
    # WIRE_HEADERS); False: payload only, the simulator's default.
    headers: bool = True


def summarize(entry: dict[str, Any], sender_label: str, t0: float) -> dict[str, float]:
    """What the comparison keeps of an `inbox --json` entry (times after `t0`)."""
    sources = entry.get("sources") or []
    from_sender = sum(int(s["bytes"]) for s in sources if s.get("peer") == sender_label)
    from_peers = sum(int(s["bytes"]) for s in sources if s.get("peer") != sender_label)
    first = entry.get("first_byte_at")
    return {"seconds": float(entry["completed_at"]) - t0,
            "first_byte_s": float(first) - t0 if first is not None else float("nan"),
            "from_sender_mb": from_sender / 1e6, "from_peers_mb": from_peers / 1e6}


def simulate(setup: FidelitySetup, *, co_recipients: bool) -> list[dict[str, float]]:
    """Per recipient, in host order: `seconds` to completion after the send (virtual),
    `first_byte_s` likewise, `from_sender_mb` and `from_peers_mb` (the node's view of its
    sources, as `inbox --json` shows it)."""
    from overlay.app.node import NodeOptions
    from overlay.mail.inbox_state import InboxState

    with tempfile.TemporaryDirectory(prefix="peerpost-fidelity-") as tmp, \
            Simulation(setup.seed, latency=FixedLatency(setup.one_way),
                       **(WIRE_HEADERS if setup.headers else {})) as sim:
        root = Path(tmp)
        server_host = sim.add_host("server")
        sender_host = sim.add_host("sender", up=setup.up, down=setup.down)
        hosts = [sim.add_host(f"r{i}", up=setup.up, down=setup.down)
                 for i in range(setup.recipients)]
        path = root / "file.bin"
        write_clip(path, setup.size, f"{setup.seed}/fidelity")
        options = NodeOptions(co_recipients=co_recipients)

        async def main() -> list[dict[str, float]]:
            deployed = await deploy_rendezvous(sim, server_host, DOMAIN, dht_port=DHT_PORT)
            sender = SimNode(sim, sender_host, root / "sender", f"sender@{DOMAIN}",
                             deployed.address, options=options)
            nodes = [SimNode(sim, h, root / h.name, f"{h.name}@{DOMAIN}", deployed.address,
                             options=options) for h in hosts]
            for n in (sender, *nodes):
                await n.init()
            running = await sender.start()
            for n in nodes:
                await n.start()
            sent = await sender_host.create_task(
                running.send(path, [n.address for n in nodes], "fidelity", ""))
            t0 = EPOCH + sim.now
            mid = bytes.fromhex(sent["id"])
            label = running.identity.peer_id.hex()[:16]

            async def one(n: SimNode) -> dict[str, float]:
                entries = await n.wait_inbox(
                    lambda es: any(e.id == mid and e.state is InboxState.COMPLETE
                                   for e in es), every=0.5)
                (entry,) = [e for e in entries if e.id == mid]
                if entry.completed_at is None or n.node is None:
                    raise RuntimeError(f"{n.address}: complete without completed_at")
                act = n.node.downloads.active.get(mid)
                return summarize({
                    "completed_at": entry.completed_at, "first_byte_at": entry.first_byte_at,
                    "sources": [v.as_dict() for v in act.sources.values()] if act else []},
                    label, t0)

            async with asyncio.timeout(setup.timeout):
                times = list(await asyncio.gather(*(one(n) for n in nodes)))
            for n in (sender, *nodes):
                await n.stop()
            await server_host.create_task(deployed.server.aclose())
            return times

        result: list[dict[str, float]] = sim.run(main())
        if sim.errors:
            raise RuntimeError(f"{len(sim.errors)} simulated callbacks failed: "
                               f"{sim.errors[0].get('message')}")
        return result
