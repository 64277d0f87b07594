"""Across two domains, a first message whose sender's keys cannot be looked up when it
arrives (the sender's domain went down after forwarding it) is held `unverified`; once the
sender's domain answers again the node looks the sender up by itself and downloads it, as
it would have with the lookup on time. Found by `python -m benchmarks soak --domains 2`:
a held message waited for `peerpost contacts accept` unless the same sender happened to
send again. Real servers, nodes and dnsmasq (the World of test_e2e_federation)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.overlay.test_e2e_federation import World, complete, make_file, make_world, send

pytestmark = pytest.mark.slow

__all__ = ["make_world"]  # the fixture, used by name

FAST_RETRY = ["--web", "off", "--retry-base", "0.5", "--retry-max", "2"]


def test_a_held_first_message_is_verified_once_the_senders_domain_answers(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world()
    w.a.start()
    w.b.start()
    alice, _ = w.a.init("alice")
    bob, _ = w.b.init("bob")
    bob.extra = FAST_RETRY
    alice.extra = FAST_RETRY
    w.b.net.start_node(bob)
    src = make_file(tmp_path / "first.bin", 256 << 10)
    mid = send(w.b, bob, src, alice.address)  # alice's node is not running: it waits at a.test
    w.b.wait_log(r"event=outbound\.delivered .*to=alice@a\.test")

    # b.test goes down; alice's node comes up, gets bob's message, and cannot look bob up.
    assert w.b.net.server is not None
    w.b.net.server.stop()
    w.a.net.start_node(alice)
    assert alice.proc is not None
    alice.proc.lines.wait_for(re.compile(r"could not look up the keys of bob@b\.test"), 30,
                              "alice's node")
    entry = w.a.net.inbox_entry(alice, mid)
    assert entry is not None and entry["state"] == "unverified", entry

    # b.test is back: nothing else from bob, yet alice's node verifies and downloads it.
    w.b.start()
    got = w.a.net.wait_until(lambda: complete(w.a, alice, mid), 30, "alice's download")
    assert Path(got["path"]).read_bytes() == src.read_bytes()
    assert [e["id"] for e in w.a.net.cli_json(alice, "inbox", "--all")] == [mid]
