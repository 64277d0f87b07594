"""The DHT node's loops that run for its life (republishing each announced record, refreshing
the routing table) outlive a round that fails: the failure is logged with its traceback
and the next round runs. Out of a round, an error ended the loop with no trace but a task
exception never retrieved: the node's records expired, or its table went stale, for good.
Real UDP sockets on loopback, one loop, in-process DhtNodes, the intervals cut short."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import overlay.dht.node as dht_node
from tests.overlay.dht_swarm import close_all, start_swarm

WAIT = 10.0  # generous: two cores shared with other tests
HOME = "rv.example.net:4500"


class OneBrokenRound:
    """Counts a loop's rounds: the `broken`-th raises, `after` is set by any later one."""

    def __init__(self, broken: int) -> None:
        self.broken = broken
        self.calls = 0
        self.after = asyncio.Event()

    def step(self) -> None:
        self.calls += 1
        if self.calls == self.broken:
            raise RuntimeError("the test breaks one round")
        if self.calls > self.broken:
            self.after.set()


@pytest.fixture
def short_rounds(monkeypatch: pytest.MonkeyPatch,
                 caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Both loops' rounds 50 ms apart; the DHT's log captured."""
    caplog.set_level(logging.INFO, "peerpost.dht")
    monkeypatch.setattr(dht_node, "REPUBLISH_INTERVAL", 0.05)
    monkeypatch.setattr(dht_node, "REFRESH_INTERVAL", 0.05)
    return caplog


async def test_a_republish_round_that_fails_is_logged_and_the_next_one_runs(
        short_rounds: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = await start_swarm(4, seed=31)
    try:
        me, real = nodes[3], nodes[3]._publish
        rounds = OneBrokenRound(2)  # the announce's own publish, then the first republish

        async def publish(*args: Any, **kw: Any) -> int:
            rounds.step()
            return await real(*args, **kw)

        monkeypatch.setattr(me, "_publish", publish)
        cid = bytes(range(32))
        assert await me.announce(cid, ["127.0.0.1:1"], HOME) >= 1
        await asyncio.wait_for(rounds.after.wait(), WAIT)
        assert await nodes[0].find_providers(cid)  # still found
    finally:
        await close_all(nodes)
    assert "DHT: republishing 00010203 failed; trying again at the next round" in short_rounds.text
    assert "RuntimeError: the test breaks one round" in short_rounds.text


async def test_a_refresh_round_that_fails_is_logged_and_the_next_one_runs(
        short_rounds: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = await start_swarm(3, seed=32)
    try:
        me, real = nodes[2], nodes[2].protocol.get_refresh_ids
        rounds = OneBrokenRound(1)

        def refresh_ids() -> list[bytes]:
            rounds.step()
            return list(real())

        monkeypatch.setattr(me.protocol, "get_refresh_ids", refresh_ids)
        await asyncio.wait_for(rounds.after.wait(), WAIT)
    finally:
        await close_all(nodes)
    assert "DHT: refreshing the routing table failed; trying again at the next round" \
        in short_rounds.text
    assert "RuntimeError: the test breaks one round" in short_rounds.text


async def test_a_record_no_longer_held_is_withdrawn_at_the_next_republish(
        short_rounds: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`keep` is asked before each republish: once it says the content is gone, no round
    publishes it again and our own store drops our record. Before, a content the node
    dropped was published every 22 h for as long as the node ran."""
    nodes = await start_swarm(4, seed=33)
    try:
        me, real = nodes[3], nodes[3]._publish
        published = []

        async def publish(*args: Any, **kw: Any) -> int:
            published.append(args[0])
            return await real(*args, **kw)

        monkeypatch.setattr(me, "_publish", publish)
        asked = []
        dropped = asyncio.Event()

        async def keep() -> bool:
            asked.append(len(published))
            if len(asked) < 2:
                return True  # still held at the first republish
            dropped.set()
            return False

        cid = bytes(range(32))
        assert await me.announce(cid, ["127.0.0.1:1"], HOME, keep=keep) >= 1
        assert me.storage.providers(cid, 20)
        await asyncio.wait_for(dropped.wait(), WAIT)
        await asyncio.sleep(0.5)  # ten rounds of 50 ms that must not come
        assert asked == [1, 2] and len(published) == 2  # the announce and one republish
        assert not [r for r in me.storage.providers(cid, 20) if r.peer_id == me.peer_id]
    finally:
        await close_all(nodes)
    assert "DHT: no longer republishing 0001020304050607: it is no longer held here" \
        in short_rounds.text
