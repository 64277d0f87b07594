"""The relay transport passes the shared `Stream` conformance suite through a real
in-process rendezvous server on loopback, and says who is at the other end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from crypto.identity import DeviceIdentity
from overlay.transports.relay import RelayStream, relay_accept, relay_dial
from overlay.transports.stream import Stream
from rendezvous.client import RendezvousClient, is_relay_invite
from rendezvous.limits import Limits
from rendezvous.messages import RelayInvite
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.tls import self_signed, server_tls

from .streams import check_stream

DOMAIN = "example.net"
ALICE, BOB = DeviceIdentity.from_seed(b"\x0a" * 32), DeviceIdentity.from_seed(b"\x0b" * 32)


class RelayPair:
    """Alice dials Bob through the server; Bob's control session takes the invitation."""

    def __init__(self, server: RendezvousServer, bob: RendezvousClient) -> None:
        if server.address is None:
            raise RuntimeError("server not started")
        self.host, self.port = server.address
        self.pushes = bob.pushes()
        self.tls = bob.tls
        self.server_key = bob.server_key if bob.tls else None

    async def next_invite(self) -> RelayInvite:
        async for push in self.pushes:
            if is_relay_invite(push) and isinstance(push, RelayInvite):
                return push
        raise AssertionError("Bob's session ended without an invitation")

    async def __call__(self) -> tuple[Stream, Stream]:
        dial = asyncio.create_task(relay_dial(self.host, self.port, ALICE, "alice@example.net",
                                              "bob@example.net", BOB.peer_id, timeout=10,
                                              tls=self.tls, server_key=self.server_key))
        invite = await self.next_invite()
        b = await relay_accept(self.host, self.port, BOB, "bob@example.net", invite,
                               tls=self.tls, server_key=self.server_key)
        a = await dial
        return a, b


@asynccontextmanager
async def relay_setup(data: Path, limits: Limits | None = None, *, tls: bool = False
                      ) -> AsyncIterator[tuple[RendezvousServer, RelayPair]]:
    """A server with open registration and Bob online; yields it and a pair factory.
    `tls`: TLS 1.3 on every connection (a self-signed certificate), as nodes reach it."""
    server = RendezvousServer(DOMAIN, SqliteStore(data / "rv.sqlite3"), open_registration=True,
                              limits=limits,
                              tls=server_tls(*self_signed(data, DOMAIN)) if tls else None)
    host, port = await server.start("127.0.0.1", 0)
    key = server.domain_key.public if tls else None
    try:
        async with RendezvousClient(host, port, ALICE, "alice@example.net", register=True,
                                    tls=tls, server_key=key), \
                RendezvousClient(host, port, BOB, "bob@example.net", register=True,
                                 tls=tls, server_key=key) as bob:
            yield server, RelayPair(server, bob)
    finally:
        await server.aclose()


async def test_relay_stream_conforms(tmp_path: Path) -> None:
    # The default rate cap would make the 48 MB backpressure check take half a minute.
    async with relay_setup(tmp_path, Limits(relay_rate=0, relay_daily=0)) as (server, pair):
        await check_stream(pair)
        assert server.relay.snapshot()["relay_active"] == 0
        assert server.relay.snapshot()["relayed_bytes"] > 48 << 20


async def test_relay_stream_names_the_path_and_the_peer(tmp_path: Path) -> None:
    async with relay_setup(tmp_path) as (_, pair):
        a, b = await pair()
        assert isinstance(a, RelayStream) and isinstance(b, RelayStream)
        assert a.path == b.path == "relay"
        assert (a.peer, a.peer_device) == ("bob@example.net", BOB.peer_id)
        assert (b.peer, b.peer_device) == ("alice@example.net", ALICE.peer_id)
        assert a.session == b.session
        await a.aclose()
        await b.aclose()
