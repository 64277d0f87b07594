"""`MailSender.send` overlaps what it waits for: the recipients' FINGERs go out at once,
and the file's description (PyAV) runs while they are answered. A refused address is the
error it was when they went one by one, and leaves nothing behind. So does a file that
goes away while they are answered.

The fake server below answers a FINGER only once the test's condition holds (every
address asked; the description started): a send that waits for one round trip before
starting the next thing never gets there and times out.
"""

from __future__ import annotations

import asyncio
import errno
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.mail import outgoing
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
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
    async def add_local_file(path: Path) -> Any:
        raise raised

    monkeypatch.setattr(store, "add_local_file", add_local_file)
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
