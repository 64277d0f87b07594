"""`MailSender.send` overlaps what it waits for: the recipients' FINGERs go out at once,
and the file's naming (the hash pass) and description (PyAV) run while they are answered;
the content is recorded only once every recipient is accepted. A refused address is the
error it was when they went one by one, stops the hash pass and leaves nothing behind. So
does a file that goes away or changes while they are answered.

The fake server below answers a FINGER only once the test's condition holds (every
address asked; the description started): a send that waits for one round trip before
starting the next thing never gets there and times out.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from crypto.content import LARGE_CHUNK_SIZE, LARGE_CONTENT, LARGE_MEDIA_CHUNK_SIZE
from crypto.identity import DeviceIdentity
from overlay.content import catalog
from overlay.content.catalog import ContentStore
from overlay.mail import outgoing
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.folders import plan_pack, write_map
from overlay.mail.outbox import Outbox
from overlay.mail.outgoing import MailSender, SendError
from rendezvous.errors import error_for
from rendezvous.records import DeviceInfo, FingerResult
from rendezvous.status import Status

ALICE = DeviceIdentity.from_seed(b"\x01" * 32)
KEYS = {f"{name}@a.test": DeviceIdentity.from_seed(bytes([i + 2]) * 32).public.verify_key
        for i, name in enumerate(("bob", "carol", "dave"))}


class _Server:
    """FINGER answers held until `ready()`; a listed address is refused as unknown."""

    def __init__(self, ready: Callable[[], bool], unknown: frozenset[str] = frozenset()
                 ) -> None:
        self.ready = ready
        self.unknown = unknown
        self.asked: list[str] = []
        self.changed = asyncio.Event()
        self.sent: list[tuple[bytes, list[Any]]] = []

    async def finger(self, address: str) -> FingerResult:
        self.asked.append(address)
        self.changed.set()
        while not self.ready():
            self.changed.clear()
            await self.changed.wait()
        if address in self.unknown:
            raise error_for(Status.NOT_FOUND, "no such address")
        return FingerResult(address, (DeviceInfo(KEYS[address], True, None, {}),))

    async def send(self, message_id: bytes, items: list[Any]) -> None:
        self.sent.append((message_id, items))


def _sender(db: NodeDB, store: ContentStore, server: _Server) -> MailSender:
    return MailSender(ALICE, "alice@a.test", rendezvous=cast(Any, server), store=store,
                      contacts=Contacts(db), outbox=Outbox(db), announce=lambda c: None,
                      direct_addresses=list, home_server="a.test", wall=lambda: 1000.0)


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.bin"
    path.write_bytes(b"x" * 5000)
    return path


@pytest.fixture
def described(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths `describe` was started for (it still describes them)."""
    started: list[Path] = []
    real = outgoing.describe

    async def describe(path: Path) -> Any:
        started.append(path)
        return await real(path)

    monkeypatch.setattr(outgoing, "describe", describe)
    return started


async def test_fingers_go_out_at_once(db: NodeDB, store: ContentStore, clip: Path) -> None:
    to = list(KEYS)
    server = _Server(lambda: len(server.asked) == len(to))
    async with asyncio.timeout(10):
        mid = await _sender(db, store, server).send(clip, to, "t", "")
    assert [m for m, _ in server.sent] == [mid]
    assert sorted(a for a, _, _ in server.sent[0][1]) == sorted(to)


async def test_the_description_runs_while_the_server_answers(
        db: NodeDB, store: ContentStore, clip: Path, described: list[Path]) -> None:
    server = _Server(lambda: bool(described))
    async with asyncio.timeout(10):
        await _sender(db, store, server).send(clip, ["bob@a.test"], "t", "")
    assert described == [clip] and len(server.sent) == 1


