"""The operator commands on a PostgreSQL store, with two real `serve --store` instances of
one domain: `invite`, `accounts list|show|delete` and `devices revoke --store URL` work as
they do with `--data`, and a revoke or delete reaches every instance: a revoked device's
session on the other instance ends within seconds and it cannot log in on either."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from rendezvous.domainkey import load_or_create
from rendezvous.errors import ConnectionLostError

from .conftest import ident, mid
from .test_operator import Server, ok_json, rc, run, serve

pytestmark = pytest.mark.slow
ALICE, ALICE2, BOB = ident(71), ident(72), ident(73)


@asynccontextmanager
async def two_instances(tmp_path: Path, url: str, *extra: str) -> AsyncIterator[
        tuple[Server, Server]]:
    """Two `serve --store URL` processes of example.net with the one domain key."""
    key_dir = tmp_path / "key"
    key_dir.mkdir(mode=0o700)
    load_or_create(key_dir)
    async with AsyncExitStack() as stack:
        servers = []
        for name in ("one", "two"):
            data = tmp_path / name
            data.mkdir(mode=0o700)
            shutil.copy2(key_dir / "domain_key.json", data / "domain_key.json")
            servers.append(await stack.enter_async_context(serve(
                data, "--store", url, "--stun-port", "off", "--dht-port", "off",
                "--instance-heartbeat", "0.5", *extra, expect=1)))
        yield servers[0], servers[1]


async def test_revoke_and_delete_on_postgresql_reach_every_instance(tmp_path: Path,
                                                                    pg_url: str) -> None:
    async with two_instances(tmp_path, pg_url, "--open-registration") as (one, two):
        async with rc(one.port, ALICE, "alice@example.net", register=True):
            pass
        code, token, err = await run("invite", "alice@example.net", "--store", pg_url)
        assert code == 0, err
        async with rc(two.port, ALICE2, "alice@example.net", register=True,
                      invite=token.strip()) as a2:
            await a2.send(mid(), [("alice@example.net", ALICE.peer_id, b"a" * 10)])
        async with rc(one.port, BOB, "bob@example.net", register=True):
            pass
        async with rc(two.port, ALICE, "alice@example.net") as a1:
            await a1.send(mid(), [("bob@example.net", BOB.peer_id, b"x" * 50)])

        rows = await ok_json("accounts", "list", "--store", pg_url)
        assert [(r["address"], r["devices"], r["queued_envelopes"])
                for r in rows] == [("alice@example.net", 2, 1), ("bob@example.net", 1, 1)]
        code, out, _ = await run("accounts", "list", "--store", pg_url)
        assert code == 0 and "2 accounts" in out
        shown = await ok_json("accounts", "show", "Alice@Example.net", "--store", pg_url)
        assert [d["peer_id"] for d in shown["device_list"]] == [
            ALICE.peer_id.hex(), ALICE2.peer_id.hex()]

        # ALICE2 is connected to instance two; the revoke is made against the database.
        async with rc(two.port, ALICE2, "alice@example.net", reconnect=False) as a2, \
                rc(one.port, ALICE, "alice@example.net", reconnect=False) as a1:
            mark_one, mark_two = len(one.log), len(two.log)
            t0 = time.monotonic()
            done = await ok_json("devices", "revoke", "alice@example.net",
                                 ALICE2.peer_id.hex()[:12], "--store", pg_url)
            assert done["revoked"] == ALICE2.peer_id.hex()
            assert done["instances_told"] is True
            line = await two.wait_log("event=instance.accounts_reread", after=mark_two,
                                      within=10)
            took = time.monotonic() - t0
            assert "sessions_ended=1" in line
            with pytest.raises(ConnectionLostError):
                await a2.finger("alice@example.net")
            print(f"revoke to the session's end on the other instance: {took:.2f} s")
            # Instance one re-read too, and ALICE's session there stayed.
            assert "sessions_ended=0" in await one.wait_log(
                "event=instance.accounts_reread", after=mark_one, within=10)
            assert len((await a1.finger("alice@example.net")).devices) == 1
        for srv in (one, two):
            with pytest.raises(Exception, match=r"not bound to alice@example\.net"):
                await rc(srv.port, ALICE2, "alice@example.net", reconnect=False).start()

        code, _, err = await run("devices", "revoke", "alice@example.net", "ffff0000",
                                 "--store", pg_url)
        assert code == 1 and "alice@example.net has no device ffff0000" in err

        # Delete bob, with the envelope queued for him, while he is online on instance two.
        async with rc(two.port, BOB, "bob@example.net", reconnect=False) as b:
            mark = len(two.log)
            done = await ok_json("accounts", "delete", "bob@example.net", "--store", pg_url)
            assert (done["devices"], done["envelopes"]) == (1, 1)
            assert "sessions_ended=1" in await two.wait_log(
                "event=instance.accounts_reread", after=mark, within=10)
            with pytest.raises(ConnectionLostError):
                await b.finger("bob@example.net")
        for srv in (one, two):
            async with rc(srv.port, ALICE, "alice@example.net") as a1:
                with pytest.raises(Exception, match=r"no such address: bob@example\.net"):
                    await a1.finger("bob@example.net")
        rows = await ok_json("accounts", "list", "--store", pg_url)
        assert [(r["address"], r["queued_envelopes"])
                for r in rows] == [("alice@example.net", 1)]
        code, _, err = await run("accounts", "show", "bob@example.net", "--store", pg_url)
        assert code == 1 and "no account bob@example.net" in err
        # Registering bob again starts from an empty queue and empty quota counters.
        async with rc(one.port, BOB, "bob@example.net", register=True):
            pass

        conn = await asyncpg.connect(pg_url)
        try:
            usage = await conn.fetchrow("SELECT count, bytes FROM usage "
                                        "WHERE address = 'bob@example.net'")
            pairs = await conn.fetchval("SELECT count(*) FROM pair_usage "
                                        "WHERE recipient = 'bob@example.net'")
        finally:
            await conn.close()
        assert tuple(usage) == (0, 0) and pairs == 0


def test_the_accounts_event_round_trips_and_is_nobody_s_own() -> None:
    from rendezvous.instances import _Outgoing, decode_events, encode_events

    (payload,) = encode_events("operator", _Outgoing([], [], [], accounts=True))
    events = decode_events(payload)
    assert events.accounts and events.origin == "operator"
    assert not events.rescan and not events.envelopes
    (plain,) = encode_events("i1", _Outgoing([(b"\x01" * 20, 5)], [], []))
    assert not decode_events(plain).accounts
    with pytest.raises(ValueError, match="unknown event 'a'"):
        decode_events('{"o":"x","v":[["a",1]]}')


async def test_backup_and_restore_say_how_to_back_up_a_postgresql_store(
        tmp_path: Path) -> None:
    for args in (("backup", str(tmp_path / "b")), ("restore", str(tmp_path))):
        code, _, err = await run(*args, "--store", "postgresql://u@127.0.0.1:1/d")
        assert code == 1 and "pg_dump" in err, err
