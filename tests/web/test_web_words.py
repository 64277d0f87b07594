"""What the web inbox calls each state and each reason a download stopped or waits: words
a receiver understands, and the way forward (the node's own text stays under Details)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from overlay.app.operations import CANCELLED_TEXT
from overlay.app.web.server import _limit, error_text, state_text
from overlay.mail.downloads import told_no_source_text
from overlay.transfer.downloader import SOURCE_CHANGED_FAILURE, WITHDRAWN_FAILURE

# The text an earlier version recorded in node.db; such rows still read the same.
OLD_SOURCE_CHANGED = ("source changed: the sender's file was edited, moved or deleted after "
                      "it was sent; ask them to send it again (`peerpost resend`)")


def entry(state: str, error: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"state": state, "error": error, "junk": False, "size": 1000, "queued": False,
            "next_attempt": None, "from": "alice@example.net", **kw}


# `queued` as the node gives it: true for one downloading that waits its turn, and for one
# offered that auto-download takes (on, at most auto-download-max, not a junk sender's).
@pytest.mark.parametrize(("e", "want"), [
    (entry("offered", queued=True), "waiting to download"),
    (entry("offered"), "not downloaded yet"),  # auto-download off, or over its limit
    (entry("offered", junk=True), "not downloaded (junk sender)"),
    (entry("unverified"), "on hold: sender not confirmed"),
    (entry("retrying"), "waiting for the sender"),
    (entry("downloading"), "downloading"),
    (entry("downloading", queued=True), "waiting for another download"),
    (entry("complete"), "received"),
    (entry("failed", CANCELLED_TEXT), "stopped"),
    (entry("failed", WITHDRAWN_FAILURE), "cancelled by the sender"),
    (entry("failed", SOURCE_CHANGED_FAILURE), "the sender's file changed"),
    (entry("failed", OLD_SOURCE_CHANGED), "the sender's file changed"),
    (entry("failed", "ValueError: x"), "failed"),
])
def test_states_in_words(e: dict[str, Any], want: str) -> None:
    assert state_text(e) == want


@pytest.mark.parametrize(("e", "starts"), [
    (entry("downloading"), ""),
    (entry("retrying", "no source reachable for 3 missing chunks (9b4c: tcp: [Errno 111])"),
     "No computer that has this file can be reached right now (is alice@example.net's"),
    (entry("retrying", "the disk is full: cannot write /x.part (No space left on device)"),
     "This computer's disk is full: delete files you no longer need."),
    (entry("retrying", "could not look up the sender"), "The download was interrupted."),
    (entry("failed", CANCELLED_TEXT), "You stopped this download."),
    (entry("failed", WITHDRAWN_FAILURE), "The sender cancelled this message"),
    (entry("failed", SOURCE_CHANGED_FAILURE), "The sender's file was changed"),
    (entry("failed", OLD_SOURCE_CHANGED), "The sender's file was changed"),
    (entry("failed", "DownloadFailed: bad chunk"), "The download failed. “Try again”"),
    (entry("failed", told_no_source_text("alice@example.net", "source changed",
                                         "no source reachable (9b4c: no content 0101)")),
     "No computer that has this file answered. alice@example.net was told you would not"),
])
def test_why_a_download_stopped_in_words(e: dict[str, Any], starts: str) -> None:
    text = error_text(e)
    assert text.startswith(starts) if starts else text == ""
    assert "Errno" not in text and "`" not in text and "9b4c" not in text


def test_the_next_try_is_a_time_of_day() -> None:
    e = entry("retrying", "no source reachable for 1 missing chunks ()",
              next_attempt=1_800_000_000.0)
    assert re.search(r"goes on by itself \(next try at \d\d:\d\d:\d\d\)\.$", error_text(e))


@pytest.mark.parametrize(("n", "want"), [
    (None, "none"), (2 << 30, "2 GiB"), (200_000_000, "200 MB"), (5 * (1 << 20), "5 MiB"),
    (1234, "1234"), (3000, "3 KB"),
])
def test_a_limit_reads_back_as_written(n: int | None, want: str) -> None:
    assert _limit(n) == want
