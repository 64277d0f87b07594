"""What the user reads about a server that does not prove the pinned key, and the note a
starting node leaves in its home while it waits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.app.cli import main
from overlay.app.home import NodeHome
from overlay.app.operations import key_mismatch_text
from rendezvous.client_core import ServerIdentityError
from rendezvous.domainkey import fingerprint

PINNED, OTHER = b"\x01" * 32, b"\x02" * 32


def test_another_key_names_both_fingerprints() -> None:
    text = key_mismatch_text("rv.example.net:4500", ServerIdentityError(PINNED, OTHER, "x"))
    assert text == (f"the server at rv.example.net:4500 presented another key than the one "
                    f"pinned for it (pinned {fingerprint(PINNED)}, presented "
                    f"{fingerprint(OTHER)})")


@pytest.mark.parametrize("pinned", [PINNED, None])
def test_the_right_key_not_proven_points_at_a_proxy(pinned: bytes | None) -> None:
    text = key_mismatch_text("h:1", ServerIdentityError(pinned, PINNED, "x"))
    assert text == (f"the server at h:1 shows the key {fingerprint(PINNED)} but does not prove "
                    "it over this connection (a proxy terminating TLS in between?)")


def test_the_login_wait_note_round_trips_and_garbage_reads_as_none(tmp_path: Path) -> None:
    home = NodeHome(tmp_path)
    assert home.login_wait() is None
    home.note_login_wait("why", 1234.5)
    assert home.login_wait() == ("why", 1234.5)
    for bad in ("{", "[]", json.dumps({"why": 1, "next_try": 2}),
                json.dumps({"why": "w", "next_try": True})):
        home.login_wait_path.write_text(bad)
        assert home.login_wait() is None
    home.note_login_wait(None)
    assert not home.login_wait_path.exists()
    home.note_login_wait(None)  # twice is fine


@pytest.mark.parametrize("value", ["0", "-1", "soon", "86400"])
def test_mismatch_retry_takes_seconds_above_zero(value: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path), "node", "--mismatch-retry", value])
    assert exc.value.code == 2
    assert "--mismatch-retry" in capsys.readouterr().err
