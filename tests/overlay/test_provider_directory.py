"""The node's provider directory over a real DHT: what it announces again after a wake or
a network move. Real UDP sockets on loopback, one loop, in-process DHT nodes."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest

from crypto.identity import DeviceIdentity
from overlay.dht.directory import ProviderDirectory
from tests.overlay.dht_swarm import close_all, start_swarm

HOME = "rv.example.net:4500"


async def test_a_wake_counts_only_the_contents_it_announces_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two contents announced; the file of one is deleted before the host sleeps. On the
    wake the node announces the other again and withdraws the gone one, and says "1
    content announced again" (it said 2: the gone one was counted, then skipped)."""
    caplog.set_level(logging.INFO, "peerpost.providers")
    nodes = await start_swarm(3, seed=43)
    kept, deleted = b"k" * 32, b"d" * 32
    gone: set[bytes] = set()
    me = ProviderDirectory(DeviceIdentity.from_seed(b"m" * 32), wall=time.time,
                           rng=random.Random(43), held=lambda cid: cid not in gone)
    try:
        await me.start("127.0.0.1", [nodes[0].address])
        me.addresses, me.home_server = ["127.0.0.1:9000"], HOME
        me.announce(kept)
        me.announce(deleted)
        gone.add(deleted)
        assert await me.announce_again() == 1
        assert await me.readdress(["127.0.0.1:9001"]) == 1  # a network move: the same
    finally:
        await me.aclose()
        await close_all(nodes)
    assert f"withdrew {deleted.hex()[:16]} from the DHT" in caplog.text
    assert f"withdrew {kept.hex()[:16]}" not in caplog.text


async def test_a_refusal_leaves_a_content_still_held_announced(
        caplog: pytest.LogCaptureFixture) -> None:
    """Serving refused two announced contents as gone. A download's partial is held (it
    serves the chunks it has), so it stays announced; the deleted file is not. An id
    never announced (anyone may ask for any) costs no check."""
    caplog.set_level(logging.INFO, "peerpost.providers")
    nodes = await start_swarm(3, seed=44)
    partial, deleted = b"p" * 32, b"d" * 32
    me = ProviderDirectory(DeviceIdentity.from_seed(b"m" * 32), wall=time.time,
                           rng=random.Random(44), held=lambda cid: cid != deleted)
    try:
        await me.start("127.0.0.1", [nodes[0].address])
        me.addresses, me.home_server = ["127.0.0.1:9000"], HOME
        me.announce(partial)
        me.announce(deleted)
        checks = [me.unserved(partial), me.unserved(deleted)]
        assert me.unserved(b"n" * 32) is None
        await asyncio.wait_for(asyncio.gather(*(c for c in checks if c is not None)), 10)
        assert await me.announce_again() == 1  # the partial only
    finally:
        await me.aclose()
        await close_all(nodes)
    assert f"withdrew {partial.hex()[:16]}" not in caplog.text
