"""Which store `peerpost-rendezvous` uses, and `peerpost-rendezvous migrate`.

`--store URL` (config key `store`) names a PostgreSQL database
(`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`): several `serve` processes of one domain
share it (rendezvous/pg_store.py). Without it the store is SQLite in `--data`, as for a
home server or `make demo`, which need no database server.

Schema versions: `serve` creates the schema of an empty database and refuses one at a
version it does not know, newer or older, naming the command to run:

    peerpost-rendezvous migrate --store URL     # PostgreSQL: numbered migrations
    peerpost-rendezvous migrate --data DIR      # SQLite: the same upgrade `serve` makes

SQLite files are still upgraded by `serve` itself (one process owns the file, so it can);
a shared PostgreSQL database is upgraded only by `migrate`, once, while instances of the
old version may still be running against it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rendezvous.store import Store, StoreStats

# The parser's parts (STORE_HELP, store_url, add_migrate_command) load no store: the other
# functions import theirs when they run, so a command without --store loads neither.

STORE_HELP = ("the database: postgresql://USER@HOST:PORT/DB, shared by every instance of "
              "the domain (default: SQLite in --data)")


def store_url(text: str) -> str:
    """A `--store` value: a PostgreSQL URL."""
    from rendezvous.pg_store import is_postgres_url

    if not is_postgres_url(text):
        raise argparse.ArgumentTypeError(f"expected postgresql://USER@HOST:PORT/DB, got "
                                         f"{text.split('@')[-1]!r}")
    return text


def make_store(store: str | None, data: Path, domain: str, *,
               outbound_claim: float = 60.0, domain_key: bytes | None = None) -> Store:
    """The store `serve` runs on: PostgreSQL with `--store` (which refuses to serve with
    another `domain_key` than the domain's first instance), else SQLite in `data`."""
    if store is None:
        from rendezvous.sqlite_store import DB_NAME, SqliteStore

        return SqliteStore(data / DB_NAME)
    from rendezvous.pg_store import PgStore

    return PgStore(store, domain=domain, domain_key=domain_key, outbound_claim=outbound_claim)


def add_migrate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("migrate", help="bring the database's schema to this version "
                                       "(serve refuses an older one on PostgreSQL)")
    where = m.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=store_url, metavar="URL", help=STORE_HELP)
    where.add_argument("--data", type=Path, help="the data folder of an SQLite server")
    m.add_argument("--json", action="store_true", help="machine-readable output")


def migrate_command(args: argparse.Namespace) -> int:
    """`migrate`: apply what is missing; print the version before and after, and each step."""
    import asyncio
    import json
    import sqlite3

    try:
        if args.store is not None:
            doc = asyncio.run(_migrate_pg(args.store))
        else:
            doc = _migrate_sqlite(args.data)
    except (OSError, RuntimeError, sqlite3.Error) as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc))
        return 0
    before = "empty" if doc["before"] is None else f"version {doc['before']}"
    for step in doc["applied"]:
        print(f"applied {step['version']}: {step['description']}")
    if doc["applied"]:
        print(f"{doc['database']}: schema {before} -> version {doc['after']}")
    else:
        print(f"{doc['database']}: schema version {doc['after']}, up to date")
    return 0


async def _migrate_pg(url: str) -> dict[str, Any]:
    from rendezvous.pg_schema import SCHEMA_VERSION as PG_VERSION
    from rendezvous.pg_store import migrate, redacted

    before, applied = await migrate(url)
    return {"database": redacted(url), "before": before, "after": PG_VERSION,
            "applied": [{"version": m.version, "description": m.description}
                        for m in applied]}


def _migrate_sqlite(data: Path) -> dict[str, Any]:
    import sqlite3

    from rendezvous.sqlite_store import DB_NAME, SCHEMA_VERSION, connect

    db = data / DB_NAME
    if not db.is_file():
        raise OSError(f"no database in {data} (serve creates it)")
    raw = sqlite3.connect(db)
    try:
        row = raw.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    finally:
        raw.close()
    before = int(row[0]) if row else None
    connect(db).close()  # upgrades step by step, refuses a newer file
    applied = [] if before is None else [
        {"version": v + 1, "description": f"SQLite schema {v} -> {v + 1}"}
        for v in range(before, SCHEMA_VERSION)]
    return {"database": str(db), "before": before, "after": SCHEMA_VERSION,
            "applied": applied}


def pg_create_invite(url: str, address: str, token: str, now: float,
                     expires_at: float) -> str | None:
    """`invite --store URL`: the invite is recorded; the refusal text when the database
    serves another domain or none yet."""
    import asyncio

    from rendezvous.pg_store import create_invite, served_domain

    async def run() -> str | None:
        domain = await served_domain(url)
        if domain is None:
            return (f"{url.split('@')[-1]} is not served yet: start `peerpost-rendezvous "
                    "serve --store ...` once first")
        if address.rpartition("@")[2] != domain:
            return f"that database serves {domain}, not {address.rpartition('@')[2]}"
        await create_invite(url, address, token, now, expires_at)
        return None

    return asyncio.run(run())


def pg_read_stats(url: str) -> StoreStats:
    """`stats --store URL`: the store's counts."""
    import asyncio

    from rendezvous.pg_store import read_stats

    return asyncio.run(read_stats(url))
