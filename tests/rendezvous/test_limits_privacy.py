"""The server's bounds on sessions, queues, PIPE holds and relay volume, and what FINGER
tells whom: in process, real sockets and a real SQLite file, restarts included."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sqlite3
from pathlib import Path

import pytest

from overlay.transports.relay import RelayError, relay_dial
from overlay.transports.stream import StreamBroken
from rendezvous.errors import AuthenticationError, NotFoundError, QuotaError
from rendezvous.limits import Limits
from rendezvous.messages import Deliver, PipeMessage, Send, SendItem
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.store import Quota, RegistrationPolicy
from tests.overlay.test_relay_stream import ALICE as RELAY_ALICE
from tests.overlay.test_relay_stream import BOB as RELAY_BOB
from tests.overlay.test_relay_stream import relay_setup

from .conftest import DOMAIN, RawSession, ident, mid, port_of, running_server
from .test_relay import MB, pump
from .test_server import client, take

ALICE, BOB, BOB2, CAROL, DAVE = ident(1), ident(2), ident(3), ident(4), ident(5)
_OPEN = RegistrationPolicy(open_registration=True)


async def test_sessions_are_capped_per_device_account_and_ip(tmp_path: Path) -> None:
    limits = Limits(sessions_per_device=2, sessions_per_account=3, sessions_per_ip=4)
    async with running_server(tmp_path, limits=limits) as server:
        now = server.clock()
        async with client(server, BOB, "bob@example.net"):
            pass
        await server.store.add_invite("bob@example.net", "inv", now, now + 60)
        async with client(server, BOB2, "bob@example.net", invite="inv"):
            pass
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(client(server, BOB, "bob@example.net"))
            with pytest.raises(AuthenticationError) as err:
                await client(server, BOB, "bob@example.net").start()
            assert err.value.status == Status.RATE_LIMITED
            assert err.value.text == "this device already has 2 sessions, the limit; " \
                                     "close one first"
            await stack.enter_async_context(client(server, BOB2, "bob@example.net"))
            with pytest.raises(AuthenticationError) as err:
                await client(server, BOB2, "bob@example.net").start()
            assert err.value.text == "bob@example.net already has 3 sessions, the limit; " \
                                     "close one first"
            last = await stack.enter_async_context(client(server, ALICE, "alice@example.net"))
            with pytest.raises(AuthenticationError) as err:
                await client(server, CAROL, "carol@example.net").start()
            assert err.value.text == "4 sessions are already open from your IP address, " \
                                     "the limit"
            assert server.snapshot()["sessions_refused"] == 3
            await last.aclose()
            async with client(server, CAROL, "carol@example.net") as c:  # a slot came free
                await c.finger("bob@example.net")


async def test_one_sender_cannot_fill_another_accounts_queue(tmp_path: Path) -> None:
    limits = Limits(sender_quota_count=2, sender_quota_bytes=1000)
    async with running_server(tmp_path, limits=limits) as server:
        async with client(server, BOB, "bob@example.net"):
            pass
        async with client(server, ALICE, "alice@example.net") as a, \
                client(server, CAROL, "carol@example.net") as c:
            for _ in range(2):
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])
            with pytest.raises(QuotaError) as err:
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])
            assert str(err.value.text) == (
                "quota exceeded for bob@example.net from alice@example.net: 2 envelopes / 2 "
                "bytes of yours queued there, limit 2 / 1000 per sender")
            await c.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])  # others still can
            with pytest.raises(QuotaError, match="limit 2 / 1000 per sender"):
                await c.send(mid(), [("bob@example.net", BOB.peer_id, b"y" * 1001)])
    # The usage is counted again from the file after a restart; Bob's removal frees it.
    async with running_server(tmp_path, limits=limits) as server:
        async with client(server, ALICE, "alice@example.net") as a:
            with pytest.raises(QuotaError, match=re.escape("from alice@example.net")):
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])
            async with client(server, BOB, "bob@example.net") as b:
                (first, *_) = await b.list()
                await b.remove(first.message_id)
            await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])


async def test_finger_shows_presence_only_to_those_who_exchanged_mail(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        adv = {"addrs": ["10.0.0.2:4567"], "nat": True}
        async with client(server, ALICE, "alice@example.net", advertise=adv) as a, \
                client(server, BOB, "bob@example.net", advertise=adv) as b, \
                client(server, CAROL, "carol@example.net", advertise=adv) as c, \
                client(server, DAVE, "dave@example.net", advertise=adv) as d:
            # Nobody has exchanged mail: keys only, shown offline, never seen, no hints.
            (dev,) = (await c.finger("bob@example.net")).devices
            assert dev.verify_key == BOB.public.verify_key
            assert (dev.online, dev.last_seen, dev.advertise) == (False, None, {})
            (own,) = (await b.finger("bob@example.net")).devices  # oneself: everything
            assert own.online and own.advertise == adv
            # One message from Alice to Bob and Dave: each pair of the three has exchanged
            # mail (sender and recipient both ways; co-recipients, who fetch from each other).
            await a.send(mid(), [("bob@example.net", BOB.peer_id, b"1"),
                                 ("dave@example.net", DAVE.peer_id, b"2")])
            for asker, whom in ((a, "bob@example.net"), (b, "alice@example.net"),
                                (b, "dave@example.net"), (d, "bob@example.net")):
                (dev,) = (await asker.finger(whom)).devices
                assert dev.online and dev.advertise == adv, (asker.address, whom)
            (dev,) = (await c.finger("bob@example.net")).devices
            assert (dev.online, dev.advertise) == (False, {})
            # An unknown address: the same 404 text as SEND's, nothing more.
            with pytest.raises(NotFoundError) as fing:
                await c.finger("nobody@example.net")
            with pytest.raises(NotFoundError) as sent:
                await c.send(mid(), [("nobody@example.net", BOB.peer_id, b"x")])
            assert fing.value.text == sent.value.text == "no such address: nobody@example.net"
    # What was exchanged survives a restart; a server run with finger_open shows all.
    async with running_server(tmp_path) as server:
        async with client(server, DAVE, "dave@example.net") as d, \
                client(server, CAROL, "carol@example.net") as c:
            (dev,) = (await d.finger("alice@example.net")).devices
            assert dev.advertise == adv and dev.last_seen is not None
            (dev,) = (await c.finger("alice@example.net")).devices
            assert dev.advertise == {} and dev.last_seen is None
    server = RendezvousServer(DOMAIN, SqliteStore(tmp_path / "rv.sqlite3"),
                              open_registration=True, finger_open=True)
    await server.start("127.0.0.1", 0)
    try:
        async with client(server, CAROL, "carol@example.net") as c:
            (dev,) = (await c.finger("alice@example.net")).devices
            assert dev.advertise == adv and dev.last_seen is not None
    finally:
        await server.aclose()


async def test_pipe_hold_is_shared_per_sender_and_survives_a_restart(tmp_path: Path) -> None:
    limits = Limits(pipe_held_per_device=3, pipe_held_per_sender=2)
    async with running_server(tmp_path, limits=limits) as server:
        async with client(server, BOB, "bob@example.net"):
            pass  # registered, now offline
        async with client(server, ALICE, "alice@example.net") as a, \
                client(server, CAROL, "carol@example.net") as c:
            await a.pipe("bob@example.net", b"a-1", hold=60)
            await a.pipe("bob@example.net", b"a-2", hold=60)
            with pytest.raises(QuotaError) as err:
                await a.pipe("bob@example.net", b"a-3", hold=60)
            assert err.value.text == "2 pipe messages from you already held for that " \
                                     "device, the limit"
            await c.pipe("bob@example.net", b"c-1", hold=60)  # Alice did not use it all
            with pytest.raises(QuotaError, match="3 pipe messages already held"):
                await c.pipe("bob@example.net", b"c-2", hold=60)
    async with running_server(tmp_path, limits=limits) as server:
        async with client(server, BOB, "bob@example.net") as b:
            held = await take(b.pushes(), 3)
            assert held == [PipeMessage("alice@example.net", ALICE.peer_id, b"a-1"),
                            PipeMessage("alice@example.net", ALICE.peer_id, b"a-2"),
                            PipeMessage("carol@example.net", CAROL.peer_id, b"c-1")]


async def test_the_daily_relay_volume_survives_a_restart(tmp_path: Path) -> None:
    limits = Limits(relay_rate=0, relay_daily=1 * MB)
    async with relay_setup(tmp_path, limits) as (server, pair):
        a, b = await pair()
        sender = asyncio.create_task(pump(a, 4 * MB))
        async with asyncio.timeout(20):
            with contextlib.suppress(StreamBroken):
                while await b.receive_some(1 << 20):
                    pass
            await asyncio.wait([sender])
        await a.aclose()
        await b.aclose()
        assert server.snapshot()["relay_cut_daily"] == 1
    async with relay_setup(tmp_path, limits) as (server, _):
        host, port = server.address or ("", 0)
        with pytest.raises(RelayError) as refused:
            await relay_dial(host, port, RELAY_ALICE, "alice@example.net", "bob@example.net",
                             RELAY_BOB.peer_id, timeout=5)
        assert refused.value.status == Status.RATE_LIMITED
        assert re.search(r"daily relay volume of alice@example.net used up: 1 MB of 1 MB",
                         refused.value.text)


def _slow_socket() -> socket.socket:
    """A client socket with a small receive buffer, so unread pushes pile up server side."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_slowest_readers_are_dropped_when_all_unsent_passes_the_budget(
        tmp_path: Path) -> None:
    limits = Limits(push_buffer_total=1_500_000, max_push_buffer=8 * MB, quota_bytes=1 << 30,
                    sender_quota_bytes=0, sender_quota_count=0, quota_count=1_000_000)
    async with running_server(tmp_path, limits=limits) as server:
        port = port_of(server)
        readers = {}
        for who, name in ((BOB, "bob"), (CAROL, "carol")):
            sock = _slow_socket()
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            s = RawSession(reader, writer)
            await s.read()
            assert (await s.auth(who, f"{name}@example.net", register=True)).status == 200
            readers[name] = s
        blob = b"z" * 60_000
        async with client(server, ALICE, "alice@example.net") as a, \
                client(server, DAVE, "dave@example.net") as d:
            dave_pushes = d.pushes()

            # Bob reads nothing until 1.2 MB of pushes wait for him at the server (past
            # what the kernel's socket buffers took); then Carol, who reads nothing either,
            # gets pushes until the total passes 1.5 MB: Bob, with the most unsent, is the
            # one dropped, and Carol, now under the budget alone, stays.
            sent = {"bob": 0, "carol": 0}
            while server.snapshot()["unsent_bytes"] < 1_200_000 and sent["bob"] < 400:
                await a.send(mid(), [("bob@example.net", BOB.peer_id, blob)])
                sent["bob"] += 1
            assert server.snapshot()["slow_readers_dropped"] == 0
            while server.snapshot()["slow_readers_dropped"] == 0 and sent["carol"] < 400:
                await a.send(mid(), [("carol@example.net", CAROL.peer_id, blob)])
                sent["carol"] += 1
            assert await readers["bob"].closed_by_server()
            assert server.snapshot()["slow_readers_dropped"] == 1
            # Carol stays connected and reads all of hers; others are served meanwhile.
            got = 0
            while got < sent["carol"]:
                msg = await readers["carol"].read()
                if isinstance(msg, Deliver):
                    got += 1
            await a.send(mid(), [("dave@example.net", DAVE.peer_id, b"hi")])
            (push,) = await take(dave_pushes, 1)
            assert isinstance(push, Deliver) and push.envelope.blob == b"hi"
        # Bob's envelopes stayed queued for his next session.
        async with client(server, BOB, "bob@example.net") as b:
            assert len(await b.list()) == sent["bob"]
        for s in readers.values():
            await s.close()


