"""The web inbox as someone who never opens a terminal meets it (Debian's chromium against
a real server and nodes): every page says what happened and what to do next, in words."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from tests.overlay.test_e2e_trust import second_device
from tests.web.clip import make_jpeg
from tests.web.conftest import login_url, web_base

pytestmark = pytest.mark.slow

PHONE = {"width": 390, "height": 844}


def slow_sender_and_bob(net: LocalNetwork, rate: int, *, bob_extra: tuple[str, ...] = ()
                        ) -> tuple[NodeHandle, NodeHandle]:
    """alice, whose uploads are capped at `rate` bytes a second, and bob (started with
    `bob_extra`), both running."""
    alice = net.add_node("alice", extra=["--max-upload-rate", str(rate)])
    bob = net.add_node("bob", extra=list(bob_extra))
    net.start_node(alice)
    net.start_node(bob)
    return alice, bob


def sent_in_part_then_restarted(net: LocalNetwork, alice: NodeHandle, bob: NodeHandle,
                                path: Path) -> str:
    """alice sends bob `path`; once bob holds part of it, her node stops, and his restarts
    while hers is stopped: the message is `retrying`, with some of it in. Its id."""
    mid = net.cli(alice, "send", str(path), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["progress"] > 0, 60,
                   f"part of {path.name} at bob")
    net.stop_node(alice)
    net.stop_node(bob)
    net.start_node(bob)
    e = net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "retrying"
                       and x, 60, "bob to show retrying")
    assert 0 < e["progress"] < 1
    return mid


def test_signing_in_and_dead_links_say_the_way_forward(net: LocalNetwork,
                                                      browser_page: Any) -> None:
    page = browser_page
    (bob,) = net.start_nodes("bob")
    base = web_base(bob)
    # The bare address, before any sign-in: a page that says how to get in.
    page.goto(base + "/")
    assert "Not signed in" in page.inner_text("h1")
    assert "peerpost web" in page.inner_text("main")
    page.goto(base + "/login?token=wrong")
    assert "expired" in page.inner_text("h1") and "peerpost web" in page.inner_text("main")

    url = login_url(net, bob)
    page.goto(url)
    assert page.url == base + "/"
    assert "No messages yet" in page.inner_text("#inbox-empty")
    # The used link again (the back button, a reload, a bookmark) while signed in: the inbox.
    page.goto(base + "/prefs")
    page.goto(url)
    assert page.url == base + "/" and page.inner_text("h1") == "Inbox"
    # A message that is not (or no longer) here.
    page.goto(base + "/message/00ff00ff")
    assert "not in your inbox" in page.inner_text("h1")
    page.click("text=Back to the inbox")
    assert page.url == base + "/"


def test_a_photo_with_a_long_name_on_a_phone(net: LocalNetwork, browser_page: Any,
                                             tmp_path: Path) -> None:
    page = browser_page
    page.set_viewport_size(PHONE)
    alice, bob = net.start_nodes("alice", "bob")
    net.cli(bob, "prefs", "set", "auto-download", "off")
    name = "Familientreffen_am_See_mit_Oma_Ärger_und_Überraschung_" * 3 + ".jpg"
    photo = make_jpeg(tmp_path / name)
    mid = net.cli(alice, "send", str(photo), "--to", bob.address).stdout.strip()
    stored = net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the message at bob")
    base = web_base(bob)
    page.goto(login_url(net, bob))

    row = page.wait_for_selector(f'tr[data-id="{mid}"]')
    assert row.query_selector(".state").inner_text() == "not downloaded yet"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    row.query_selector("a").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.inner_text("#msg-state") == "not downloaded yet"
    assert not page.is_visible("#save")
    assert not page.is_visible("#msg-from")  # no empty "Coming from" heading
    # Downloading it: the page follows without a reload, and offers to save it at the end.
    page.click("button:text-is('Download it')")
    page.wait_for_selector("#save", state="visible", timeout=30_000)
    assert page.inner_text("#msg-state") == "received"
    # The photo shows once it has loaded: an <img> has no box before that (a loaded full
    # test run looked at once and found it not visible yet).
    page.wait_for_selector("img#player", state="visible", timeout=10_000)
    assert not page.is_visible("button:text-is('Download it')")
    with page.expect_download() as info:
        page.click("#save")
    saved = info.value
    assert saved.suggested_filename == stored["file_name"]
    assert Path(saved.path()).read_bytes() == photo.read_bytes()
    # Where the node keeps it (what Remove leaves in place).
    got = net.inbox_entry(bob, mid)
    assert got is not None and page.inner_text("#msg-path") == got["path"]

    # Junk and back: the page says what marking did, and how to undo it.
    page.click("text=Mark sender junk")
    page.wait_for_selector("#sender-note")
    assert "is on your junk list" in page.inner_text("#sender-note")
    # Her next message is left out of the list, and the list says so.
    net.cli(alice, "send", str(photo), "--to", bob.address)
    page.goto(base + "/")
    page.wait_for_selector("#inbox-junk:has-text('1 message from senders on your junk list')",
                           timeout=30_000)
    page.click("text=Preferences")
    assert alice.address in page.inner_text("#junk-senders")
    # What each choice does, in words: "delete" is the sender's own file.
    assert "delete them from this computer" in page.inner_text("select[name=retention]")
    page.select_option("select[name=auto-download]", "on")
    page.click("button:text-is('Save')")
    page.wait_for_selector("#flash:text-is('Saved.')")
    assert net.cli_json(bob, "prefs")["auto_download"] is True
    page.click(f"#junk-senders li:has-text('{alice.address}') button")
    page.wait_for_selector(f"#junk-senders:not(:has-text('{alice.address}'))")
    assert alice.address not in json.dumps(net.cli_json(bob, "prefs")["junk_senders"])
    # Not junk after all: what she sent meanwhile is in the list again, and can download.
    page.goto(base + "/")
    page.wait_for_selector("tr.msg >> nth=1")
    assert page.inner_text("#inbox-junk") == ""
    page.click("tr.msg >> nth=0 >> a")  # auto-download is on now: it comes by itself
    page.wait_for_selector("#save", state="visible", timeout=30_000)

    # Remove asks first; the back button then lands on a page that says it is gone.
    page.goto(f"{base}/message/{mid}")
    other = page.context.new_page()  # the same message open in a second tab
    other.goto(f"{base}/message/{mid}")
    page.bring_to_front()
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", answer)
    page.click("button:text-is('Remove')")
    page.wait_for_url(base + "/")
    assert asked and "Remove" in asked[0]
    assert page.locator(f'tr[data-id="{mid}"]').count() == 0
    page.go_back()
    assert "not in your inbox" in page.inner_text("h1")
    # The other tab says so by itself, and its buttons no longer act.
    other.wait_for_selector("#msg-gone", state="visible")
    assert other.is_disabled("button:text-is('Remove')")


def test_the_page_says_when_the_node_is_gone(net: LocalNetwork, browser_page: Any) -> None:
    page = browser_page
    (bob,) = net.start_nodes("bob")
    page.goto(login_url(net, bob))
    prefs = page.context.new_page()
    web_base_was = web_base(bob)
    prefs.goto(web_base_was + "/prefs")
    page.bring_to_front()
    # The mail server away (the internet down): the open page says so, and when it is back.
    assert net.server is not None
    net.server.stop()
    page.wait_for_selector("#server-down", state="visible", timeout=15_000)
    assert "Not connected to the mail server" in page.inner_text("#server-down")
    net.start_server()
    page.wait_for_selector("#server-down", state="hidden", timeout=30_000)
    # The node itself stopped.
    net.stop_node(bob)
    page.wait_for_selector("#offline", state="visible", timeout=10_000)
    assert "Lost contact with peerpost" in page.inner_text("#offline")
    # A button on a page opened before: it says so instead of doing nothing.
    prefs.click("button:text-is('Save')")
    prefs.wait_for_function("document.getElementById('flash').textContent !== ''")
    assert re.match(r"Could not reach peerpost .* Nothing was changed", prefs.inner_text("#flash"))
    # Started again (on the same port, as on 8470 by default), it still knows this
    # browser's sign-in: the page catches up by itself and its buttons work.
    bob.extra = ["--web", urlsplit(web_base_was).netloc]
    net.start_node(bob)
    page.wait_for_selector("#offline", state="hidden", timeout=15_000)
    prefs.click("button:text-is('Save')")
    prefs.wait_for_selector("#flash:has-text('Saved.')", timeout=10_000)
    # Signed out from the command line: the open page says so and what to do.
    net.cli(bob, "web", "--sign-out")
    page.wait_for_selector("#offline:has-text('signed out')", timeout=15_000)
    assert "peerpost web" in page.inner_text("#offline")


def test_a_photo_waiting_for_another_download_shows_once_it_is_in(
        net: LocalNetwork, browser_page: Any, tmp_path: Path) -> None:
    """A photo asked for while another download runs is `downloading` but waits its turn,
    with nothing held. Its page gave the <img> its source at once: /media answered 404,
    and the photo stayed broken after it arrived (a loaded run met the same 404 in the
    moment before a download opens its file)."""
    page = browser_page
    # At 256 KiB/s the first download (8 MiB) would run 32 s: the cancel ends it. The
    # photo (2400 x 1800, two 1 MiB chunks) takes 5 s: the page loads it mid-download.
    alice, bob = slow_sender_and_bob(net, 256 << 10)
    net.cli(bob, "prefs", "set", "auto-download", "off")
    (tmp_path / "film.bin").write_bytes(bytes(8 << 20))
    photo = make_jpeg(tmp_path / "garden.jpg", width=2400, height=1800)
    assert photo.stat().st_size > 1 << 20
    first, mid = (net.cli(alice, "send", str(f), "--to", bob.address).stdout.strip()
                  for f in (tmp_path / "film.bin", photo))
    net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the photo at bob")
    net.cli(bob, "fetch", first)
    media: list[Any] = []
    page.on("response", lambda r: media.append(r) if "/media/" in r.url else None)
    page.goto(login_url(net, bob))
    page.goto(f"{web_base(bob)}/message/{mid}")
    page.click("button:text-is('Download it')")
    waiting = "#msg-state:text-is('waiting for another download')"
    page.wait_for_selector(waiting, timeout=30_000)
    page.reload()  # the page as the server renders it in that state
    page.wait_for_selector(waiting)
    net.cli(bob, "cancel", first)
    page.wait_for_selector("#save", state="visible", timeout=60_000)
    page.wait_for_selector("img#player", state="visible", timeout=10_000)
    assert page.evaluate("document.getElementById('player').naturalWidth") == 2400
    # One fetch of the photo, whole: none before the node had any of it.
    assert [(r.status, r.body() == photo.read_bytes()) for r in media] == [(200, True)]


def test_an_offer_says_whether_it_downloads_by_itself(net: LocalNetwork, browser_page: Any,
                                                      tmp_path: Path) -> None:
    """An offered message that auto-download takes once the running download ends says
    `waiting to download`; one over auto-download-max waits for the user and says `not
    downloaded yet`. The words come from the node's `queued`, as `peerpost inbox` has it."""
    page = browser_page
    # 2 MiB at 128 KiB/s: the first download runs 16 s, the second offer waits all along.
    alice, bob = slow_sender_and_bob(net, 128 << 10)
    net.cli(bob, "prefs", "set", "auto-download-max", "3MiB")
    sent = []
    for name, size in (("first.bin", 2 << 20), ("second.bin", 2 << 20), ("big.bin", 4 << 20)):
        (tmp_path / name).write_bytes(bytes(size))
        sent.append(net.cli(alice, "send", str(tmp_path / name), "--to",
                            bob.address).stdout.strip())
    first, second, big = sent
    page.goto(login_url(net, bob))
    for mid, words in ((first, "downloading"), (second, "waiting to download"),
                       (big, "not downloaded yet")):
        page.wait_for_selector(f'tr[data-id="{mid}"] .state:text-is("{words}")',
                               timeout=30_000)
    waiting = net.inbox_entry(bob, second)
    assert waiting is not None and waiting["state"] == "offered" and waiting["queued"]
    page.goto(f"{web_base(bob)}/message/{second}")
    assert page.inner_text("#msg-state") == "waiting to download"


