"""The instance bus on a real PostgreSQL: shared presence with a lease, events between
instances (envelopes, held PIPE messages, relay invites), and the re-scan after the
listening connection was cut."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rendezvous.instances import (
    InstanceRow,
    PgInstanceBus,
    _Outgoing,
    decode_events,
    encode_events,
    instances_lines,
    instances_report,
)
from rendezvous.messages import RelayInvite
from rendezvous.pg_schema import migrate
from rendezvous.records import Envelope
from rendezvous.store import QueuedEnvelope

from .conftest import eventually

D1, D2 = b"\x01" * 20, b"\x02" * 20  # peer ids


class FakeHost:
    """Records what the bus asks of its server."""

    def __init__(self) -> None:
        self.devices: list[bytes] = []
        self.calls: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.rereads = 0

    def bus_local_devices(self) -> list[bytes]:
        return list(self.devices)

    async def bus_deliver(self, device: bytes, seqs: set[int] | None,
                          skip: set[int] | None = None, only: object | None = None) -> int:
        await self.calls.put(("deliver", device, seqs, skip, time.perf_counter()))
        return len(seqs or ())

    def bus_push(self, device: bytes, queued: list[QueuedEnvelope],
                 only: object | None = None) -> int:
        self.calls.put_nowait(("push", device, {q.seq for q in queued}, queued,
                               time.perf_counter()))
        return len(queued)

    async def bus_take_pipes(self, device: bytes) -> None:
        await self.calls.put(("pipes", device))

    def bus_relay_invite(self, device: bytes, invite: RelayInvite) -> bool:
        self.calls.put_nowait(("invite", device, invite))
        return True

    def bus_stats(self) -> dict[str, Any]:
        return {"online_sessions": len(self.devices)}

    async def reread_accounts(self) -> int:
        self.rereads += 1
        return 0


def queued(seq: int, device: bytes) -> QueuedEnvelope:
    return QueuedEnvelope(seq, Envelope(b"m" * 16, "a@example.net", "b@example.net", device,
                                        0, b"blob", 0.0))


@pytest.fixture
async def buses(pg_url: str) -> AsyncIterator[tuple[PgInstanceBus, FakeHost, PgInstanceBus,
                                                    FakeHost]]:
    import asyncpg  # pg_url has checked it is there

    conn = await asyncpg.connect(pg_url)
    await migrate(conn)  # the store's schema: the bus reads announced envelopes from it
    # The envelopes the test announces, as a store would have committed them.
    for seq, device in ((7, D2), (8, D1), (9, D2), (10, D2), (11, D1)):
        await conn.execute(
            "INSERT INTO envelopes (seq, device, mid, sender, recipient, prio, blob, "
            "received_at, expires_at) VALUES ($1, $2, $3, 'a@example.net', "
            "'b@example.net', 0, $4, 0, 1e12)", seq, device, bytes([seq]) * 16, b"blob")
    await conn.close()
    a, b = PgInstanceBus(pg_url, heartbeat=0.2), PgInstanceBus(pg_url, heartbeat=0.2)
    ha, hb = FakeHost(), FakeHost()
    await a.start(ha, ("127.0.0.1", 1001))
    await b.start(hb, ("127.0.0.1", 1002))
    try:
        yield a, ha, b, hb
    finally:
        await a.aclose()
        await b.aclose()


def test_events_round_trip_in_payloads_under_the_limit() -> None:
    out = _Outgoing([(D1, n) for n in range(500)], [D2],
                    [(D1, RelayInvite("a@x.net", D2, b"s" * 16, "h", 5, b"k" * 32))])
    payloads = encode_events("inst", out)
    assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
    events = [decode_events(p) for p in payloads]
    assert [e for ev in events for e in ev.envelopes] == out.envelopes
    assert [p for ev in events for p in ev.pipes] == [D2]
    assert [i for ev in events for i in ev.invites] == out.invites
    assert not any(ev.rescan for ev in events)
    (only,) = encode_events("inst", _Outgoing([], [], [], rescan=True))
    assert decode_events(only).rescan
    for bad in ("", "[]", '{"o":"x","v":[["e","zz",1]]}', '{"o":"x","v":[["q"]]}'):
        with pytest.raises(ValueError):
            decode_events(bad)


async def test_presence_events_and_lease(
        buses: tuple[PgInstanceBus, FakeHost, PgInstanceBus, FakeHost]) -> None:
    a, ha, b, hb = buses
    ha.devices.append(D1)
    assert a.session_up(D1, 0) == set()
    await a.settle()
    assert await b.online_elsewhere([D1, D2]) == {D1: a.instance}
    assert await a.online_elsewhere([D1]) == {}  # its own sessions are not "elsewhere"

    # An envelope stored on b for a device on a: a reads it within a round trip or two.
    t0 = time.perf_counter()
    b.stored([queued(7, D2), queued(8, D1)])
    kind, device, seqs, pushed, t1 = await asyncio.wait_for(ha.calls.get(), 5)
    assert (kind, device, seqs) == ("push", D1, {8})
    assert pushed[0].envelope.message_id == bytes([8]) * 16
    print(f"bus event latency {1000 * (t1 - t0):.1f} ms")
    b.pipes_held([D1])
    assert await asyncio.wait_for(ha.calls.get(), 5) == ("pipes", D1)
    invite = RelayInvite("c@example.net", D2, b"s" * 16, "127.0.0.1", 1002, b"k" * 32)
    b.relay_invite(D1, invite)
    assert await asyncio.wait_for(ha.calls.get(), 5) == ("invite", D1, invite)
    assert hb.calls.empty()  # b hears none of its own events

    # A session that begins on b after an event for it was announced gets it replayed.
    b.session_up(D1, 0)
    a.stored([queued(9, D2)])
    a.pipes_held([D1])  # notifications arrive in order: once b has this, it has seq 9
    await a.settle()
    assert await asyncio.wait_for(hb.calls.get(), 5) == ("pipes", D1)
    b.stored([queued(10, D2)])  # b's own: it pushed that one itself
    assert b.session_up(D2, 8) == {9}  # the server pushes it unless its flush had it

    # The listener is cut: a listens again and re-reads the queues of its devices.
    async with b._lock:
        await b._conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1",
            a._listener.get_server_pid())
    kind, device, seqs, skip, _ = await asyncio.wait_for(ha.calls.get(), 10)
    assert (kind, device, seqs) == ("deliver", D1, None) and 8 in skip
    assert await asyncio.wait_for(ha.calls.get(), 5) == ("pipes", D1)
    assert a.listener_reconnects == 1
    b.stored([queued(11, D1)])
    kind, device, seqs, _, _ = await asyncio.wait_for(ha.calls.get(), 5)
    assert (kind, device, seqs) == ("push", D1, {11})
    assert (ha.rereads, hb.rereads) == (1, 0)  # an accounts event may have been lost too

    # a dies (its tasks and connections gone at once, as under kill -9): its device is
    # offline for b once the lease ends.
    await a._tasks.aclose()
    a._conn.terminate()
    a._listener.terminate()
    assert await b.online_elsewhere([D1]) == {D1: a.instance}

    async def offline() -> None:
        assert await b.online_elsewhere([D1]) == {}, f"online after a's {a.lease} s lease"
    await eventually(offline)


async def test_finger_pipe_and_relay_across_instances(pg_url: str) -> None:
    """Two in-process servers of one domain on one database: FINGER shows a device online
    on the other instance, PIPE reaches it there, and a relay invite names the caller's
    instance, where both ends meet."""
    from overlay.transports.relay import relay_accept, relay_dial
    from rendezvous.client import RendezvousClient
    from rendezvous.domainkey import DomainKey
    from rendezvous.messages import PipeMessage
    from rendezvous.pg_store import PgStore
    from rendezvous.server import RendezvousServer
    from tests.overlay.streams import receive_exactly
    from tests.overlay.test_relay_stream import ALICE, BOB

    key = DomainKey.generate()
    # A lease no load outlasts: with the default (3 heartbeats, 0.6 s) a loaded run saw
    # FINGER find bob online and the PIPE right after find him offline (480). The lease
    # ending is test_presence_events_and_lease's subject, not this test's.
    buses = [PgInstanceBus(pg_url, heartbeat=0.2, lease=30.0) for _ in range(2)]
    servers = [RendezvousServer("example.net", PgStore(pg_url), open_registration=True,
                                domain_key=key, finger_open=True, resolver=None, bus=bus)
               for bus in buses]
    (h1, p1), (h2, p2) = [await s.start("127.0.0.1", 0) for s in servers]
    try:
        async with RendezvousClient(h1, p1, ALICE, "alice@example.net", register=True) as a, \
                RendezvousClient(h2, p2, BOB, "bob@example.net", register=True) as b:
            await buses[1].settle()
            (dev,) = (await a.finger("bob@example.net")).devices
            assert dev.online
            pushes = b.pushes()
            await a.pipe("bob@example.net", b"offer")
            push = await asyncio.wait_for(anext(pushes), 5)
            assert isinstance(push, PipeMessage) and push.payload == b"offer"

            async def accept() -> Any:
                invite = await asyncio.wait_for(anext(pushes), 5)
                assert isinstance(invite, RelayInvite)
                assert (invite.host, invite.port, invite.key) == (h1, p1, key.public)
                assert invite.host is not None and invite.port is not None
                return await relay_accept(invite.host, invite.port, BOB, "bob@example.net",
                                          invite, server_key=key.public)

            callee = asyncio.create_task(accept())
            caller = await relay_dial(h1, p1, ALICE, "alice@example.net", "bob@example.net",
                                      BOB.peer_id, server_key=key.public)
            stream = await callee
            await caller.send_all(b"over the relay")
            assert await receive_exactly(stream, 14) == b"over the relay"
            await caller.aclose()
            await stream.aclose()
    finally:
        for s in servers:
            await s.aclose()


def test_stats_text_names_each_instance_and_the_domain() -> None:
    rows = [InstanceRow("aaa", "10.0.0.1", 4500, True, 0.0, 0.4, 3,
                        {"online_sessions": 4, "online_devices": 3, "sends": 10, "delivered": 12,
                         "pushed_remote": 5}),
            InstanceRow("bbb", "10.0.0.2", 4500, False, 0.0, 42.0, 1, {"sends": 7})]
    lines = instances_lines(instances_report(rows))
    assert lines == [
        "instance aaa at 10.0.0.1:4500 (alive): 3 devices in 4 sessions, 10 messages in, "
        "12 pushed (5 stored by other instances)",
        "instance bbb at 10.0.0.2:4500 (lease expired 42 s ago): 1 device in 0 sessions, "
        "7 messages in, 0 pushed (0 stored by other instances)",
        "domain: 1 instance alive, 1 expired; 3 devices in 4 sessions, 10 messages in, "
        "12 pushed"]


async def test_envelope_committed_after_a_login_with_a_smaller_seq_is_pushed_once(
        pg_url: str) -> None:
    """Seqs are not in commit order across instances: an envelope another instance
    commits just after a login may carry a seq below the session's hi. The flush did not
    have it, so the announcement pushes it, once."""
    import asyncpg

    from rendezvous.client import RendezvousClient
    from rendezvous.domainkey import DomainKey
    from rendezvous.messages import Deliver
    from rendezvous.pg_store import PgStore
    from rendezvous.server import RendezvousServer
    from tests.overlay.test_relay_stream import ALICE, BOB

    key = DomainKey.generate()
    # A lease no load outlasts: with the default (3 heartbeats, 0.6 s) a loaded run saw
    # FINGER find bob online and the PIPE right after find him offline (480). The lease
    # ending is test_presence_events_and_lease's subject, not this test's.
    buses = [PgInstanceBus(pg_url, heartbeat=0.2, lease=30.0) for _ in range(2)]
    servers = [RendezvousServer("example.net", PgStore(pg_url), open_registration=True,
                                domain_key=key, resolver=None, bus=bus) for bus in buses]
    (h1, p1), (h2, p2) = [await s.start("127.0.0.1", 0) for s in servers]
    conn = await asyncpg.connect(pg_url)
    try:
        async with RendezvousClient(h1, p1, BOB, "bob@example.net", register=True):
            pass  # bob exists, offline
        async with RendezvousClient(h2, p2, ALICE, "alice@example.net", register=True) as a:
            late = conn.transaction()
            await late.start()  # an instance's batch, still in flight: a seq but no commit
            seq = await conn.fetchval(
                "INSERT INTO envelopes (device, mid, sender, recipient, prio, blob, "
                "received_at, expires_at) VALUES ($1, $2, 'alice@example.net', "
                "'bob@example.net', 0, 'late', 0, 1e12) RETURNING seq",
                BOB.peer_id, b"L" * 16)
            await a.send(b"E" * 16, [("bob@example.net", BOB.peer_id, b"early")])
            async with RendezvousClient(h1, p1, BOB, "bob@example.net") as b:
                pushes = b.pushes()
                first = await asyncio.wait_for(anext(pushes), 5)
                assert isinstance(first, Deliver) and first.envelope.blob == b"early"
                await late.commit()
                servers[1].bus.stored([QueuedEnvelope(seq, Envelope(
                    b"L" * 16, "alice@example.net", "bob@example.net", BOB.peer_id, 0,
                    b"late", 0.0))])
                second = await asyncio.wait_for(anext(pushes), 5)
                assert isinstance(second, Deliver) and second.envelope.blob == b"late"
                assert seq < max(c.flush_hi for c in servers[0]._online[BOB.peer_id])
                # Announced again (a rescan): not pushed a second time.
                servers[1].bus.stored([QueuedEnvelope(seq, second.envelope)])
                await buses[1].settle()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(anext(pushes), 0.5)
    finally:
        await conn.close()
        for s in servers:
            await s.aclose()


async def test_relay_from_another_domain_names_the_callers_instance(
        pg_url: str, tmp_path: Path) -> None:
    """a.test runs two instances (both SRV targets); alice dials through the second.
    b.test's invite names that instance, where her splice waits, not the first target."""
    from overlay.transports.relay import relay_accept, relay_dial
    from rendezvous.dns import DomainRecords
    from rendezvous.pg_store import PgStore
    from rendezvous.server import RendezvousServer
    from tests.overlay.streams import receive_exactly

    from .test_federation import ALICE, BOB, World

    world = World(tmp_path)
    instances = [RendezvousServer("a.test", PgStore(pg_url), open_registration=True,
                                  domain_key=world.keys["a.test"], resolver=world.resolver,
                                  bus=PgInstanceBus(pg_url, heartbeat=0.2)) for _ in range(2)]
    first, second = [await s.start("127.0.0.1", 0) for s in instances]
    world.resolver.add(DomainRecords("a.test", (first, second),
                                     world.keys["a.test"].public))
    try:
        async with world.server("b.test") as b:
            async with world.client(b, BOB, "bob@b.test"), \
                    world.client(instances[1], ALICE, "alice@a.test") as alice:
                pass
            async with world.client(b, BOB, "bob@b.test") as bob:
                dial = asyncio.create_task(relay_dial(
                    *second, ALICE, "alice@a.test", "bob@b.test", BOB.peer_id,
                    server_key=alice.server_key))
                async with asyncio.timeout(10):
                    async for invite in bob.pushes():
                        if isinstance(invite, RelayInvite):
                            break
                assert isinstance(invite, RelayInvite)
                assert (invite.host, invite.port) == second
                assert invite.host is not None and invite.port is not None
                callee = await relay_accept(invite.host, invite.port, BOB, "bob@b.test",
                                            invite, server_key=invite.key)
                caller = await dial
                await caller.send_all(b"via the second instance")
                assert await receive_exactly(callee, 23) == b"via the second instance"
                await caller.aclose()
                await callee.aclose()
    finally:
        for s in instances:
            await s.aclose()


