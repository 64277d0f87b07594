"""The web inbox of a node whose inbox holds more than the 1,000 messages it lists, in
Debian's chromium against a real server and nodes. The 1,000 newer messages are written
into the stopped node's node.db through the Inbox API, as the many-messages e2e test
does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork
from overlay.mail.db import NodeDB
from overlay.mail.inbox import Inbox
from tests.overlay.test_e2e_many_messages import newer_received
from tests.web.conftest import login_url
from tests.web.test_web_actions import make_file

pytestmark = pytest.mark.slow


def junk_line(n: int) -> str:
    return f"{n} messages from senders on your junk list are not shown (see Preferences)."


def test_the_junk_line_counts_junk_older_than_the_newest_thousand(
        net: LocalNetwork, browser_page: Any, tmp_path: Path) -> None:
    """Three junk messages older than 1,000 others: the list leaves them out and says so.
    A fourth arrives while the page is open, and the line counts four. The page counted
    only the junk among the 1,000 it lists: none, then one."""
    page = browser_page
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    net.cli(bob, "prefs", "junk", "add", alice.address)
    net.stop_node(bob)
    long_ago = time.time() - 100_000
    with NodeDB.open(bob.home) as db:
        for n in range(3):
            Inbox(db).add(id=bytes([0xee, n]) * 8, sender="erin@example.net",
                          sender_peer_id=b"e" * 20, title=f"junk {n}", note="", size=1,
                          file_name="j.bin", media_type="application/octet-stream",
                          content_id=bytes([0xee, n]) * 16, chunk_count=1, message=b"",
                          received_at=long_ago - n, junk=True)
    newer_received(bob, long_ago)
    net.start_node(bob)

    page.goto(login_url(net, bob))
    page.wait_for_selector("#inbox")
    assert page.inner_text("#inbox-junk") == junk_line(3)
    assert page.locator("#inbox-rows tr").count() == 1000

    net.cli(alice, "send", str(make_file(tmp_path / "spam.bin", 1000)), "--to", bob.address)
    # The live update: the new junk message takes the place of the oldest listed.
    page.wait_for_function(
        "() => document.querySelectorAll('#inbox-rows tr').length === 999", timeout=30_000)
    page.wait_for_selector(f"#inbox-junk:text-is('{junk_line(4)}')", timeout=10_000)
