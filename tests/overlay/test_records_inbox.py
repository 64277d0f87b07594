"""The inbox table and its state machine, against a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from overlay.mail.db import _MIGRATIONS, NodeDB, RecordLimitError
from overlay.mail.inbox import Inbox, InboxEntry
from overlay.mail.inbox_state import TRANSITIONS, IllegalTransition, InboxState
from tests.present import present

S = InboxState


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def offer(inbox: Inbox, n: int, **over: Any) -> bytes:
    fields: dict[str, Any] = dict(
        id=n.to_bytes(16, "big"), sender="alice@example.net", sender_peer_id=b"p" * 20,
        title=f"clip {n}", note="for you", size=3_000_000, file_name="clip.ts",
        media_type="video/mp2t", content_id=bytes([n % 256]) * 32, chunk_count=3,
        message=b"\x93raw location message", received_at=1000.0 + n,
    )
    fields.update(over)
    inbox.add(**fields)
    return bytes(fields["id"])


def test_add_is_idempotent_by_id(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    first = inbox.get(mid)
    again: dict[str, Any] = dict(
        id=mid, sender="mallory@example.net", sender_peer_id=b"m" * 20, title="other",
        note="", size=1, file_name="x", media_type="x/y", content_id=b"x" * 32,
        chunk_count=1, message=b"other", received_at=5.0,
    )
    assert inbox.add(**again) is False
    assert inbox.get(mid) == first
    assert len(inbox.list()) == 1


def test_entry_round_trips_every_field(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 2, priority=True)
    e = inbox.get(mid)
    assert e == InboxEntry(
        id=mid, sender="alice@example.net", sender_peer_id=b"p" * 20, title="clip 2",
        note="for you", size=3_000_000, file_name="clip.ts", media_type="video/mp2t",
        content_id=bytes([2]) * 32, state=S.OFFERED, junk=False, priority=True,
        received_at=1002.0, next_attempt=None, attempts=0, error=None, path=None,
        chunks_held=0, chunk_count=3, message=b"\x93raw location message",
    )
    assert e.progress == 0.0
    assert inbox.get(b"\0" * 16) is None


def test_list_is_newest_first_and_hides_junk(db: NodeDB) -> None:
    inbox = Inbox(db)
    offer(inbox, 1)
    offer(inbox, 3)
    offer(inbox, 2, junk=True, sender="spam@junk.example")
    assert [e.title for e in inbox.list()] == ["clip 3", "clip 1"]
    assert [e.title for e in inbox.list(include_junk=True)] == ["clip 3", "clip 2", "clip 1"]


def test_full_download_path(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    inbox.transition(mid, S.DOWNLOADING)
    inbox.set_progress(mid, 1)
    e = inbox.transition(mid, S.RETRYING, next_attempt=1500.0, error="no source reachable")
    assert (e.state, e.next_attempt, e.error, e.chunks_held) == (
        S.RETRYING, 1500.0, "no source reachable", 1,
    )
    inbox.transition(mid, S.DOWNLOADING)
    inbox.set_progress(mid, 2)
    done = inbox.transition(mid, S.COMPLETE, path="/home/bob/clip.ts")
    assert done == inbox.get(mid)
    assert done.state is S.COMPLETE and done.path == "/home/bob/clip.ts"
    assert done.progress == 1.0 and done.attempts == 2 and done.error is None


def test_illegal_transition_says_what_and_why(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    with pytest.raises(IllegalTransition, match=r"cannot go from offered to complete"):
        inbox.transition(mid, S.COMPLETE, path="/x")
    inbox.transition(mid, S.DOWNLOADING)
    inbox.transition(mid, S.COMPLETE, path="/x")
    with pytest.raises(IllegalTransition, match=r"complete to downloading.*none, it is final"):
        inbox.transition(mid, S.DOWNLOADING)
    assert present(inbox.get(mid)).state is S.COMPLETE


def test_transition_arguments_are_required(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    inbox.transition(mid, S.DOWNLOADING)
    with pytest.raises(ValueError, match="next_attempt"):
        inbox.transition(mid, S.RETRYING)
    with pytest.raises(ValueError, match="reason"):
        inbox.transition(mid, S.FAILED)
    with pytest.raises(ValueError, match="path"):
        inbox.transition(mid, S.COMPLETE)
    assert present(inbox.get(mid)).state is S.DOWNLOADING
    with pytest.raises(KeyError, match="no inbox message"):
        inbox.transition(b"\1" * 16, S.DOWNLOADING)


def test_user_retries_a_failed_download(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    inbox.transition(mid, S.FAILED, error="expired")
    e = inbox.transition(mid, S.DOWNLOADING)
    assert e.state is S.DOWNLOADING and e.error is None and e.attempts == 1


def test_junk_never_leaves_offered_until_unmarked(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1, junk=True)
    with pytest.raises(IllegalTransition, match="junk sender"):
        inbox.transition(mid, S.DOWNLOADING)
    assert inbox.fetch_order(1e9, include_offered=True) == []
    inbox.set_flags(mid, junk=False)
    assert [e.id for e in inbox.fetch_order(1e9, include_offered=True)] == [mid]
    inbox.transition(mid, S.DOWNLOADING)
    with pytest.raises(IllegalTransition, match="only an offered message"):
        inbox.set_flags(mid, junk=True)


def test_fetch_order_priority_first_then_oldest(db: NodeDB) -> None:
    inbox = Inbox(db)
    old = offer(inbox, 1)
    newer = offer(inbox, 2)
    vip = offer(inbox, 3, priority=True, sender="boss@example.net")
    waiting = offer(inbox, 4, priority=True)
    untouched = offer(inbox, 5)
    for mid in (old, newer, vip, waiting):
        inbox.transition(mid, S.DOWNLOADING)
    inbox.transition(waiting, S.RETRYING, next_attempt=2000.0)
    assert [e.id for e in inbox.fetch_order(1999.0)] == [vip, old, newer]
    assert [e.id for e in inbox.fetch_order(2000.0)] == [vip, waiting, old, newer]
    assert [e.id for e in inbox.fetch_order(2000.0, include_offered=True)] == [
        vip, waiting, old, newer, untouched,
    ]
    assert inbox.next_wakeup() == 2000.0


def test_progress_is_bounded_and_only_while_active(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    with pytest.raises(IllegalTransition, match="no progress to record in state offered"):
        inbox.set_progress(mid, 1)
    inbox.transition(mid, S.DOWNLOADING)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        inbox.set_progress(mid, 4)
    inbox.set_progress(mid, 2)
    assert present(inbox.get(mid)).progress == pytest.approx(2 / 3)


def test_empty_file_counts_as_fully_held(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1, size=0, chunk_count=0)
    assert present(inbox.get(mid)).progress == 1.0


def test_inbox_is_bounded(db: NodeDB) -> None:
    inbox = Inbox(db, max_entries=2)
    offer(inbox, 1)
    offer(inbox, 2)
    with pytest.raises(RecordLimitError, match="inbox is full"):
        offer(inbox, 3)
    assert inbox.add(  # a redelivery of a known message is still fine when full
        id=(1).to_bytes(16, "big"), sender="a@b.c", sender_peer_id=b"", title="", note="",
        size=0, file_name="", media_type="", content_id=b"", chunk_count=0, message=b"",
        received_at=0.0,
    ) is False
    assert inbox.remove((1).to_bytes(16, "big")) is True
    offer(inbox, 3)


def test_bad_arguments_are_refused(db: NodeDB) -> None:
    inbox = Inbox(db)
    with pytest.raises(ValueError, match="16 bytes"):
        offer(inbox, 1, id=b"short")
    with pytest.raises(ValueError, match="over the limit"):
        offer(inbox, 1, message=b"x" * (64 * 1024 + 1))


class InboxMachine(RuleBasedStateMachine):
    """Random adds, moves, progress and reopenings against a dict model of the table."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.path = Path(self._dir.name)
        self.db = NodeDB.open(self.path)
        self.inbox = Inbox(self.db)
        self.model: dict[bytes, tuple[InboxState, bool, int, int]] = {}  # state, junk, held, n

    def teardown(self) -> None:
        self.db.close()
        self._dir.cleanup()

    @rule(n=st.integers(0, 7), junk=st.booleans(), chunks=st.integers(0, 5))
    def add(self, n: int, junk: bool, chunks: int) -> None:
        mid = offer(self.inbox, n, junk=junk, chunk_count=chunks)
        self.model.setdefault(mid, (S.OFFERED, junk, 0, chunks))

    @rule(n=st.integers(0, 7), to=st.sampled_from(list(InboxState)))
    def move(self, n: int, to: InboxState) -> None:
        mid = n.to_bytes(16, "big")
        if mid not in self.model:
            with pytest.raises(KeyError):
                self.inbox.transition(mid, to, next_attempt=1.0, error="e", path="/p")
            return
        state, junk, held, chunks = self.model[mid]
        legal = not junk and to in TRANSITIONS[state]
        if not legal:
            with pytest.raises(IllegalTransition):
                self.inbox.transition(mid, to, next_attempt=1.0, error="e", path="/p")
            return
        self.inbox.transition(mid, to, next_attempt=1.0, error="e", path="/p")
        self.model[mid] = (to, junk, chunks if to is S.COMPLETE else held, chunks)

    @rule(n=st.integers(0, 7), held=st.integers(0, 5))
    def progress(self, n: int, held: int) -> None:
        mid = n.to_bytes(16, "big")
        if mid not in self.model:
            return
        state, junk, _, chunks = self.model[mid]
        if state not in (S.DOWNLOADING, S.RETRYING):
            with pytest.raises(IllegalTransition):
                self.inbox.set_progress(mid, held)
        elif held > chunks:
            with pytest.raises(ValueError):
                self.inbox.set_progress(mid, held)
        else:
            self.inbox.set_progress(mid, held)
            self.model[mid] = (state, junk, held, chunks)

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = NodeDB.open(self.path)
        self.inbox = Inbox(self.db)

    @invariant()
    def table_matches_model(self) -> None:
        rows = {e.id: e for e in self.inbox.list(include_junk=True)}
        assert set(rows) == set(self.model)
        for mid, (state, junk, held, chunks) in self.model.items():
            e = rows[mid]
            assert (e.state, e.junk, e.chunks_held, e.chunk_count) == (state, junk, held, chunks)
            assert 0.0 <= e.progress <= 1.0
            assert not e.junk or e.state is S.OFFERED
            assert e.state is not S.COMPLETE or (e.path and e.progress == 1.0)
            assert e.state is not S.RETRYING or e.next_attempt is not None
            assert e.state is not S.FAILED or e.error


InboxMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
test_inbox_state_machine = InboxMachine.TestCase


def test_download_times_keep_the_first_mark_and_survive_reopening(db: NodeDB,
                                                                  tmp_path: Path) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    inbox.mark_time(mid, "started", 100.0)
    inbox.mark_time(mid, "first_byte", 100.5)
    inbox.mark_time(mid, "started", 200.0)  # a resumed download keeps its first start
    inbox.mark_time(mid, "completed", 201.0)
    e = inbox.get(mid)
    assert e is not None
    assert (e.started_at, e.first_byte_at, e.completed_at) == (100.0, 100.5, 201.0)
    with pytest.raises(ValueError, match="unknown download event"):
        inbox.mark_time(mid, "exploded", 1.0)


def test_an_arrival_is_pending_until_settled_then_due_until_told(db: NodeDB) -> None:
    inbox = Inbox(db)
    mid = offer(inbox, 1)
    assert inbox.arrivals_due() == []  # pending: its sender's lookup may still run
    settled = inbox.settle_arrival(mid)
    assert settled is not None and settled.id == mid
    assert inbox.settle_arrival(mid) is None  # told by one caller only
    assert [e.id for e in inbox.arrivals_due()] == [mid]
    inbox.arrival_told(mid)
    assert inbox.arrivals_due() == [] and inbox.settle_arrival(mid) is None


