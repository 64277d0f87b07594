"""What the owner does in the web inbox besides reading: cancel a download, change
preferences, open it with `peerpost web`; and what /media answers while the only holder of
the missing chunks is gone. Real server and nodes, plain HTTP requests."""

from __future__ import annotations

import html
import random
import re
import stat
import time
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.app.operations import CANCELLED_TEXT
from tests.web.conftest import login_url, web_base
from tests.web.test_web_access import request

pytestmark = pytest.mark.slow

MiB = 1 << 20


def make_file(path: Path, size: int) -> Path:
    path.write_bytes(random.Random(3).randbytes(size))
    return path


def held_chunks(node: NodeHandle, count: int) -> list[bool]:
    """Which chunks the node's partial download holds, from its on-disk bitmap."""
    (have,) = node.home.rglob("partial/*.have")
    bitmap = have.read_bytes()
    return [bool(bitmap[i >> 3] & (1 << (i & 7))) for i in range(count)]


def cancel_hidden(page: bytes, mid: str) -> bool:
    """Whether the message page hides its Stop download button (app.js shows it again
    when the state says so)."""
    m = re.search(rb'<button id="cancel"([^>]*)>', page)
    assert m is not None and f'data-action="/api/message/{mid}/cancel"'.encode() in m[1]
    return b" hidden" in m[1]


def login(net: LocalNetwork, node: NodeHandle) -> tuple[str, dict[str, str]]:
    """(base URL, headers of a logged-in POST carrying the CSRF token)."""
    base = web_base(node)
    status, headers, _ = request(base, "GET", login_url(net, node)[len(base):])
    assert status == 303
    cookie = headers["set-cookie"].split(";")[0]
    _, _, page = request(base, "GET", "/", {"Cookie": cookie})
    csrf = page.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    return base, {"Cookie": cookie, "X-CSRF-Token": csrf, "Content-Type": "application/json"}


def test_cancel_resume_and_503_when_the_holder_is_gone(net: LocalNetwork,
                                                       tmp_path: Path) -> None:
    # 16 MiB at 1 MiB/s: 16 s of download to act in.
    alice = net.add_node("alice", extra=["--max-upload-rate", str(MiB)])
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(alice)
    net.start_node(bob)
    data = make_file(tmp_path / "film.bin", 16 * MiB).read_bytes()
    mid = net.cli(alice, "send", str(tmp_path / "film.bin"), "--to", bob.address).stdout.strip()
    base, post = login(net, bob)
    get = {"Cookie": post["Cookie"]}

    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["progress"] >= 2 / 16,
                   30, "bob's first chunks")
    # A range inside what is held comes from the partial file, byte-equal.
    at = held_chunks(bob, 16).index(True) * MiB + 1000
    status, headers, body = request(base, "GET", f"/media/{mid}",
                                    {**get, "Range": f"bytes={at}-{at + 999}"})
    assert status == 206 and headers["content-range"] == f"bytes {at}-{at + 999}/{len(data)}"
    assert body == data[at:at + 1000]

    # The message page offers Cancel while it downloads; cancel stops it.
    _, _, page = request(base, "GET", f"/message/{mid}", get)
    assert not cancel_hidden(page, mid)
    status, _, _ = request(base, "POST", f"/api/message/{mid}/cancel", post, b"{}")
    assert status == 200
    e = net.inbox_entry(bob, mid)
    assert e is not None and e["state"] == "failed" and e["error"] == CANCELLED_TEXT
    held = e["progress"]
    time.sleep(2.0)  # a cancelled download must not start again by itself
    e = net.inbox_entry(bob, mid)
    assert e is not None and e["state"] == "failed" and e["progress"] == held
    _, _, page = request(base, "GET", f"/message/{mid}", get)
    assert cancel_hidden(page, mid) and CANCELLED_TEXT.encode() in page
    assert re.search(rb"id=\"msg-state\"[^>]*>stopped \d+%<", page)  # in words
    # Cancelling what does not run is refused with the reason.
    status, _, text = request(base, "POST", f"/api/message/{mid}/cancel", post, b"{}")
    assert status == 400 and b"is failed, not downloading" in text

    # Fetch goes on from the chunks kept.
    assert request(base, "POST", f"/api/message/{mid}/fetch", post, b"{}")[0] == 200
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "downloading"
                   and e["progress"] > held, 30, "the download going on")

    # The only holder leaves mid-download: a range not held waits for it, then 503.
    net.stop_node(alice)
    held = held_chunks(bob, 16)
    assert not all(held)
    gap, have = held.index(False) * MiB, held.index(True) * MiB
    t0 = time.monotonic()
    status, headers, _ = request(base, "GET", f"/media/{mid}",
                                 {**get, "Range": f"bytes={gap}-{gap + 99}"})
    waited = time.monotonic() - t0
    assert status == 503 and int(headers["retry-after"]) > 0
    assert 19 <= waited <= 30, waited
    # What was held still comes.
    status, _, body = request(base, "GET", f"/media/{mid}",
                              {**get, "Range": f"bytes={have}-{have + 99}"})
    assert status == 206 and body == data[have:have + 100]


