"""DHT RPC timeouts on a loaded machine: a stall of our own loop, or a peer that answers
late, must not be taken for dead nodes. Real UDP sockets on loopback, one loop.

The 150-node test's rare flake (an announce stored at 0-2 of 20 nodes) came from both: under
CPU load, store replies waiting unread in the socket while the 100 ms timers fired, and
joining nodes whose one contact (the busy bootstrap node) answered late and was removed."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from kademlia.node import Node

from overlay.dht.protocol import Answer, DhtProtocol, Outcome
from overlay.dht.records import ProviderRecord
from tests.overlay.dht_swarm import added_by, close_all, routes_to, start_swarm

STALL = 0.3  # seconds the loop does not listen: three times the 100 ms RTO floor
HOME = "rv.example.net:7000"


def _stall_soon() -> None:
    """Block the loop for STALL seconds right after this turn, as a long callback, a GC
    pass or a descheduled process does (the stall is the condition under test)."""
    asyncio.get_running_loop().call_soon(time.sleep, STALL)


async def test_a_stall_while_replies_are_in_flight_times_nothing_out() -> None:
    nodes = await start_swarm(25, seed=31)
    try:
        me = nodes[5]
        contacts = [Node(c.node_id, c.host, c.port) for c in me.contacts()][:15]
        assert len(contacts) == 15
        # The join may have timed an RPC out (its nodes answer from this one loop, loaded).
        before = me.stats().get("rpc.timeout", 0)
        pings = [me.protocol.call_ping(c) for c in contacts]
        _stall_soon()
        outcomes = await asyncio.gather(*pings)
        assert all(isinstance(o, Answer) for o in outcomes), outcomes
        assert me.stats().get("rpc.timeout", 0) == before
        assert all(routes_to(me, c.id) for c in contacts)
    finally:
        await close_all(nodes)


def _pause_reading(transport: Any) -> Callable[[], None]:
    """Stop reading a UDP transport's socket; what starts it again. Its pause_reading came
    in Python 3.11.4; before (Debian 12's python3 is 3.11.2) the loop stops watching the
    socket as that method does."""
    if sys.version_info >= (3, 11, 4):
        transport.pause_reading()
        return cast(Callable[[], None], transport.resume_reading)
    loop, fd = transport._loop, transport._sock_fd
    loop._remove_reader(fd)
    return lambda: loop._add_reader(fd, transport._read_ready)


async def test_a_reply_still_unread_when_its_timer_fires_on_time_is_not_timed_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stall the loop reads its socket's backlog one datagram a turn, so a timer
    can come due on time with its reply still waiting there: that reply is read, and its
    node keeps its place in the table."""
    nodes = await start_swarm(3, seed=34)
    try:
        me, peer = nodes[2], nodes[0]
        assert routes_to(me, peer.peer_id)
        judged = asyncio.Event()
        on_timeout = me.protocol._on_timeout

        def timer(msg_id: bytes, deadline: float) -> None:
            on_timeout(msg_id, deadline)
            if msg_id not in me.protocol._pending:  # not given more time (a late timer)
                judged.set()

        monkeypatch.setattr(me.protocol, "_on_timeout", timer)
        resume = _pause_reading(me.protocol.transport)  # the reply waits in the socket
        ping = me.protocol.call_ping(Node(peer.peer_id, *peer.address))
        await judged.wait()
        assert isinstance(ping.result(), Answer)
        resume()
        assert me.stats().get("rpc.timeout", 0) == 0
        assert routes_to(me, peer.peer_id)
    finally:
        await close_all(nodes)


async def test_an_announce_counts_the_stores_made_though_the_loop_stalled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = await start_swarm(30, seed=32)
    store = DhtProtocol.call_store
    stalled: list[bool] = []

    def call_store(self: DhtProtocol, node: Node, record: ProviderRecord,
                   token: bytes) -> asyncio.Future[Outcome]:
        if not stalled:  # once, as the first of the 20 stores goes out
            stalled.append(True)
            _stall_soon()
        return store(self, node, record, token)

    monkeypatch.setattr(DhtProtocol, "call_store", call_store)
    try:
        assert await nodes[7].announce(bytes(range(32)), ["127.0.0.1:4000"], HOME) == 20
        assert stalled
    finally:
        await close_all(nodes)


async def test_a_reply_after_its_timeout_puts_the_node_back_in_the_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = await start_swarm(3, seed=33)
    try:
        me, slow = nodes[2], nodes[0]
        assert routes_to(me, slow.peer_id)
        send = slow.protocol._send
        loop = asyncio.get_running_loop()
        # `slow` answers STALL seconds late (a busy bootstrap node), so `me` times out
        # and takes it out of its table.
        monkeypatch.setattr(slow.protocol, "_send",
                            lambda data, addr: loop.call_later(STALL, send, data, addr))
        back = added_by([me], slow.peer_id, 1, monkeypatch)
        outcome = await me.protocol.call_find_node(Node(slow.peer_id, *slow.address),
                                                   me.peer_id)
        assert not isinstance(outcome, Answer)
        assert not routes_to(me, slow.peer_id)
        await asyncio.wait_for(back.wait(), 5.0)  # its late reply came
        assert routes_to(me, slow.peer_id)
        assert me.stats()["rpc.late_reply"] == 1
        # The late round trip is in its estimate: the next wait is longer than the reply.
        assert me.protocol.rtt.timeout_for(slow.peer_id) > STALL
    finally:
        await close_all(nodes)


async def test_a_timer_that_cannot_look_at_its_socket_still_times_its_rpc_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors, the timer's look at the socket is skipped, and the RPC to a
    node that never answers times out as before: its future is resolved all the same."""
    [me] = await start_swarm(1, seed=35)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))

        def no_fd(fd: int) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(os, "dup", no_fd)
        try:
            ping = me.protocol.call_ping(Node(bytes(20), *silent.getsockname()))
            async with asyncio.timeout(10):
                outcome = await ping
            assert not isinstance(outcome, Answer) and outcome.reason == "timeout"
        finally:
            monkeypatch.undo()
            await close_all([me])
