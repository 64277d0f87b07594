"""`serve --store postgresql://...` as a real process on a real PostgreSQL: SEND, kill -9,
restart, every acknowledged envelope delivered exactly once; invite and stats against the
database; `migrate` applies the numbered migrations and `serve` refuses a schema it does
not know, naming the command to run."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from pathlib import Path

import asyncpg
import pytest

from .conftest import eventually, ident, mid
from .test_processes import cli, delivered, rc, serve

pytestmark = pytest.mark.slow
ALICE, BOB = ident(1), ident(2)


async def test_serve_on_postgresql_kill_9_loses_and_repeats_nothing(tmp_path: Path,
                                                                    pg_url: str) -> None:
    data = tmp_path / "data"
    ids = [mid() for _ in range(200)]
    async with serve(data, "--open-registration", "--store", pg_url) as srv:
        async with rc(srv.port, BOB, "bob@example.net", register=True):
            pass
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            await asyncio.gather(*(a.send(m, [("bob@example.net", BOB.peer_id, m * 4)])
                                   for m in ids))
            srv.proc.kill()  # SIGKILL right after the last ack
            assert await srv.proc.wait() == -signal.SIGKILL
    stats = json.loads(await cli("stats", "--data", str(data), "--store", pg_url, "--json"))
    assert (stats["accounts"], stats["queued_envelopes"]) == (2, 200)
    # Another instance (own data folder, with the domain's key) on the database finds them all.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy2(data / "domain_key.json", other / "domain_key.json")
    async with serve(other, "--open-registration", "--store", pg_url) as srv:
        async with rc(srv.port, BOB, "bob@example.net") as b:
            got: list[bytes] = []
            for p in await delivered(b, 200):
                assert p.envelope.blob == p.envelope.message_id * 4
                got.append(p.envelope.message_id)
            assert sorted(got) == sorted(ids)  # all 200, each exactly once
            await asyncio.gather(*(b.remove(m) for m in got))
        async with rc(srv.port, BOB, "bob@example.net") as b:
            assert await b.list() == []
        token = (await cli("invite", "carol@example.net", "--store", pg_url)).strip()
        async with rc(srv.port, ident(3), "carol@example.net", register=True, invite=token):
            pass
    stats = json.loads(await cli("stats", "--data", str(data), "--store", pg_url, "--json"))
    assert (stats["accounts"], stats["queued_envelopes"]) == (3, 0)


async def run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_migrate_and_serve_refuses_an_unknown_schema(tmp_path: Path,
                                                           pg_url: str) -> None:
    code, out, _ = await run("migrate", "--store", pg_url)
    assert code == 0
    assert out.splitlines()[0].startswith("applied 1: accounts, devices, envelopes")
    assert out.splitlines()[-1].endswith("schema empty -> version 3")
    code, out, _ = await run("migrate", "--store", pg_url, "--json")
    assert json.loads(out)["applied"] == [] and json.loads(out)["after"] == 3
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_version VALUES (99, 'from the future')")
        serve_args = ("serve", "--domain", "example.net", "--data", str(tmp_path / "d"),
                      "--store", pg_url, "--stun-port", "off", "--dht-port", "off")
        code, _, err = await run(*serve_args)
        assert code == 1
        assert "schema version 99 was written by a newer server; this one knows versions " \
               "up to 3" in err
        await conn.execute("DELETE FROM schema_version WHERE version >= 2")
        code, _, err = await run(*serve_args)
        assert code == 1
        assert "schema version 1, this server needs 3: run `peerpost-rendezvous migrate " \
               "--store postgresql://" in err
        code, out, _ = await run("migrate", "--store", pg_url)
        assert code == 0 and out.startswith("applied 2: instances of one domain")
        await conn.execute("INSERT INTO meta VALUES ('domain', 'example.net')")  # as served
    finally:
        await conn.close()
    code, _, err = await run("serve", "--domain", "other.test", "--data", str(tmp_path / "e"),
                             "--store", pg_url, "--stun-port", "off", "--dht-port", "off")
    assert code == 1 and "serves example.net, not other.test" in err
    code, _, err = await run("serve", "--domain", "example.net", "--data", str(tmp_path / "f"),
                             "--store", "mysql://x/y")
    assert code == 2 and "expected postgresql://USER@HOST:PORT/DB" in err


async def test_migrate_an_sqlite_data_folder(tmp_path: Path) -> None:
    code, _, err = await run("migrate", "--data", str(tmp_path))
    assert code == 1 and "no database in" in err
    async with serve(tmp_path / "data", "--stun-port", "off", "--dht-port", "off"):
        pass
    code, out, _ = await run("migrate", "--data", str(tmp_path / "data"))
    assert code == 0 and out.strip().endswith("schema version 4, up to date")



async def test_an_instance_started_while_another_creates_the_schema_waits_for_it(
        pg_url: str) -> None:
    # Two `serve --store` started together (two hosts booting): the first creates the
    # schema one migration per transaction, and the second, seeing version 1 of 3, said
    # "run `peerpost-rendezvous migrate` first" and exited.
    from rendezvous import pg_schema
    from rendezvous.pg_store import PgStore

    creator = await asyncpg.connect(pg_url)
    store = PgStore(pg_url, domain="example.net")
    try:
        await creator.execute("SELECT pg_advisory_lock($1)", pg_schema.MIGRATE_LOCK)
        await creator.execute(pg_schema._VERSION_TABLE)  # as migrate() leaves it after step 1
        first = pg_schema.MIGRATIONS[0]
        await creator.execute(first.sql)
        await creator.execute("INSERT INTO schema_version (version, description) "
                              "VALUES ($1, $2)", first.version, first.description)
        opening = asyncio.create_task(store.open())

        async def waits_or_ended() -> None:  # for the creator's lock, or (wrongly) not
            waiting = await creator.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND NOT l.granted "
                "AND d.datname = current_database()")
            assert waiting or opening.done(), "the second instance neither waits nor ends"
        await eventually(waits_or_ended)
        assert not opening.done() or opening.exception() is None, opening.exception()
        await pg_schema.migrate(creator)  # the rest, then the creator lets go
        await creator.execute("SELECT pg_advisory_unlock($1)", pg_schema.MIGRATE_LOCK)
        await asyncio.wait_for(opening, 10)
        assert await pg_schema.current_version(creator) == pg_schema.SCHEMA_VERSION
    finally:
        await store.aclose()
        await creator.close()
