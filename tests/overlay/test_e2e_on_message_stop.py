"""End to end (real servers, nodes and hook processes): `node --on-message`'s `arrived`
runs once per message, to its end, with the state the message settled in, also when the
node stops at the wrong moment.

A node stopped while it looked up a first contact (the sender's domain not answering yet)
ran `arrived` with `unverified`, a process its stop then killed, and at its next start the
message, pushed again, was a duplicate: the user's command never saw it settle, and mostly
never ran at all. A command the node's stop killed half way counted as run: never run
again. Now the first is told at the next start, once its lookup ran, and the second runs
again then."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.mail.db import NodeDB
from overlay.mail.inbox import Inbox
from overlay.mail.prefs import Prefs
from tests.overlay.test_e2e_federation import World, complete, make_file, make_world, send

from .test_e2e_on_message_trust import recorded, runs

pytestmark = pytest.mark.slow

__all__ = ["make_world"]  # the fixture, used by name


def test_a_node_stopped_during_a_first_contacts_lookup_runs_arrived_once_as_it_settles(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    hook, events = recorded(tmp_path)
    w = make_world()
    w.a.start()
    w.b.start()
    alice, _ = w.a.init("alice")
    bob, _ = w.b.init("bob")
    alice.extra = ["--web", "off", *hook]
    bob.extra = ["--web", "off"]
    w.b.net.start_node(bob)
    src = make_file(tmp_path / "first.bin", 256 << 10)
    mid = send(w.b, bob, src, alice.address)  # alice's node is not running: it waits at a.test
    w.b.wait_log(r"event=outbound\.delivered .*to=alice@a\.test")

    # b.test stops answering (its connections stay up): alice's node files bob's message
    # `unverified` and its lookup of bob hangs. Her node stops meanwhile.
    assert w.b.net.server is not None
    b_server = w.b.net.server.popen.pid
    os.kill(b_server, signal.SIGSTOP)
    try:
        w.a.net.start_node(alice)
        assert alice.proc is not None
        alice.proc.lines.wait_for(re.compile(r"unverified: signed by device"), 30,
                                  "alice's node filing bob's message")
        w.a.net.stop_node(alice)
    finally:
        os.kill(b_server, signal.SIGCONT)
    assert runs(events, mid, "arrived") == []  # not settled: nothing to tell yet

    # Her next start looks bob up again, and tells the message as it settled: once.
    w.a.net.start_node(alice)
    (arrived,) = w.a.net.wait_until(lambda: runs(events, mid, "arrived"), 60,
                                    "the hook's `arrived` run after the restart")
    assert arrived["PEERPOST_STATE"] == "offered"
    assert arrived["PEERPOST_FROM"] == bob.address
    got = w.a.net.wait_until(lambda: complete(w.a, alice, mid), 120, "alice's download")
    assert Path(got["path"]).read_bytes() == src.read_bytes()
    w.a.net.wait_until(lambda: runs(events, mid, "complete"), 30, "the hook's `complete` run")
    assert len(runs(events, mid, "arrived")) == 1


# Appends a line when it starts and one when it ends; while the file named by its second
# argument exists it does not end (the test holds it there while the node stops), for the
# events named after it (all if none).
HELD = """\
import json, os, sys, time
out, hold, held = sys.argv[1], sys.argv[2], sys.argv[3:] or ["arrived", "complete"]
run = {k: os.environ.get(k) for k in ("PEERPOST_ID", "PEERPOST_EVENT", "PEERPOST_STATE",
                                      "PEERPOST_PATH")}
with open(out, "a") as f:
    f.write(json.dumps({**run, "at": "start"}) + "\\n")
while run["PEERPOST_EVENT"] in held and os.path.exists(hold):
    time.sleep(0.05)
with open(out, "a") as f:
    f.write(json.dumps({**run, "at": "end"}) + "\\n")
"""


def test_an_arrived_command_the_stop_killed_runs_again_at_the_next_start(
        net: LocalNetwork, tmp_path: Path) -> None:
    import json
    import shlex

    script, out, hold = tmp_path / "held.py", tmp_path / "runs.jsonl", tmp_path / "hold"
    script.write_text(HELD)
    hold.touch()
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--on-message", shlex.join(
        [sys.executable, str(script), str(out), str(hold)])])
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "clip.bin", 64 << 10)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

    def arrived(at: str, message: str = mid) -> list[dict[str, str]]:
        lines = out.read_text().splitlines() if out.exists() else []
        return [r for r in map(json.loads, lines)
                if r["PEERPOST_ID"] == message and r["PEERPOST_EVENT"] == "arrived"
                and r["at"] == at]

    net.wait_until(lambda: arrived("start"), 30, "the hook's `arrived` run starting")
    net.stop_node(bob)  # kills the command half way
    assert arrived("end") == []

    hold.unlink()
    net.start_node(bob)
    (ended,) = net.wait_until(lambda: arrived("end"), 30, "the `arrived` run again, to its end")
    assert ended["PEERPOST_STATE"] in ("offered", "downloading", "retrying", "complete")
    got = net.wait_complete(bob, mid, 60, "bob's download")
    assert Path(got["path"]).read_bytes() == src.read_bytes()

    # Run to its end once: a later start runs it no more. The hooks start in the order
    # fired, so once a new message's has ended, a repeat of the first would show.
    net.stop_node(bob)
    net.start_node(bob)
    mid2 = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: arrived("end", mid2), 30, "the next message's `arrived` run")
    assert len(arrived("start")) == 2 and len(arrived("end")) == 1


def held_hook(tmp_path: Path, *events: str) -> tuple[list[str], Path, Runs]:
    """`--on-message` running HELD (held while the returned file exists), and a reader
    of its runs: (message id, event, "start" or "end") -> the runs' fields."""
    import json
    import shlex

    script, out, hold = tmp_path / "held.py", tmp_path / "runs.jsonl", tmp_path / "hold"
    script.write_text(HELD)
    hold.touch()

    def runs_of(mid: str, event: str, at: str) -> list[dict[str, str]]:
        lines = out.read_text().splitlines() if out.exists() else []
        return [r for r in map(json.loads, lines)
                if r["PEERPOST_ID"] == mid and r["PEERPOST_EVENT"] == event and r["at"] == at]
    cmd = shlex.join([sys.executable, str(script), str(out), str(hold), *events])
    return ["--on-message", cmd], hold, runs_of