async def test_a_version_1_data_folder_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "rv.sqlite3"
    store = SqliteStore(path)
    await store.open()
    for n, addr in ((1, "alice@example.net"), (2, "bob@example.net")):
        await store.authenticate(addr, ident(n).public.verify_key, register=True, invite=None,
                                 advertise=None, now=1.0, policy=_OPEN, page=1)
    await store.aclose()
    # Make it what a version 1 server left: no new tables, no vouch column, one envelope.
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE exchanged; DROP TABLE pipe_held; DROP TABLE relay_usage; "
                     "ALTER TABLE devices DROP COLUMN vouch; "
                     "UPDATE meta SET value='1' WHERE key='schema';")
    db.execute("INSERT INTO envelopes (device, mid, sender, recipient, prio, blob, "
               "received_at, expires_at) VALUES (?, ?, ?, ?, 0, x'00', 5.0, 1e12)",
               (BOB.peer_id, mid(), "alice@example.net", "bob@example.net"))
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        view = await store.finger("bob@example.net", "alice@example.net")
        assert view.exchanged and view.devices is not None and len(view.devices) == 1
        assert not (await store.finger("carol@example.net", "alice@example.net")).exchanged
        assert len(await store.pending(BOB.peer_id, 0, 1 << 62, 10, 6.0)) == 1
    finally:
        await store.aclose()
    db = sqlite3.connect(path)
    (version,) = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    assert int(version) >= 2
    with pytest.raises(RuntimeError, match=r"schema version 99, .*written by a newer server"):
        await SqliteStore(path).open()


