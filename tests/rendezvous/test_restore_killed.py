"""A `restore --force` killed at each step (a real process, ended with os._exit just
before its Nth rename) leaves nothing `serve` starts on by halves: killed before its mark
was flushed, the folder is as it was, database and WAL included; killed after, the next
`serve` puts the rest in place before it opens anything (rendezvous.staged)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rendezvous.domainkey import load_or_create
from rendezvous.sqlite_store import DB_NAME
from rendezvous.staged import STAGING_PREFIX
from tests.diskfull import rows, run_killed_before_rename

from .test_metrics_logs import serve
from .test_restore_failed import killed_with_wal, make_backup


@pytest.mark.parametrize("stop", [0, 1, 2, 3])
async def test_a_forced_restore_killed_at_each_step(tmp_path: Path, stop: int) -> None:
    backup, theirs = make_backup(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    ours = load_or_create(data).fingerprint
    killed_with_wal(data / DB_NAME)

    # os.replace 0 puts the plan in place, 1 the mark (the point of no return), 2 the
    # domain key, 3 the database
    done = run_killed_before_rename(stop, "rendezvous.cli",
                                    ["restore", str(backup), "--data", str(data), "--force"])
    assert done.returncode == 9, done.stderr
    assert list(data.glob(STAGING_PREFIX + "*"))  # killed midway: its staging is there
    if stop == 3:  # the backup's key is in, its database not: half a folder
        assert load_or_create(data).fingerprint == theirs
        assert (backup / DB_NAME).read_bytes() != (data / DB_NAME).read_bytes()

    async with serve(data, "--plaintext", want=("listening",)) as served:
        pass
    log = served.log.read_text()
    assert list(data.glob(STAGING_PREFIX + "*")) == []
    if stop <= 1:  # nothing was put in place: the folder as it was, its WAL included
        assert "restore.finished" not in log
        assert rows(data / DB_NAME) == 7 and load_or_create(data).fingerprint == ours
    else:  # the restore had decided: finished before the server opened the database
        assert "event=restore.finished" in log
        assert rows(data / DB_NAME) == 300 and load_or_create(data).fingerprint == theirs
