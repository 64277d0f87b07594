"""A real `serve --store` told to re-read accounts (SIGUSR1) while its PostgreSQL server is
down logs that it could not and serves on; once the database is back the next SIGUSR1
re-reads. The error ended the server ('cannot connect to ...: Connection refused')."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.pgtest import PgCluster

from .conftest import ident
from .test_operator import rc, serve

pytestmark = pytest.mark.slow
ALICE = ident(81)


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
