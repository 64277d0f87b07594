"""Vouches on the server: kept when a device joins an account, checked, shown in FINGER."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from crypto.vouch import Vouch, make_vouch
from rendezvous.client import RendezvousClient
from rendezvous.errors import AuthenticationError
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import _MIGRATIONS, SCHEMA_VERSION, connect

from .conftest import ident, port_of, running_server

BOB1, BOB2, BOB3, ROGUE = ident(21), ident(22), ident(23), ident(24)
ADDR = "bob@example.net"


def client(server: RendezvousServer, who: DeviceIdentity, **kw: Any) -> RendezvousClient:
    return RendezvousClient("127.0.0.1", port_of(server), who, ADDR,
                            register=True, request_timeout=5.0, **kw)


async def test_a_vouched_device_shows_its_vouch_in_finger(tmp_path: Path) -> None:
    async with running_server(tmp_path, open_registration=False) as server:
        now = server.clock()
        for token in ("i1", "i2", "i3", "i4"):
            await server.store.add_invite(ADDR, token, now, now + 60)
        async with client(server, BOB1, invite="i1"):
            pass
        good = make_vouch(BOB1, ADDR, BOB2.public.verify_key).to_bytes()
        async with client(server, BOB2, invite="i2", vouch=good):
            pass
        # a vouch by a key that is no device of the address is refused, with the reason
        forged = make_vouch(ROGUE, ADDR, BOB3.public.verify_key).to_bytes()
        with pytest.raises(AuthenticationError) as err:
            await client(server, BOB3, invite="i3", vouch=forged).start()
        assert err.value.status == 403 and "vouch" in err.value.text
        # one for another key is refused too
        with pytest.raises(AuthenticationError):
            await client(server, BOB3, invite="i3", vouch=good).start()
        async with client(server, BOB3, invite="i3") as b3:  # none: allowed, shown as none
            info = await b3.finger(ADDR)
        vouches = {d.verify_key: d.vouch for d in info.devices}
        assert vouches == {BOB1.public.verify_key: None, BOB2.public.verify_key: good,
                           BOB3.public.verify_key: None}
        Vouch.from_bytes(good).verify(ADDR, BOB2.public.verify_key)


def test_a_file_from_before_vouches_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "rv.sqlite3"
    conn = connect(path)
    conn.execute("ALTER TABLE devices DROP COLUMN vouch")
    before = next(v for v, step in _MIGRATIONS.items() if "ADD COLUMN vouch" in step)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(before),))
    conn.execute("INSERT INTO accounts VALUES ('bob@example.net', 1.0)")
    conn.execute("INSERT INTO devices (peer_id, verify_key, address, added) VALUES (?, ?, ?, 1)",
                 (BOB1.peer_id, BOB1.public.verify_key, ADDR))
    conn.close()
    conn = connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == \
            str(SCHEMA_VERSION)
        assert conn.execute("SELECT address, vouch FROM devices").fetchall() == [(ADDR, None)]
    finally:
        conn.close()
    with pytest.raises(sqlite3.OperationalError):
        sqlite3.connect(path).execute("ALTER TABLE devices ADD COLUMN vouch BLOB")
