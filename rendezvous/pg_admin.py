"""Operator work on a PostgreSQL store (`--store URL`): accounts and devices.

The same commands and results as rendezvous/admin.py does on a data folder's SQLite file,
for the database every instance of a domain shares. Each function opens its own
connection and changes what it changes in one transaction, next to serving instances.

What SQLite keeps in one server's memory is in the database here: the queued count and
bytes per recipient (`usage`), per sender and recipient (`pair_usage`) and per sending
domain of linked envelopes (`domain_usage`). Removing envelopes counts them out of those
rows in the same transaction, after locking the account's `usage` row first, as the
store's batches do, so the quotas stay exact.

`delete_account` and `revoke_device` announce the change on the instances' channel in
that transaction (instances.py's `a` event, sent with the commit): every running instance
re-reads accounts and ends the sessions of the removed devices, as SIGUSR1 makes one
SQLite server do.
"""

from __future__ import annotations

from typing import Any

from rendezvous.admin import Account, AdminError, hex_of
from rendezvous.instances import announce_accounts_changed
from rendezvous.pg_store import connect, redacted

_ACCOUNT_SQL = """
SELECT a.address, a.created,
       (SELECT count(*) FROM devices d WHERE d.address = a.address),
       (SELECT count(*) FROM envelopes e WHERE e.recipient = a.address),
       (SELECT COALESCE(sum(octet_length(e.blob)), 0) FROM envelopes e
        WHERE e.recipient = a.address),
       (SELECT max(d.last_seen) FROM devices d WHERE d.address = a.address)
FROM accounts a
"""


async def _connect(url: str) -> Any:
    """A connection to a database `serve --store` has set up; AdminError for any other (an
    empty one raised asyncpg's 'relation "accounts" does not exist' with a traceback)."""
    conn = await connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('accounts') IS NULL"):
            raise AdminError(f"{redacted(url)} holds no peerpost server database (is it the "
                             "one `serve --store` uses? serve sets it up at its first start)")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _lock_account(conn: Any, address: str) -> bool:
    """Lock `address`'s usage row for this transaction (a SEND batch on another instance
    waits for it); whether the account exists."""
    await conn.execute("SELECT 1 FROM usage WHERE address = $1 FOR NO KEY UPDATE", address)
    found = await conn.fetchval("SELECT 1 FROM accounts WHERE address = $1", address)
    return found is not None


def _account(row: Any) -> Account:
    return Account(row[0], float(row[1]), int(row[2]), int(row[3]), int(row[4]),
                   None if row[5] is None else float(row[5]))


async def list_accounts(url: str) -> list[Account]:
    conn = await _connect(url)
    try:
        return [_account(r) for r in await conn.fetch(_ACCOUNT_SQL + " ORDER BY a.address")]
    finally:
        await conn.close()


async def show_account(url: str, address: str) -> dict[str, Any] | None:
    """The account and its devices, or None when there is no such account."""
    conn = await _connect(url)
    try:
        row = await conn.fetchrow(_ACCOUNT_SQL + " WHERE a.address = $1", address)
        if row is None:
            return None
        devices = await conn.fetch(
            "SELECT d.peer_id, d.added, d.last_seen, d.vouch IS NOT NULL, "
            "(SELECT count(*) FROM envelopes e WHERE e.device = d.peer_id) "
            "FROM devices d WHERE d.address = $1 ORDER BY d.added", address)
    finally:
        await conn.close()
    doc = _account(row).to_json()
    doc["device_list"] = [{"peer_id": bytes(pid).hex(), "added": added, "last_seen": seen,
                           "vouched": bool(vouched), "queued_envelopes": int(queued)}
                          for pid, added, seen, vouched, queued in devices]
    return doc


