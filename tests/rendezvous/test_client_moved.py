"""`RendezvousClient.moved`: the host reaches its server from another address now (it
changed network). A session bound to the old address is replaced at once, carrying the
new reachability hints; one that already uses the new address is kept and not touched."""

from __future__ import annotations

import asyncio

from rendezvous.client import RendezvousClient
from rendezvous.server import RendezvousServer

from .conftest import ident, port_of

ALICE = "alice@example.net"
HOME = {"addrs": ["10.1.0.2:4567"], "nat": True}
HOTSPOT = {"addrs": ["10.3.0.2:4567"], "nat": True}


def _client(server: RendezvousServer) -> RendezvousClient:
    return RendezvousClient("127.0.0.1", port_of(server), ident(1), ALICE, register=True,
                            request_timeout=5.0, advertise=HOME)


async def test_a_session_from_an_address_the_host_lost_is_replaced_at_once(
        server: RendezvousServer) -> None:
    async with _client(server) as rc:
        assert rc.local_ip == "127.0.0.1" and rc.server_ip == "127.0.0.1"
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert rc.moved("127.0.0.2", HOTSPOT)  # the route to the server starts elsewhere
        # FINGER is sent on the dropped session, cut off, and sent again on the new one.
        (dev,) = (await rc.finger(ALICE)).devices
        assert dev.online and dev.advertise == HOTSPOT
        assert rc.reconnects == 1 and loop.time() - began < 2.0


async def test_a_session_that_uses_the_new_address_is_kept(server: RendezvousServer) -> None:
    async with _client(server) as rc:
        assert not rc.moved("127.0.0.1", HOTSPOT)
        (dev,) = (await rc.finger(ALICE)).devices
        assert dev.advertise == HOME  # only the next login carries the new hints
        assert rc.reconnects == 0 and rc.connected


async def test_relogin_replaces_a_session_that_seems_fine_at_once(
        server: RendezvousServer) -> None:
    """The host woke from sleep: the session's socket still has the host's address and
    its keepalive saw no silence (its clock stood still), yet it is replaced at once."""
    async with _client(server) as rc:
        loop = asyncio.get_running_loop()
        began = loop.time()
        rc.relogin("woke after 600 s asleep")
        (dev,) = (await rc.finger(ALICE)).devices
        assert dev.online
        assert rc.reconnects == 1 and loop.time() - began < 2.0
