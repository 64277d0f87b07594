"""A withdrawal that lands while an announce of the same content is still under way has the
last word: the announce stores no record after it, at the DHT nodes nor at home, and
nothing republishes it. Before, the announce's STOREs reached the nodes after the
withdrawal and the content was offered for 48 h more (republished every 22 h), although
the node no longer held it. Real UDP sockets on loopback, one loop, in-process DHT nodes;
the announcer's lookup is held back until the withdrawal is done."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable

import pytest
from kademlia.node import Node

import overlay.dht.node as dht_node
from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode
from overlay.dht.directory import ProviderDirectory
from overlay.dht.protocol import Outcome
from tests.overlay.dht_swarm import close_all, start_swarm
from tests.rendezvous.test_keepalive import LogEvents, watching

WAIT = 10.0  # generous: two cores shared with other tests
HOME = "rv.example.net:4500"
CID = b"c" * 32
SHORT = CID.hex()[:16]


class HeldLookups:
    """Once `hold()` is called, `node`'s FIND_VALUE queries wait (unsent) until `release()`;
    `asked` is set at the first one held: the announce's lookup is under way."""

    def __init__(self, node: DhtNode, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked = asyncio.Event()
        self._go = asyncio.Event()
        self._go.set()
        real = node.protocol.call_find_value

        async def later(peer: Node, content_id: bytes) -> Outcome:
            if not self._go.is_set():
                self.asked.set()
                await self._go.wait()
            return await real(peer, content_id)

        def query(peer: Node, content_id: bytes) -> asyncio.Future[Outcome]:
            return asyncio.get_running_loop().create_task(later(peer, content_id))

        monkeypatch.setattr(node.protocol, "call_find_value", query)

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()


def providers_log() -> contextlib.AbstractContextManager[LogEvents]:
    """What the provider directory logs from now on."""
    return watching("peerpost.providers")


async def _announce_ended(said: LogEvents) -> str:
    """The line the announce under way ends with: the first to name CID."""
    await said.wait_for(SHORT, WAIT)
    return next(line for line in said.seen if SHORT in line)


async def _withdrawn_meanwhile(me: ProviderDirectory, gone: set[bytes],
                               resume: Callable[[], None]) -> str:
    """CID is removed and withdrawn while its announce waits; then `resume` lets the
    announce go on. Returns the line it ends with."""
    gone.add(CID)
    await me.withdraw(CID)
    with providers_log() as said:
        resume()
        return await _announce_ended(said)


async def _offered_by(nodes: list[DhtNode], peer_id: bytes) -> list[float]:
    """When each record of `peer_id` for CID that the DHT nodes store expires (a lookup
    from nodes[0] first, as a downloader's would find it)."""
    found = await nodes[0].find_providers(CID)
    return sorted([r.expires for r in found if r.peer_id == peer_id]
                  + [r.expires for n in nodes for r in n.storage.providers(CID, 20)
                     if r.peer_id == peer_id])


async def test_a_dht_withdraw_during_the_announce_lookup_stores_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DhtNode alone: the announce returns 0, no node stores the record, our own store
    holds none of ours, and no round republishes it (rounds every 50 ms here)."""
    monkeypatch.setattr(dht_node, "REPUBLISH_INTERVAL", 0.05)
    nodes = await start_swarm(6, seed=51)
    try:
        me = nodes[5]
        lookups = HeldLookups(me, monkeypatch)
        lookups.hold()
        announcing = asyncio.get_running_loop().create_task(
            me.announce(CID, ["127.0.0.1:9000"], HOME))
        await asyncio.wait_for(lookups.asked.wait(), WAIT)
        await me.withdraw(CID)
        lookups.release()
        assert await asyncio.wait_for(announcing, WAIT) == 0
        await asyncio.sleep(0.5)  # ten republish rounds that must not come
        assert await _offered_by(nodes, me.peer_id) == []
    finally:
        await close_all(nodes)


async def _directory(nodes: list[DhtNode], held: Callable[[bytes], bool],
                     wall: Callable[[], float] = time.time) -> ProviderDirectory:
    me = ProviderDirectory(DeviceIdentity.from_seed(b"m" * 32), wall=wall,
                           rng=random.Random(52), held=held)
    await me.start("127.0.0.1", [nodes[0].address])
    me.addresses, me.home_server = ["127.0.0.1:9000"], HOME
    return me


async def test_a_withdrawal_during_the_first_announce_lookup_is_the_last_word(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first announce after a download is looking up the closest nodes when `rm`
    withdraws the content: no node is told of it. Then the content is received again:
    it is announced (the withdrawal left nothing behind that stops a later announce). A
    withdrawal decided before the content came back (it is held when the withdrawal
    runs) does not lose that announce: the content is announced again at once."""
    nodes = await start_swarm(6, seed=52)
    gone: set[bytes] = set()
    me = await _directory(nodes, lambda cid: cid not in gone)
    try:
        lookups = HeldLookups(me.dht, monkeypatch)
        lookups.hold()
        me.announce(CID)
        await asyncio.wait_for(lookups.asked.wait(), WAIT)
        ended = await _withdrawn_meanwhile(me, gone, lookups.release)
        assert await _offered_by(nodes, me.dht.peer_id) == []
        assert "it was withdrawn while being announced" in ended

        gone.clear()  # received again
        with providers_log() as said:
            me.announce(CID)
            assert f"announced {SHORT} to" in await _announce_ended(said)
        assert len(await _offered_by(nodes, me.dht.peer_id)) >= 2

        with providers_log() as said:
            await me.withdraw(CID)  # on stale news: the content is held
            await said.wait_for(f"announced {SHORT} to", WAIT)
        assert f"{SHORT} is held here again: announcing it" in said.seen
        assert [r for r in me.dht.storage.providers(CID, 20) if r.peer_id == me.dht.peer_id]
    finally:
        await me.aclose()
        await close_all(nodes)


async def test_a_withdrawal_during_the_holding_check_is_the_last_word() -> None:
    """The announce asked whether the content is held (yes) just before `rm` removed it
    and withdrew it: the announce, told yes, still publishes nothing."""
    nodes = await start_swarm(6, seed=53)
    gone: set[bytes] = set()
    checking, answer = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    asked = []

    def held(cid: bytes) -> bool:
        yes = cid not in gone
        asked.append(yes)
        if len(asked) == 1:  # the announce's own check: its answer comes once withdrawn
            loop.call_soon_threadsafe(checking.set)
            answer.wait(WAIT)
        return yes

    me = await _directory(nodes, held)
    try:
        me.announce(CID)
        await asyncio.wait_for(checking.wait(), WAIT)
        ended = await _withdrawn_meanwhile(me, gone, answer.set)
        assert await _offered_by(nodes, me.dht.peer_id) == []
        assert "it was withdrawn while being announced" in ended
        assert asked == [True, False]  # the announce's, then the withdrawal's
    finally:
        answer.set()
        await me.aclose()
        await close_all(nodes)


async def test_a_withdrawal_during_a_wake_announce_leaves_the_records_to_lapse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Announced; an hour later the host wakes and announces it again, and the file is
    removed while that announce looks up the closest nodes. The records the nodes hold
    still lapse 48 h after the first announce: the wake's STOREs, which would have made
    them live 48 h from the withdrawal, are not sent, and our own store keeps none."""
    nodes = await start_swarm(6, seed=54)
    gone: set[bytes] = set()
    ago = [3600.0]  # the first announce an hour ago (a record from the future is refused)
    me = await _directory(nodes, lambda cid: cid not in gone,
                          wall=lambda: time.time() - ago[0])
    try:
        lookups = HeldLookups(me.dht, monkeypatch)
        with providers_log() as said:
            me.announce(CID)
            assert f"announced {SHORT} to" in await _announce_ended(said)
        first = await _offered_by(nodes, me.dht.peer_id)
        assert first and max(first) - min(first) < 60  # all from the first announce

        ago[0] = 0.0
        lookups.hold()
        assert await me.announce_again() == 1
        await asyncio.wait_for(lookups.asked.wait(), WAIT)
        ended = await _withdrawn_meanwhile(me, gone, lookups.release)
        now = await _offered_by(nodes, me.dht.peer_id)
        assert max(now) <= max(first), "the wake's announce refreshed the records"
        assert not [r for r in me.dht.storage.providers(CID, 20)
                    if r.peer_id == me.dht.peer_id]
        assert "it was withdrawn while being announced" in ended
    finally:
        await me.aclose()
        await close_all(nodes)
