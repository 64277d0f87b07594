"""End to end: a node whose inbox or outbox holds more than the 1,000 messages `inbox` and
`status` list still finds, fetches, removes, shows and keeps cancelled every one of them,
through the `peerpost` CLI, between real node and server processes on loopback.

The 1,000 newer messages are written straight into the stopped node's node.db through
the Inbox and Outbox API (the network would take minutes to deliver them); what the
test then does goes through the CLI of the running node."""

from __future__ import annotations

import html
import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.mail.db import NodeDB
from overlay.mail.inbox import Inbox
from overlay.mail.outbox import Outbox, RecipientStatus
from tests.overlay.test_e2e_cli import make_file, same_bytes
from tests.web.test_web_access import request
from tests.web.test_web_actions import login

pytestmark = pytest.mark.slow

NEWER = 1000


def newer_received(node: NodeHandle, after: float) -> None:
    """NEWER messages received after `after` into the stopped `node`'s inbox."""
    with NodeDB.open(node.home) as db:
        inbox = Inbox(db)
        for n in range(NEWER):
            inbox.add(id=b"\x11" + n.to_bytes(15, "big"), sender="dave@example.net",
                      sender_peer_id=b"d" * 20, title=f"newer {n}", note="", size=1,
                      file_name=f"n{n}.bin", media_type="application/octet-stream",
                      content_id=n.to_bytes(32, "big"), chunk_count=1, message=b"",
                      received_at=after + 1 + n)


def _offered(net: LocalNetwork, src: Path) -> tuple[NodeHandle, NodeHandle, Path, str,
                                                     dict[str, Any]]:
    """Alice sends a file of 200,000 bytes at `src` to bob, whose node downloads only
    what he fetches: (alice, bob, the file, the message id, bob's inbox entry of it)."""
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    net.cli(bob, "prefs", "set", "auto-download", "off")
    make_file(src, 200_000, seed=5)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    entry = net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the message at bob")
    return alice, bob, src, mid, entry


def _first_event(base: str, cookie: str, mid: str) -> list[dict[str, Any]]:
    """The entries of the first `inbox` event the web inbox's page of `mid` gets."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    try:
        conn.request("GET", f"/events?id={mid}", headers={"Cookie": cookie})
        r = conn.getresponse()
        assert r.status == 200
        while not (line := r.fp.readline()).startswith(b"event: inbox"):
            assert line, "the stream ended"
        data = r.fp.readline()
        assert data.startswith(b"data: ")
        entries: list[dict[str, Any]] = json.loads(data[len(b"data: "):])
        return entries
    finally:
        conn.close()


def _other_prefix(mid: str) -> str:
    """Three hex digits no id of the test starts with but two old ones given them."""
    return "abc" if not mid.startswith("ab") else "cde"


def test_the_oldest_of_a_thousand_and_one_is_fetched_and_removed_by_its_prefix(
        net: LocalNetwork, tmp_path: Path) -> None:
    _, bob, src, mid, first = _offered(net, tmp_path / "old.bin")
    net.stop_node(bob)
    newer_received(bob, first["received_at"])
    # Two more old messages whose ids share three digits, and a third that shares two.
    two = _other_prefix(mid)
    with NodeDB.open(bob.home) as db:
        for n, head in enumerate((f"{two}0", f"{two}1", f"{two[:2]}{int(two[2], 16) + 1:x}0")):
            Inbox(db).add(id=bytes.fromhex(head + "0" * 28), sender="erin@example.net",
                          sender_peer_id=b"e" * 20, title=f"old {n}", note="", size=1,
                          file_name="o.bin", media_type="application/octet-stream",
                          content_id=bytes([n + 1]) * 32, chunk_count=1, message=b"",
                          received_at=first["received_at"] - 1 - n)
    net.start_node(bob)

    shown = net.cli(bob, "inbox").stdout
    assert mid[:8] not in shown
    # The lab's view finds it too (the tests' wait for a message's state).
    old = net.inbox_entry(bob, mid)
    assert old is not None and old["state"] == "offered" and old["title"] == "old.bin"
    assert (f"the 1,000 newest of {NEWER + 4:,} messages shown; `peerpost inbox --prune` "
            "removes old ones, `peerpost fetch ID` and `rm ID` find any") in shown, shown

    # The web inbox's page of it, and its live updates, are of it (not "removed").
    base, headers = login(net, bob)
    status, _, page = request(base, "GET", f"/message/{mid}", {"Cookie": headers["Cookie"]})
    assert status == 200 and b'<span id="msg-state"' in page and b"old.bin" in page
    _, _, page = request(base, "GET", "/", {"Cookie": headers["Cookie"]})
    assert (f"The 1,000 newest of {NEWER + 4:,} messages are shown. The older ones are kept: "
            "`peerpost fetch ID` and `peerpost rm ID` find them.") in html.unescape(page.decode())
    assert [e["state"] for e in _first_event(base, headers["Cookie"], mid)
            if e["id"] == mid] == ["offered"]

    res = net.cli(bob, "fetch", "--wait", "--json", mid[:8], timeout=90)
    got = json.loads(res.stdout)
    assert got["id"] == mid and got["state"] == "complete"
    assert same_bytes(src, Path(got["path"]))

    res = net.cli(bob, "rm", two, check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: '{two}' matches 2 messages; give more digits"
    res = net.cli(bob, "rm", two[:2], check=False)
    assert res.stderr.strip() == f"error: '{two[:2]}' matches 3 messages; give more digits"

    assert f"removed {mid[:12]}" in net.cli(bob, "rm", mid[:8]).stdout
    res = net.cli(bob, "fetch", mid[:8], check=False)
    assert res.returncode == 1
    assert f"no message '{mid[:8]}' in the inbox" in res.stderr
    assert Path(got["path"]).exists(), "rm without --delete-file keeps the received file"


def _newer_sent(node: NodeHandle, *, downloaded: bool) -> str:
    """NEWER messages sent after the one the stopped `node` sent (each `downloaded` by its
    recipient, or queued); that one's id."""
    with NodeDB.open(node.home) as db:
        outbox = Outbox(db)
        (sent,) = outbox.list()
        for n in range(NEWER):
            mid, at = b"\x11" + n.to_bytes(15, "big"), sent.created_at + 1 + n
            outbox.add(id=mid, path=f"/gone/{n}.bin", title=f"newer {n}", size=1,
                       content_id=n.to_bytes(32, "big"), created_at=at,
                       recipients=["dave@example.net"])
            if downloaded:
                outbox.set_recipient_state(mid, "dave@example.net", RecipientStatus.DOWNLOADED,
                                           at)
        return sent.id.hex()