async def test_a_refused_address_is_the_error_and_nothing_is_left(
        db: NodeDB, store: ContentStore, clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    # carol is refused; dave, after her, answers first: as one by one, the error names
    # carol and dave's key is not pinned; nothing is sent, kept in the outbox or named.
    server = _Server(lambda: len(server.asked) == 3, unknown=frozenset({"carol@a.test"}))
    sender = _sender(db, store, server)
    with pytest.raises(SendError) as err:
        async with asyncio.timeout(10):
            await sender.send(clip, ["bob@a.test", "carol@a.test", "dave@a.test"], "t", "")
    assert str(err.value) == "carol@a.test: no such address"
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []
    pinned = Contacts(db)
    assert pinned.trusted_keys("bob@a.test") == {KEYS["bob@a.test"]}
    assert not pinned.trusted_keys("dave@a.test")
    del err  # its traceback holds the send's frame, and so the cancelled description
    gc.collect()  # whose outcome was taken: nothing for asyncio to log
    assert "never retrieved" not in caplog.text


async def test_a_cancel_while_the_description_winds_down_is_not_lost(
        db: NodeDB, store: ContentStore, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused address cancels the description; a cancel of the send itself (the node
    stopping) that lands while the description winds down ends the send as cancelled, not
    as the refusal: it was swallowed with the description's own cancel."""
    winding_down = asyncio.Event()

    async def describe(path: Path) -> Any:
        try:
            await asyncio.sleep(3600)
        finally:
            winding_down.set()
            await asyncio.sleep(0.2)  # its cleanup (PyAV closing the file)

    monkeypatch.setattr(outgoing, "describe", describe)
    server = _Server(lambda: True, unknown=frozenset({"carol@a.test"}))
    sending = asyncio.create_task(_sender(db, store, server).send(clip, ["carol@a.test"],
                                                                   "t", ""))
    async with asyncio.timeout(10):
        await winding_down.wait()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending


async def test_a_file_removed_while_the_fingers_are_answered_is_not_sent(
        db: NodeDB, store: ContentStore, clip: Path) -> None:
    """Removed after the send checked it, before it was named: the error says so and that
    nothing was sent (it was a bare `[Errno 2] No such file or directory`)."""
    def remove_then_answer() -> bool:
        clip.unlink(missing_ok=True)
        return True

    server = _Server(remove_then_answer)
    with pytest.raises(SendError) as err:
        async with asyncio.timeout(10):
            await _sender(db, store, server).send(clip, ["bob@a.test"], "t", "")
    assert str(err.value) == (f"cannot read {clip}: No such file or directory; "
                              "nothing was sent")
    assert server.asked == ["bob@a.test"]
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []


@pytest.mark.parametrize("raised", [PermissionError(errno.EACCES, "Permission denied"),
                                    OSError(errno.ENOSPC, "No space left on device")],
                         ids=["unreadable", "disk-full"])
async def test_naming_that_fails_is_a_send_error_unless_the_disk_is_full(
        db: NodeDB, store: ContentStore, clip: Path, monkeypatch: pytest.MonkeyPatch,
        raised: OSError) -> None:
    """A file made unreadable is the user's to mend: a SendError. A full disk stays the
    OSError it was, which the control socket words as this node's full disk."""
    async def name_local_file(path: Path, *, stop: Any = None, media: bool = False) -> Any:
        raise raised

    monkeypatch.setattr(store, "name_local_file", name_local_file)
    server = _Server(lambda: True)
    with pytest.raises((SendError, OSError)) as err:
        async with asyncio.timeout(10):
            await _sender(db, store, server).send(clip, ["bob@a.test"], "t", "")
    if raised.errno == errno.ENOSPC:
        assert err.value is raised
    else:
        assert isinstance(err.value, SendError)
        assert str(err.value) == f"cannot read {clip}: Permission denied; nothing was sent"
    assert server.sent == [] and Outbox(db).list() == []


async def test_the_file_is_named_while_the_server_answers(
        db: NodeDB, store: ContentStore, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FINGER that takes a WAN round trip (100 ms here) no longer comes before the hash
    pass: naming starts before the answer, and the content is recorded only after it.
    On the parent the pass started once the answer was in: the send took the sum."""
    events: list[str] = []
    real = catalog.name_chunks_from

    def name_chunks_from(*args: Any, **kwargs: Any) -> list[bytes]:
        events.append("naming")  # list.append: safe from the naming thread
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog, "name_chunks_from", name_chunks_from)
    recorded_at_answer: list[list[bytes]] = []

    class _SlowServer(_Server):
        async def finger(self, address: str) -> FingerResult:
            await asyncio.sleep(0.1)  # the round trip through a remote domain's server
            events.append("answer")
            recorded_at_answer.append(store.content_ids())
            return await super().finger(address)

    server = _SlowServer(lambda: True)
    async with asyncio.timeout(10):
        mid = await _sender(db, store, server).send(clip, ["bob@a.test"], "t", "")
    assert events == ["naming", "answer"]
    assert recorded_at_answer == [[]]
    entry = Outbox(db).get(mid)
    assert entry is not None and store.content_ids() == [entry.content_id]
    assert [m for m, _ in server.sent] == [mid]


class _WatchedPass:
    """The naming pass, watched: `started` once its first chunk is read; each later read
    waits (at most 5 s) until the send sets the pass's stop flag, so a pass nobody stops
    reads every chunk; `ended` once its threads are done, with its error if any."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.ended = threading.Event(), threading.Event()
        self.reads: list[int] = []
        self.error: BaseException | None = None
        real = catalog.name_chunks_from

        def name_chunks_from(fill: Callable[[int, memoryview], None], size: int,
                             chunk_size: int, key: bytes, scheme: Any,
                             stop: threading.Event | None = None) -> list[bytes]:
            never = threading.Event()

            def watched_fill(start: int, view: memoryview) -> None:
                self.reads.append(start)
                if self.started.is_set():
                    (stop or never).wait(5)
                self.started.set()
                fill(start, view)

            try:
                return real(watched_fill, size, chunk_size, key, scheme, stop)
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                self.ended.set()

        monkeypatch.setattr(catalog, "name_chunks_from", name_chunks_from)


class _RefusingServer(_Server):
    """Refuses every address (unknown), once the naming pass has read a chunk (or 5 s)."""

    def __init__(self, watched: _WatchedPass) -> None:
        super().__init__(lambda: True)
        self.watched = watched

    async def finger(self, address: str) -> FingerResult:
        await asyncio.to_thread(self.watched.started.wait, 5)
        raise error_for(Status.NOT_FOUND, "no such address")


CHUNKS = 6  # of 1 MiB: the size `chunk_size_for` gives a file this small


async def test_a_refused_address_stops_the_naming_and_records_nothing(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused while its file is being named: the pass stops within a chunk and has ended
    when `send` raises; nothing is in the content store or the outbox."""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes((CHUNKS - 1) << 20) + b"x")
    watched = _WatchedPass(monkeypatch)
    server = _RefusingServer(watched)
    with pytest.raises(SendError) as err:
        async with asyncio.timeout(30):
            await _sender(db, store, server).send(big, ["carol@a.test"], "t", "")
    assert watched.ended.is_set()  # before `send` raised
    assert str(err.value) == "carol@a.test: no such address"
    assert isinstance(watched.error, catalog.NamingStopped)
    assert len(watched.reads) < CHUNKS
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []


async def test_a_refused_folder_send_stops_the_naming_and_deletes_only_its_map(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a folder, named through its map: the map goes, the files stay."""
    src = tmp_path / "sunday"
    src.mkdir()
    (src / "a.bin").write_bytes(bytes((CHUNKS - 1) << 20) + b"x")
    map_path, info = write_map(plan_pack([src]), store.root)
    watched = _WatchedPass(monkeypatch)
    server = _RefusingServer(watched)
    with pytest.raises(SendError) as err:
        async with asyncio.timeout(30):
            await _sender(db, store, server).send(map_path, ["carol@a.test"], "t", "", info)
    assert watched.ended.is_set()
    assert str(err.value) == "carol@a.test: no such address"
    assert isinstance(watched.error, catalog.NamingStopped)
    assert len(watched.reads) < CHUNKS
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []
    assert not map_path.exists() and (src / "a.bin").stat().st_size == ((CHUNKS - 1) << 20) + 1


@pytest.mark.parametrize("change", ["edited", "removed"])
async def test_a_file_changed_once_named_while_the_server_answers_is_not_sent(
        db: NodeDB, store: ContentStore, clip: Path, monkeypatch: pytest.MonkeyPatch,
        change: str) -> None:
    """Named and described before the FINGER is answered, then edited or removed: the
    send is refused as if that had happened before naming, and nothing is recorded."""
    named, described = asyncio.Event(), asyncio.Event()
    name, describe = store.name_local_file, outgoing.describe

    async def name_local_file(path: Path, *, stop: Any = None, media: bool = False) -> Any:
        try:
            return await name(path, stop=stop)
        finally:
            named.set()

    async def describing(path: Path) -> Any:
        try:
            return await describe(path)
        finally:
            described.set()

    monkeypatch.setattr(store, "name_local_file", name_local_file)
    monkeypatch.setattr(outgoing, "describe", describing)

    class _ChangingServer(_Server):
        async def finger(self, address: str) -> FingerResult:
            await named.wait()
            await described.wait()
            if change == "edited":
                with clip.open("ab") as f:
                    f.write(b"more")
            else:
                clip.unlink()
            return await super().finger(address)

    server = _ChangingServer(lambda: True)
    with pytest.raises(SendError) as err:
        async with asyncio.timeout(10):
            await _sender(db, store, server).send(clip, ["bob@a.test"], "t", "")
    assert str(err.value) == {
        "edited": f"{clip.resolve()} changed while it was being added; nothing was sent",
        "removed": f"cannot read {clip}: No such file or directory; nothing was sent",
    }[change]
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []


async def test_a_send_cancelled_while_naming_stops_the_pass_before_it_ends(
        db: NodeDB, store: ContentStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node stopping cancels a send whose FINGER is out: its hash pass stops within a
    chunk and has ended when the cancelled send does, with nothing recorded."""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes((CHUNKS - 1) << 20) + b"x")
    watched = _WatchedPass(monkeypatch)
    server = _Server(lambda: False)  # never answers
    sending = asyncio.create_task(_sender(db, store, server).send(big, ["bob@a.test"],
                                                                   "t", ""))
    async with asyncio.timeout(30):
        assert await asyncio.to_thread(watched.started.wait, 10)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
    assert watched.ended.is_set()
    assert isinstance(watched.error, catalog.NamingStopped)
    assert len(watched.reads) < CHUNKS
    assert server.sent == [] and Outbox(db).list() == [] and store.content_ids() == []


@pytest.mark.parametrize("name, chunk_size", [
    ("holiday.MP4", LARGE_MEDIA_CHUNK_SIZE), ("song.flac", LARGE_MEDIA_CHUNK_SIZE),
    ("backup.img", LARGE_CHUNK_SIZE), ("payload.bin", LARGE_CHUNK_SIZE)])
async def test_a_large_file_is_sent_in_larger_chunks_unless_it_is_audio_or_video(
        db: NodeDB, store: ContentStore, tmp_path: Path, name: str, chunk_size: int) -> None:
    """A 512 MiB file goes out in 4 MiB chunks (less work per byte for both nodes), but a
    clip or song named as one keeps 2 MiB ones: a recipient seeking in it while it still
    downloads waits for whole chunks. Sparse: the hash pass reads zeros."""
    big = tmp_path / name
    with open(big, "wb") as f:
        f.truncate(LARGE_CONTENT)
    server = _Server(lambda: True)
    async with asyncio.timeout(60):
        mid = await _sender(db, store, server).send(big, ["bob@a.test"], "t", "")
    entry = Outbox(db).get(mid)
    assert entry is not None
    local = store.local(entry.content_id)
    assert local is not None and local.chunk_size == chunk_size
    assert len(local.leaves) == LARGE_CONTENT // chunk_size