Runs = Callable[[str, str, str], list[dict[str, str]]]


def test_a_complete_command_the_stop_killed_runs_again_at_the_next_start(
        net: LocalNetwork, tmp_path: Path) -> None:
    """A hook that files a finished video away lost that move when the node stopped
    while it ran: `complete` counted as run, never run again."""
    hook, hold, runs_of = held_hook(tmp_path, "complete")
    alice, bob = net.add_node("alice"), net.add_node("bob", extra=hook)
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "video.bin", 256 << 10)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: runs_of(mid, "complete", "start"), 60,
                   "the hook's `complete` run starting")
    net.stop_node(bob)  # kills the command half way
    assert runs_of(mid, "complete", "end") == []

    hold.unlink()
    net.start_node(bob)
    (ended,) = net.wait_until(lambda: runs_of(mid, "complete", "end"), 30,
                              "the `complete` run again, to its end")
    assert ended["PEERPOST_STATE"] == "complete"
    assert Path(ended["PEERPOST_PATH"]).read_bytes() == src.read_bytes()

    # Run to its end once: a later start runs it no more. What a start finds owed starts
    # at once, so once a later message's `complete` has ended, a repeat would show.
    net.stop_node(bob)
    net.start_node(bob)
    mid2 = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: runs_of(mid2, "complete", "end"), 60,
                   "the next message's `complete` run")
    assert len(runs_of(mid, "complete", "start")) == 2
    assert len(runs_of(mid, "complete", "end")) == 1
    assert len(runs_of(mid, "arrived", "end")) == 1


OWED = 200


def _owed_arrivals(node: NodeHandle) -> list[str]:
    """OWED messages filed and settled in the stopped `node`'s node.db, their `arrived`
    not run yet: as a node killed while they came in leaves them (the network would take
    minutes to deliver so many)."""
    mids = [b"\x22" + n.to_bytes(15, "big") for n in range(OWED)]
    with NodeDB.open(node.home) as db:
        Prefs(db).auto_download = False  # they have no source to download from
        inbox = Inbox(db)
        with inbox.transaction():  # one commit
            for n, mid in enumerate(mids):
                inbox.add(id=mid, sender="dave@example.net", sender_peer_id=b"d" * 20,
                          title=f"owed {n}", note="", size=1, file_name=f"o{n}.bin",
                          media_type="application/octet-stream",
                          content_id=n.to_bytes(32, "big"), chunk_count=1, message=b"",
                          received_at=1000.0 + n)
                inbox.settle_arrival(mid)
    return [mid.hex() for mid in mids]


def test_hooks_owed_past_the_bound_wait_their_turn_and_each_runs_once(
        net: LocalNetwork, tmp_path: Path) -> None:
    """200 `arrived` owed at a start, against room for 68 (4 running, 64 waiting): the
    132 over it were dropped for good and counted as run. Now they wait in node.db, run
    in this run as room frees, or at the next start if the node stops first."""
    hook, hold, runs_of = held_hook(tmp_path, "arrived")
    alice, bob = net.add_node("alice"), net.add_node("bob", extra=hook)
    mids = _owed_arrivals(bob)
    net.start_node(alice)

    # Held: 4 run, 64 wait, 132 are left owed; the stop kills the 4.
    net.start_node(bob)
    net.wait_until(lambda: sum(bool(runs_of(m, "arrived", "start")) for m in mids) == 4, 30,
                   "the first 4 runs starting")
    info = net.cli_json(bob, "info")
    assert info["counters"]["on-message deferred"] == OWED - 68
    net.stop_node(bob)
    assert not any(runs_of(m, "arrived", "end") for m in mids)

    # The next start runs all 200, 68 at a time: each to its end, once.
    hold.unlink()
    net.start_node(bob)
    net.wait_until(lambda: all(runs_of(m, "arrived", "end") for m in mids), 120,
                   "every owed `arrived` run to its end")
    assert [len(runs_of(m, "arrived", "end")) for m in mids] == [1] * OWED

    # And no more at a later start: a new message's run comes after them, alone.
    net.stop_node(bob)
    net.start_node(bob)
    src = make_file(tmp_path / "clip.bin", 64 << 10)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: runs_of(mid, "arrived", "end"), 30, "the new message's run")
    assert [len(runs_of(m, "arrived", "end")) for m in mids] == [1] * OWED
    assert net.cli_json(bob, "info")["counters"].get("on-message deferred", 0) == 0
