"""A PostgreSQL that asks for a password the operator did not give: the documented URL
form (postgresql://USER@HOST:PORT/DB) has no place for one, so the error says where it
goes; with PGPASSWORD set the command gets in, and a database `serve` never set up is one
line, not a traceback. A cluster of its own (password auth on TCP)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tests.pgtest import PgCluster, unavailable

from .test_operator import SCRIPT

pytestmark = pytest.mark.slow


async def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_a_missing_password_says_where_it_goes(tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="pp-pgpw-"))  # postgres (as root) must get in
    cluster = PgCluster.start(base)
    try:
        conn = await asyncpg.connect(cluster.url())
        try:
            await conn.execute("CREATE ROLE operator LOGIN PASSWORD 'right'")
            await conn.execute("CREATE DATABASE rv OWNER operator")
        finally:
            await conn.close()
        hba = cluster.data / "pg_hba.conf"
        hba.write_text("host all operator 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        cluster._run([str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-l",
                      str(cluster.log), "-w", "-t", "60", "restart"])  # reload would race
        url = f"postgresql://operator@127.0.0.1:{cluster.port}/rv"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = str(tmp_path)  # no ~/.pgpass
        code, err = await _run(env, "accounts", "list", "--store", url)
        assert code == 1 and err == (
            f"peerpost-rendezvous: cannot connect to {url}: password authentication failed "
            'for user "operator" (no password was given: set PGPASSWORD, or a ~/.pgpass line '
            "for the user serve runs as, or put it in the URL, USER:PASSWORD@)\n")
        code, err = await _run({**env, "PGPASSWORD": "wrong"}, "accounts", "list",
                               "--store", url)
        assert code == 1 and "no password was given" not in err and "failed" in err
        # The right password gets in; the database is empty (never served): one line too.
        code, err = await _run({**env, "PGPASSWORD": "right"}, "accounts", "list",
                               "--store", url)
        assert code == 1 and err == (
            f"peerpost-rendezvous: {url} holds no peerpost server database (is it the one "
            "`serve --store` uses? serve sets it up at its first start)\n")
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