def test_the_sent_page_past_a_thousand_says_so_and_asks_to_stay_on_for_an_older_one(
        net: LocalNetwork, tmp_path: Path) -> None:
    """The Sent page lists the newest 1,000; bob has yet to download the message before
    them, so the page asks to keep alice's computer on. It said neither: it read only the
    1,000 listed, all downloaded."""
    alice, bob, _, mid, _ = _offered(net, tmp_path / "old.bin")
    net.stop_node(alice)
    assert _newer_sent(alice, downloaded=True) == mid
    net.start_node(alice)

    base, headers = login(net, alice)
    cookie = {"Cookie": headers["Cookie"]}
    _, _, page = request(base, "GET", "/sent", cookie)
    text = html.unescape(page.decode())
    assert "old.bin" not in text
    assert (f"The 1,000 newest of {NEWER + 1:,} messages are shown. The older ones are kept: "
            "`peerpost status ID` finds them.") in text
    assert '<p id="sent-owed" class="warn">Keep this computer on' in text

    # Once bob has it, nobody needs alice's computer: the page says so no more.
    net.cli(bob, "fetch", "--wait", mid, timeout=90)
    net.wait_until(lambda: net.cli_json(alice, "status", mid)[0]["recipients"][0]["state"]
                   == "downloaded", 60, "bob's receipt at alice")
    _, _, page = request(base, "GET", "/sent", cookie)
    assert b"The 1,000 newest of" in page and b'id="sent-owed"' not in page


def test_a_cancel_older_than_a_thousand_sends_holds_after_a_restart(
        net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob, _, mid, _ = _offered(net, tmp_path / "draft.bin")
    net.cli(alice, "cancel", mid[:8])
    net.stop_node(alice)
    assert _newer_sent(alice, downloaded=False) == mid
    net.start_node(alice)

    (m,) = net.cli_json(alice, "status", mid[:8])
    assert m["id"] == mid
    assert [(r["address"], r["shown"], r["reason"]) for r in m["recipients"]] == [
        (bob.address, "cancelled", "cancelled by the sender")]
    listed = net.cli(alice, "status").stdout
    assert f"the 1,000 newest of {NEWER + 1:,} messages shown; `peerpost status ID` finds " \
        "any" in listed, listed

    # Bob asks for it after the sender's restart: refused as withdrawn, nothing received.
    res = net.cli(bob, "fetch", "--wait", mid[:8], check=False, timeout=90)
    assert res.returncode == 1
    assert "failed: withdrawn: the sender cancelled this message" in res.stderr, res.stderr
    files = [p for p in (bob.home / "received").rglob("*") if p.is_file()]
    assert all(p.suffix == ".part" for p in files), files
    assert all(not any(p.read_bytes()) for p in files), "no byte of it came"
