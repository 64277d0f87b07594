"""One delivery between two real nodes on simulated hosts, for the rung tests (TCP punch, QUIC).

alice (behind NAT `a`) sends a file to bob (behind NAT `b`) through a real rendezvous
server; the result is what bob's `inbox --json` sources show (file bytes by path), the
virtual seconds from send to complete, whether the bytes are equal, and the trace digest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from overlay.app.node import NodeOptions
from overlay.mail.inbox_state import InboxState
from sim.deploy import STUN_TCP_PORT, SimNode, deploy_rendezvous
from sim.network.latency import FixedLatency
from sim.network.nat import NatBehaviour
from sim.simulation import Simulation

MB = 1_000_000
SIZE = 1_000_000


@dataclass(frozen=True, slots=True)
class Delivered:
    """bob's bytes by path, the virtual seconds from send to complete, bytes equal, the
    run's trace digest."""

    paths: dict[str, int]
    took: float
    same: bool
    digest: str


def deliver(tmp: Path, a: NatBehaviour | None, b: NatBehaviour | None, *,
            alice_options: NodeOptions | None = None,
            bob_options: NodeOptions | None = None, seed: int = 1,
            loss: float = 0.0, punch: bool = True) -> Delivered:
    """Run the delivery (seeded; `loss`: of every datagram; `punch` False: the server runs
    no STUN over TCP, so the ladder has no TCP punch; callback errors fail the caller's
    test)."""
    with Simulation(seed=seed, latency=FixedLatency(0.02), loss=loss) as sim:
        rv = sim.add_host("rv")
        ha = sim.add_host("alice", up=2.5 * MB, down=10 * MB, nat=a)
        hb = sim.add_host("bob", up=2.5 * MB, down=10 * MB, nat=b)
        tmp.mkdir(parents=True, exist_ok=True)
        clip = tmp / "clip.bin"
        clip.write_bytes(sim.rng_for("clip").randbytes(SIZE))

        async def main() -> tuple[dict[str, int], float, bool]:
            deployed = await deploy_rendezvous(
                sim, rv, "example.net", stun_tcp_port=STUN_TCP_PORT if punch else None)
            alice = SimNode(sim, ha, tmp / "alice", "alice@example.net", deployed.address,
                            options=alice_options)
            bob = SimNode(sim, hb, tmp / "bob", "bob@example.net", deployed.address,
                          options=bob_options)
            for n in (alice, bob):
                await n.init()
                await n.start()
            assert alice.node is not None and bob.node is not None
            t0 = sim.now
            await ha.create_task(alice.node.send(clip, ["bob@example.net"], "clip", ""))
            async with asyncio.timeout(600):
                (entry,) = await bob.wait_inbox(
                    lambda es: bool(es) and es[0].state is InboxState.COMPLETE)
            took = sim.now - t0
            act = bob.node.downloads.active.get(entry.id)
            paths: dict[str, int] = {}
            for s in act.sources.values() if act else ():
                view = s.as_dict()
                paths[str(view["path"])] = paths.get(str(view["path"]), 0) + int(
                    str(view["bytes"]))
            same = Path(str(entry.path)).read_bytes() == clip.read_bytes()
            for n in (alice, bob):
                await n.stop()
            await rv.create_task(deployed.server.aclose())
            return paths, took, same

        paths, took, same = sim.run(main())
        assert not sim.errors, sim.errors[:3]
        return Delivered(paths, took, same, sim.trace.digest())
