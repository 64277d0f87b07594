"""Files put in a folder all or nothing (`restore` of a server's data folder and of a node's
home), including across a kill.

Every file is copied into a staging folder (`.restore-part-*`) in the folder it goes to,
so its rename stays in one file system (a home's store/ may be a link to another disk),
and flushed; before them, the one in the destination itself gets the plan (`names.json`:
the names in the order they go in, and those to drop first, such as the old database's
WAL). Once all are flushed a mark (`ready`) is written and flushed: the point of no
return. Only then are the drops made and the copies renamed into place, the mark removed
and the staging folders with it.

A run killed before its mark was written changed nothing in the destination: its staging
folders are removed. One killed after it may have renamed some files and not others (a
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
_NAMES = "names.json"  # the plan, written first: where the copies go, what is dropped
_READY = "ready"  # the point of no return


class Unfinished(Exception):
    """Putting the files in place failed past the point of no return: some may be in, and
    the next holder of the folder's lock tries again (`finish_interrupted`)."""


def install_files(dest_dir: Path, files: Sequence[tuple[Path, str, bool]], *,
                  drop: Sequence[str] = ()) -> None:
    """Copy each (source, name, private) to `dest_dir` / name all or nothing, in the order
    given, after removing the `drop` names (module docstring). A failure before the plan
    is written (a bad file in the backup, a full disk) leaves `dest_dir` as it was (an
    OSError); one after it is Unfinished. The caller holds the folder's lock."""
    finish_interrupted(dest_dir)
    names = [name for _, name, _ in files]
    for name in (*names, *drop):
        _check_name(name)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest_dir))
    try:
        _write_flushed(staging / _NAMES, json.dumps({"names": names, "drop": list(drop)}))
        for src, name, private in files:
            staged = _staged(dest_dir, staging.name, name)
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staged)
            if private:
                os.chmod(staged, 0o600)
            _fsync(staged)
        for folder in {_staged(dest_dir, staging.name, name).parent for name in names}:
            _fsync(folder)
        _write_flushed(staging / _READY, "")
    except BaseException:
        _discard(dest_dir, staging, names)
        raise
    try:
        _put_in_place(dest_dir, staging)
    except OSError as exc:
        raise Unfinished(str(exc)) from exc


def finish_interrupted(dest_dir: Path) -> list[str]:
    """What a killed `install_files` left in `dest_dir` (whose lock the caller holds): a
    staging folder with a plan is put in place, one without is removed. Returns the names
    put in place now (empty when there was nothing to finish)."""
    done: list[str] = []
    for staging in sorted(Path(dest_dir).glob(STAGING_PREFIX + "*")):
        if staging.is_symlink() or not staging.is_dir():
            continue  # not ours
        if not (staging / _NAMES).exists():  # killed before it staged anything
            shutil.rmtree(staging, ignore_errors=True)
        elif (staging / _READY).exists():
            done += _put_in_place(Path(dest_dir), staging)
        else:
            _discard(Path(dest_dir), staging, _plan(staging)[0])
    return done


def interrupted(dest_dir: Path) -> bool:
    """Whether `dest_dir` holds a staging folder past its point of no return: a restore
    that was killed while it put its files in place (or that is putting them there now)."""
    return any((staging / _READY).exists() and not staging.is_symlink()
               for staging in Path(dest_dir).glob(STAGING_PREFIX + "*"))


def _staged(dest_dir: Path, staging_name: str, name: str) -> Path:
    """Where `name`'s copy waits: in a staging folder of that name in the folder it goes
    to, so its rename stays in one file system (a home's store/ may be another disk)."""
    target = dest_dir / name
    return target.parent / staging_name / target.name


def _plan(staging: Path) -> tuple[list[str], list[str]]:
    try:
        plan = json.loads((staging / _NAMES).read_text())
        names, drop = list(plan["names"]), list(plan["drop"])
        for name in (*names, *drop):
            _check_name(name)
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"{staging / _NAMES} is not a restore plan this version wrote ({exc}):"
                      f" remove {staging} once the folder is as you want it") from None
    return names, drop


def _put_in_place(dest_dir: Path, staging: Path) -> list[str]:
    names, drop = _plan(staging)
    left = [name for name in names if _staged(dest_dir, staging.name, name).exists()]
    if left:  # see the module docstring: none of the copies was opened yet
        for name in drop:
            (dest_dir / name).unlink(missing_ok=True)
    for name in left:
        os.replace(_staged(dest_dir, staging.name, name), dest_dir / name)
    for folder in {(dest_dir / name).parent for name in left} | {dest_dir}:
        _fsync(folder)
    # The mark goes first, and not quietly: left behind, it would drop a live WAL later.
    (staging / _READY).unlink()
    _discard(dest_dir, staging, names)
    return left


def _discard(dest_dir: Path, staging: Path, names: Sequence[str]) -> None:
    for folder in {_staged(dest_dir, staging.name, name).parent for name in names}:
        if folder != staging:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _check_name(name: str) -> None:
    """A name inside the folder (`store/content.sqlite`), nothing that leads out of it."""
    path = Path(name) if isinstance(name, str) else None
    if path is None or not path.parts or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{name!r} is not a file name inside the folder")


def _write_flushed(path: Path, text: str) -> None:
    """`path` holds `text` on disk, its name too, or does not exist."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
