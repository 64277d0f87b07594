"""`Delivery` takes a pushed message without waiting for the REMOVE that acknowledges it
before the download starts: the download is woken once the inbox has the message, and a
first contact's once FINGER has listed the signing key; the REMOVE (a round trip and a
commit at the server, whose store answers in order) comes after.

The fake server below answers the REMOVE only once the download was woken: a delivery that
waits for the REMOVE first never gets there.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from overlay.mail.db import NodeDB
from overlay.mail.delivery import Delivery
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import Pushed
from rendezvous.backoff import Backoff
from rendezvous.records import DeviceInfo, FingerResult
from tests.overlay.test_incoming_trust import ALICE, ALICE1, K1, pushed, receiver


class _Server:
    """Pushes one envelope; answers its REMOVE only once `ready()`, and records the
    FINGERs and REMOVEs it answered."""

    def __init__(self, env: Pushed) -> None:
        self.env = env
        self.ready: Callable[[], bool] = lambda: True
        self.changed = asyncio.Event()
        self.fingered: list[str] = []
        self.removed: list[bytes] = []
        self.handed_on: list[str] = []  # FINGER answers given to `on_finger`

    async def pushes(self) -> AsyncIterator[Any]:
        yield SimpleNamespace(envelope=self.env)

    async def finger(self, address: str) -> FingerResult:
        self.fingered.append(address)
        return FingerResult(address, (DeviceInfo(K1, True, None, {}),))

    async def remove(self, message_id: bytes) -> None:
        while not self.ready():
            self.changed.clear()
            await self.changed.wait()
        self.removed.append(message_id)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


async def _take(db: NodeDB, server: _Server, *, known: bool, woken: list[bool]) -> Any:
    """Run the push loop over the server's one envelope; the inbox afterwards."""
    mail, inbox, _ = receiver(db, known=known)

    def wake() -> None:
        woken.append(True)
        server.changed.set()

    async def withdraw(content_id: bytes) -> None:
        return None

    delivery = Delivery(cast(Any, server), mail, cast(Any, None), cast(Any, None),
                        cast(Any, None), cast(Any, SimpleNamespace(wake=wake)),
                        archive=db.path, on_pipe=lambda m: False, on_relay=lambda i: None,
                        withdraw=withdraw, lookup_backoff=Backoff(0.01, 0.05),
                        rng=random.Random(1),
                        on_finger=lambda address, info: server.handed_on.append(address))
    async with asyncio.timeout(5):
        await delivery.pushes()
    return inbox


async def test_a_first_contacts_download_is_woken_before_the_remove_answers(
        db: NodeDB) -> None:
    env = pushed(1, ALICE1)
    server = _Server(env)
    woken: list[bool] = []
    server.ready = lambda: bool(woken)
    inbox = await _take(db, server, known=False, woken=woken)
    assert server.fingered == [ALICE] and server.removed == [env.message_id]
    assert server.handed_on == [ALICE]  # the download's holder finder needn't ask again
    # FINGER listed the signing key: trusted on first contact, offered, and fetched.
    assert inbox.get(env.message_id).state is InboxState.OFFERED
    assert woken


async def test_a_known_senders_download_is_woken_before_the_remove_answers(
        db: NodeDB) -> None:
    env = pushed(2, ALICE1)
    server = _Server(env)
    woken: list[bool] = []
    server.ready = lambda: bool(woken)
    inbox = await _take(db, server, known=True, woken=woken)
    assert server.removed == [env.message_id] and not server.fingered
    assert not server.handed_on
    assert inbox.get(env.message_id).state is InboxState.OFFERED

