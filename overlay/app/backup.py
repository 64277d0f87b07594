"""`peerpost backup DEST` and `peerpost restore SRC`: a node's home folder without its media.

A backup holds what the node cannot get back from anywhere else: its identity (the device
keys its address is registered with and its contacts pinned), its config, `node.db` (inbox,
outbox, preferences, contacts' pinned keys) and the content store's records
(`store/content.sqlite`: which files it serves and their keys). The two databases are
copied with SQLite's online backup API, so `backup` runs beside a running node and each
copy is one consistent snapshot. Received and sent files are the user's own: they are
backed up with everything else, not here.

`restore` needs the node stopped (it takes the home's daemon lock), checks the backup
(SQLite's integrity check on both databases, the identity readable), refuses to replace
another device's identity without `force`, and puts the files in place all or nothing
(`rendezvous.staged.install_files`): all are copied into a staging folder first, and only
then are the home's old WAL and shared-memory files dropped (SQLite would replay them onto
the restored database) and the copies renamed into place. A restore that fails (a bad
file, a full disk) leaves the home as it was, its databases' WAL included; what it made
in a home that was not there is taken away again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.app.home import HomeError, NodeHome
from rendezvous.admin import copy_file, integrity_problem, snapshot
from rendezvous.keyfile import load_identity
from rendezvous.staged import Unfinished, install_files

IDENTITY, CONFIG, NODE_DB, STORE_DB = ("identity.json", "config.json", "node.db",
                                       "store/content.sqlite")
DATABASES = (NODE_DB, STORE_DB)


def backup(home: NodeHome, dest: Path) -> dict[str, Any]:
    """Copy the home's identity, config and databases into `dest`, a new (or empty)
    folder made owner-only. Returns what was copied."""
    if not home.exists():
        raise HomeError(f"no peerpost node in {home.root} to back up")
    dest = Path(dest).expanduser().resolve()  # said back to the user: `run1/../bk` as bk
    root = home.root.resolve()
    if dest == root or root in dest.parents:
        raise HomeError(f"{dest} is inside the home folder it would back up")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HomeError(f"{dest} exists and is not an empty folder")
    (dest / "store").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)
    copy_file(home.identity_path, dest / IDENTITY, private=True)
    copy_file(home.config_path, dest / CONFIG, private=True)
    sizes = {}
    for name in DATABASES:
        if not (home.root / name).exists():
            continue  # a store not made yet (the node never ran)
        src = sqlite3.connect(f"file:{home.root / name}?mode=ro", uri=True, timeout=10.0)
        try:
            snapshot(src, dest / name)
        finally:
            src.close()
        os.chmod(dest / name, 0o600)
        sizes[name] = (dest / name).stat().st_size
    return {"dest": str(dest), "files": [IDENTITY, CONFIG, *sizes], "bytes": sizes}


def restore(home: NodeHome, src: Path, *, force: bool = False) -> dict[str, Any]:
    """Put a backup made by `backup` in place of the home's files; the node must be
    stopped. Returns what was restored."""
    src = Path(src).expanduser().absolute()
    for name in (IDENTITY, CONFIG, NODE_DB):
        if not (src / name).is_file():
            raise HomeError(f"{src} holds no {name}: not a peerpost backup")
    for name in DATABASES:
        if (src / name).exists() and (problem := integrity_problem(src / name)) is not None:
            raise HomeError(f"{src / name} is damaged ({problem}): not restored")
    try:
        restored = load_identity(src / IDENTITY)
    except DecodeError as exc:
        raise HomeError(f"{src / IDENTITY}: {exc}") from None
    made = [p for p in (home.root, home.root / "store", home.lock_path) if not p.exists()]
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        files = _restore_locked(home, src, restored, force=force)
    except BaseException:
        for path in reversed(made):  # what this run made, never anything else
            with contextlib.suppress(OSError):  # a folder someone else put files in
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
        raise
    return {"home": str(home.root), "files": files,
            "key": restored.public.fingerprint()}


def _restore_locked(home: NodeHome, src: Path, restored: DeviceIdentity, *,
                    force: bool) -> list[str]:
    with home.daemon_lock():  # HomeBusy while the node runs
        if home.identity_path.exists() and not force:
            try:
                current = home.load_identity()
            except HomeError:
                current = None  # unreadable: the backup's is what is wanted
            if current is not None and current.public != restored.public:
                raise HomeError(
                    f"{home.root} holds another device (key {current.public.fingerprint()}); "
                    f"the backup is of {restored.public.fingerprint()}. Restoring replaces "
                    "this device's identity with the backup's: add --force to do so")
        (home.root / "store").mkdir(exist_ok=True, mode=0o700)
        # Identity and config first: a run killed between two renames leaves this device's
        # identity, so a rerun needs no --force.
        files = [name for name in (IDENTITY, CONFIG, *DATABASES) if (src / name).exists()]
        try:
            install_files(home.root, [(src / name, name, True) for name in files],
                          drop=[name + suffix for name in DATABASES
                                for suffix in ("-wal", "-shm")])
        except OSError as exc:
            raise HomeError(f"restoring {src} into {home.root} failed, nothing there was "
                            f"changed: {exc}") from None
        except Unfinished as exc:
            raise HomeError(f"restoring {src} into {home.root} stopped while its files went "
                            f"in ({exc}): the node's next start or a rerun finishes it once "
                            "that is mended") from None
    return files
