"""The operator commands of `peerpost-rendezvous`: accounts, devices, backup, restore.

    peerpost-rendezvous accounts list --data DIR|--store URL [--json]
    peerpost-rendezvous accounts show ADDRESS --data DIR|--store URL [--json]
    peerpost-rendezvous accounts delete ADDRESS --data DIR|--store URL [--json]
    peerpost-rendezvous devices revoke ADDRESS PEER_ID --data DIR|--store URL [--json]
    peerpost-rendezvous backup DEST --data DIR [--json]
    peerpost-rendezvous restore SRC --data DIR [--force] [--json]

They work on the data folder's SQLite file (rendezvous/admin.py) and run next to a serving
server. After `accounts delete` and `devices revoke` a running server is sent SIGUSR1: it
re-reads accounts and devices and ends the sessions of the removed devices. With `--store
URL` the accounts and devices commands work on the PostgreSQL database the domain's
instances share (rendezvous/pg_admin.py), and the change is announced to every running
instance on their channel, which does the same re-read. `backup` and `restore` are for a
data folder's SQLite file (a PostgreSQL database is backed up with its own tools). `restore`
refuses a folder a server is using (its lock, datalock.py), and one that already holds a
database unless `--force`.

Their flags are defined in rendezvous/cli.py (`add_operator_commands`), which imports this
module only to run one of them: the admin and store modules it loads are not needed to
build the parser or show its help.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from crypto.address import normalize_address
from crypto.errors import DecodeError
from rendezvous.admin import (
    Account,
    AdminError,
    backup,
    delete_account,
    list_accounts,
    restore,
    revoke_device,
    show_account,
)
from rendezvous.cliutil import counted
from rendezvous.datalock import LOCK_NAME, DataInUse, DataLock, holder
from rendezvous.domainkey import DomainKey
from rendezvous.sqlite_store import DB_NAME


def run_operator_command(args: argparse.Namespace) -> int:
    try:
        doc, text = _run(args)
    except (AdminError, DataInUse, DecodeError, RuntimeError) as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file's error names the file; a database's names itself
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"peerpost-rendezvous: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc) if args.json else text)
    return 0


def _db(data: Path) -> Path:
    db = data / DB_NAME
    if not db.is_file():
        raise AdminError(f"no server database in {data} (is it the folder `serve --data` "
                         "uses?)")
    return db


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if t else "never"


def _run(args: argparse.Namespace) -> tuple[Any, str]:
    if getattr(args, "store", None) is not None:
        return asyncio.run(_run_pg(args))
    data: Path = args.data
    if args.command == "backup":
        done = backup(data, args.dest)
        return done, (f"backed up {data} to {done['dest']}: {', '.join(done['files'])} "
                      f"({done['bytes']} bytes of database)")
    if args.command == "restore":
        return _restore(args)
    db = _db(data)
    if args.command == "accounts" and args.action == "list":
        return _list_text(list_accounts(db))
    address = normalize_address(args.address)
    if args.command == "accounts" and args.action == "show":
        return _show_text(address, show_account(db, address))
    if args.command == "accounts" and args.action == "delete":
        counts = delete_account(db, address)
        return _deleted_text(address, counts, _tell_server(data))
    if args.command == "devices" and args.action == "revoke":
        peer_id, counts = revoke_device(db, address, args.peer_id)
        return _revoked_text(address, peer_id, counts, _tell_server(data))
    raise AdminError(f"unknown command {args.command}")


async def _run_pg(args: argparse.Namespace) -> tuple[Any, str]:
    """The accounts and devices commands on a PostgreSQL store."""
    from rendezvous import pg_admin

    url: str = args.store
    if args.command in ("backup", "restore"):
        raise AdminError(f"{args.command} copies a data folder's SQLite file and keys; back up "
                         "a PostgreSQL store with PostgreSQL's own tools (pg_dump, or base "
                         "backups with WAL archiving), and each instance's --data folder "
                         "(domain_key.json, TLS files) as files")
    if args.command == "accounts" and args.action == "list":
        return _list_text(await pg_admin.list_accounts(url))
    address = normalize_address(args.address)
    if args.command == "accounts" and args.action == "show":
        return _show_text(address, await pg_admin.show_account(url, address))
    if args.command == "accounts" and args.action == "delete":
        counts = await pg_admin.delete_account(url, address)
        return _deleted_text(address, counts, None, instances=True)
    if args.command == "devices" and args.action == "revoke":
        peer_id, counts = await pg_admin.revoke_device(url, address, args.peer_id)
        return _revoked_text(address, peer_id, counts, None, instances=True)
    raise AdminError(f"unknown command {args.command}")


def _list_text(rows: list[Account]) -> tuple[Any, str]:
    lines = [f"{'ADDRESS':32} {'DEVICES':>7} {'QUEUED':>7} {'BYTES':>10}  LAST SEEN"]
    lines += [f"{r.address:32} {r.devices:>7} {r.queued:>7} {r.queued_bytes:>10}  "
              f"{_when(r.last_seen)}" for r in rows]
    lines.append(f"{len(rows)} account{'s' if len(rows) != 1 else ''}")
    return [r.to_json() for r in rows], "\n".join(lines)


def _show_text(address: str, doc: dict[str, Any] | None) -> tuple[Any, str]:
    if doc is None:
        raise AdminError(f"no account {address}")
    lines = [f"account {address}, created {_when(doc['created'])}",
             f"queued: {doc['queued_envelopes']} envelopes, {doc['queued_bytes']} bytes",
             f"devices: {doc['devices']}"]
    lines += [f"  {d['peer_id']}  added {_when(d['added'])}, last seen "
              f"{_when(d['last_seen'])}, {d['queued_envelopes']} queued"
              f"{', vouched' if d['vouched'] else ''}" for d in doc["device_list"]]
    return doc, "\n".join(lines)


def _deleted_text(address: str, counts: dict[str, int] | None, told: int | None, *,
                  instances: bool = False) -> tuple[Any, str]:
    if counts is None:
        raise AdminError(f"no account {address}")
    doc = {"deleted": address, **counts, "server_pid": told}
    if instances:
        doc["instances_told"] = True
    return doc, (f"deleted {address}: {counted(counts['devices'], 'device')}, "
                 f"{counted(counts['envelopes'], 'queued envelope')}, {counts['outbound']} "
                 "outbound"
                 f"{_told(told, instances)}")


def _revoked_text(address: str, peer_id: bytes, counts: dict[str, int], told: int | None,
                  *, instances: bool = False) -> tuple[Any, str]:
    doc = {"revoked": peer_id.hex(), "address": address, **counts, "server_pid": told}
    if instances:
        doc["instances_told"] = True
    return doc, (f"revoked device {peer_id.hex()} of {address} ({counts['envelopes']} "
                 f"queued envelopes dropped){_told(told, instances)}")


def _restore(args: argparse.Namespace) -> tuple[Any, str]:
    data: Path = args.data
    src: Path = args.src
    if not src.is_dir():
        raise AdminError(f"no backup folder {src}")
    if data.exists():
        held, pid = holder(data)
        if held:
            raise AdminError(f"{data} is in use by a server (pid {pid or '?'}): stop it "
                             "before restoring into it")
    made_dir, made_lock = not data.exists(), not (data / LOCK_NAME).exists()
    data.mkdir(parents=True, exist_ok=True)
    lock = DataLock.acquire(data)  # no `serve` may start while the files are replaced
    try:
        # Checked under the lock: a restore that took it first may have put a database
        # and another domain key here since the folder was looked at.
        old, new = _refusal_under_lock(data, src, force=args.force)
        copied = restore(src, data)
    except BaseException:
        # Nothing was put in place: take away the lock file and folder this run made, so
        # the folder is as it was (a rerun is not told it already holds something).
        if made_lock:
            lock.path.unlink(missing_ok=True)
        lock.release()
        if made_dir:
            with contextlib.suppress(OSError):  # not empty: someone else's files
                data.rmdir()
        raise
    lock.release()
    changed = old is not None and new is not None and old != new
    text = f"restored {src} into {data}: {', '.join(copied)}"
    if changed:
        text += (f"; the domain key is now the backup's {new} (it was {old}): publish its "
                 "TXT record (`peerpost-rendezvous dns-records`)")
    return ({"restored": str(src), "data": str(data), "files": copied,
             "domain_key": new, "replaced_domain_key": old if changed else None}, text)


def _refusal_under_lock(data: Path, src: Path, *, force: bool,
                        ) -> tuple[str | None, str | None]:
    """AdminError unless `force` when `data` (whose lock the caller holds) has a database
    or another domain key than the backup; else (the folder's key, the backup's)."""
    if (data / DB_NAME).exists() and not force:
        raise AdminError(f"{data} already holds a server database; --force replaces it")
    old, new = _key_print(data), _key_print(src)
    if old is not None and new is not None and old != new and not force:
        # DNS may publish the folder's key already (`dns-records` makes one): restoring
        # another would make nodes and other domains refuse the server.
        raise AdminError(f"{data}'s domain key {old} is not the backup's {new}; --force "
                         "replaces it with the backup's (then publish its TXT record: "
                         "`peerpost-rendezvous dns-records`)")
    return old, new


def _key_print(folder: Path) -> str | None:
    """The fingerprint of `folder`'s domain key, None without one."""
    path = folder / "domain_key.json"
    if not path.is_file():
        return None
    try:
        return DomainKey.from_json(path.read_text()).fingerprint
    except (OSError, ValueError) as exc:
        raise AdminError(f"{path} is not a domain key: {exc}") from None


def _tell_server(data: Path) -> int | None:
    """SIGUSR1 to the server serving `data`, if one is: it re-reads accounts and devices."""
    held, pid = holder(data)
    if not held or pid is None:
        return None
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return None
    return pid


def _told(pid: int | None, instances: bool = False) -> str:
    if instances:
        return "; every running instance ends its sessions"
    return f"; the running server (pid {pid}) ends its sessions" if pid else ""
