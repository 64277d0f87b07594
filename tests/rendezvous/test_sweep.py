"""The server's housekeeping round (expiring envelopes, saving relay meters) outlives a
round that fails: a full disk refuses the DELETE, and the next round tries again."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from rendezvous.limits import Limits

from .conftest import disk_full, pg_starting_up, running_server


@pytest.mark.parametrize("failure", [disk_full, lambda: sqlite3.OperationalError("I/O"),
                                     pg_starting_up])
async def test_a_failed_sweep_is_logged_and_the_next_one_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: Callable[[], Exception]) -> None:
    caplog.set_level(logging.INFO, "rendezvous.server")
    # A 10 s envelope lifetime sweeps every second.
    async with running_server(tmp_path, limits=Limits(envelope_ttl=10)) as server:
        real = server.store.expire
        calls: list[float] = []

        async def expire(now: float) -> int:
            calls.append(now)
            if len(calls) == 1:
                raise failure()
            return await real(now)

        server.store.expire = expire  # type: ignore[method-assign]
        for _ in range(60):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(calls) >= 2, "no sweep after the failed one"
    text = caplog.text
    if failure is disk_full:
        assert "event=storage.full verb=sweep" in text and "Traceback" not in text
    elif failure is pg_starting_up:
        assert "event=storage.unavailable verb=sweep" in text and "Traceback" not in text
    else:
        assert "event=sweep.failed" in text
