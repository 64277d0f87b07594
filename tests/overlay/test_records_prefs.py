"""Preferences: defaults, checked settings, sender lists and classification."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.mail.db import NodeDB, RecordLimitError, RecordsError
from overlay.mail.prefs import MAX_SENDER_RULES, Prefs, sender_pattern


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def test_defaults(db: NodeDB) -> None:
    assert Prefs(db).as_dict() == {
        "auto_download": True, "retention": "keep", "archive_dir": None,
        "max_upload_rate": None, "auto_download_max": 2 * 1024**3,
        "priority_senders": [], "junk_senders": [],
    }


def test_settings_persist(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        p = Prefs(db)
        p.auto_download = False
        p.retention = "archive"
        p.archive_dir = "/srv/sent"
        p.max_upload_rate = 2_000_000
    with NodeDB.open(tmp_path) as db:
        p = Prefs(db)
        assert (p.auto_download, p.retention, p.archive_dir, p.max_upload_rate) == (
            False, "archive", "/srv/sent", 2_000_000,
        )
        p.max_upload_rate = None
        assert p.max_upload_rate is None


def test_bad_settings_are_refused_with_the_rule(db: NodeDB) -> None:
    p = Prefs(db)
    with pytest.raises(ValueError, match="retention is one of keep, delete, archive"):
        p.retention = "shred"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="max_upload_rate"):
        p.max_upload_rate = -5
    with pytest.raises(ValueError, match="true or false"):
        p.auto_download = "yes"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="archive_dir"):
        p.archive_dir = ""
    assert p.retention == "keep" and p.max_upload_rate is None


def test_damaged_stored_value_is_reported(db: NodeDB) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO pref (name, value) VALUES ('retention', x'c1')")
    with pytest.raises(RecordsError, match="stored preference retention is damaged"):
        _ = Prefs(db).retention


def test_classify_address_beats_domain(db: NodeDB) -> None:
    p = Prefs(db)
    assert p.add_junk("@Spam.Example") == "@spam.example"
    p.add_priority("Friend@spam.example")
    p.add_priority("@work.example")
    assert p.classify("friend@spam.example") == "priority"
    assert p.classify("anyone@spam.example") == "junk"
    assert p.classify("boss@work.example") == "priority"
    assert p.classify("x@sub.spam.example") == "normal"  # a domain rule is that domain only
    assert p.classify("stranger@elsewhere.example") == "normal"
    assert p.classify("not an address") == "junk"
    # Which rule decides, for an undo that takes off the right one.
    assert p.rule_for("Friend@spam.example") == ("friend@spam.example", "priority")
    assert p.rule_for("anyone@spam.example") == ("@spam.example", "junk")
    assert p.rule_for("stranger@elsewhere.example") is None


def test_a_pattern_is_on_one_list_only(db: NodeDB) -> None:
    p = Prefs(db)
    p.add_junk("bob@b.example")
    p.add_priority("bob@b.example")
    assert p.priority_senders() == {"bob@b.example"}
    assert p.junk_senders() == frozenset()
    assert p.list_of("BOB@b.example") == "priority"
    assert not p.remove_sender("bob@b.example", "junk")  # not on that list: kept
    assert p.classify("bob@b.example") == "priority"
    assert p.remove_sender("BOB@b.example", "priority")
    assert not p.remove_sender("bob@b.example", "priority")
    assert p.list_of("bob@b.example") is None
    assert p.classify("bob@b.example") == "normal"


def test_patterns_are_checked_and_bounded(db: NodeDB) -> None:
    with pytest.raises(ValueError):
        sender_pattern("@")
    with pytest.raises(ValueError):
        sender_pattern("bob@@x")
    p = Prefs(db)
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO sender_rule (pattern, kind) VALUES (?, 'junk')",
            [(f"@d{i}.example",) for i in range(MAX_SENDER_RULES)],
        )
    with pytest.raises(RecordLimitError):
        p.add_junk("@one-more.example")
    p.add_priority("@d0.example")  # moving an existing pattern is still allowed
    assert "@d0.example" in p.priority_senders()
