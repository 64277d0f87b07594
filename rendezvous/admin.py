"""Operator work on a data folder's SQLite file: accounts, devices, backup and restore.

Each function opens its own short connection (`sqlite_store.connect`), as `invite` and
`stats` do, so it runs next to a serving server: WAL lets a second writer in between the
server's group commits (`busy_timeout` waits for one). A running server caches device
bindings and queue usage, so after `delete_account` or `revoke_device` the CLI tells it to
re-read them (SIGUSR1, see cli.py); until then it may still accept a SEND for the removed
device, whose row then simply expires.

`backup` uses SQLite's online backup API: it copies the database as of one read
transaction, so the copy is consistent while the server keeps committing. A backup folder
holds the database and the folder's keys (domain key, DHT identity, TLS certificate), which
nodes have pinned: a database alone could not stand in for the server.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rendezvous.sqlite_store import DB_NAME, connect
from rendezvous.staged import Unfinished, install_files

# What a backup copies besides the database: the keys nodes and other domains pinned.
KEY_FILES = ("domain_key.json", "server-identity.json", "tls_cert.pem", "tls_key.pem")
_PRIVATE = {"domain_key.json", "server-identity.json", "tls_key.pem"}


class AdminError(Exception):
    """An operator command cannot do what was asked; the text says why."""


def served_domain(db: Path) -> str | None:
    """The domain the database was served for (recorded by `serve`), or None."""
    conn = connect(db)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='domain'").fetchone()
    finally:
        conn.close()
    return str(row[0]) if row else None


def record_domain(db: Path, domain: str, *, record: bool = True) -> None:
    """Record `domain` as the database's on the first `serve`; refuse another one later
    (a data folder holds one domain's accounts and its domain key). `record=False` only
    refuses: `serve` records once it listens, so a start that failed binds no domain."""
    conn = connect(db)
    try:
        if record:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('domain', ?)", (domain,))
        row = conn.execute("SELECT value FROM meta WHERE key='domain'").fetchone()
    finally:
        conn.close()
    if row is not None and row[0] != domain:
        raise AdminError(f"{db.parent} serves {row[0]}, not {domain}")


@dataclass(frozen=True, slots=True)
class Account:
    address: str
    created: float
    devices: int
    queued: int
    queued_bytes: int
    last_seen: float | None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "created": self.created, "devices": self.devices,
                "queued_envelopes": self.queued, "queued_bytes": self.queued_bytes,
                "last_seen": self.last_seen}


_ACCOUNT_SQL = """
SELECT a.address, a.created,
       (SELECT COUNT(*) FROM devices d WHERE d.address = a.address),
       (SELECT COUNT(*) FROM envelopes e WHERE e.recipient = a.address),
       (SELECT COALESCE(SUM(length(e.blob)), 0) FROM envelopes e WHERE e.recipient = a.address),
       (SELECT MAX(d.last_seen) FROM devices d WHERE d.address = a.address)
FROM accounts a
"""


def list_accounts(db: Path) -> list[Account]:
    conn = connect(db)
    try:
        rows = conn.execute(_ACCOUNT_SQL + " ORDER BY a.address").fetchall()
    finally:
        conn.close()
    return [Account(*r) for r in rows]


def show_account(db: Path, address: str) -> dict[str, Any] | None:
    """The account and its devices, or None when there is no such account."""
    conn = connect(db)
    try:
        row = conn.execute(_ACCOUNT_SQL + " WHERE a.address=?", (address,)).fetchone()
        if row is None:
            return None
        devices = conn.execute(
            "SELECT d.peer_id, d.added, d.last_seen, d.vouch IS NOT NULL, "
            "(SELECT COUNT(*) FROM envelopes e WHERE e.device = d.peer_id) "
            "FROM devices d WHERE d.address=? ORDER BY d.added", (address,)).fetchall()
    finally:
        conn.close()
    doc = Account(*row).to_json()
    doc["device_list"] = [{"peer_id": pid.hex(), "added": added, "last_seen": seen,
                           "vouched": bool(vouched), "queued_envelopes": queued}
                          for pid, added, seen, vouched, queued in devices]
    return doc


def delete_account(db: Path, address: str) -> dict[str, int] | None:
    """Remove the account, its devices, everything queued for or held for them, its
    exchanged-mail pairs and relay volume. None when there is no such account."""
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM accounts WHERE address=?",
                            (address,)).fetchone() is None:
                conn.execute("ROLLBACK")
                return None
            devices = [r[0] for r in conn.execute(
                "SELECT peer_id FROM devices WHERE address=?", (address,))]
            counts = _drop_devices(conn, devices)
            counts["outbound"] = conn.execute(
                "DELETE FROM outbound WHERE sender=? AND state='queued'", (address,)).rowcount
            conn.execute("DELETE FROM exchanged WHERE a=? OR b=?", (address, address))
            conn.execute("DELETE FROM relay_usage WHERE account=?", (address,))
            conn.execute("DELETE FROM invites WHERE address=? AND used_by IS NULL", (address,))
            conn.execute("DELETE FROM accounts WHERE address=?", (address,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return counts


def _drop_devices(conn: sqlite3.Connection, devices: list[bytes]) -> dict[str, int]:
    envelopes = held = 0
    for d in devices:
        envelopes += conn.execute("DELETE FROM envelopes WHERE device=?", (d,)).rowcount
        held += conn.execute("DELETE FROM pipe_held WHERE device=?", (d,)).rowcount
        conn.execute("DELETE FROM devices WHERE peer_id=?", (d,))
    return {"devices": len(devices), "envelopes": envelopes, "pipes_held": held}


def hex_of(text: str) -> str:
    """A peer id as typed (any case, with spaces, colons or dashes) as bare hex digits."""
    digits = "".join(c for c in text.lower() if c not in " :-")
    if not digits or any(c not in "0123456789abcdef" for c in digits):
        raise AdminError(f"{text!r} is not a peer id (hex digits)")
    return digits


def revoke_device(db: Path, address: str, peer_id: str) -> tuple[bytes, dict[str, int]]:
    """Unbind the device of `address` whose peer id is (or starts with, 8 hex digits at
    least) `peer_id`; what was queued or held for it goes too. The account stays; the key
    can only join again as a new device would (an invite, unless registration is open)."""
    want = hex_of(peer_id)
    if len(want) < 8:
        raise AdminError("give at least 8 hex digits of the peer id")
    conn = connect(db)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM accounts WHERE address=?",
                            (address,)).fetchone() is None:
                raise AdminError(f"no account {address}")
            found = [r[0] for r in conn.execute("SELECT peer_id FROM devices WHERE address=?",
                                                (address,)) if r[0].hex().startswith(want)]
            if not found:
                raise AdminError(f"{address} has no device {peer_id}")
            if len(found) > 1:
                raise AdminError(f"{peer_id} matches {len(found)} devices of {address}; "
                                 "give more digits")
            counts = _drop_devices(conn, found)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return found[0], counts


def backup(data_dir: Path, dest: Path) -> dict[str, Any]:
    """Copy the data folder's database (online backup API) and key files into `dest`, a
    new folder (or an empty one). Returns what was copied."""
    db = data_dir / DB_NAME
    if not db.exists():
        raise AdminError(f"no server database in {data_dir}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AdminError(f"{dest} exists and is not an empty folder")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    src = connect(db)
    try:
        snapshot(src, dest / DB_NAME)
    finally:
        src.close()
    copied = [DB_NAME]
    for name in KEY_FILES:
        if (data_dir / name).exists():
            copy_file(data_dir / name, dest / name, private=name in _PRIVATE)
            copied.append(name)
    return {"dest": str(dest), "files": copied, "bytes": (dest / DB_NAME).stat().st_size}


def snapshot(src: sqlite3.Connection, dest: Path) -> None:
    """Copy the database `src` is open on to `dest`, one self-contained file, through
    `dest`.part: all pages in one step of the online backup API, so one read snapshot,
    consistent while other connections go on committing."""
    tmp = dest.with_name(dest.name + ".part")
    out = sqlite3.connect(tmp)
    try:
        src.backup(out)
        out.execute("PRAGMA journal_mode=DELETE")
    finally:
        out.close()
    os.replace(tmp, dest)


def integrity_problem(db: Path) -> str | None:
    """What is wrong with the file `db` as a backup's copy of a database (read only), or
    None: not a file, what SQLite's integrity check finds, or no table at all (a copy cut
    to nothing opens as an empty database and passes the check)."""
    if not db.is_file():
        return "not a file"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        result = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                              ).fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    if result != "ok":
        return " ".join(result.split())
    return None if tables else "it holds no tables"


def damaged_text(path: Path, problem: str, *, kept: str) -> str:
    """What to do about a node's SQLite file `path` that SQLite finds damaged (a disk
    error, a bad copy): restore a backup, or move it and its journal aside; `kept` says
    what stays and what starts over then."""
    problem = " ".join(problem.replace("*** in database main ***", "").split())
    aside = path.parent / "damaged"
    return (f"{path} is damaged ({problem}); the node does not start with it. Restore it "
            "from a backup (`peerpost restore DEST` of one `peerpost backup` made), or move "
            f"it aside with its journal (`mkdir -p {aside} && mv {path}* {aside}/`) to start "
            f"with an empty one: {kept}")


def check_backup(src: Path) -> None:
    """Refuse a folder that is not a backup: no database, or one SQLite finds damaged."""
    db = src / DB_NAME
    if not db.is_file():
        raise AdminError(f"{src} holds no {DB_NAME}: not a backup folder")
    if (problem := integrity_problem(db)) is not None:
        raise AdminError(f"{db} is damaged: {problem}")
    if not (src / "domain_key.json").exists():
        raise AdminError(f"{src} holds no domain_key.json: nodes could not trust the "
                         "restored server")


def restore(src: Path, data_dir: Path) -> list[str]:
    """Put a backup's files in `data_dir` (the caller holds its lock) all or nothing
    (`install_files`), dropping the old database's WAL and shared-memory files so they
    cannot be replayed onto it. The keys go in first and the database last; a run killed
    while they go in is finished by the next holder of the lock (`serve`, a rerun)."""
    check_backup(src)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name in (*KEY_FILES, DB_NAME) if (src / name).exists()]
    try:
        install_files(data_dir, [(src / name, name, name in _PRIVATE) for name in names],
                      drop=(DB_NAME + "-wal", DB_NAME + "-shm", "stats.json"))
    except OSError as exc:
        raise AdminError(f"restoring {src} into {data_dir} failed, nothing there was "
                         f"changed: {exc}") from None
    except Unfinished as exc:
        raise AdminError(f"restoring {src} into {data_dir} stopped while its files went in "
                         f"({exc}): `serve` or a rerun finishes it once that is mended") from None
    return [DB_NAME, *(name for name in names if name != DB_NAME)]


def copy_file(src: Path, dest: Path, *, private: bool) -> None:
    """Copy `src` to `dest` through `dest`.part (mode 0600 when `private`)."""
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