def test_a_cancelled_and_a_held_message_say_why_and_what_next(net: LocalNetwork,
                                                             browser_page: Any,
                                                             tmp_path: Path) -> None:
    page = browser_page
    # bob's download must still run when alice cancels it: from the send to the cancel took
    # 5.4-6.7 s with 3 copies at once at load ~7, against the 8 s that 8 MiB took at 1 MiB/s
    # (the sent page once showed 'has it' and no #sent-owed). At 128 KiB/s it takes 64 s;
    # the cancel ends it, so the test takes no longer.
    alice, bob = slow_sender_and_bob(net, 128 << 10)
    big = tmp_path / "film.bin"
    big.write_bytes(bytes(8 << 20))
    mid = net.cli(alice, "send", str(big), "--to", bob.address).stdout.strip()
    base = web_base(bob)
    page.goto(login_url(net, bob))
    page.goto(f"{base}/message/{mid}")
    page.wait_for_selector("#msg-state.state-downloading", timeout=30_000)
    # The sender's own inbox in another tab of the same browser (another port of the same
    # host): it says what the file still needs from her, and bob stays signed in.
    sent = page.context.new_page()
    sent.goto(login_url(net, alice))
    sent.goto(web_base(alice) + "/sent")
    assert "Keep this computer on" in sent.inner_text("#sent-owed")
    assert sent.inner_text("#sent td.state") in ("in their inbox, not downloaded yet",
                                                 "downloading it now")
    # The sender cancels: the open page follows, and says it in words.
    net.cli(alice, "cancel", mid)
    sent.reload()
    assert sent.inner_text("#sent td.state") == "cancelled"
    page.wait_for_selector("#msg-error", state="visible", timeout=30_000)
    assert page.inner_text("#msg-state").startswith("cancelled by the sender")
    assert page.inner_text("#msg-error-text") == ("The sender cancelled this message: it can "
                                                  "no longer be downloaded.")
    assert not page.is_visible("#msg-error-raw")  # the node's own words: under Details
    assert not page.is_visible("#cancel")

    # From a device of alice's that none of hers confirmed: on hold, and the way out.
    alice2 = second_device(net, "alice2", alice.address)
    photo = make_jpeg(tmp_path / "cake.jpg")
    held = net.cli(alice2, "send", str(photo), "--to", bob.address).stdout.strip()
    page.goto(f"{base}/message/{held}")
    page.wait_for_selector("#msg-state.state-unverified", timeout=30_000)
    assert page.inner_text("#msg-state") == "on hold: sender not confirmed"
    assert "accept it on the Contacts page" in page.inner_text("main")
    page.click("text=Contacts")
    assert "new device, not confirmed" in page.inner_text("#contacts")
    page.click("button:text-is('Accept')")
    page.wait_for_selector("button:text-is('Accept')", state="detached")  # reloaded
    page.goto(f"{base}/message/{held}")
    page.wait_for_selector("#save", state="visible", timeout=30_000)
    assert page.inner_text("#msg-state") == "received"


