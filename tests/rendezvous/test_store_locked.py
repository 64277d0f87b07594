"""The SQLite store's writer outlives a batch SQLite refuses as a whole: another process
holding the file's write lock past busy_timeout (an operator's `sqlite3` shell in a
transaction, say) fails the requests of that moment, and the next ones are served. The
error ended the writer thread, and every later request waited for ever."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from rendezvous import sqlite_store
from rendezvous.sqlite_store import SqliteStore
from rendezvous.status import Status
from rendezvous.store import RegistrationPolicy

from .conftest import ident

OPEN = RegistrationPolicy(open_registration=True)


@pytest.mark.parametrize("inline", [False, True], ids=["thread", "inline"])
async def test_a_batch_refused_while_another_process_writes_fails_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool) -> None:
    real = sqlite_store.connect

    def connect(path: Path) -> sqlite3.Connection:
        conn = real(path)
        conn.execute("PRAGMA busy_timeout=100")  # 10 s in service
        return conn

    monkeypatch.setattr(sqlite_store, "connect", connect)
    path = tmp_path / "rv.sqlite3"
    store = SqliteStore(path, inline=inline)
    await store.open()

    async def register(n: int) -> Status:
        out = await asyncio.wait_for(store.authenticate(
            f"u{n}@example.net", ident(n).public.verify_key, register=True, invite=None,
            advertise=None, now=1.0, policy=OPEN, page=10), 5)
        return out.status

    try:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            await register(1)
        other.execute("ROLLBACK")
        other.close()
        assert await register(2) == Status.OK
        assert await store.devices("u2@example.net")
    finally:
        await store.aclose()
