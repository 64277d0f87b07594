"""How `peerpost contacts` and the web's contacts page show a retired key its server lists
again: once, as a key trusted before that only the user's accept brings back, not as a
stranger's new device or a changed key, nor as one its server no longer lists."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from crypto.codec import Fields
from crypto.identity import DeviceIdentity
from overlay.app import cli
from overlay.app.cli import contact_cells as cli_cells
from overlay.app.control_wire import NodeTooOld, reply_type
from overlay.app.operations import ControlOperations
from overlay.app.web import server as web
from overlay.mail.contacts import Contacts, PinResult
from overlay.mail.db import NodeDB

BOB = "bob@b.example"


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([n]) * 32)


def shown(tmp_path: Path, steps: Any) -> dict[str, Any]:
    """Bob's contact as `contacts --json` gives it after `steps(contacts)`."""
    with NodeDB.open(tmp_path) as db:
        c = Contacts(db)
        steps(c)
        ops = SimpleNamespace(contacts=c)
        (got,) = asyncio.run(ControlOperations.contacts_list(ops, Fields({}, "test")))  # type: ignore[arg-type]
        return dict(got)


def lines_of(text: list[str], fp: str) -> list[str]:
    return [line for line in text if fp in line]


def test_keys_retired_by_an_empty_listing_then_listed_again(tmp_path: Path) -> None:
    # A glitch on bob's server: one lookup lists no device, the next lists both again.
    one, two = ident(1).public, ident(2).public

    def steps(c: Contacts) -> None:
        c.pin_keys(BOB, [one.verify_key, two.verify_key], 10.0)
        assert c.retire_all(BOB, 20.0)
        assert c.pin_keys(BOB, [one.verify_key, two.verify_key], 30.0) is PinResult.CHANGED

    c = shown(tmp_path, steps)
    fps, notes = cli_cells(c)
    for fp in (one.fingerprint(), two.fingerprint()):
        (line,) = lines_of(fps, fp)  # once, not also as pending or as unlisted
        assert "listed again: not trusted until you accept it" in line
    text = "\n".join(notes)
    assert "KEY CHANGED" not in text and "NEW DEVICE KEY" not in text
    assert "RETIRED, IS LISTED AGAIN" in text and "`peerpost contacts accept`" in text

    fps, warn = web.contact_cells(c)
    for fp in (one.fingerprint(), two.fingerprint()):
        (line,) = lines_of(fps, fp)
        assert "now listed again: not trusted until you accept it" in line
    page = re.sub("<[^>]+>", "", " ".join(warn))
    assert "this may be someone else" not in page and "new device" not in page
    assert "is listed again" in page and "accept it" in page


def test_a_retired_key_listed_again_next_to_a_new_one(tmp_path: Path) -> None:
    # One key retired and listed again, a stranger's key next to it, a third gone for good.
    one, two, three, four = (ident(n).public for n in (1, 2, 3, 4))

    def steps(c: Contacts) -> None:
        c.pin_keys(BOB, [one.verify_key, two.verify_key, three.verify_key], 10.0)
        c.pin_keys(BOB, [one.verify_key], 20.0)
        assert c.pin_keys(BOB, [one.verify_key, two.verify_key, four.verify_key],
                          30.0) is PinResult.UNVOUCHED

    c = shown(tmp_path, steps)
    fps, notes = cli_cells(c)
    (line,) = lines_of(fps, two.fingerprint())
    assert "listed again" in line
    (line,) = lines_of(fps, four.fingerprint())
    assert line.endswith("(unvouched)")
    (line,) = lines_of(fps, three.fingerprint())
    assert "its server no longer lists it" in line
    text = "\n".join(notes)
    assert "NEW DEVICE KEY" in text and "RETIRED, IS LISTED AGAIN" in text
    fps, warn = web.contact_cells(c)
    (line,) = lines_of(fps, two.fingerprint())
    assert "now listed again" in line
    (line,) = lines_of(fps, three.fingerprint())
    assert "no longer trusted" in line
    page = " ".join(warn)
    assert "A new device that none of theirs confirmed" in page and "is listed again" in page


# Every state a contact reaches through its server's listings and the user's accept or
# dismiss, with the alerts it must raise (KEY CHANGED, NEW DEVICE KEY, LISTED AGAIN).
STATES: dict[str, tuple[Any, set[str]]] = {
    "pinned": (lambda c: c.pin_keys(BOB, [key(1)], 10.0), set()),
    "first message, not listed": (lambda c: c.note_signer(BOB, key(1), 10.0), {"new"}),
    "changed": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0), c.pin_keys(BOB, [key(2)], 20.0)),
                {"changed"}),
    "changed twice": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                                 c.pin_keys(BOB, [key(2)], 20.0),
                                 c.pin_keys(BOB, [key(3)], 30.0)), {"changed"}),
    "new device": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                              c.pin_keys(BOB, [key(1), key(2)], 20.0)), {"new"}),
    "a device retired": (lambda c: (c.pin_keys(BOB, [key(1), key(2)], 10.0),
                                    c.pin_keys(BOB, [key(1)], 20.0)), set()),
    "all retired": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0), c.retire_all(BOB, 20.0)),
                    set()),
    "listed again": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0), c.retire_all(BOB, 20.0),
                                c.pin_keys(BOB, [key(1)], 30.0)), {"again"}),
    "listed again with a new key": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                                               c.retire_all(BOB, 20.0),
                                               c.pin_keys(BOB, [key(1), key(2)], 30.0)),
                                    {"changed", "again"}),
    "listed again next to a new device": (
        lambda c: (c.pin_keys(BOB, [key(1), key(2)], 10.0), c.pin_keys(BOB, [key(1)], 20.0),
                   c.pin_keys(BOB, [key(1), key(2), key(3)], 30.0)), {"new", "again"}),
    "change accepted": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                                   c.pin_keys(BOB, [key(2)], 20.0), c.accept(BOB)), set()),
    "change dismissed": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                                    c.pin_keys(BOB, [key(2)], 20.0),
                                    c.dismiss_change(BOB)), set()),
    "listed again, accepted": (lambda c: (c.pin_keys(BOB, [key(1)], 10.0),
                                          c.retire_all(BOB, 20.0),
                                          c.pin_keys(BOB, [key(1)], 30.0), c.accept(BOB)),
                               set()),
}
# What `peerpost contacts` prints below the table, and writes in the row, for each alert.
WARNINGS = {"changed": "a contact's key has changed", "new": "nobody vouched",
            "again": "lists again a key it had stopped listing"}
