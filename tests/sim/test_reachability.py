"""A simulated node learns its reachability as a real one does: the simulated server answers
STUN on UDP, the real `probe` asks it through the NAT model, and the node acts on the answer.

What the NAT lab (tests/natlab/test_webrtc_nat.py) asserts of real NATs from one socket
asking two STUN addresses holds here: the server sees the NAT's public address; a full cone
and a port-restricted cone keep one public port for both servers, a symmetric NAT gives
each its own. A node behind any of the three is behind NAT; a public host is not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kademlia.node import Node as Contact

from overlay.app.node import Node
from overlay.dht import DhtNode
from overlay.dht.protocol import Answer, RpcFailure
from overlay.dht.wire import Nodes
from overlay.transports.reachability import Reachability, probe
from rendezvous.services import StunService
from rendezvous.stun import query_mapping
from sim.deploy import RENDEZVOUS_PORT, STUN_PORT, Deployed, SimNode, deploy_rendezvous
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


async def _start_dev(sim: Simulation, rv: Host, host: Host,
                     root: Path) -> tuple[Deployed, SimNode, Node, DhtNode]:
    """The server on `rv` with its DHT bootstrap node, and a real node started on `host`."""
    deployed = await deploy_rendezvous(sim, rv, "example.net", dht_port=8468)
    node = SimNode(sim, host, root, "dev@example.net", deployed.address)
    await node.init()
    running = await node.start()
    bootstrap = deployed.server.services["dht"]
    assert isinstance(bootstrap, DhtNode)
    return deployed, node, running, bootstrap


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_nated_node_runs_its_dht_as_a_client(tmp_path: Path, kind: str) -> None:
    """A real node behind NAT says so to its peers and joins the DHT as a client: the
    server's bootstrap node never puts it in its routing table. A public node serves."""
    with Simulation(seed=5, latency=FixedLatency(0.02)) as sim:
        rv = sim.add_host("rv")
        host = sim.add_host("dev", up=2e6, down=10e6, nat=KINDS[kind])

        async def main() -> tuple[Reachability | None, bool, object, list[bytes], bytes]:
            deployed, node, running, bootstrap = await _start_dev(sim, rv, host,
                                                                  tmp_path / kind)
            dht = running.providers.dht
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


@pytest.mark.parametrize("kind", ["full_cone", "public"])
def test_the_dht_role_follows_a_move_to_another_kind_of_network(tmp_path: Path,
                                                                 kind: str) -> None:
    """A node that started behind a NAT and finds itself reachable after a move serves the
    DHT from then on, and the bootstrap node routes to it; one that started reachable and
    finds a NAT in front stops answering, and the bootstrap node drops it. (The move is
    what STUN would say after it: the host behind a full-cone NAT is in fact reachable at
    its mapping, as behind a forwarded port.)"""
    with Simulation(seed=7, latency=FixedLatency(0.02)) as sim:
        rv = sim.add_host("rv")
        host = sim.add_host("dev", up=2e6, down=10e6, nat=KINDS[kind])

        async def main() -> tuple[bool, bool, bool, bool, object, object]:
            deployed, node, running, bootstrap = await _start_dev(sim, rv, host,
                                                                  tmp_path / kind)
            dht = running.providers.dht
            before = dht.client_only, dht.peer_id in {c.node_id for c in bootstrap.contacts()}
            was = running.reach
            assert was is not None and was.local_ip is not None
            mapped = was.mapped or ("203.0.113.9", 4000)
            await host.create_task(running._moved(
                was.local_ip, was.local_ip, Reachability(was.local_ip, mapped, not was.nat)))
            await asyncio.sleep(5.0)  # virtual: its lookup, and the bootstrap's ping back
            contact = next((Contact(c.node_id, c.host, c.port) for c in bootstrap.contacts()
                            if c.node_id == dht.peer_id), None)
            asked = None
            if contact is not None:
                asked = await rv.create_task(_ask(bootstrap, contact))
            routed = dht.peer_id in {c.node_id for c in bootstrap.contacts()}
            after = dht.client_only, routed
            await node.stop()
            await rv.create_task(deployed.server.aclose())
            return (*before, *after, asked, running.reach)

        was_client, was_routed, now_client, now_routed, asked, reach = sim.run(main())
        assert not sim.errors, sim.errors[:3]
    nated_before = kind != "public"
    assert (was_client, was_routed) == (nated_before, not nated_before)
    assert isinstance(reach, Reachability) and reach.nat is not nated_before
    assert now_client is not nated_before
    if nated_before:  # it answers, and stays routed to
        assert isinstance(asked, Answer) and isinstance(asked.body, Nodes)
        assert now_routed
    else:  # still listed until asked; then no answer, and it is dropped
        assert asked == RpcFailure("timeout")
        assert not now_routed


async def _ask(dht: DhtNode, contact: Contact) -> object:
    return await dht.protocol.call_find_node(contact, dht.peer_id)
