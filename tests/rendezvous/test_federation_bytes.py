"""The bytes across domains, in-process (two servers on loopback, a StaticResolver): PIPE
forwarded over the link (delivered, held for an offline device, answered back, aligned),
a relayed stream between devices of two domains hosted by the caller's server (bytes
both ways; the callee checks that server's key), and the two servers' DHT bootstrap nodes
knowing each other once a link is up."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.dht import run_bootstrap_node
from overlay.transports.relay import RelayError, relay_accept, relay_dial
from rendezvous.client import PipeMessage, RelayInvite, RendezvousClient
from rendezvous.errors import RendezvousError
from rendezvous.federation import LinkClient
from rendezvous.limits import Limits
from rendezvous.messages import Pipe, Relay
from rendezvous.server import RendezvousServer
from rendezvous.status import Status
from tests.overlay.streams import receive_exactly

from .test_federation import ALICE, BOB, LogWaiter, World, ident

A, B = "a.test", "b.test"
CAROL = ident(3)


async def _next(rc: RendezvousClient, kind: type, within: float = 10.0) -> object:
    async with asyncio.timeout(within):
        async for push in rc.pushes():
            if isinstance(push, kind):
                return push
    raise AssertionError("pushes ended")


async def _register(world: World, srv: RendezvousServer, who: object, address: str) -> None:
    async with world.client(srv, who, address):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_pipe_crosses_domains_both_ways_and_is_held_for_an_offline_device(
        tmp_path: Path, tls: bool) -> None:
    world = World(tmp_path, tls)
    async with world.server(A) as a, world.server(B) as b:
        await _register(world, b, BOB, "bob@b.test")
        async with world.client(a, ALICE, "alice@a.test") as alice:
            # Bob offline: the offer is held at b.test, in its store.
            await alice.pipe("bob@b.test", b"offer-held", device=BOB.peer_id, hold=30)
            assert b.pipes_held == 1
            async with world.client(b, BOB, "bob@b.test") as bob:
                held = await _next(bob, PipeMessage)
                assert isinstance(held, PipeMessage)
                assert (held.sender, held.sender_device, held.payload) == (
                    "alice@a.test", ALICE.peer_id, b"offer-held")
                # Online now: relayed at once, and the answer comes back over b's link.
                await alice.pipe("bob@b.test", b"offer-live", device=BOB.peer_id)
                live = await _next(bob, PipeMessage)
                assert isinstance(live, PipeMessage) and live.payload == b"offer-live"
                await bob.pipe("alice@a.test", b"answer", device=ALICE.peer_id)
                back = await _next(alice, PipeMessage)
                assert isinstance(back, PipeMessage)
                assert (back.sender, back.sender_device, back.payload) == (
                    "bob@b.test", BOB.peer_id, b"answer")
            # Not online and no hold: the remote's own refusal.
            with pytest.raises(RendezvousError, match=re.escape("bob@b.test has no device online")):
                await alice.pipe("bob@b.test", b"x")
            with pytest.raises(RendezvousError, match=re.escape("no such address: nobody@b.test")):
                await alice.pipe("nobody@b.test", b"x")


async def test_a_link_carries_pipe_and_relay_only_for_its_own_senders(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B) as b:
        await _register(world, b, BOB, "bob@b.test")
        assert a.federation is not None
        link = await a.federation.link(B)
        assert isinstance(link, LinkClient)
        forged = await link.request(lambda rid: Pipe(rid, "bob@b.test", b"x", None, 1000,
                                                     "mallory@c.test", CAROL.peer_id))
        assert forged.status == Status.FORBIDDEN
        assert "from senders of a.test to addresses of b.test only" in forged.text
        elsewhere = await link.request(lambda rid: Relay(rid, "carol@a.test", CAROL.peer_id,
                                                         os.urandom(16), "alice@a.test",
                                                         ALICE.peer_id))
        assert elsewhere.status == Status.FORBIDDEN
        assert b.link_refused_alignment == 2
        offline = await link.request(lambda rid: Relay(rid, "bob@b.test", BOB.peer_id,
                                                       os.urandom(16), "alice@a.test",
                                                       ALICE.peer_id))
        assert offline.status == Status.NOT_ONLINE


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_relay_between_two_domains_carries_bytes_both_ways(tmp_path: Path,
                                                                 tls: bool) -> None:
    world = World(tmp_path, tls)
    async with world.server(A) as a, world.server(B) as b:
        assert a.address is not None
        await _register(world, b, BOB, "bob@b.test")
        async with world.client(a, ALICE, "alice@a.test") as alice, \
                world.client(b, BOB, "bob@b.test") as bob:
            dial = asyncio.ensure_future(relay_dial(
                *a.address, ALICE, "alice@a.test", "bob@b.test", BOB.peer_id, tls=tls,
                server_key=alice.server_key))
            invite = await _next(bob, RelayInvite)
            assert isinstance(invite, RelayInvite)
            # b.test names a.test's server as its records say, with a.test's domain key.
            assert (invite.host, invite.port, invite.key) == (*a.address, a.domain_key.public)
            assert invite.host is not None and invite.port is not None
            assert (invite.sender, invite.sender_device) == ("alice@a.test", ALICE.peer_id)
            # The splice needs the very device key the invite was for.
            with pytest.raises(RelayError, match="offered to another device"):
                await relay_accept(invite.host, invite.port, CAROL, "bob@b.test", invite,
                                   tls=tls, server_key=invite.key)
            callee = await relay_accept(invite.host, invite.port, BOB, "bob@b.test", invite,
                                        tls=tls, server_key=invite.key)
            caller = await dial
            assert caller.path == callee.path == "relay"
            up, down = os.urandom(300_000), os.urandom(200_000)
            await caller.send_all(up)
            await callee.send_all(down)
            assert await receive_exactly(callee, len(up)) == up
            assert await receive_exactly(caller, len(down)) == down
            await caller.aclose()
            await callee.aclose()
            # The caller's server relayed, and charged alice's account.
            assert a.snapshot()["relay_sessions"] == 1
            assert b.snapshot()["relay_sessions"] == 0
            assert b.relay_invites_forwarded == 1
            assert a.snapshot()["relayed_bytes"] >= len(up) + len(down)


async def test_relay_accept_checks_the_key_the_invite_names(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B) as b:
        assert a.address is not None
        await _register(world, b, BOB, "bob@b.test")
        await _register(world, a, ALICE, "alice@a.test")
        async with world.client(b, BOB, "bob@b.test") as bob:
            dial = asyncio.ensure_future(relay_dial(
                *a.address, ALICE, "alice@a.test", "bob@b.test", BOB.peer_id))
            invite = await _next(bob, RelayInvite)
            assert isinstance(invite, RelayInvite)
            with pytest.raises(RelayError, match="identity"):
                await relay_accept(*a.address, BOB, "bob@b.test", invite,
                                   server_key=b.domain_key.public)
            dial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dial


@pytest.fixture
def server_log() -> Iterator[LogWaiter]:
    waiter = LogWaiter()
    logger = logging.getLogger("rendezvous.server")
    logger.addHandler(waiter)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(old)


async def test_bootstrap_nodes_of_two_domains_know_each_other_after_a_link(
        tmp_path: Path, server_log: LogWaiter) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B) as b:
        # The servers close their services.
        dht_a = await run_bootstrap_node("127.0.0.1", 0, ident(10))
        a.add_service("dht", dht_a)
        dht_b = await run_bootstrap_node("127.0.0.1", 0, ident(11))
        b.add_service("dht", dht_b)
        # A CHALLENGE announces the ports of the services present when it is made.
        await _register(world, b, BOB, "bob@b.test")
        assert a.federation is not None
        await a.federation.link(B)
        await server_log.event("dht.joined_domain")
        assert a.dht_domains_joined == 1
        assert dht_b.peer_id in {c.node_id for c in dht_a.contacts()}
        assert dht_a.peer_id in {c.node_id for c in dht_b.contacts()}


async def test_forwarded_pipes_are_rate_limited_per_linking_domain(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, \
            world.server(B, limits=Limits(link_rate=1, link_burst=2)) as b:
        await _register(world, b, BOB, "bob@b.test")
        async with world.client(a, ALICE, "alice@a.test") as alice:
            for _ in range(2):
                await alice.pipe("bob@b.test", b"offer", hold=30)
            with pytest.raises(RendezvousError, match=re.escape(
                    "too many PIPE/RELAY requests from a.test: limit 1 per second")):
                await alice.pipe("bob@b.test", b"offer", hold=30)
        assert b.link_rate_limited == 1 and b.pipes_held == 2


async def test_a_foreign_relay_connection_may_only_accept(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B):
        assert a.address is not None
        await _register(world, a, ALICE, "alice@a.test")
        with pytest.raises(RelayError, match="may only RELAY-ACCEPT here"):
            await relay_dial(*a.address, BOB, "bob@b.test", "alice@a.test", ALICE.peer_id)