def test_preferences_change_through_the_page(net: LocalNetwork) -> None:
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(bob)
    base, post = login(net, bob)
    _, _, page = request(base, "GET", "/prefs", {"Cookie": post["Cookie"]})
    for name in (b'name="auto-download"', b'name="auto-download-max"', b'name="retention"'):
        assert name in page

    body = b'{"auto-download": "off", "auto-download-max": "200MB", "retention": "delete"}'
    # Without the CSRF token nothing changes.
    no_csrf = {k: v for k, v in post.items() if k != "X-CSRF-Token"}
    assert request(base, "POST", "/api/prefs", no_csrf, body)[0] == 403
    assert net.cli_json(bob, "prefs")["auto_download"] is True

    status, _, _ = request(base, "POST", "/api/prefs", post, body)
    assert status == 200
    prefs = net.cli_json(bob, "prefs")
    assert prefs["auto_download"] is False
    assert prefs["auto_download_max"] == 200_000_000
    assert prefs["retention"] == "delete"
    _, _, page = request(base, "GET", "/prefs", {"Cookie": post["Cookie"]})
    assert b'<option value="off" selected>' in page and b'value="200 MB"' in page

    # A bad value is refused with the reason, the good ones before it stay.
    status, _, text = request(base, "POST", "/api/prefs", post,
                              b'{"auto-download": "on", "auto-download-max": "lots"}')
    assert status == 400 and b"not a size" in text
    assert net.cli_json(bob, "prefs")["auto_download_max"] == 200_000_000
    status, _, text = request(base, "POST", "/api/prefs", post, b'{"retention": "burn"}')
    assert status == 400 and b"retention is one of keep, delete, archive" in text
    assert request(base, "POST", "/api/prefs", post, b'{"archive-dir": "/"}')[0] == 400


def test_not_junk_of_a_sender_junked_by_domain_takes_the_domain_off(
        net: LocalNetwork, tmp_path: Path) -> None:
    # The message page's "Not junk" asked to take the sender's address off the junk list;
    # for a sender junked by `@domain` that was refused ("... is not in the junk list"),
    # and the message stayed junk.
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(alice)
    net.start_node(bob)
    domain = "@" + alice.address.split("@")[1]
    net.cli(bob, "prefs", "junk", "add", domain)
    mid = net.cli(alice, "send", str(make_file(tmp_path / "a.bin", 4096)), "--to",
                  bob.address).stdout.strip()
    net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the junk message")
    base, post = login(net, bob)
    _, _, page = request(base, "GET", f"/message/{mid}", {"Cookie": post["Cookie"]})
    note = page.split(b'id="sender-note">')[1].split(b"</p>")[0].decode()
    assert f"is on your junk list (all of {domain})" in note
    assert f">Not junk: all of {domain}</button>" in note
    found = re.search(r"data-body='([^']*)'", note)
    assert found is not None
    status, _, text = request(base, "POST", "/api/sender", post,
                              html.unescape(found[1]).encode())
    assert status == 200, text
    assert net.cli_json(bob, "prefs")["junk_senders"] == []
    net.wait_complete(bob, mid, 60, "the message of a sender no longer junk")


def test_peerpost_web_opens_the_login_url_in_the_browser(net: LocalNetwork,
                                                         tmp_path: Path) -> None:
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(bob)
    got = tmp_path / "opened.txt"
    script = tmp_path / "fake-browser"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {got}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    net.env["BROWSER"] = str(script)
    try:
        res = net.cli(bob, "web")
    finally:
        del net.env["BROWSER"]
    url = got.read_text()
    base = web_base(bob)
    assert url.startswith(f"{base}/login?token=") and res.stdout.strip() == ""
    # The URL it opened logs in (once).
    status, headers, _ = request(base, "GET", url[len(base):])
    assert status == 303 and headers["location"] == "/"
    assert not (bob.home / "web_token").exists()


def test_try_again_after_the_sender_was_told_says_so_and_ends(net: LocalNetwork,
                                                              tmp_path: Path) -> None:
    """Alice edits the file after sending: bob's download fails (source changed), his node
    tells hers he will not download it, and she, nobody else to serve, stops serving it.
    Bob's Try again in the web inbox: the page says at once that alice was told, and the
    try ends failed in words. It waited at 'waiting for the sender' for ever."""
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(alice)
    src = make_file(tmp_path / "clip.bin", MiB)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    src.write_bytes(b"edited")
    net.start_node(bob)
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "failed",
                   60, "bob's download to fail")
    assert bob.proc is not None
    net.wait_until(lambda: f"told {alice.address} that message {mid}" in bob.proc.log(), 30,
                   "bob's decline to go")
    net.wait_until(lambda: net.cli_json(alice, "status")[0]["retention_done"] is not None,
                   30, "alice to stop serving it")
    base, post = login(net, bob)
    get = {"Cookie": post["Cookie"]}
    assert request(base, "POST", f"/api/message/{mid}/fetch", post, b"{}")[0] == 200
    _, _, page = request(base, "GET", f"/message/{mid}", get)
    told = (f"{alice.address} was told you would not download this (source changed), and "
            "may have stopped serving it").encode()
    assert told in page, page
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "failed",
                   60, "the try to end")
    _, _, page = request(base, "GET", f"/message/{mid}", get)
    assert (f"No computer that has this file answered. {alice.address} was told you would "
            "not download it").encode() in page, page
