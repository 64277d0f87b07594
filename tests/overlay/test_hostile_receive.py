"""A receiving node against hostile messages: each reproduced failure, as a unit test.

A full inbox, file names too long in bytes or blank, layouts of millions of tiny chunks,
terminal escapes in titles, a symlink planted where the `.part` file goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from crypto.content import check_layout
from crypto.envelope import seal_for_recipients
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.location import (
    Description,
    Handle,
    Headers,
    LocationMessage,
    decode_location,
)
from overlay.app import cli
from overlay.app.home import NodeHome
from overlay.content.catalog import ContentStore
from overlay.content.diskio import PARTIAL_DIR, safe_file_name
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB, RecordLimitError
from overlay.mail.downloads import DownloadQueue
from overlay.mail.inbox import DEFAULT_MAX_ENTRIES, Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox
from overlay.mail.prefs import Prefs, parse_size
from tests.present import present

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)
GiB = 1 << 30


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def location(n: int, *, size: int = 1000, chunk: int = 1 << 20, name: str = "clip.ts",
             title: str = "clip") -> LocationMessage:
    return LocationMessage(
        headers=Headers(message_id=n.to_bytes(16, "big"), sender="alice@example.net",
                        sender_peer_id=ALICE.peer_id, recipients=("bob@example.net",),
                        created=1_700_000_000),
        description=Description(title=title, file_name=name),
        handle=Handle(content_id=bytes([n % 256]) * 32, size=size, chunk_size=chunk,
                      content_key=b"k" * 32, capability=b"p" * 32),
    )


def pushed(msg: LocationMessage) -> Pushed:
    ((_, blob),) = seal_for_recipients(ALICE, "location", msg.encode(), [BOB.public])
    return Pushed(msg.headers.message_id, "alice@example.net", blob)


def incoming(db: NodeDB, inbox: Inbox) -> IncomingMail:
    contacts = Contacts(db)
    # a known sender, its keys looked up just now (older than KEYS_FRESH: looked up again)
    contacts.pin_keys("alice@example.net", [ALICE.public.verify_key], time.time())
    return IncomingMail(BOB, "bob@example.net", inbox, Outbox(db), Prefs(db), contacts,
                        wall=time.time)


# --- 1. a full inbox ----------------------------------------------------------------------


def test_a_full_inbox_refuses_new_mail_and_keeps_what_it_has(db: NodeDB) -> None:
    inbox = Inbox(db, max_entries=3)
    mail = incoming(db, inbox)
    for n in range(3):
        assert mail.handle(pushed(location(n)))[0] is Outcome.NEW
    before = inbox.list()
    outcome, _ = mail.handle(pushed(location(99)))
    # Refused, not raised: the caller acknowledges it so the server stops redelivering.
    assert outcome is Outcome.REFUSED
    assert mail.counters["refused-inbox-full"] == 1
    assert inbox.is_full() and inbox.get((99).to_bytes(16, "big")) is None
    assert inbox.list() == before
    # A redelivery of a stored message is still a duplicate, not a refusal.
    assert mail.handle(pushed(location(1)))[0] is Outcome.DUPLICATE


def test_the_default_limit_is_ten_thousand(db: NodeDB) -> None:
    inbox = Inbox(db)
    assert inbox.max_entries == DEFAULT_MAX_ENTRIES == 10_000
    with db.transaction() as conn:  # fill it in one transaction: 10,000 adds take long
        conn.executemany(
            "INSERT INTO inbox (id, sender, sender_peer_id, title, note, size, file_name,"
            " media_type, content_id, state, junk, priority, received_at, chunk_count, message)"
            " VALUES (?, 'a@b.example', ?, 't', '', 1, 'f', 'x/y', ?, 'offered', 0, 0, ?, 1,"
            " x'93')", [(n.to_bytes(16, "big"), b"p" * 20, b"c" * 32, float(n))
                        for n in range(10_000)])
    assert inbox.is_full()
    mail = incoming(db, inbox)
    assert mail.handle(pushed(location(1 << 40)))[0] is Outcome.REFUSED
    with pytest.raises(RecordLimitError):
        inbox.add(id=b"z" * 16, sender="a@b.example", sender_peer_id=b"p" * 20, title="",
                  note="", size=1, file_name="f", media_type="x/y", content_id=b"c" * 32,
                  chunk_count=1, message=b"\x93", received_at=1.0)


def test_prune_picks_old_finished_messages_and_junk(db: NodeDB) -> None:
    inbox = Inbox(db)
    mail = incoming(db, inbox)
    for n in range(4):
        mail.handle(pushed(location(n)))
    ids = [n.to_bytes(16, "big") for n in range(4)]
    inbox.transition(ids[0], InboxState.DOWNLOADING)
    inbox.transition(ids[0], InboxState.COMPLETE, path="/x")
    inbox.transition(ids[1], InboxState.FAILED, error="bad")
    inbox.set_flags(ids[2], junk=True)
    now = time.time()
    assert inbox.prunable(before=now - 86400) == []
    assert {e.id for e in inbox.prunable(before=now + 1)} == {ids[0], ids[1]}
    assert {e.id for e in inbox.prunable(before=now + 1, junk=True)} == set(ids[:3])


# --- 2. file names ------------------------------------------------------------------------


def test_names_are_checked_in_bytes() -> None:
    ok = "é" * 120 + ".t"  # 242 characters would pass a character count; 242 bytes here
    assert len(ok.encode()) == 242
    with pytest.raises(DecodeError, match="241 bytes"):
        decode_location(dataclasses.replace(location(1), description=Description(
            file_name=ok)).encode())
    fits = "é" * 119 + ".ts"
    assert decode_location(location(1, name=fits).encode()).description.file_name == fits
    for bad in ("   ", "a\x1bb", "\r"):
        with pytest.raises(DecodeError):
            location(1, name=bad).encode()


def test_the_store_cuts_a_long_name_to_fit_its_suffixes() -> None:
    name = safe_file_name("é" * 120 + ".mp4")
    assert name.endswith(".mp4") and len(name.encode()) + 14 + 8 <= 255
    with pytest.raises(DecodeError):
        safe_file_name("   ")


def offer(inbox: Inbox, n: int, size: int = 1000) -> bytes:
    msg = location(n, size=size)
    inbox.add(id=msg.headers.message_id, sender="alice@example.net",
              sender_peer_id=ALICE.peer_id, title=f"m{n}", note="", size=size,
              file_name="clip.ts", media_type="x/y", content_id=msg.handle.content_id,
              chunk_count=1, message=msg.encode(), received_at=1000.0 + n)
    return msg.headers.message_id


async def test_one_failing_download_is_marked_failed_and_the_queue_goes_on(db: NodeDB) -> None:
    inbox = Inbox(db)
    bad, good = offer(inbox, 1), offer(inbox, 2)
    calls: dict[bytes, int] = {bad: 0, good: 0}
    done = asyncio.Event()

    async def fetch(entry: InboxEntry, msg: Any, act: Any, progress: Any) -> str:
        calls[entry.id] += 1
        if entry.id == bad:
            raise OSError(36, "File name too long")  # none of the handled errors
        return "/tmp/done"

    async def completed(entry: InboxEntry, msg: Any) -> None:
        done.set()

    q = DownloadQueue(inbox, Prefs(db), fetch, completed, wall=time.time,
                      rng=random.Random(1))
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(q.run())
        async with asyncio.timeout(10):
            await done.wait()
        for _ in range(20):  # a spinning queue would call the fetcher again and again
            await asyncio.sleep(0)
        runner.cancel()
    failed = inbox.get(bad)
    assert failed is not None and failed.state is InboxState.FAILED
    assert "File name too long" in (failed.error or "")
    assert calls == {bad: 1, good: 1}
    assert present(inbox.get(good)).state is InboxState.COMPLETE


# --- 3. layouts and the auto-download limit ----------------------------------------------


def test_layouts_of_millions_of_tiny_chunks_are_refused() -> None:
    with pytest.raises(DecodeError, match="chunks"):
        check_layout(2 * GiB, 1024)  # 2,097,152 chunks
    with pytest.raises(DecodeError, match="at least 65536"):
        check_layout(64 << 20, 16 << 10)  # 4,096 chunks of 16 KiB
    with pytest.raises(DecodeError, match="at most 1048576"):
        check_layout(128 * GiB, 64 << 10)
    check_layout(64 * GiB, 64 << 10)  # 2^20 chunks: the most there can be
    check_layout(1 << 20, 1024)  # a small file may still use small chunks
    with pytest.raises(DecodeError):
        location(1, size=2 * GiB, chunk=1024).encode()


def test_sizes_parse_with_units() -> None:
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1GiB") == GiB
    assert parse_size("1.5 GiB") == 3 * GiB // 2
    assert parse_size("123") == 123
    assert parse_size("none") is None
    for bad in ("", "GB", "2XB", "-1GB", "1e9", "9" * 30):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_large_offers_wait_for_fetch(db: NodeDB) -> None:
    inbox, prefs = Inbox(db), Prefs(db)
    assert prefs.auto_download_max == 2 * GiB
    small, big = offer(inbox, 1, size=1000), offer(inbox, 2, size=3 * GiB)
    order = inbox.fetch_order(2000.0, include_offered=True,
                              offered_max_size=prefs.auto_download_max)
    assert [e.id for e in order] == [small]
    prefs.auto_download_max = None
    assert [e.id for e in inbox.fetch_order(2000.0, include_offered=True,
                                            offered_max_size=None)] == [small, big]


# --- 4. terminal output -------------------------------------------------------------------


def _render_inbox(monkeypatch: pytest.MonkeyPatch, title: str, sender: str) -> str:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200, force_terminal=False,
                                                color_system=None))
    entry = {"id": "ab" * 16, "from": sender, "title": title, "size": 10,
             "state": "failed", "error": title, "progress": 0.0, "sources": []}

    def call(socket_path: Any, op: str, /, **args: Any) -> Any:
        if op == "ping":
            return {"inbox": {"messages": 1, "max": 10, "full": False}}
        return [entry]

    monkeypatch.setattr(cli, "control_call", call)
    args = cli.build_parser().parse_args(["inbox"])
    cli.cmd_inbox(NodeHome("/nonexistent"), args)
    return out.getvalue()


def test_markup_and_escapes_in_a_title_are_shown_not_obeyed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = _render_inbox(monkeypatch, "[red]x[/red]\x1b[2J\rY\x07", "a@b.example")
    assert "[red]x[/red]" in text
    assert "\\x1b[2J\\x0dY\\x07" in text
    assert not any(ord(c) < 0x20 and c != "\n" for c in text)


@settings(max_examples=200, deadline=None)
@given(title=st.text(max_size=60))
def test_no_control_character_reaches_stdout_for_any_title(title: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        text = _render_inbox(mp, title, title)
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in text)


# --- 5. the .part file ----------------------------------------------------------------------


def test_a_symlink_planted_at_the_part_path_is_not_followed(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    dest = tmp_path / "received"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    cid = b"c" * 32
    private = dest / PARTIAL_DIR
    private.mkdir(parents=True, mode=0o700)
    part = private / f"clip.ts.{cid[:4].hex()}.part"
    part.symlink_to(victim)
    partial = store.open_partial(cid, 3 << 20, 1 << 20, b"k" * 32, b"p" * 32, dest, "clip.ts")
    assert partial.part_path == part and not part.is_symlink()
    assert part.stat().st_size == 3 << 20
    assert victim.read_bytes() == b"precious"
    store.close()


def test_the_part_folder_must_be_ours(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    dest = tmp_path / "received"
    dest.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dest / PARTIAL_DIR).symlink_to(elsewhere)
    with pytest.raises(Exception, match="not a folder of this user"):
        store.open_partial(b"d" * 32, 10, 1 << 20, b"k" * 32, b"p" * 32, dest, "f")
    assert os.listdir(elsewhere) == []
    store.close()
