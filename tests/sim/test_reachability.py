"""A simulated node learns its reachability as a real one does: the simulated server answers
STUN on UDP, the real `probe` asks it through the NAT model, and the node acts on the answer.

What the NAT lab (tests/natlab/test_webrtc_nat.py) asserts of real NATs from one socket
asking two STUN addresses holds here: the server sees the NAT's public address; a full cone
and a port-restricted cone keep one public port for both servers, a symmetric NAT gives
each its own. A node behind any of the three is behind NAT; a public host is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.dht import DhtNode
from overlay.transports.reachability import Reachability, probe
from rendezvous.services import StunService
from rendezvous.stun import query_mapping
from sim.deploy import RENDEZVOUS_PORT, STUN_PORT, SimNode, deploy_rendezvous
from sim.network.host import Host
from sim.network.latency import FixedLatency
from sim.network.nat import NatBehaviour
from sim.simulation import Simulation

KINDS: dict[str, NatBehaviour | None] = {
    "full_cone": NatBehaviour.full_cone(),
    "port_restricted": NatBehaviour.port_restricted_cone(),
    "symmetric": NatBehaviour.symmetric(),
    "public": None,
}
SECOND_STUN = 3479


def _public_ip(host: Host) -> str:
    return host.nat.address if host.nat is not None else host.address


def test_the_real_probe_sees_each_nat_kind_as_the_lab_does() -> None:
    with Simulation(seed=3, latency=FixedLatency(0.02)) as sim:
        rv = sim.add_host("rv")
        hosts = {kind: sim.add_host(kind, nat=nat) for kind, nat in KINDS.items()}

        async def main() -> dict[str, tuple[Reachability, list[tuple[str, int]]]]:
            deployed = await deploy_rendezvous(sim, rv, "example.net")
            second = await rv.create_task(StunService.start("0.0.0.0", SECOND_STUN))
            out = {}
            for kind, host in hosts.items():
                reach = await host.create_task(probe(rv.address, RENDEZVOUS_PORT, STUN_PORT,
                                                     host.address))
                mapped = await host.create_task(query_mapping(
                    [(rv.address, STUN_PORT), (rv.address, SECOND_STUN)]))
                out[kind] = (reach, mapped)
            await rv.create_task(second.aclose())
            await rv.create_task(deployed.server.aclose())
            return out

        seen = sim.run(main())
        assert not sim.errors, sim.errors[:3]
    for kind, (reach, (first, second)) in seen.items():
        host = hosts[kind]
        assert reach.local_ip == host.address, kind
        assert reach.nat is (kind != "public"), (kind, reach)
        assert reach.mapped is not None and reach.mapped[0] == _public_ip(host), kind
        assert first[0] == second[0] == _public_ip(host), kind
        if kind == "symmetric":
            assert first[1] != second[1], f"symmetric NAT kept one port: {first} {second}"
        else:
            assert first[1] == second[1], f"{kind} moved the port: {first} {second}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_nated_node_runs_its_dht_as_a_client(tmp_path: Path, kind: str) -> None:
    """A real node behind NAT says so to its peers and joins the DHT as a client: the
    server's bootstrap node never puts it in its routing table. A public node serves."""
    with Simulation(seed=5, latency=FixedLatency(0.02)) as sim:
        rv = sim.add_host("rv")
        host = sim.add_host("dev", up=2e6, down=10e6, nat=KINDS[kind])

        async def main() -> tuple[Reachability | None, bool, object, list[bytes], bytes]:
            deployed = await deploy_rendezvous(sim, rv, "example.net", dht_port=8468)
            node = SimNode(sim, host, tmp_path / kind, "dev@example.net", deployed.address)
            await node.init()
            running = await node.start()
            dht = running.providers.dht
            bootstrap = deployed.server.services["dht"]
            assert isinstance(bootstrap, DhtNode)
            known = [c.node_id for c in bootstrap.contacts()]
            # What peers read before dialling it (a NATed holder: start WebRTC at once).
            (device,) = (await host.create_task(
                running.rendezvous.finger("dev@example.net"))).devices
            out = (running.reach, dht.client_only, (device.advertise or {}).get("nat"),
                   known, dht.peer_id)
            await node.stop()
            await rv.create_task(deployed.server.aclose())
            return out

        reach, client_only, says_nat, known, me = sim.run(main())
        assert not sim.errors, sim.errors[:3]
    nated = kind != "public"
    assert reach is not None and reach.nat is nated
    assert client_only is nated
    assert says_nat is nated
    assert (me in known) is not nated, (kind, len(known))
