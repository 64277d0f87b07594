"""Server links and forwarding between two in-process servers (a.test, b.test) on loopback,
each finding the other through a StaticResolver: link authentication both ways, alignment,
exactly-once delivery, the durable outbound queue across a restart, expiry, blocking."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from crypto.identity import DeviceIdentity
from rendezvous import federation
from rendezvous.backoff import Backoff
from rendezvous.client import Deliver, RendezvousClient
from rendezvous.dns import DomainRecords, StaticResolver
from rendezvous.domainkey import DomainKey, load_or_create
from rendezvous.errors import AuthenticationError, RendezvousError
from rendezvous.federation import LinkClient, LinkError
from rendezvous.limits import Limits
from rendezvous.messages import Finger, Send, SendItem
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.tls import self_signed, server_tls

from .conftest import disk_full, pg_starting_up

A, B = "a.test", "b.test"


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([n]) * 32)


ALICE, BOB, CAROL = ident(1), ident(2), ident(3)


class World:
    """Both servers' data folders and one resolver table they share."""

    def __init__(self, tmp: Path, tls: bool = False) -> None:
        self.tmp = tmp
        self.tls = tls
        self.resolver = StaticResolver({})
        self.keys = {d: load_or_create(self._data(d)) for d in (A, B)}

    def _data(self, domain: str) -> Path:
        path = self.tmp / domain
        path.mkdir(exist_ok=True)
        return path

    def publish(self, server: RendezvousServer, key: bytes | None = None) -> None:
        assert server.address is not None
        self.resolver.add(DomainRecords(server.domain, (server.address,),
                                        key or server.domain_key.public))

    @asynccontextmanager
    async def server(self, domain: str, *, resolver: StaticResolver | None = None,
                     limits: Limits | None = None, blocked: frozenset[str] = frozenset(),
                     publish: bool = True) -> AsyncIterator[RendezvousServer]:
        data = self._data(domain)
        tls = server_tls(*self_signed(data, domain)) if self.tls else None
        srv = RendezvousServer(domain, SqliteStore(data / "rv.sqlite3"),
                               open_registration=True, limits=limits,
                               domain_key=self.keys[domain], tls=tls,
                               resolver=resolver or self.resolver, blocked_domains=blocked)
        await srv.start("127.0.0.1", 0)
        if srv.federation is not None:
            srv.federation.backoff = Backoff(0.05, 0.2)
        if publish:
            self.publish(srv)
        try:
            yield srv
        finally:
            await srv.aclose()

    def client(self, server: RendezvousServer, who: DeviceIdentity,
               address: str) -> RendezvousClient:
        assert server.address is not None
        return RendezvousClient(*server.address, who, address, register=True,
                                tls=self.tls, reconnect=False)


async def _next_deliver(rc: RendezvousClient, within: float = 10.0) -> Deliver:
    async with asyncio.timeout(within):
        async for push in rc.pushes():
            if isinstance(push, Deliver):
                return push
    raise AssertionError("pushes ended")