@pytest.mark.parametrize("error", [
    "interface", ConnectionResetError(104, "Connection reset by peer"), TimeoutError()])
async def test_a_bus_losing_its_connection_at_start_says_so_in_one_line(error: Any) -> None:
    # A connection lost in the middle of the first statement (asyncpg's InterfaceError), or
    # a timed-out one: `serve` prints RuntimeError as one line, anything else as a traceback.
    import asyncpg

    exc = asyncpg.InterfaceError("connection was closed in the middle of operation") \
        if error == "interface" else error

    class Lost:
        async def execute(self, *args: Any) -> None:
            raise exc

    bus = PgInstanceBus("postgresql://rv:secret@127.0.0.1:5/rv")

    async def connect() -> Lost:
        return Lost()

    bus._connect = connect  # type: ignore[method-assign]
    with pytest.raises(RuntimeError) as err:
        await bus.start(FakeHost(), ("127.0.0.1", 4500))
    text = str(err.value)
    assert text.startswith("postgresql://rv:***@127.0.0.1:5/rv: ") and "secret" not in text
    assert text.removeprefix("postgresql://rv:***@127.0.0.1:5/rv: ") in (
        "connection was closed in the middle of operation",
        "[Errno 104] Connection reset by peer", "TimeoutError")


async def test_a_listener_asyncpg_aborts_without_telling_is_listened_again(
        buses: tuple[PgInstanceBus, FakeHost, PgInstanceBus, FakeHost]) -> None:
    """asyncpg aborts a connection on a protocol error (its `_coreproto_error`, as when
    PostgreSQL ends the session in the middle of a statement) without calling its
    termination listeners. A loaded test run saw the bus go on with such a listener: every
    heartbeat failed with 'connection is closed', and no event came in again. The failed
    check of the listener now counts as losing it: the bus listens again and re-reads what
    it may have missed."""
    a, ha, b, _ = buses
    ha.devices.append(D1)
    a.session_up(D1, 0)
    await a.settle()
    listener = a._listener
    listener._abort()  # what asyncpg's protocol error does: no termination listener runs
    kind, device, seqs, _, _ = await asyncio.wait_for(ha.calls.get(), 10)
    assert (kind, device, seqs) == ("deliver", D1, None)  # the re-scan after listening
    assert a.listener_reconnects == 1 and a._listener is not listener
    b.stored([queued(11, D1)])
    while (call := await asyncio.wait_for(ha.calls.get(), 5))[0] != "push":
        pass
    assert call[1:3] == (D1, {11})
