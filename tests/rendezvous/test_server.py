"""Tier (c), in-process: the real server and client library over loopback, real SQLite."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient
from rendezvous.errors import (
    AuthenticationError,
    NotFoundError,
    NotOnlineError,
    QuotaError,
    RequestTimeoutError,
    TooLargeError,
)
from rendezvous.limits import Limits
from rendezvous.messages import Deliver, PipeMessage
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore

from .conftest import ident, mid, port_of, running_server

ALICE, BOB, BOB2 = ident(1), ident(2), ident(3)


def client(server: RendezvousServer, who: DeviceIdentity, address: str,
           **kw: Any) -> RendezvousClient:
    kw.setdefault("register", True)
    kw.setdefault("request_timeout", 5.0)
    return RendezvousClient("127.0.0.1", port_of(server), who, address, **kw)


async def take(it: AsyncIterator[object], n: int, within: float = 5.0) -> list[object]:
    out = []
    async with asyncio.timeout(within):
        for _ in range(n):
            out.append(await anext(it))
    return out


async def nothing_more(it: AsyncIterator[object], within: float = 0.3) -> bool:
    try:
        async with asyncio.timeout(within):
            await anext(it)
    except TimeoutError:
        return True
    return False


async def test_send_is_pushed_live_and_remove_is_final(server: RendezvousServer) -> None:
    async with client(server, ALICE, "alice@example.net") as a, \
            client(server, BOB, "bob@example.net") as b:
        pushes = b.pushes()
        m = mid()
        await a.send(m, [("bob@example.net", BOB.peer_id, b"sealed-1")], priority=3)
        (push,) = await take(pushes, 1)
        assert isinstance(push, Deliver)
        env = push.envelope
        assert (env.message_id, env.sender, env.recipient, env.device, env.priority, env.blob) \
            == (m, "alice@example.net", "bob@example.net", BOB.peer_id, 3, b"sealed-1")
        await a.send(m, [("bob@example.net", BOB.peer_id, b"sealed-1")])  # a retry
        assert await nothing_more(pushes)
        assert [i.message_id for i in await b.list()] == [m]
        assert (await b.retrieve(m)).blob == b"sealed-1"
        await b.remove(m)
        await b.remove(m)  # idempotent
        assert await b.list() == []
        with pytest.raises(NotFoundError, match=f"no queued envelope {m.hex()}"):
            await b.retrieve(m)
    async with client(server, BOB, "bob@example.net") as b:
        assert await nothing_more(b.pushes())


async def test_queue_flush_in_pages_with_live_sends_is_exactly_once(tmp_path: Path) -> None:
    async with running_server(tmp_path, limits=Limits(flush_page=7)) as server:
        async with client(server, BOB, "bob@example.net"):
            pass
        async with client(server, ALICE, "alice@example.net") as a:
            queued = [mid() for _ in range(60)]
            for m in queued:
                await a.send(m, [("bob@example.net", BOB.peer_id, m)])
            b = client(server, BOB, "bob@example.net")
            live = [mid() for _ in range(40)]
            # Sends race the flush that starts when Bob authenticates.
            await asyncio.gather(b.start(), *(
                a.send(m, [("bob@example.net", BOB.peer_id, m)]) for m in live))
            try:
                got = await take(b.pushes(), 100)
                ids = [p.envelope.message_id for p in got if isinstance(p, Deliver)]
                assert sorted(ids) == sorted(queued + live)
                assert await nothing_more(b.pushes())
            finally:
                await b.aclose()


async def test_finger_shows_presence_keys_and_advertisement(server: RendezvousServer) -> None:
    async with client(server, ALICE, "alice@example.net") as a:
        with pytest.raises(NotFoundError, match=re.escape("no such address: carol@example.net")):
            await a.finger("carol@example.net")
        async with client(server, BOB, "bob@example.net",
                          advertise={"addrs": ["10.0.0.2:4567"], "nat": False}) as b:
            # Presence and hints go to those who exchanged mail (test_limits_privacy.py).
            await a.send(mid(), [("bob@example.net", BOB.peer_id, b"hi")])
            f = await a.finger("bob@example.net")
            (dev,) = f.devices
            assert f.address == "bob@example.net"
            assert dev.verify_key == BOB.public.verify_key and dev.online
            assert dev.advertise == {"addrs": ["10.0.0.2:4567"], "nat": False}
            await b.advertise({"addrs": ["10.0.0.3:1"]})
            (dev,) = (await a.finger("bob@example.net")).devices
            assert dev.advertise == {"addrs": ["10.0.0.3:1"]}
            with pytest.raises(TooLargeError):
                await b.advertise({f"k{i}": "x" * 200 for i in range(10)})
        f = await a.finger("bob@example.net")
        (dev,) = f.devices
        assert not dev.online and dev.last_seen is not None and dev.last_seen > 0


async def test_pipe_relays_holds_and_refuses(server: RendezvousServer) -> None:
    async with client(server, BOB, "bob@example.net"):
        pass  # registered, now offline
    async with client(server, ALICE, "alice@example.net") as a:
        with pytest.raises(NotOnlineError, match=re.escape("bob@example.net has no device online")):
            await a.pipe("bob@example.net", b"offer-0")
        await a.pipe("bob@example.net", b"offer-1", hold=60)
        with pytest.raises(NotFoundError, match="is not bound"):
            await a.pipe("bob@example.net", b"x", device=bytes(20), hold=60)
        async with client(server, BOB, "bob@example.net") as b:
            pushes = b.pushes()
            (held,) = await take(pushes, 1)
            assert held == PipeMessage("alice@example.net", ALICE.peer_id, b"offer-1")
            await a.pipe("bob@example.net", b"offer-2", device=BOB.peer_id)
            (live,) = await take(pushes, 1)
            assert isinstance(live, PipeMessage) and live.payload == b"offer-2"
            await b.pipe("alice@example.net", b"answer")
            (ans,) = await take(a.pushes(), 1)
            assert ans == PipeMessage("bob@example.net", BOB.peer_id, b"answer")


async def test_two_devices_one_address(tmp_path: Path) -> None:
    async with running_server(tmp_path, open_registration=False) as server:
        store = server.store
        now = server.clock()
        await store.add_invite("bob@example.net", "inv-1", now, now + 60)
        await store.add_invite("bob@example.net", "inv-2", now, now + 60)
        with pytest.raises(AuthenticationError) as err:
            await client(server, BOB, "bob@example.net").start()
        assert err.value.status == 403 and "needs an invite" in err.value.text
        async with client(server, BOB, "bob@example.net", invite="inv-1"), \
                client(server, BOB2, "bob@example.net", invite="inv-2"):
            pass
        with pytest.raises(AuthenticationError) as err:  # Bob's invite is not Alice's
            await client(server, ALICE, "alice@example.net", invite="inv-1").start()
        assert "invite is not valid for alice@example.net" in err.value.text
        await store.add_invite("alice@example.net", "inv-a", now, now + 60)
        async with client(server, BOB, "bob@example.net", register=False) as b1, \
                client(server, BOB2, "bob@example.net", register=False) as b2, \
                client(server, ALICE, "alice@example.net", invite="inv-a") as a:
            m = mid()
            await a.send(m, [("bob@example.net", BOB.peer_id, b"for-1"),
                             ("bob@example.net", BOB2.peer_id, b"for-2")])
            (p1,) = await take(b1.pushes(), 1)
            (p2,) = await take(b2.pushes(), 1)
            assert isinstance(p1, Deliver) and isinstance(p2, Deliver)
            assert (p1.envelope.blob, p2.envelope.blob) == (b"for-1", b"for-2")
            assert len((await a.finger("bob@example.net")).devices) == 2


async def test_quota_error_reaches_the_sender(tmp_path: Path) -> None:
    async with running_server(tmp_path, limits=Limits(quota_count=3)) as server:
        async with client(server, BOB, "bob@example.net"):
            pass
        async with client(server, ALICE, "alice@example.net") as a:
            for _ in range(3):
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])
            with pytest.raises(QuotaError, match=re.escape("quota exceeded for bob@example.net")):
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x")])


async def test_client_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    async with running_server(tmp_path) as first:
        port = port_of(first)
        b = client(first, BOB, "bob@example.net", max_backoff=0.2)
        await b.start()
        a = client(first, ALICE, "alice@example.net", max_backoff=0.2)
        await a.start()
    try:
        assert not b.connected
        pushes = b.pushes()
        async with running_server(tmp_path, port=port):
            m = mid()
            await a.send(m, [("bob@example.net", BOB.peer_id, b"after restart")])
            await b.wait_connected(5)
            (p,) = await take(pushes, 1)
            assert isinstance(p, Deliver) and p.envelope.message_id == m
            assert b.reconnects == 1
            await a.aclose()
            await b.aclose()
    finally:
        await a.aclose()
        await b.aclose()


class _LogSeen(logging.Handler):
    """Sets `event` when a record containing every one of `needles` is logged."""

    def __init__(self, *needles: str) -> None:
        super().__init__(logging.INFO)
        self.needles = needles
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if all(n in record.getMessage() for n in self.needles):
            self.event.set()


async def test_retry_now_cuts_the_reconnect_backoff_short(tmp_path: Path) -> None:
    # After a few seconds of outage the backoff waits seconds between attempts; a user who
    # sends while disconnected should not wait for it once the server is back.
    logger = logging.getLogger("rendezvous.client")
    sixth = _LogSeen("client.reconnect_failed", "attempt=6")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(sixth)
    try:
        async with running_server(tmp_path) as first:
            port = port_of(first)
            b = client(first, BOB, "bob@example.net", max_backoff=60)
            await b.start()
        try:
            async with asyncio.timeout(20):  # the sixth attempt fails 3.2-6.3 s from now
                await sixth.event.wait()
            async with running_server(tmp_path, port=port):
                # The seventh attempt waits 3.2-6.4 s: none comes within this second.
                with pytest.raises(RequestTimeoutError):
                    await b.wait_connected(1.0)
                b.retry_now()
                await b.wait_connected(2)
                assert b.connected and b.reconnects == 1
        finally:
            await b.aclose()
    finally:
        logger.removeHandler(sixth)
        logger.setLevel(level)


class _HeldStore(SqliteStore):
    """A store whose writer thread can be held before it runs (and commits) a batch."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def _run_batch(self, conn: sqlite3.Connection, ops: list[Any]) -> list[Any]:
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(10)
        return super()._run_batch(conn, ops)


