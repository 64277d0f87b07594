"""`MessageHook` (what `node --on-message` runs), with a real command: a junk sender's
message runs nothing on arrival (it ran the command, and popped a desktop notification,
for mail the inbox hides and never fetches), and `done` is called once the command ran to
its end, not when the node's stop killed it (then the node runs it again at its next
start)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

from crypto.content import chunk_count
from overlay.app.notify import MessageHook
from overlay.mail.inbox import InboxEntry
from overlay.mail.inbox_state import InboxState

RECORD = """\
import json, os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in ("PEERPOST_ID", "PEERPOST_STATE",
                                                       "PEERPOST_EVENT")}) + "\\n")
if len(sys.argv) > 2:  # a FIFO: say it started, then run on until killed
    with open(sys.argv[2], "w") as f:
        f.write("started")
    time.sleep(60)
"""


def entry(n: int, *, junk: bool) -> InboxEntry:
    return InboxEntry(
        id=n.to_bytes(16, "big"), sender="mallory@example.org", sender_peer_id=b"\1" * 32,
        title="win big", note="", size=10, file_name="x.bin",
        media_type="application/octet-stream", content_id=b"\2" * 32,
        state=InboxState.OFFERED, junk=junk, priority=False, received_at=1000.0,
        next_attempt=None, attempts=0, error=None, path=None, chunks_held=0,
        chunk_count=chunk_count(10, 1 << 20), message=b"m")


def hook(tmp_path: Path, *extra: str) -> tuple[MessageHook, Path]:
    script, out = tmp_path / "record.py", tmp_path / "runs.jsonl"
    script.write_text(RECORD)
    return MessageHook(shlex.join([sys.executable, str(script), str(out), *extra]),
                       desktop=False), out


def ran(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


async def test_a_junk_senders_message_runs_nothing_on_arrival(tmp_path: Path) -> None:
    h, out = hook(tmp_path)
    done: list[int] = []
    both = asyncio.Event()

    def told(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            both.set()
    h.fire(entry(1, junk=True), "arrived", lambda: told(1))
    h.fire(entry(2, junk=False), "arrived", lambda: told(2))
    async with asyncio.timeout(30):
        await both.wait()
    await h.aclose()
    assert sorted(done) == [1, 2]  # the junk one: nothing to run, told at once
    assert ran(out) == [{"PEERPOST_ID": (2).to_bytes(16, "big").hex(),
                         "PEERPOST_STATE": "offered", "PEERPOST_EVENT": "arrived"}]
    assert h.counters["ran"] == 1


async def test_a_command_the_stop_kills_is_not_done(tmp_path: Path) -> None:
    started = tmp_path / "started"
    os.mkfifo(started)
    h, out = hook(tmp_path, str(started))
    done: list[int] = []
    h.fire(entry(1, junk=False), "arrived", lambda: done.append(1))
    async with asyncio.timeout(30):
        assert await asyncio.to_thread(started.read_text) == "started"
    await h.aclose()  # the node stopping
    assert len(ran(out)) == 1
    assert done == [] and h.counters["ran"] == 0