def test_a_photo_that_failed_to_load_shows_once_it_is_in(net: LocalNetwork, browser_page: Any,
                                                         tmp_path: Path) -> None:
    """bob holds part of a photo and his node restarts while alice, the sender, is stopped.
    His page, opened in `retrying`, gives the <img> its source, and its load fails: a 404
    before the download has reopened its file, else the chunk alice has not sent is waited
    for 20 s and the answer is a 503 or a body cut short (both seen). The page loaded the
    photo again only on a reload; now it does so by itself when the state moves on."""
    page = browser_page
    # At 256 KiB/s the photo's first 1 MiB chunk takes 4 s; alice stops before the second.
    alice, bob = slow_sender_and_bob(net, 256 << 10,
                                     bob_extra=("--retry-base", "0.5", "--retry-max", "2"))
    photo = make_jpeg(tmp_path / "garden.jpg", width=2400, height=1800)
    assert photo.stat().st_size > 1 << 20
    mid = sent_in_part_then_restarted(net, alice, bob, photo)
    media: list[Any] = []
    page.on("response", lambda r: media.append(r) if "/media/" in r.url else None)
    page.goto(login_url(net, bob))
    page.goto(f"{web_base(bob)}/message/{mid}")
    page.evaluate("window.notReloaded = true")
    # The broken photo the user saw: a 404, or a body cut short when the rest did not come.
    page.wait_for_function("(p => p.complete && p.naturalWidth === 0)"
                           "(document.getElementById('player'))", timeout=60_000)
    assert len(media) == 1, [r.status for r in media]

    alice.extra = []  # back uncapped: the cap was there to stop her midway
    net.start_node(alice)
    page.wait_for_selector("#save", state="visible", timeout=60_000)
    page.wait_for_selector("img#player", state="visible", timeout=10_000)
    assert page.evaluate("document.getElementById('player').naturalWidth") == 2400
    assert page.evaluate("window.notReloaded") is True
    # The photo as sent, from the last load; the first one is the failed one.
    assert (media[-1].status, media[-1].body()) == (200, photo.read_bytes()), [
        (r.status, r.url) for r in media]
    assert len(media) >= 2