async def delete_account(url: str, address: str) -> dict[str, int] | None:
    """Remove the account, its devices, everything queued for or held for them, its
    exchanged-mail pairs and relay volume. None when there is no such account."""
    conn = await _connect(url)
    try:
        async with conn.transaction():
            if not await _lock_account(conn, address):
                return None
            devices = [bytes(r[0]) for r in await conn.fetch(
                "SELECT peer_id FROM devices WHERE address = $1", address)]
            counts = await _drop_devices(conn, address, devices)
            counts["outbound"] = len(await conn.fetch(
                "DELETE FROM outbound WHERE sender = $1 AND state = 'queued' RETURNING id",
                address))
            await conn.execute("DELETE FROM exchanged WHERE a = $1 OR b = $1", address)
            await conn.execute("DELETE FROM relay_usage WHERE account = $1", address)
            await conn.execute("DELETE FROM invites WHERE address = $1 AND used_by IS NULL",
                               address)
            await conn.execute("DELETE FROM pair_usage WHERE recipient = $1", address)
            await conn.execute("DELETE FROM usage WHERE address = $1", address)
            await conn.execute("DELETE FROM accounts WHERE address = $1", address)
            await announce_accounts_changed(conn)
    finally:
        await conn.close()
    return counts


async def revoke_device(url: str, address: str, peer_id: str) -> tuple[bytes, dict[str, int]]:
    """Unbind the device of `address` whose peer id is (or starts with, 8 hex digits at
    least) `peer_id`; what was queued or held for it goes too (as admin.revoke_device)."""
    want = hex_of(peer_id)
    if len(want) < 8:
        raise AdminError("give at least 8 hex digits of the peer id")
    conn = await _connect(url)
    try:
        async with conn.transaction():
            if not await _lock_account(conn, address):
                raise AdminError(f"no account {address}")
            found = [bytes(r[0]) for r in await conn.fetch(
                "SELECT peer_id FROM devices WHERE address = $1", address)
                if bytes(r[0]).hex().startswith(want)]
            if not found:
                raise AdminError(f"{address} has no device {peer_id}")
            if len(found) > 1:
                raise AdminError(f"{peer_id} matches {len(found)} devices of {address}; "
                                 "give more digits")
            counts = await _drop_devices(conn, address, found)
            await announce_accounts_changed(conn)
    finally:
        await conn.close()
    return found[0], counts


async def _drop_devices(conn: Any, address: str, devices: list[bytes]) -> dict[str, int]:
    """Delete the devices with what is queued and held for them; count the envelopes out
    of the usage rows (the account's `usage` row is locked by the caller)."""
    gone = await conn.fetch(
        "DELETE FROM envelopes WHERE device = ANY($1::bytea[]) "
        "RETURNING sender, octet_length(blob) AS size, linked", devices)
    held = await conn.fetch("DELETE FROM pipe_held WHERE device = ANY($1::bytea[]) "
                            "RETURNING id", devices)
    await conn.execute("DELETE FROM devices WHERE peer_id = ANY($1::bytea[])", devices)
    per_sender: dict[str, list[int]] = {}
    per_domain: dict[str, list[int]] = {}
    for sender, size, linked in gone:
        for key, table in ((sender, per_sender),
                           *(((sender.rpartition("@")[2], per_domain),) if linked else ())):
            slot = table.setdefault(key, [0, 0])
            slot[0] += 1
            slot[1] += int(size)
    if gone:
        await conn.execute(
            "UPDATE usage SET count = GREATEST(count - $2, 0), "
            "bytes = GREATEST(bytes - $3, 0) WHERE address = $1",
            address, len(gone), sum(int(r[1]) for r in gone))
        senders = sorted(per_sender)
        await conn.execute(
            "UPDATE pair_usage p SET count = p.count - k.c, bytes = p.bytes - k.b "
            "FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS k(s, c, b) "
            "WHERE p.recipient = $1 AND p.sender = k.s",
            address, senders, [per_sender[s][0] for s in senders],
            [per_sender[s][1] for s in senders])
        await conn.execute("DELETE FROM pair_usage WHERE recipient = $1 AND count <= 0",
                           address)
    if per_domain:
        domains = sorted(per_domain)
        await conn.execute(
            "UPDATE domain_usage u SET count = GREATEST(u.count - k.c, 0), "
            "bytes = GREATEST(u.bytes - k.b, 0) "
            "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS k(d, c, b) "
            "WHERE u.domain = k.d",
            domains, [per_domain[d][0] for d in domains], [per_domain[d][1] for d in domains])
    return {"devices": len(devices), "envelopes": len(gone), "pipes_held": len(held)}
