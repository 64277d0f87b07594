"""A DHT node changes role at runtime (its host moved out from behind a NAT, or behind
one): real UDP sockets on loopback, one loop, in-process DhtNodes."""

from __future__ import annotations

import asyncio

import pytest
from kademlia.node import Node

from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode
from overlay.dht.protocol import Answer, RpcFailure
from overlay.dht.wire import Nodes
from tests.overlay.dht_swarm import added_by, close_all, routes_to, start_swarm

WAIT = 10.0  # generous: two cores shared with other tests


def _as_contact(node: DhtNode) -> Node:
    return Node(node.peer_id, *node.address)


async def test_a_client_switched_to_serving_answers_and_is_routed_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = await start_swarm(12, seed=21, client_only=frozenset({11}))
    try:
        me, servers = nodes[11], nodes[:11]
        assert not any(routes_to(n, me.peer_id) for n in servers)
        refused = await servers[3].protocol.call_find_node(_as_contact(me), me.peer_id)
        assert refused == RpcFailure("timeout")

        learned = added_by(servers, me.peer_id, 3, monkeypatch)
        assert me.set_client_only(False)
        assert not me.set_client_only(False)  # no change, nothing done
        # With nothing more than the switch, its own lookup tells the nodes it asks.
        await asyncio.wait_for(learned.wait(), WAIT)
        assert sum(routes_to(n, me.peer_id) for n in servers) >= 3

        answer = await servers[3].protocol.call_find_node(_as_contact(me), me.peer_id)
        assert isinstance(answer, Answer) and isinstance(answer.body, Nodes)
        assert answer.body.contacts  # its table, handed out
        assert me.stats()["rpc.served"] > 0
    finally:
        await close_all(nodes)


async def test_a_server_switched_to_client_only_stops_answering_and_being_added() -> None:
    nodes = await start_swarm(12, seed=22)
    try:
        me, peer = nodes[11], nodes[4]
        pong = await peer.protocol.call_ping(_as_contact(me))
        assert isinstance(pong, Answer)
        assert routes_to(peer, me.peer_id)

        assert me.set_client_only(True)
        refused = await peer.protocol.call_find_node(_as_contact(me), peer.peer_id)
        assert refused == RpcFailure("timeout")
        assert not routes_to(peer, me.peer_id)  # it timed out, so it left the table
        assert me.stats()["dropped.not_serving"] >= 1

        # It still asks (and is answered), but its requests no longer say it serves: no
        # node pings it back to add it (a ping would be refused and counted).
        refusals = me.stats()["dropped.not_serving"]
        served = peer.stats().get("rpc.served", 0)
        assert await me.bootstrap([peer.address]) >= 10
        await me.find_nodes(bytes(20))  # more round trips: a ping sent would be in by now
        assert peer.stats()["rpc.served"] > served
        assert me.stats()["dropped.not_serving"] == refusals
        assert not routes_to(peer, me.peer_id)
    finally:
        await close_all(nodes)


async def test_a_client_with_an_empty_table_switched_to_serving_joins_through_via(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose table is empty when it may serve (its bootstrap failed on the old
    network) joins through the server's bootstrap node, which then routes to it."""
    nodes = await start_swarm(6, seed=23)
    try:
        async with DhtNode(DeviceIdentity.from_seed(b"\x17" * 32), client_only=True) as me:
            await me.listen("127.0.0.1", 0)
            learned = added_by([nodes[0]], me.peer_id, 1, monkeypatch)
            assert me.set_client_only(False, via=[nodes[0].address])
            await asyncio.wait_for(learned.wait(), WAIT)
            assert routes_to(nodes[0], me.peer_id)
            assert me.stats()["rpc.served"] >= 1  # the ping that proved it
    finally:
        await close_all(nodes)
