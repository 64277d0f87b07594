"""Files put in a folder all or nothing (`restore` of a server's data folder and of a node's
home), including across a kill.

Every file is copied into a staging folder inside the destination (`.restore-part-*`, so
the renames stay in one file system) and flushed; then a plan (`ready.json`: the names in
the order they go in, and the names to drop first, such as the old database's WAL) is
written and flushed, which is the point of no return. Only then are the drops made and the
copies renamed into place, the plan removed and the staging folder with it.

A run killed before its plan was written changed nothing in the destination: its staging
folder is removed. One killed after it may have renamed some files and not others (a
backup's keys next to the old database, or no database at all): the next holder of the
folder's lock (`serve`, a node starting, another restore) calls `finish_interrupted`
before it opens anything, which puts the rest in place as the run decided, so nothing
ever starts on half a folder. The drops are made again only while a copy is still to go
in: those copies were never opened, so no WAL of theirs can exist yet.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

STAGING_PREFIX = ".restore-part-"
_PLAN = "ready.json"


def install_files(dest_dir: Path, files: Sequence[tuple[Path, str, bool]], *,
                  drop: Sequence[str] = ()) -> None:
    """Copy each (source, name, private) to `dest_dir` / name all or nothing, in the order
    given, after removing the `drop` names (module docstring). A failure before the plan
    is written (a bad file in the backup, a full disk) leaves `dest_dir` as it was. The
    caller holds the folder's lock."""
    finish_interrupted(dest_dir)
    for _, name, _ in files:
        _check_name(name)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest_dir))
    try:
        for src, name, private in files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / name)
            if private:
                os.chmod(staging / name, 0o600)
            _fsync(staging / name)
        plan = json.dumps({"names": [name for _, name, _ in files], "drop": list(drop)})
        (staging / (_PLAN + ".tmp")).write_text(plan)
        _fsync(staging / (_PLAN + ".tmp"))
        os.replace(staging / (_PLAN + ".tmp"), staging / _PLAN)
        _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _put_in_place(dest_dir, staging)


def finish_interrupted(dest_dir: Path) -> list[str]:
    """What a killed `install_files` left in `dest_dir` (whose lock the caller holds): a
    staging folder with a plan is put in place, one without is removed. Returns the names
    put in place now (empty when there was nothing to finish)."""
    done: list[str] = []
    for staging in sorted(Path(dest_dir).glob(STAGING_PREFIX + "*")):
        if staging.is_symlink() or not staging.is_dir():
            continue  # not ours
        if (staging / _PLAN).exists():
            done += _put_in_place(Path(dest_dir), staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return done


def interrupted(dest_dir: Path) -> bool:
    """Whether `dest_dir` holds a staging folder with a plan: a restore that was killed
    while it put its files in place (or that is putting them there now)."""
    return any((staging / _PLAN).exists() and not staging.is_symlink()
               for staging in Path(dest_dir).glob(STAGING_PREFIX + "*"))


def _put_in_place(dest_dir: Path, staging: Path) -> list[str]:
    try:
        plan = json.loads((staging / _PLAN).read_text())
        names, drop = list(plan["names"]), list(plan["drop"])
        for name in (*names, *drop):
            _check_name(name)
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"{staging / _PLAN} is not a restore plan this version wrote ({exc}):"
                      f" remove {staging} once the folder is as you want it") from None
    left = [name for name in names if (staging / name).exists()]
    if left:  # see the module docstring: none of the copies was opened yet
        for name in drop:
            (dest_dir / name).unlink(missing_ok=True)
    for name in left:
        os.replace(staging / name, dest_dir / name)
    for folder in {(dest_dir / name).parent for name in left} | {dest_dir}:
        _fsync(folder)
    # The plan goes first, and not quietly: left behind, it would drop a live WAL later.
    (staging / _PLAN).unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return left


def _check_name(name: str) -> None:
    """A name inside the folder (`store/content.sqlite`), nothing that leads out of it."""
    path = Path(name) if isinstance(name, str) else None
    if path is None or not path.parts or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{name!r} is not a file name inside the folder")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