def test_messages_filed_before_the_arrival_column_are_not_told_again(tmp_path: Path) -> None:
    """Upgrading must not run `node --on-message` for every message already received."""
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 7}
    with NodeDB.open(tmp_path, migrations=steps) as old, old.transaction() as conn:
        conn.execute(  # as the v7 code filed it
            "INSERT INTO inbox (id, sender, sender_peer_id, title, note, size, file_name,"
            " media_type, content_id, state, junk, priority, received_at, chunk_count,"
            " message) VALUES (?, 'a@b.c', ?, 't', '', 1, 'f', 'x/y', ?, 'offered', 0, 0,"
            " 1.0, 1, ?)", (b"m" * 16, b"p" * 32, b"c" * 32, b"\x93"))
    with NodeDB.open(tmp_path) as db:
        inbox = Inbox(db)
        assert inbox.arrivals_due() == [] and inbox.settle_arrival(b"m" * 16) is None
        assert present(inbox.get(b"m" * 16)).state is InboxState.OFFERED


def test_every_arrival_due_is_read_however_many(db: NodeDB) -> None:
    """A start tells every message due: one past the first 1,000 read was left for a later
    start."""
    inbox = Inbox(db)
    with inbox.transaction():  # one commit
        mids = [offer(inbox, n) for n in range(1, 1202)]
    assert len(inbox.pending_arrivals()) == 1201
    with inbox.transaction():
        for mid in mids:
            inbox.settle_arrival(mid)
    assert [e.id for e in inbox.arrivals_due()] == mids