NOTES = {"changed": "KEY CHANGED", "new": "NEW DEVICE KEY", "again": "IS LISTED AGAIN"}
PAGE = {"changed": "this may be someone else", "new": "none of theirs confirmed",
        "again": "is listed again"}


def key(n: int) -> bytes:
    return ident(n).public.verify_key


@pytest.mark.parametrize("state", STATES)
def test_the_warning_the_row_and_the_page_agree(tmp_path: Path, state: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    steps, alerts = STATES[state]
    c = shown(tmp_path, steps)
    out, err = contacts_output(monkeypatch, tmp_path, [c])
    row = " ".join(out.split())
    assert {a for a, text in WARNINGS.items() if text in err} == alerts
    assert {a for a, text in NOTES.items() if text in row} == alerts
    _, warn = web.contact_cells(c)
    assert {a for a, text in PAGE.items() if text in " ".join(warn)} == alerts
    for f in c["fingerprints"] + c["pending"] + c["unvouched"]:
        assert _spaced(f) in row  # every key the alerts are about is in the row
    assert ("\u2502" in out) and BOB in out


def contacts_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                    contacts: list[dict[str, Any]]) -> tuple[str, str]:
    """What `peerpost contacts` prints (stdout, stderr) for `contacts` as the node answers
    them, on a terminal wide enough that no cell wraps."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=400))
    monkeypatch.setattr(cli, "err_console", Console(file=err, width=400))
    monkeypatch.setattr(cli, "control_call", lambda *a, **kw: contacts)
    home = SimpleNamespace(control_path=tmp_path / "control")
    args = SimpleNamespace(action=None, json=False, address=None)
    assert cli.cmd_contacts(home, args) == 0  # type: ignore[arg-type]
    return out.getvalue(), err.getvalue()


def _spaced(fp: str) -> str:
    return " ".join(fp.split())


def test_the_row_and_the_page_say_when_the_keys_were_confirmed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bob's server answered a lookup at 10 and at 20; carol only wrote (never looked up).
    def steps(c: Contacts) -> None:
        c.pin_keys(BOB, [key(1)], 10.0)
        c.pin_keys(BOB, [key(1), key(2)], 20.0)
        c.note_signer("carol@c.example", key(3), 30.0)

    with NodeDB.open(tmp_path) as db:
        c = Contacts(db)
        steps(c)
        ops = SimpleNamespace(contacts=c)
        bob, carol = sorted(asyncio.run(ControlOperations.contacts_list(ops, Fields({}, "t"))),  # type: ignore[arg-type]
                            key=lambda x: x["address"])
    assert bob["keys_confirmed_at"] == 20.0 and carol["keys_confirmed_at"] is None
    out, _ = contacts_output(monkeypatch, tmp_path, [bob, carol])
    bob_rows, carol_rows = out.split("carol@c.example")  # bob's row, then carol's
    assert f"keys confirmed {cli._when(20.0)}" in bob_rows
    assert "keys confirmed" not in carol_rows
    _, notes = cli_cells(bob)
    assert notes[-1] == f"keys confirmed {cli._when(20.0)}"  # after what needs the user
    assert not [n for n in cli_cells(carol)[1] if "confirmed" in n]
    page = re.sub("<[^>]+>", "", " ".join(web.contact_cells(bob)[1]))
    assert f"Their server confirmed these devices {web._when(20.0)}." in page
    assert "confirmed these devices" not in " ".join(web.contact_cells(carol)[1])


def test_a_node_older_than_the_command_is_named_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node started before an upgrade answers `contacts` without `keys` and `alerts`:
    the table says to restart it; --json prints what the node sent."""
    old = reply_type("contacts")({"address": BOB, "fingerprints": ["ab cd"], "pending": [],
                                  "unvouched": [], "changed": False, "first_seen": 1.0})
    with pytest.raises(NodeTooOld, match=r"older than this peerpost: restart it .*"
                       r"answered `contacts` without `keys`"):
        contacts_output(monkeypatch, tmp_path, [old])
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    args = SimpleNamespace(action=None, json=True, address=None)
    assert cli.cmd_contacts(SimpleNamespace(control_path=tmp_path / "c"), args) == 0  # type: ignore[arg-type]
    assert '"address": "bob@' in out.getvalue()