async def _no_deliver(rc: RendezvousClient, within: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await _next_deliver(rc, within)


async def _track(rc: RendezvousClient, mid: bytes) -> dict[str, dict[str, object]]:
    domain, states = await rc.track(mid)
    assert domain == rc.address.rpartition("@")[2]
    return {t.to: dataclasses.asdict(t) for t in states}


class LogWaiter(logging.Handler):
    """Wakes a test when the federation logs an event (`event=NAME` in its line)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())
        self.changed.set()

    async def event(self, name: str, within: float = 10.0) -> str:
        async with asyncio.timeout(within):
            while True:
                for line in self.seen:
                    if f"event={name} " in line + " ":
                        self.seen.remove(line)
                        return line
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def fed_log() -> Iterator[LogWaiter]:
    waiter = LogWaiter()
    logger = logging.getLogger("rendezvous.federation")
    logger.addHandler(waiter)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(old)


async def _register_bob(world: World, b: RendezvousServer) -> None:
    async with world.client(b, BOB, "bob@b.test"):
        pass


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_alice_at_a_sends_to_bob_at_b_offline_then_online_once(tmp_path: Path,
                                                                     tls: bool,
                                                                     fed_log: LogWaiter) -> None:
    world = World(tmp_path, tls)
    async with world.server(A) as a, world.server(B) as b:
        await _register_bob(world, b)
        async with world.client(a, ALICE, "alice@a.test") as alice:
            # FINGER of a foreign address goes over the link, keys shown to anyone.
            info = await alice.finger("bob@b.test")
            assert [d.verify_key for d in info.devices] == [BOB.public.verify_key]
            assert not info.devices[0].online  # presence only for correspondents
            mid = os.urandom(16)
            await alice.send(mid, [("bob@b.test", BOB.peer_id, b"sealed for bob")])
            await fed_log.event("outbound.delivered")
            assert (await _track(alice, mid))["bob@b.test"]["state"] == "delivered"
            assert a.federation is not None and a.federation.forwarded == 1
            assert b.links_accepted == 1
            # Delivered to b's queue while bob was offline; he gets it once.
            async with world.client(b, BOB, "bob@b.test") as bob:
                env = (await _next_deliver(bob)).envelope
                assert (env.sender, env.blob, env.message_id) == ("alice@a.test",
                                                                  b"sealed for bob", mid)
                await bob.remove(mid)
                await _no_deliver(bob)
                # A receipt is an ordinary SEND the other way.
                rid = os.urandom(16)
                await bob.send(rid, [("alice@a.test", ALICE.peer_id, b"receipt")])
                back = (await _next_deliver(alice)).envelope
                assert (back.sender, back.blob) == ("bob@b.test", b"receipt")
                # Now they have exchanged mail: FINGER over the link shows presence.
                info = await alice.finger("bob@b.test")
                assert info.devices[0].online


async def test_receiver_refuses_a_link_signed_by_another_key(tmp_path: Path,
                                                             fed_log: LogWaiter) -> None:
    world = World(tmp_path)
    # b's resolver has the wrong key for a.test.
    wrong = StaticResolver({})
    async with world.server(A) as a, world.server(B, resolver=wrong) as b:
        assert a.address is not None
        wrong.add(DomainRecords(A, (a.address,), DomainKey.generate().public))
        world.publish(b)
        await _register_bob(world, b)
        assert b.address is not None
        link = LinkClient(A, world.keys[A], DomainRecords(B, (b.address,),
                                                          b.domain_key.public), tls=False)
        with pytest.raises(LinkError, match=re.escape(
                "refused the link: 401 LINK signature does not verify under the domain key "
                "of a.test")):
            await link.connect()
        assert b.links_refused == 1 and b.links_accepted == 0
        # The forwarding queue records why it waits.
        async with world.client(a, ALICE, "alice@a.test") as alice:
            mid = os.urandom(16)
            await alice.send(mid, [("bob@b.test", BOB.peer_id, b"x")])
            await fed_log.event("outbound.retry")
            state = (await _track(alice, mid))["bob@b.test"]
            assert state["state"] == "queued" and state["since"] is not None
            assert "LINK signature does not verify" in str(state["error"])


async def test_linker_refuses_a_server_without_the_published_key(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B) as b:
        world.publish(b, key=DomainKey.generate().public)  # DNS says another key
        await _register_bob(world, b)
        async with world.client(a, ALICE, "alice@a.test") as alice:
            with pytest.raises(RendezvousError, match=r"b\.test is unreachable: .*did not "
                                                      r"prove the domain key DNS publishes"):
                await alice.finger("bob@b.test")
        assert a.federation is not None and a.federation.links_refused_identity == 1
        assert b.links_accepted == 0


async def test_alignment_sender_and_recipient_domains(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A), world.server(B) as b:
        await _register_bob(world, b)
        assert b.address is not None
        link = LinkClient(A, world.keys[A], DomainRecords(B, (b.address,),
                                                          b.domain_key.public), tls=False)
        await link.connect()
        try:
            mid = os.urandom(16)
            item = SendItem("bob@b.test", BOB.peer_id, b"x")
            r = await link.request(lambda rid: Send(rid, mid, 0, (item,), "mallory@c.test"))
            assert (r.status, r.text) == (Status.FORBIDDEN, "sender mallory@c.test is not of "
                                          "the linking domain a.test")
            other = SendItem("carol@c.test", ALICE.peer_id, b"x")
            r = await link.request(lambda rid: Send(rid, mid, 0, (other,), "alice@a.test"))
            assert (r.status, r.text) == (Status.FORBIDDEN,
                                          "recipient carol@c.test is not of b.test")
            r = await link.request(lambda rid: Finger(rid, "bob@b.test", "eve@c.test"))
            assert r.status == Status.FORBIDDEN
            assert b.link_refused_alignment == 3
            # A duplicate forward after bob downloaded and removed it: delivered once.
            r = await link.request(lambda rid: Send(rid, mid, 0, (item,), "alice@a.test"))
            assert r.ok and r.body["stored"] == 1
            async with world.client(b, BOB, "bob@b.test") as bob:
                assert (await _next_deliver(bob)).envelope.message_id == mid
                await bob.remove(mid)
                r = await link.request(lambda rid: Send(rid, mid, 0, (item,),
                                                        "alice@a.test"))
                assert r.ok and r.body["stored"] == 0
                await _no_deliver(bob)
            assert len(await bob_list(world, b)) == 0
        finally:
            await link.aclose()


async def bob_list(world: World, b: RendezvousServer) -> list[object]:
    async with world.client(b, BOB, "bob@b.test") as bob:
        return list(await bob.list())


async def test_b_down_at_send_queued_across_a_restart_then_delivered(
        tmp_path: Path, fed_log: LogWaiter) -> None:
    world = World(tmp_path)
    async with world.server(B) as b:
        await _register_bob(world, b)
        bob_key_port = b.address
    assert bob_key_port is not None
    # b.test is down: its records point at a closed port.
    world.resolver.add(DomainRecords(B, (bob_key_port,), world.keys[B].public))
    mid = os.urandom(16)
    async with world.server(A) as a, world.client(a, ALICE, "alice@a.test") as alice:
        await alice.send(mid, [("bob@b.test", BOB.peer_id, b"held at a")])  # acked: queued
        await fed_log.event("outbound.retry")
        state = (await _track(alice, mid))["bob@b.test"]
        assert state["state"] == "queued" and "b.test unreachable" in str(state["error"])
    # a.test restarts (its store closed and reopened), then b.test comes back.
    async with world.server(A) as a, world.server(B) as b:
        assert a.federation is not None
        async with world.client(a, ALICE, "alice@a.test") as alice:
            await fed_log.event("outbound.delivered")
            assert (await _track(alice, mid))["bob@b.test"]["state"] == "delivered"
        async with world.client(b, BOB, "bob@b.test") as bob:
            env = (await _next_deliver(bob)).envelope
            assert env.blob == b"held at a"
            await _no_deliver(bob)


@pytest.mark.parametrize("failure", [disk_full, lambda: sqlite3.OperationalError("I/O"),
                                     pg_starting_up])
async def test_an_outbound_round_the_store_fails_is_tried_again(
        tmp_path: Path, fed_log: LogWaiter, failure: Callable[[], Exception]) -> None:
    """b.test is down and a.test's store refuses to note it (its disk is full): the
    worker for b.test ended there, and the mail waited for the next send to b.test or a
    restart. It is logged and tried again, and delivered once b.test is back."""
    world = World(tmp_path)
    async with world.server(B) as b:
        await _register_bob(world, b)
    world.resolver.add(DomainRecords(B, (_closed_port(),), world.keys[B].public))
    async with world.server(A) as a, world.client(a, ALICE, "alice@a.test") as alice:
        real = a.store.outbound_failed
        calls: list[str] = []

        async def outbound_failed(domain: str, error: str, now: float) -> None:
            calls.append(domain)
            if len(calls) == 1:
                raise failure()
            await real(domain, error, now)

        a.store.outbound_failed = outbound_failed  # type: ignore[method-assign]
        mid = os.urandom(16)
        await alice.send(mid, [("bob@b.test", BOB.peer_id, b"held at a")])
        line = await fed_log.event("storage.full" if failure is disk_full
                                   else "outbound.round_failed")
        assert "domain=b.test" in line
        await fed_log.event("outbound.retry")  # the next round
        async with world.server(B) as b, world.client(b, BOB, "bob@b.test") as bob:
            assert (await _next_deliver(bob)).envelope.blob == b"held at a"
            assert (await _track(alice, mid))["bob@b.test"]["state"] == "delivered"


async def test_the_outbound_sweep_outlives_postgresql_starting_up(
        tmp_path: Path, fed_log: LogWaiter) -> None:
    """The sweep (expiry, and on PostgreSQL the wake that forwards a dead instance's
    rows) got a RuntimeError from a store that could not reconnect and took it for the
    store closing: it ended for the server's life. Now the next round runs."""
    world = World(tmp_path)
    limits = dataclasses.replace(Limits(), outbound_expiry=0.5)  # a round a second
    async with world.server(A, limits=limits) as a:
        real = a.store.outbound_expire
        calls: list[float] = []

        async def outbound_expire(now: float) -> int:
            calls.append(now)
            if len(calls) == 1:
                raise pg_starting_up()
            return await real(now)

        a.store.outbound_expire = outbound_expire  # type: ignore[method-assign]
        assert "starting up" in await fed_log.event("outbound.sweep_failed")
        for _ in range(40):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(calls) >= 2, "no sweep after the failed one"


def _closed_port() -> tuple[str, int]:
    """A loopback port nothing listens on (bound, read back, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", sock.getsockname()[1]


async def test_expiry_bounces_to_the_sender(tmp_path: Path, fed_log: LogWaiter) -> None:
    world = World(tmp_path)
    world.resolver.add(DomainRecords(B, (_closed_port(),), world.keys[B].public))
    limits = dataclasses.replace(Limits(), outbound_expiry=0.5)
    async with world.server(A, limits=limits) as a, \
            world.client(a, ALICE, "alice@a.test") as alice:
        mid = os.urandom(16)
        await alice.send(mid, [("bob@b.test", BOB.peer_id, b"x")])
        await fed_log.event("outbound.expired")
        state = (await _track(alice, mid))["bob@b.test"]
        assert str(state["error"]).startswith("not delivered to b.test before it expired")


async def test_unknown_recipient_bounces_with_the_remote_text(tmp_path: Path,
                                                             fed_log: LogWaiter) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.server(B), \
            world.client(a, ALICE, "alice@a.test") as alice:
        mid = os.urandom(16)
        await alice.send(mid, [("nobody@b.test", BOB.peer_id, b"x")])
        await fed_log.event("outbound.bounced")
        state = (await _track(alice, mid))["nobody@b.test"]
        assert state["error"] == "b.test refused it: no such address: nobody@b.test"


async def test_blocked_domain_is_refused(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A), world.server(B, blocked=frozenset({A})) as b:
        assert b.address is not None
        link = LinkClient(A, world.keys[A], DomainRecords(B, (b.address,),
                                                          b.domain_key.public), tls=False)
        refused = re.escape("403 links and mail from a.test are refused")
        with pytest.raises(LinkError, match=refused):
            await link.connect()
        assert b.link_refused_blocked == 1


async def test_mail_waiting_for_a_domain_that_blocks_us_bounces_at_once(
        tmp_path: Path, fed_log: LogWaiter) -> None:
    """Not after the 5-day expiry: a LINK refused with 403 by every server of the domain
    is its operator's decision, not an outage."""
    world = World(tmp_path)
    world.resolver.add(DomainRecords(B, (_closed_port(),), world.keys[B].public))  # down
    async with world.server(A) as a, world.client(a, ALICE, "alice@a.test") as alice:
        mids = [os.urandom(16), os.urandom(16)]
        for mid in mids:
            await alice.send(mid, [("bob@b.test", BOB.peer_id, b"x")])  # acked: queued
        await fed_log.event("outbound.retry")
        async with world.server(B, blocked=frozenset({A})):  # back, blocking a.test
            line = await fed_log.event("outbound.refused")
            assert "bounced=2" in line
            for mid in mids:
                state = (await _track(alice, mid))["bob@b.test"]
                assert (state["state"], state["error"]) == (
                    "bounced", "b.test refused it: links and mail from a.test are refused "
                    "here")
            with pytest.raises(RendezvousError, match=re.escape(
                    "b.test refuses mail from a.test: links and mail from a.test are "
                    "refused here")) as err:
                await alice.finger("bob@b.test")
            assert getattr(err.value, "status", None) == Status.FORBIDDEN
        assert a.federation is not None and a.federation.links_refused >= 1


async def test_per_domain_rate_limit(tmp_path: Path) -> None:
    world = World(tmp_path)
    limits = dataclasses.replace(Limits(), link_rate=0.001, link_burst=1,
                                 max_items_per_send=1)
    async with world.server(A), world.server(B, limits=limits) as b:
        await _register_bob(world, b)
        assert b.address is not None
        link = LinkClient(A, world.keys[A], DomainRecords(B, (b.address,),
                                                          b.domain_key.public), tls=False)
        await link.connect()
        try:
            item = SendItem("bob@b.test", BOB.peer_id, b"x")
            r = await link.request(lambda rid: Send(rid, os.urandom(16), 0, (item,),
                                                    "alice@a.test"))
            assert r.ok
            r = await link.request(lambda rid: Send(rid, os.urandom(16), 0, (item,),
                                                    "alice@a.test"))
            assert r.status == Status.RATE_LIMITED and "too many envelopes from a.test" in r.text
            assert b.link_rate_limited == 1
        finally:
            await link.aclose()


async def test_node_session_may_not_name_a_sender(tmp_path: Path) -> None:
    world = World(tmp_path)
    async with world.server(A) as a, world.client(a, ALICE, "alice@a.test") as alice:
        item = SendItem("bob@a.test", BOB.peer_id, b"x")
        with pytest.raises(AuthenticationError, match="from/asker is for server links"):
            await alice._request(lambda rid: Send(rid, os.urandom(16), 0, (item,),
                                                  "mallory@a.test"))


async def test_a_rate_limited_link_is_paced_not_reported_unreachable(
        tmp_path: Path, fed_log: LogWaiter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federation, "PACE_DELAY", 0.05)
    world = World(tmp_path)
    limits = dataclasses.replace(Limits(), link_rate=4, link_burst=2, max_items_per_send=1)
    async with world.server(A) as a, world.server(B, limits=limits) as b, \
            world.client(a, ALICE, "alice@a.test") as alice:
        await _register_bob(world, b)
        mids = [os.urandom(16) for _ in range(6)]
        for mid in mids:
            await alice.send(mid, [("bob@b.test", BOB.peer_id, b"x")])
        await fed_log.event("outbound.paced")
        for mid in mids:
            while (await _track(alice, mid))["bob@b.test"]["state"] != "delivered":
                await fed_log.event("outbound.delivered")
        assert a.federation is not None and a.federation.paced >= 1
        assert a.federation.link_failures == 0  # never shown as "unreachable"
        assert b.link_rate_limited >= 1


async def test_withdraw_takes_back_what_waits_for_another_domain(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.resolver.add(DomainRecords(B, (_closed_port(),), world.keys[B].public))
    async with world.server(A) as a, world.client(a, ALICE, "alice@a.test") as alice, \
            world.client(a, CAROL, "carol@a.test") as carol:
        mid = os.urandom(16)
        await alice.send(mid, [("bob@b.test", BOB.peer_id, b"x"),
                               ("carol@a.test", CAROL.peer_id, b"y")])
        assert await carol.withdraw(mid) == (0, 0)  # not carol's message
        assert await alice.withdraw(mid) == (1, 1)  # carol's copy here, bob's outbound
        assert (await _track(alice, mid)) == {}
        assert [e.message_id for e in await carol.list()] == []
        assert await alice.withdraw(mid) == (0, 0)
