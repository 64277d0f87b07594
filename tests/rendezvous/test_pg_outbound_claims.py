"""Several `serve --store` instances of example.net drain one outbound queue on a real
PostgreSQL: each envelope for b.test is forwarded by one instance only (counted as the
SENDs b.test's server receives over the links), and after kill -9 of the instance that
claimed the waiting envelopes another instance forwards them once the claim lapses."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from rendezvous.client import Deliver, RendezvousClient
from rendezvous.dns import DomainRecords, StaticResolver
from rendezvous.domainkey import DomainKey, load_or_create, txt_value
from rendezvous.messages import Send
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.tls import self_signed, server_tls
from tests.dnstest import Dnsmasq

from .conftest import DOMAIN, ident, mid
from .test_operator import Server, rc, serve

pytestmark = pytest.mark.slow
ALICE, BOB = ident(81), ident(82)
B = "b.test"
CLAIM = 2.0  # --outbound-claim of the instances, seconds
# b.test stores one forwarded SEND at a time, this slowly: forwarding the 30 and 40 takes
# longer than the other instances' wake-ups (every CLAIM / 2), which then find the rows
# claimed (without the claims they forward them again).
SLOW = 0.06


def _held_port() -> socket.socket:
    """A free port on 127.0.0.1, held by a socket bound to it with SO_REUSEADDR that never
    listens, for b.test's server to listen on beside it (asyncio's servers set SO_REUSEADDR
    too) each time it starts. Released between its starts, the port was once given to
    another process's connection meanwhile, and the second start failed with "address
    already in use"."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class Receiver:
    """b.test's server, in process, counting each envelope it is sent over a link."""

    def __init__(self, data: Path, port: int, resolver: StaticResolver) -> None:
        self.data, self.port, self.resolver = data, port, resolver
        data.mkdir(mode=0o700, exist_ok=True)
        self.key: DomainKey = load_or_create(data)
        self.sends: Counter[tuple[bytes, bytes]] = Counter()  # (device, mid) -> SENDs
        self.first_at: float | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RendezvousServer]:
        srv = RendezvousServer(B, SqliteStore(self.data / "rv.sqlite3"),
                               open_registration=True, domain_key=self.key,
                               tls=server_tls(*self_signed(self.data, B)),
                               resolver=self.resolver)
        inner = srv.store.enqueue_forwarded
        one_at_a_time = asyncio.Lock()

        async def counted(sender: str, send: Send, *args: Any, **kw: Any) -> Any:
            if self.first_at is None:
                self.first_at = time.monotonic()
            for item in send.items:
                self.sends[item.device, send.message_id] += 1
            async with one_at_a_time:
                await asyncio.sleep(SLOW)
                return await inner(sender, send, *args, **kw)

        srv.store.enqueue_forwarded = counted  # type: ignore[method-assign]
        await srv.start("127.0.0.1", self.port)
        try:
            yield srv
        finally:
            await srv.aclose()


async def _deliveries(bob: RendezvousClient, want: set[bytes], within: float) -> None:
    async with asyncio.timeout(within):
        async for push in bob.pushes():
            if isinstance(push, Deliver):
                want.discard(push.envelope.message_id)
                await bob.remove(push.envelope.message_id)
                if not want:
                    return


async def test_one_instance_forwards_each_envelope_and_a_dead_ones_claims_lapse(
        tmp_path: Path, pg_url: str, dns_server: Callable[..., Dnsmasq],
        request: pytest.FixtureRequest) -> None:
    key_dir = tmp_path / "key"
    key_dir.mkdir(mode=0o700)
    a_key = load_or_create(key_dir)
    hold = _held_port()
    request.addfinalizer(hold.close)
    receiver = Receiver(tmp_path / "b", hold.getsockname()[1],
                        StaticResolver({DOMAIN: DomainRecords(DOMAIN, (("127.0.0.1", 1),),
                                                              a_key.public)}))
    ns = dns_server([f"_peerpost._tcp.{B}. 300 IN SRV 10 0 {receiver.port} rv.{B}.",
                     f'_peerpost.{B}. 300 IN TXT "{txt_value(receiver.key.public)}"'],
                    hosts={f"rv.{B}": "127.0.0.1"})

    def brc(**kw: Any) -> RendezvousClient:
        return RendezvousClient("127.0.0.1", receiver.port, BOB, f"bob@{B}", tls=True,
                                register=True, reconnect=False, **kw)

    async with receiver.running():  # bob's account at b.test
        async with brc():
            pass

    async with AsyncExitStack() as stack:
        async def instance(name: str) -> Server:
            data = tmp_path / name
            data.mkdir(mode=0o700)
            (data / "domain_key.json").write_bytes((key_dir / "domain_key.json").read_bytes())
            (data / "domain_key.json").chmod(0o600)
            return await stack.enter_async_context(serve(
                data, "--store", pg_url, "--open-registration", "--stun-port", "off",
                "--dht-port", "off", "--instance-heartbeat", "0.5", "--resolver",
                ns.hostport, "--outbound-claim", str(CLAIM), expect=1))

        # b.test is down: instance one takes the envelopes and keeps retrying them.
        one = await instance("one")
        first = [mid() for _ in range(30)]
        async with rc(one.port, ALICE, f"alice@{DOMAIN}", register=True) as alice:
            for m in first:
                await alice.send(m, [(f"bob@{B}", BOB.peer_id, m)])
        await one.wait_log("event=outbound.retry", within=20)
        one.proc.kill()
        await one.proc.wait()
        killed = time.monotonic()

        async with receiver.running():
            async with brc() as bob:
                two, three = await asyncio.gather(instance("two"), instance("three"))
                await _deliveries(bob, set(first), within=30)
                took = (receiver.first_at or 0) - killed
                print(f"kill -9 to the first forward by another instance: {took:.2f} s "
                      f"(claim {CLAIM:g} s)")
                assert took < CLAIM + 10

                # Both live instances take new mail (each wakes at once for its own,
                # the other at its sweep): still one forward per envelope.
                more = [mid() for _ in range(40)]
                async with rc(two.port, ALICE, f"alice@{DOMAIN}") as a2, \
                        rc(three.port, ALICE, f"alice@{DOMAIN}") as a3:
                    await asyncio.gather(*(
                        (a2 if i % 2 else a3).send(m, [(f"bob@{B}", BOB.peer_id, m)])
                        for i, m in enumerate(more)))
                    await _deliveries(bob, set(more), within=30)
                # bob can hold an envelope before the instance that forwarded it has
                # read b.test's acknowledgement and marked the row delivered.
                conn = await asyncpg.connect(pg_url)
                try:
                    start = time.monotonic()
                    while True:
                        states = dict(await conn.fetch(
                            "SELECT state, count(*) FROM outbound GROUP BY state"))
                        if states == {"delivered": 70} or time.monotonic() > start + 10:
                            break
                        await asyncio.sleep(0.05)
                    print(f"{states} {time.monotonic() - start:.2f} s after bob had all")
                finally:
                    await conn.close()
                assert states == {"delivered": 70}
            await stack.aclose()  # the instances stop: no forward is still in flight
        assert len(receiver.sends) == 70
        assert set(receiver.sends.values()) == {1}, receiver.sends.most_common(3)