async def test_keys_only_finger_costs_one_store_lookup_either_way(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "rv.sqlite3")
    await store.open()
    try:
        for who, addr in ((BOB, "bob@example.net"), (CAROL, "carol@example.net")):
            await store.authenticate(addr, who.public.verify_key, register=True, invite=None,
                                     advertise=None, now=1.0, policy=_OPEN, page=1)
        before = store.ops
        assert (await store.finger("carol@example.net", "nobody@example.net")).devices is None
        known = await store.finger("carol@example.net", "bob@example.net")
        assert known.devices is not None and not known.exchanged
        assert store.ops - before == 2  # one op each, known or not
        send = Send(1, mid(), 0, (SendItem("bob@example.net", BOB.peer_id, b"x"),))
        assert (await store.enqueue("carol@example.net", send, 2.0, 100.0,
                                    Quota(10, 100))).status == Status.OK
        assert (await store.finger("bob@example.net", "carol@example.net")).exchanged
    finally:
        await store.aclose()


async def test_co_recipients_of_a_message_sent_in_several_sends_have_exchanged_mail(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "rv.sqlite3")
    await store.open()
    try:
        people = ((ALICE, "alice@example.net"), (BOB, "bob@example.net"),
                  (CAROL, "carol@example.net"), (DAVE, "dave@example.net"))
        for who, addr in people:
            await store.authenticate(addr, who.public.verify_key, register=True, invite=None,
                                     advertise=None, now=1.0, policy=_OPEN, page=1)
        m = mid()  # one message, its recipients split over two SENDs as a node batches them
        for batch in (people[1:3], people[3:]):
            send = Send(1, m, 0, tuple(SendItem(a, w.peer_id, b"x") for w, a in batch))
            assert (await store.enqueue("alice@example.net", send, 2.0, 100.0,
                                        Quota(10, 100))).status == Status.OK
        for asker, whom in (("dave@example.net", "bob@example.net"),
                            ("carol@example.net", "dave@example.net"),
                            ("bob@example.net", "alice@example.net")):
            assert (await store.finger(asker, whom)).exchanged, (asker, whom)
        other = Send(1, mid(), 0, (SendItem("bob@example.net", BOB.peer_id, b"x"),))
        await store.enqueue("carol@example.net", other, 3.0, 100.0, Quota(10, 100))
        assert (await store.finger("bob@example.net", "carol@example.net")).exchanged
    finally:
        await store.aclose()
