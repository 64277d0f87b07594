"""A clip in the web inbox whose loading failed plays once the node can serve it (Debian's
chromium against a real server and nodes). Chromium reports a failed /media load in two
ways: an error (MEDIA_ERR_NETWORK after 30 refused retries, or a 404 before the download
reopened its file), or none at all: a 503 after a chunk did not come in 20 s stops the
clip for good where its data ends, and played it ends at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle
from tests.web.clip import make_webm
from tests.web.conftest import login_url, web_base
from tests.web.test_web_relative import sent_in_part_then_restarted, slow_sender_and_bob

pytestmark = pytest.mark.slow

# What the page saw, recorded from before app.js runs: the position where the clip's load
# failed, and the message's state changes (a new data-state, not the same one set again).
WATCH = """
window.failedAt = null;
window.stateChanges = 0;
document.addEventListener("error", (ev) => {
  if (ev.target instanceof HTMLMediaElement) window.failedAt = ev.target.currentTime;
}, true);
document.addEventListener("DOMContentLoaded", () => {
  const st = document.getElementById("msg-state");
  if (!st) return;
  new MutationObserver((records) => {
    for (const r of records) if (r.oldValue !== st.dataset.state) window.stateChanges++;
  }).observe(st, { attributes: true, attributeFilter: ["data-state"], attributeOldValue: true });
});
"""
PLAY = "(() => { const v = document.getElementById('player'); v.muted = true; v.play(); })()"
# Where a reloaded clip must go on from: within this many seconds of where it stopped.
# The page seeks to the very time; the test clip has a keyframe every second.
NEAR_S = 1.0


class MediaSeen:
    """The /media requests the page makes (as the browser sends them), the status of each
    answer, and the requests that finished (their whole body in)."""

    def __init__(self, page: Any) -> None:
        self.requests: list[Any] = []
        self.statuses: list[int] = []
        self.finished: list[Any] = []
        page.on("request", lambda r: self.requests.append(r) if "/media/" in r.url else None)
        page.on("response", lambda r: self.statuses.append(r.status)
                if "/media/" in r.url else None)
        page.on("requestfinished", lambda r: self.finished.append(r)
                if "/media/" in r.url else None)

    def loads(self) -> list[str]:
        """The clip's loads: one per URL (Chromium's own retries of a load ask the same
        URL, for the range it lacks; the page asks again with a new ?try=)."""
        return list(dict.fromkeys(r.url for r in self.requests))


def open_clip(net: LocalNetwork, page: Any, bob: NodeHandle, mid: str) -> MediaSeen:
    """bob's page of the message, with the page's watch installed from the start."""
    seen = MediaSeen(page)
    page.add_init_script(WATCH)
    page.goto(login_url(net, bob))
    page.goto(f"{web_base(bob)}/message/{mid}")
    page.evaluate("window.notReloaded = true")
    return seen


def restarted_with_part(net: LocalNetwork, tmp_path: Path, bob_extra: tuple[str, ...]
                        ) -> tuple[NodeHandle, NodeHandle, Path, str]:
    """alice sent bob a 6 s clip (about 2.9 MB: three 1 MiB chunks); bob holds part of
    it, and his node restarted while hers is stopped: the message is `retrying`."""
    # At 256 KiB/s the clip's first chunk takes 4 s; alice stops before the last.
    alice, bob = slow_sender_and_bob(net, 256 << 10, bob_extra=bob_extra)
    clip = make_webm(tmp_path / "clip.webm", seconds=6, bitrate=4_000_000)
    assert clip.stat().st_size > 2 << 20
    return alice, bob, clip, sent_in_part_then_restarted(net, alice, bob, clip)


def served_bytes(finished: list[Any], size: int) -> tuple[bytes, bool]:
    """The file as the finished /media answers (200 or 206) gave it, and whether they
    covered all of it."""
    got = bytearray(size)
    covered = bytearray(size)
    for req in finished:
        resp = req.response()
        if resp is None or resp.status not in (200, 206):
            continue
        body = resp.body()
        m = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
        first = int(m.group(1)) if m else 0
        got[first:first + len(body)] = body
        covered[first:first + len(body)] = b"\x01" * len(body)
    return bytes(got), all(covered)


@pytest.mark.parametrize("failure", [404, 503])
def test_a_clip_whose_first_load_failed_plays_once_it_is_in(
        net: LocalNetwork, browser_page: Any, tmp_path: Path, failure: int) -> None:
    """The page opens in `retrying`, and the clip's first load fails with no state change
    for two minutes (bob's next try). 404: no try since the restart, so the download has
    not reopened its file; the clip errs, and the page loaded it again at the next state
    change already. 503 (one try since the restart, `peerpost fetch`, opened the file):
    the second chunk is waited for 20 s, the body cut short, Chromium's retry waited for
    20 s more and answered 503. After that Chromium neither errs nor asks again: the page,
    which loaded a clip again only on an error, left it with its first 2 s, and Play
    ended it at once."""
    page = browser_page
    alice, bob, clip, mid = restarted_with_part(
        net, tmp_path, ("--retry-base", "120", "--retry-max", "120"))
    if failure == 503:
        net.cli(bob, "fetch", mid)
        net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "retrying"
                       and x["next_attempt"], 60, "bob's try to end in retrying")
    seen = open_clip(net, page, bob, mid)
    # The broken clip the user saw.
    if not any(s >= 400 for s in seen.statuses):  # else it came while the page loaded
        page.wait_for_event("response", lambda r: "/media/" in r.url and r.status >= 400,
                            timeout=90_000)
    assert [s for s in seen.statuses if s >= 400] == [failure]
    assert page.evaluate("window.stateChanges") == 0
    assert len(seen.loads()) == 1, seen.loads()

    alice.extra = []  # back uncapped: the cap was there to stop her midway
    net.start_node(alice)
    # bob tries now rather than in two minutes, as `peerpost fetch` does.
    net.cli(bob, "fetch", mid)
    page.wait_for_selector("#save", state="visible", timeout=150_000)
    page.evaluate(PLAY)
    # It plays: time goes on (a clip stopped short jumps to its end, 6 s, and ends).
    page.wait_for_function("() => { const v = document.getElementById('player'); "
                           "return v.currentTime >= 2 && !v.ended; }", timeout=20_000)
    page.wait_for_function("() => document.getElementById('player').ended", timeout=20_000)
    assert page.evaluate("window.notReloaded") is True
    # Every byte served is the clip's, and together they are the whole clip.
    got, whole = served_bytes(seen.finished, clip.stat().st_size)
    assert whole, [(r.url, r.headers.get("range")) for r in seen.requests]
    assert got == clip.read_bytes()


def test_a_clip_cut_off_mid_play_goes_on_where_it_stopped(
        net: LocalNetwork, browser_page: Any, tmp_path: Path) -> None:
    """bob watches a clip while it downloads and his node stops: Chromium's range requests
    are refused, and after its 30 retries (about 30 s) the clip fails, paused. bob's node
    starts again; at the next state change the page loads the clip again. It reloaded it
    at 0, paused; now it goes on near where it stopped, playing."""
    page = browser_page
    # About 5.7 MB of 12 s from a sender capped at 1 MiB/s: bob stops midway.
    alice, bob = slow_sender_and_bob(net, 1 << 20)
    clip = make_webm(tmp_path / "clip.webm", seconds=12, bitrate=4_000_000)
    mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["progress"] > 0, 60,
                   "part of the clip at bob")
    seen = open_clip(net, page, bob, mid)
    page.wait_for_selector("video#player[src]", timeout=30_000)
    page.evaluate(PLAY)
    page.wait_for_function("() => document.getElementById('player').currentTime >= 1",
                           timeout=30_000)
    base = web_base(bob)
    net.stop_node(bob)
    # Chromium gives up: an error once its retries were refused, or none when an HTTP
    # error answered a retry (the node closing).
    net.wait_until(lambda: page.evaluate("window.failedAt !== null")
                   or any(s >= 400 for s in seen.statuses), 90, "the clip's load to fail")
    stopped_at = page.evaluate("document.getElementById('player').currentTime")
    assert stopped_at >= 1
    assert len(seen.loads()) == 1

    bob.extra = ["--web", urlsplit(base).netloc]  # the same address: the page reconnects
    net.start_node(bob)
    # With no click, the page loads it again and it plays on from where it stopped.
    page.wait_for_function(
        f"() => {{ const v = document.getElementById('player'); "
        f"return !v.paused && v.currentTime >= {stopped_at + 1}; }}", timeout=60_000)
    played = page.evaluate("(() => { const p = document.getElementById('player').played; "
                           "return [p.length, p.start(0)]; })()")
    assert played[0] == 1 and abs(played[1] - stopped_at) <= NEAR_S, (played, stopped_at)
    assert page.evaluate("window.notReloaded") is True
    assert len(seen.loads()) >= 2 and seen.loads()[1].endswith("?try=1")


def test_a_clip_that_keeps_failing_is_not_asked_again_while_no_byte_comes(
        net: LocalNetwork, browser_page: Any, tmp_path: Path) -> None:
    """The sender stays away and bob tries every 2 s, so the message goes between
    `retrying` and `downloading` and no byte comes. The clip (played, stalled at the end
    of what bob holds, then refused with a 503) is not loaded again: a load would end
    where the first did. The page loaded it again at every state change after the stall,
    for nothing."""
    page = browser_page
    _, bob, _, mid = restarted_with_part(
        net, tmp_path, ("--retry-base", "0.5", "--retry-max", "2"))
    held = net.inbox_entry(bob, mid)
    assert held is not None and 0 < held["progress"] < 1
    seen = open_clip(net, page, bob, mid)
    page.wait_for_selector("video#player[src]", timeout=30_000)
    page.evaluate(PLAY)
    page.wait_for_function("() => window.stateChanges >= 10", timeout=120_000)
    assert len(seen.loads()) == 1, seen.loads()
    # The load is dead (Chromium asks no more: a 503, or a 404 before bob's first try
    # reopened the file), and still not asked again.
    if not any(s >= 400 for s in seen.statuses):
        page.wait_for_event("response", lambda r: "/media/" in r.url and r.status >= 400,
                            timeout=90_000)
    changes = page.evaluate("window.stateChanges")
    page.wait_for_function(f"() => window.stateChanges >= {changes + 5}", timeout=60_000)
    assert len(seen.loads()) == 1, seen.loads()
    now = net.inbox_entry(bob, mid)
    assert now is not None and now["progress"] == held["progress"], "no byte came"
    assert page.evaluate("window.notReloaded") is True
