"""A real `serve --store` told to re-read accounts (SIGUSR1) while its PostgreSQL server is
down logs that it could not and serves on; once the database is back the next SIGUSR1
re-reads. The error ended the server ('cannot connect to ...: Connection refused')."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rendezvous.errors import DATABASE_AWAY, ServerError
from tests.pgtest import PgCluster

from .conftest import ident
from .test_operator import rc, serve

pytestmark = pytest.mark.slow
ALICE = ident(81)
BOB = ident(82)


async def test_a_reread_while_the_database_is_down_is_logged_and_serving_goes_on(
        tmp_path: Path, own_pg_cluster: PgCluster) -> None:
    async with serve(tmp_path / "data", "--store", own_pg_cluster.create_database(),
                     "--stun-port", "off", "--dht-port", "off", "--open-registration",
                     expect=1) as srv:
        own_pg_cluster.stop()
        mark = len(srv.log)
        srv.proc.send_signal(signal.SIGUSR1)
        line = await srv.wait_log("event=server.accounts_reread_failed", after=mark)
        assert "Connection refused" in line, line
        own_pg_cluster.start_again()
        mark = len(srv.log)
        srv.proc.send_signal(signal.SIGUSR1)
        await srv.wait_log("event=server.accounts_reread sessions_ended=0", after=mark)
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as alice:
            assert (await alice.finger("alice@example.net")).devices
        assert srv.proc.returncode is None
        assert "Traceback" not in "".join(srv.log)


async def test_a_finger_while_the_instance_bus_is_cut_off_answers_with_local_presence(
        tmp_path: Path, own_pg_cluster: PgCluster) -> None:
    """The database restarts: the store's pool reconnects at the next statement, but the
    instance bus's own connection stays closed until its next heartbeat (30 s here). A
    FINGER of someone offline here (presence shown to anyone: --finger-open) meanwhile asks
    the bus whether another instance has them: it is answered from this instance's
    presence (offline), with one warning. It was '500 internal error', the bus's
    'connection is closed' logged with a traceback."""
    async with serve(tmp_path / "data", "--store", own_pg_cluster.create_database(),
                     "--stun-port", "off", "--dht-port", "off", "--open-registration",
                     "--instance-heartbeat", "30", "--finger-open", expect=1) as srv:
        async with rc(srv.port, BOB, "bob@example.net", register=True):
            pass
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as alice:
            assert [d.online for d in (await alice.finger("bob@example.net")).devices] \
                == [False]
        own_pg_cluster.stop()
        own_pg_cluster.start_again()
        mark = len(srv.log)
        async with rc(srv.port, ALICE, "alice@example.net") as alice:
            for _ in range(2):
                devices = (await alice.finger("bob@example.net")).devices
                assert [d.online for d in devices] == [False]
        warnings = [line for line in srv.log[mark:] if "instance.presence_read_failed" in line]
        assert len(warnings) == 1 and "connection is closed" in warnings[0], srv.log[mark:]
        assert srv.proc.returncode is None
        assert "Traceback" not in "".join(srv.log)


async def test_a_request_while_the_database_is_down_is_told_to_come_back(
        tmp_path: Path, own_pg_cluster: PgCluster) -> None:
    """PostgreSQL stops under a serving server. A message deposited meanwhile is answered
    503 "the server's database is unavailable: try again later", not 500 "internal error"
    with a traceback in the log; the same deposit once the database is back is stored,
    once. A session that ends meanwhile (its last-seen time is not written) is a warning."""
    async with serve(tmp_path / "data", "--store", own_pg_cluster.create_database(),
                     "--stun-port", "off", "--dht-port", "off", "--open-registration",
                     expect=1) as srv:
        async with rc(srv.port, BOB, "bob@example.net", register=True):
            pass
        mid = os.urandom(16)
        item = [("bob@example.net", BOB.peer_id, b"sealed location message")]
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as alice:
            own_pg_cluster.stop()
            with pytest.raises(ServerError) as refused:
                await alice.send(mid, item)
            assert (refused.value.status, refused.value.text) == (503, DATABASE_AWAY)
        await srv.wait_log("event=storage.unavailable verb=touch")
        own_pg_cluster.start_again()
        async with rc(srv.port, ALICE, "alice@example.net") as alice:
            await alice.send(mid, item)
        async with rc(srv.port, BOB, "bob@example.net") as bob:
            assert [e.message_id for e in await bob.list()] == [mid]
        assert srv.proc.returncode is None
        assert "Traceback" not in "".join(srv.log)
