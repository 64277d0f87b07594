"""End to end (real server and node processes): `node --on-message` reports a message from
a first contact or a contact's new device once its sender's keys were looked up, with the
state it keeps, once. It ran as the message was filed, `unverified`, a few milliseconds
before a first contact's message moved on to `offered`, and never again: a script acting
on `offered` mail missed the first message of every new contact."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, _script

from .test_e2e_cli import MiB, make_file
from .test_e2e_day_one import RECORDER
from .test_e2e_trust import contact, second_device

pytestmark = pytest.mark.slow

Events = Callable[[], list[dict[str, str]]]


def recorded(tmp_path: Path) -> tuple[list[str], Events]:
    """`--on-message` for a node that appends each run's fields to a file, and a reader
    of the runs so far."""
    script, out = tmp_path / "record.py", tmp_path / "events.jsonl"
    script.write_text(RECORDER)

    def events() -> list[dict[str, str]]:
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines()]
    return ["--on-message", shlex.join([sys.executable, str(script), str(out)])], events


def runs(events: Events, mid: str, event: str) -> list[dict[str, str]]:
    return [r for r in events() if r["PEERPOST_ID"] == mid and r["PEERPOST_EVENT"] == event]


def test_a_first_contacts_message_is_reported_offered_and_a_new_devices_once_unverified(
        net: LocalNetwork, tmp_path: Path) -> None:
    hook, events = recorded(tmp_path)
    alice, bob = net.add_node("alice"), net.add_node("bob", extra=hook)
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "first.bin", MiB, seed=41)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_complete(bob, mid, 60, "bob's first download")
    net.wait_until(lambda: runs(events, mid, "complete") and runs(events, mid, "arrived"),
                   30, "the hook's two runs")
    (arrived,) = runs(events, mid, "arrived")
    assert arrived["PEERPOST_STATE"] == "offered"  # `unverified` before

    # alice's new device, that no device of hers vouched for: held, reported once as such
    alice2 = second_device(net, "alice2", alice.address)
    mid2 = net.cli(alice2, "send", str(src), "--to", bob.address).stdout.strip()
    (held,) = net.wait_until(lambda: runs(events, mid2, "arrived"), 30,
                             "the hook's `arrived` run for the new device's message")
    assert held["PEERPOST_STATE"] == "unverified" and held["PEERPOST_FROM"] == alice.address
    c = contact(net, bob, alice.address)
    assert c is not None and c["unvouched"]  # looked up before the hook ran

    # Accepting the key moves the message on and downloads it: no second arrival.
    net.cli(bob, "contacts", "accept", alice.address)
    net.wait_complete(bob, mid2, 60, "bob's download after accept")
    net.wait_until(lambda: runs(events, mid2, "complete"), 30, "the hook's `complete` run")
    assert len(runs(events, mid2, "arrived")) == 1


def test_a_first_contact_whose_lookup_fails_is_reported_unverified_at_once(
        net: LocalNetwork, tmp_path: Path) -> None:
    hook, events = recorded(tmp_path)
    alice = net.add_node("alice")
    # A lookup asked again no sooner than 96 s (0.8 of 120) after the first one failed.
    bob = net.add_node("bob", extra=[*hook, "--retry-base", "120", "--retry-max", "240"])
    net.start_node(alice)
    src = make_file(tmp_path / "clip.bin", MiB, seed=42)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.stop_node(alice)
    # The operator removes alice's account while her message waits for bob: FINGER of
    # her address answers "no such address" when bob's node looks her up.
    subprocess.run([_script("peerpost-rendezvous"), "accounts", "delete", alice.address,
                    "--data", str(net.data_dir)], check=True, capture_output=True,
                   env=net.env)

    started = time.monotonic()
    net.start_node(bob)
    assert bob.proc is not None
    bob.proc.lines.wait_for(re.compile(r"could not look up the keys of alice@"), 30,
                            "bob's failed lookup")
    (arrived,) = net.wait_until(lambda: runs(events, mid, "arrived"), 30,
                                "the hook's `arrived` run")
    assert time.monotonic() - started < 60  # after the failure, not the next lookup
    assert arrived["PEERPOST_STATE"] == "unverified"
    assert arrived["PEERPOST_FROM"] == alice.address
    entry = net.inbox_entry(bob, mid)
    assert entry is not None and entry["state"] == "unverified"
    assert len(runs(events, mid, "arrived")) == 1
