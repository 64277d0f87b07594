"""`MessageHook` (what `node --on-message` runs), with real commands: a junk sender's
message runs nothing on arrival (it ran the command, and popped a desktop notification,
for mail the inbox hides and never fetches); an event is told (recorded as run in
node.db) once its command ran to its end, not when the node's stop killed it (then the
node runs it again at its next start); and events past the bound wait in node.db for
their turn, oldest first, where they were dropped for good and counted as run."""

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


class Ledger:
    """node.db's side, in memory: each event is owed from when it is fired (the node
    commits it due first) until `told`; `owed(n)` reads them back as node.db does, at
    most n of each kind, every `arrived` first, oldest first."""

    def __init__(self) -> None:
        self.due: dict[tuple[bytes, str], InboxEntry] = {}
        self.told_events: list[tuple[bytes, str]] = []
        self.all_told = asyncio.Event()

    def owe(self, e: InboxEntry, event: str) -> None:
        self.due[(e.id, event)] = e
        self.all_told.clear()

    def told(self, e: InboxEntry, event: str) -> None:
        self.told_events.append((e.id, event))
        self.due.pop((e.id, event), None)
        if not self.due:
            self.all_told.set()

    def owed(self, limit: int) -> list[tuple[InboxEntry, str]]:
        return [(e, kind) for kind in ("arrived", "complete")
                for e in sorted((e for (_, ev), e in self.due.items() if ev == kind),
                                key=lambda e: (e.received_at, e.id))[:limit]]


def hook(tmp_path: Path, *extra: str, **bounds: int) -> tuple[MessageHook, Path, Ledger]:
    script, out = tmp_path / "record.py", tmp_path / "runs.jsonl"
    script.write_text(RECORD)
    ledger = Ledger()
    return MessageHook(shlex.join([sys.executable, str(script), str(out), *extra]),
                       told=ledger.told, owed=ledger.owed, desktop=False, **bounds), out, ledger


def ran(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def fire(h: MessageHook, ledger: Ledger, e: InboxEntry, event: str = "arrived") -> None:
    ledger.owe(e, event)
    h.fire(e, event)


async def test_a_junk_senders_message_runs_nothing_on_arrival(tmp_path: Path) -> None:
    h, out, ledger = hook(tmp_path)
    fire(h, ledger, entry(1, junk=True))
    fire(h, ledger, entry(2, junk=False))
    async with asyncio.timeout(30):
        await ledger.all_told.wait()
    await h.aclose()
    # the junk one: nothing to run, told at once
    assert sorted(ledger.told_events) == [(entry(n, junk=False).id, "arrived") for n in (1, 2)]
    assert ran(out) == [{"PEERPOST_ID": (2).to_bytes(16, "big").hex(),
                         "PEERPOST_STATE": "offered", "PEERPOST_EVENT": "arrived"}]
    assert h.counters["ran"] == 1


async def test_a_command_the_stop_kills_is_not_told(tmp_path: Path) -> None:
    started = tmp_path / "started"
    os.mkfifo(started)
    h, out, ledger = hook(tmp_path, str(started))
    fire(h, ledger, entry(1, junk=False), "complete")
    async with asyncio.timeout(30):
        assert await asyncio.to_thread(started.read_text) == "started"
    await h.aclose()  # the node stopping
    assert len(ran(out)) == 1
    assert ledger.told_events == [] and h.counters["ran"] == 0
    assert list(ledger.due) == [(entry(1, junk=False).id, "complete")]  # for the next start


def shell_hook(tmp_path: Path, ledger: Ledger, **bounds: int) -> tuple[MessageHook, Path]:
    """A hook whose command appends "ID EVENT" to a file (sh: a few ms a run)."""
    out = tmp_path / "runs.txt"
    line = f'echo "$PEERPOST_ID $PEERPOST_EVENT" >> {shlex.quote(str(out))}'
    cmd = shlex.join(["sh", "-c", line])
    return MessageHook(cmd, told=ledger.told, owed=ledger.owed, desktop=False,
                       **bounds), out


def lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


async def test_a_burst_past_the_bound_waits_its_turn_and_each_event_runs_once(
        tmp_path: Path) -> None:
    """10 events against room for 3 (1 running, 2 waiting): the 7 over it ran nothing and
    counted as run before; now every one runs, once, and is told."""
    ledger = Ledger()
    h, out = shell_hook(tmp_path, ledger, max_running=1, max_waiting=2)
    events = [(entry(n, junk=False), "arrived") for n in range(1, 7)]
    events += [(entry(n, junk=False), "complete") for n in range(1, 5)]
    for e, event in events:
        fire(h, ledger, e, event)
    assert h.counters["deferred"] == 7
    async with asyncio.timeout(30):
        await ledger.all_told.wait()
    await h.aclose()
    want = [f"{e.id.hex()} {event}" for e, event in events]
    assert sorted(lines(out)) == sorted(want)  # each once
    assert sorted(ledger.told_events) == sorted((e.id, ev) for e, ev in events)
    assert h.counters["ran"] == 10


async def test_what_a_start_finds_owed_runs_oldest_first_past_the_bound(
        tmp_path: Path) -> None:
    """At start node.db holds 8 events owed (a stop, or a burst before it); `catch_up`
    runs all of them, every `arrived` before any `complete`, each once, also when the
    event comes again meanwhile (the message's push after login)."""
    ledger = Ledger()
    h, out = shell_hook(tmp_path, ledger, max_running=1, max_waiting=1)
    owed = [(entry(n, junk=False), "arrived") for n in range(1, 5)]
    owed += [(entry(n, junk=False), "complete") for n in range(1, 5)]
    for e, event in reversed(owed):  # node.db's order is the messages', not this one
        ledger.owe(e, event)
    h.catch_up()
    h.fire(*owed[0])  # running already: not run twice
    h.fire(*owed[-1])  # waiting in node.db: it keeps its place
    async with asyncio.timeout(30):
        await ledger.all_told.wait()
    await h.aclose()
    assert lines(out) == [f"{e.id.hex()} {event}" for e, event in owed]


async def test_an_event_fired_while_older_ones_wait_does_not_overtake_them(
        tmp_path: Path) -> None:
    ledger = Ledger()
    h, out = shell_hook(tmp_path, ledger, max_running=1, max_waiting=0)
    first, second, third = (entry(n, junk=False) for n in (1, 2, 3))
    fire(h, ledger, first)
    fire(h, ledger, second)  # no room: owed in node.db
    fire(h, ledger, third, "complete")  # room again, perhaps; but `second` is older
    async with asyncio.timeout(30):
        await ledger.all_told.wait()
    await h.aclose()
    assert lines(out) == [f"{first.id.hex()} arrived", f"{second.id.hex()} arrived",
                          f"{third.id.hex()} complete"]
