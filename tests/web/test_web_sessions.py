"""Web sessions kept in the home folder (one layer: WebAuth with its clock; the real node
and its restart are in test_web_access.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from overlay.app.web.auth import (
    MAX_SESSIONS,
    SESSION_IDLE,
    TOUCH_EVERY,
    WebAuth,
    issue_login_token,
    sign_out_all,
)
from overlay.app.web.auth import log as auth_log
from tests.present import present


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _signed_in(home: Path, clock: Clock) -> tuple[WebAuth, str]:
    auth = WebAuth(home / "web_token", home / "web_sessions", wall=clock)
    token = issue_login_token(home, clock())
    session = auth.redeem(token, clock())
    assert session is not None
    return auth, session.sid


def test_a_session_ends_after_thirty_idle_days_and_lives_while_used(tmp_path: Path) -> None:
    clock = Clock()
    auth, sid = _signed_in(tmp_path, clock)
    for _ in range(3):  # used every 20 days: it stays, across restarts too
        clock.t += SESSION_IDLE * 2 / 3
        auth = WebAuth(tmp_path / "web_token", tmp_path / "web_sessions", wall=clock)
        assert auth.session(sid) is not None
    clock.t += SESSION_IDLE + 1
    auth = WebAuth(tmp_path / "web_token", tmp_path / "web_sessions", wall=clock)
    assert auth.session(sid) is None


def test_use_is_saved_at_most_hourly(tmp_path: Path) -> None:
    clock = Clock()
    auth, sid = _signed_in(tmp_path, clock)
    saved = (tmp_path / "web_sessions").stat().st_mtime_ns
    clock.t += TOUCH_EVERY / 2
    assert auth.session(sid) is not None
    assert (tmp_path / "web_sessions").stat().st_mtime_ns == saved
    clock.t += TOUCH_EVERY
    assert auth.session(sid) is not None
    used = json.loads((tmp_path / "web_sessions").read_text())
    assert [v["used"] for v in used.values()] == [clock.t]


def test_the_least_recently_used_session_goes_first(tmp_path: Path) -> None:
    clock = Clock()
    auth, first = _signed_in(tmp_path, clock)
    sids = [first]
    for _ in range(MAX_SESSIONS - 1):
        clock.t += 1
        sids.append(present(auth.redeem(issue_login_token(tmp_path, clock()), clock())).sid)
    assert auth.session(first) is not None  # used: now the most recent
    clock.t += 1
    auth.redeem(issue_login_token(tmp_path, clock()), clock())
    assert auth.session(first) is not None
    assert auth.session(sids[1]) is None  # the one unused longest went
    again = WebAuth(tmp_path / "web_token", tmp_path / "web_sessions", wall=clock)
    assert again.session(first) is not None and again.session(sids[1]) is None


@pytest.mark.parametrize("damage", [b"", b"{not json", b"[1, 2]", b'{"k": {"csrf": 1}}',
                                    b"\xff\xfe"])
def test_a_damaged_sessions_file_signs_everyone_out_and_is_replaced(
        tmp_path: Path, damage: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    _, sid = _signed_in(tmp_path, clock)
    (tmp_path / "web_sessions").write_bytes(damage)
    # Caught at the module's logger itself, its level set here: in a full run a simulator
    # test earlier in the same worker sets the `overlay` logger to ERROR (sim.scenario
    # quiets the nodes it runs), and caplog's root handler then hears nothing.
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    monkeypatch.setattr(auth_log, "disabled", False)
    old_level = auth_log.level
    auth_log.setLevel(logging.WARNING)
    auth_log.addHandler(handler)
    try:
        auth = WebAuth(tmp_path / "web_token", tmp_path / "web_sessions", wall=clock)
    finally:
        auth_log.removeHandler(handler)
        auth_log.setLevel(old_level)
    assert any("every browser must sign in again" in m for m in seen), seen
    assert auth.session(sid) is None
    _, again = _signed_in(tmp_path, clock)  # signing in writes a good file
    assert WebAuth(tmp_path / "web_token", tmp_path / "web_sessions",
                   wall=clock).session(again) is not None


def test_sign_out_reaches_a_running_inbox(tmp_path: Path) -> None:
    clock = Clock()
    auth, sid = _signed_in(tmp_path, clock)
    assert sign_out_all(tmp_path) is True
    assert auth.session(sid) is None
    assert sign_out_all(tmp_path) is False