def complete(inbox: Inbox, mid: bytes) -> None:
    inbox.transition(mid, InboxState.DOWNLOADING)
    inbox.transition(mid, InboxState.COMPLETE, path=f"/home/bob/{mid.hex()}.ts")


def test_a_completion_is_due_from_the_commit_that_completes_it_until_told(db: NodeDB) -> None:
    """`--on-message`'s `complete` is owed in node.db from the moment the message is
    complete (a stop right after still runs it at the next start) until its run ended."""
    inbox = Inbox(db)
    first, second, third, fourth = (offer(inbox, n) for n in (1, 2, 3, 4))
    inbox.transition(fourth, InboxState.DOWNLOADING)
    assert inbox.completions_due() == []  # not complete: nothing to tell yet
    complete(inbox, second)
    complete(inbox, first)
    complete(inbox, third)
    assert [e.id for e in inbox.completions_due()] == [first, second, third]  # oldest first
    assert [e.id for e in inbox.completions_due(limit=2)] == [first, second]
    (due,) = inbox.completions_due(limit=1)
    assert due.state is InboxState.COMPLETE and due.path == f"/home/bob/{first.hex()}.ts"
    inbox.completion_told(first)
    assert [e.id for e in inbox.completions_due()] == [second, third]
    assert inbox.arrivals_due() == []  # the arrival is its own: still pending here


def test_messages_complete_before_the_completion_column_are_not_told_again(
        tmp_path: Path) -> None:
    """Upgrading to v9 must not run `complete` for every file received before; a message
    not complete then is told when it completes."""
    steps = {k: v for k, v in _MIGRATIONS.items() if k < 8}
    with NodeDB.open(tmp_path, migrations=steps) as old:
        inbox = Inbox(old)  # the v8 table: an insert without the column
        done, offered = offer(inbox, 1), offer(inbox, 2)
        with old.transaction() as conn:  # as the v8 code completed it
            conn.execute("UPDATE inbox SET state = 'complete', path = '/x', chunks_held = 3"
                         " WHERE id = ?", (done,))
    with NodeDB.open(tmp_path) as db:
        inbox = Inbox(db)
        assert inbox.completions_due() == []
        assert present(inbox.get(done)).state is InboxState.COMPLETE
        complete(inbox, offered)
        assert [e.id for e in inbox.completions_due()] == [offered]
