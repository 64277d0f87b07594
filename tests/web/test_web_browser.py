"""The web inbox in a real browser (Debian's chromium via Playwright) against a real
server and nodes: live inbox rows, and a clip that plays while it is still arriving."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork
from tests.web.clip import make_webm
from tests.web.conftest import login_url, web_base

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_live_inbox_and_playback_while_downloading(net: LocalNetwork, browser_page: Any,
                                                   artifacts: Path, tmp_path: Path) -> None:
    page = browser_page
    # About 22 MiB of 15 s VP8 (1.5 MiB/s of media) from a sender capped at 2.5 MiB/s:
    # the download takes ~9 s, so playing and seeking happen while it runs.
    alice = net.add_node("alice", extra=["--max-upload-rate", str(int(2.5 * MiB))])
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(alice)
    net.start_node(bob)
    clip = make_webm(tmp_path / "clip.webm")

    page.goto(login_url(net, bob))
    assert page.url == web_base(bob) + "/"
    page.wait_for_selector("#inbox")

    mid = net.cli(alice, "send", str(clip), "--to", bob.address,
                  "--title", "<b>Grandma</b> & the cake").stdout.strip()
    # The row appears without a reload (server-sent events), its title escaped.
    row = page.wait_for_selector(f'tr[data-id="{mid}"]', timeout=30_000)
    assert row.query_selector(".title").inner_text() == "<b>Grandma</b> & the cake"
    page.wait_for_selector(f'tr[data-id="{mid}"] .state-downloading', timeout=30_000)
    page.screenshot(path=str(artifacts / "inbox.png"))

    page.goto(f"{web_base(bob)}/message/{mid}")
    video = page.wait_for_selector("video#player")
    assert video is not None
    page.evaluate("() => { const v = document.getElementById('player'); v.muted = true; "
                  "return v.play(); }")
    page.wait_for_function("() => document.getElementById('player').currentTime >= 2",
                           timeout=30_000)
    entry = net.inbox_entry(bob, mid)
    assert entry is not None and entry["state"] == "downloading", entry
    assert "downloading" in page.inner_text("#msg-state")
    # Where it comes from, by name (not a peer id) and in words.
    assert page.inner_text("#msg-sources li").startswith(f"{alice.address}, direct: ")
    page.screenshot(path=str(artifacts / "player.png"))

    duration = page.evaluate("() => document.getElementById('player').duration")
    assert 14 <= duration <= 16
    target = 0.8 * duration
    t0 = time.monotonic()
    page.evaluate(f"() => {{ document.getElementById('player').currentTime = {target}; }}")
    page.wait_for_function(
        f"() => {{ const v = document.getElementById('player'); "
        f"return !v.seeking && v.currentTime > {target + 0.05} && !v.paused; }}",
        timeout=10_000)
    # That it plays there is the test; how soon is `python -m benchmarks playback`'s
    # (target < 3 s). Here, beside a loaded machine's other tests, it took 2.0-3.0 s.
    print(f"seek to {target:.1f} s played after {time.monotonic() - t0:.2f} s")
    page.screenshot(path=str(artifacts / "player-seek.png"))

    net.cli(alice, "prefs", "set", "max-upload-rate", "none")  # played while it ran: done
    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert Path(got["path"]).read_bytes() == clip.read_bytes()