async def test_send_and_remove_are_answered_only_after_their_commit(tmp_path: Path) -> None:
    store = _HeldStore(tmp_path / "rv.sqlite3")
    server = RendezvousServer("example.net", store, open_registration=True)
    await server.start("127.0.0.1", 0)
    try:
        async with client(server, ALICE, "alice@example.net") as a, \
                client(server, BOB, "bob@example.net") as b:
            pushes = b.pushes()
            for verb in ("send", "remove"):
                m = mid()
                if verb == "remove":
                    await a.send(m, [("bob@example.net", BOB.peer_id, b"x")])
                    await take(pushes, 1)
                store.hold.set()
                store.holding.clear()
                store.release.clear()
                call = (a.send(m, [("bob@example.net", BOB.peer_id, b"x")]) if verb == "send"
                        else b.remove(m))
                task = asyncio.create_task(call)
                await asyncio.to_thread(store.holding.wait, 10)
                done, _ = await asyncio.wait([task], timeout=0.2)
                assert not done, f"{verb} answered before its commit"
                store.hold.clear()
                store.release.set()
                await task
                # Acknowledged: a fresh reader of the file sees the change committed.
                db = sqlite3.connect(tmp_path / "rv.sqlite3")
                try:
                    (rows,) = db.execute("SELECT COUNT(*) FROM envelopes WHERE mid=?",
                                         (m,)).fetchone()
                finally:
                    db.close()
                assert rows == (1 if verb == "send" else 0)
    finally:
        store.release.set()
        await server.aclose()


class _CoroutineStore(SqliteStore):
    """A Store whose SEND and REMOVE are plain coroutines, as the Protocol allows."""

    async def enqueue(self, *args: Any) -> Any:
        return await super().enqueue(*args)

    async def remove(self, *args: Any) -> Any:
        return await super().remove(*args)


async def test_a_store_of_coroutines_serves_send_and_remove(tmp_path: Path) -> None:
    server = RendezvousServer("example.net", _CoroutineStore(tmp_path / "rv.sqlite3"),
                              open_registration=True)
    await server.start("127.0.0.1", 0)
    try:
        async with client(server, ALICE, "alice@example.net") as a, \
                client(server, BOB, "bob@example.net") as b:
            m = mid()
            await a.send(m, [("bob@example.net", BOB.peer_id, b"x")])
            (push,) = await take(b.pushes(), 1)
            assert isinstance(push, Deliver) and push.envelope.message_id == m
            await b.remove(m)
            assert await b.list() == []
            with pytest.raises(NotFoundError, match="no such address"):
                await a.send(mid(), [("nobody@example.net", BOB.peer_id, b"x")])
    finally:
        await server.aclose()
