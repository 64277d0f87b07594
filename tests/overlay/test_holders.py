"""HolderFinder: FINGER answers reused for FINGER_CACHE seconds, our own address skipped,
the sender first, co-recipients only when asked for, the FINGERs and the DHT lookup at
once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from crypto.location import LocationMessage
from overlay.app.holders import FINGER_CACHE, HolderFinder
from overlay.dht.directory import ProviderDirectory
from overlay.transports.ladder import ConnectionLadder
from rendezvous.client import RendezvousClient
from rendezvous.records import FingerResult

SENDER_ID = b"s" * 32
PEER_ID = b"p" * 32


@dataclass
class Device:
    peer_id: bytes
    advertise: dict[str, Any]


@dataclass
class Info:
    devices: list[Device]


@dataclass
class FakeRendezvous:
    asked: list[str] = field(default_factory=list)

    async def finger(self, address: str) -> Info:
        self.asked.append(address)
        peer = SENDER_ID if address.startswith("alice") else PEER_ID
        return Info([Device(peer, {"addrs": ["10.0.0.1:9000"], "nat": address == "carol@x"})])


@dataclass
class Record:
    peer_id: bytes
    addresses: list[str]


class FakeProviders:
    async def find(self, content_id: bytes, *, exclude: set[bytes]) -> list[Record]:
        return [r for r in [Record(PEER_ID, ["10.0.0.2:9000"])] if r.peer_id not in exclude]


class Headers:
    sender = "alice@x"
    sender_peer_id = SENDER_ID
    recipients = ("bob@x", "carol@x")
    message_id = b"m" * 16


class Hints:
    addresses = ("192.0.2.1:9000",)


class Handle:
    content_id = b"c" * 32
    sender = Hints()


class Msg:
    headers = Headers()
    handle = Handle()


def finder(rv: FakeRendezvous, *, co_recipients: bool) -> HolderFinder:
    return HolderFinder("bob@x", cast(RendezvousClient, rv),
                        cast(ProviderDirectory, FakeProviders()),
                        cast(ConnectionLadder, None), co_recipients=co_recipients, refresh=10.0)


async def test_finger_answers_are_reused_and_our_own_address_skipped() -> None:
    rv = FakeRendezvous()
    f = finder(rv, co_recipients=True)
    await f.devices(["alice@x", "bob@x", "carol@x", "alice@x"])
    assert rv.asked == ["alice@x", "carol@x"]
    await f.devices(["alice@x", "carol@x"])
    assert rv.asked == ["alice@x", "carol@x"]  # younger than FINGER_CACHE: not asked again
    assert FINGER_CACHE == 30.0


async def test_sender_first_then_co_recipients_only_when_on() -> None:
    msg = cast(LocationMessage, Msg())
    on = await finder(FakeRendezvous(), co_recipients=True).holders(msg)
    assert [h.peer_id for h in on] == [SENDER_ID, PEER_ID]
    assert on[0].address == "alice@x"
    assert on[1].direct == ("10.0.0.2:9000",)
    off = await finder(FakeRendezvous(), co_recipients=False).holders(msg)
    assert [h.peer_id for h in off] == [SENDER_ID]



class _Meeting:
    """A FINGER and a DHT lookup that each answer only once the other was asked: a finder
    that waits for one round trip before it starts the other never gets an answer."""

    def __init__(self) -> None:
        self.fingered = asyncio.Event()
        self.looked_up = asyncio.Event()

    async def finger(self, address: str) -> Info:
        self.fingered.set()
        await self.looked_up.wait()
        return await FakeRendezvous().finger(address)

    async def find(self, content_id: bytes, *, exclude: set[bytes]) -> list[Record]:
        self.looked_up.set()
        await self.fingered.wait()
        return await FakeProviders().find(content_id, exclude=exclude)


async def test_fingers_and_the_dht_lookup_go_out_together() -> None:
    both = _Meeting()
    f = HolderFinder("bob@x", cast(RendezvousClient, both), cast(ProviderDirectory, both),
                     cast(ConnectionLadder, None), co_recipients=True, refresh=10.0)
    async with asyncio.timeout(5):
        found = await f.holders(cast(LocationMessage, Msg()))
    assert [h.peer_id for h in found] == [SENDER_ID, PEER_ID]
    assert found[1].nat  # carol's advertisement, from the FINGER, reached her holder


async def test_an_answer_remembered_from_elsewhere_is_not_asked_again() -> None:
    """The inbox's FINGER of a first contact, just before its download starts."""
    rv = FakeRendezvous()
    f = finder(rv, co_recipients=False)
    f.remember("alice@x", cast(FingerResult, await FakeRendezvous().finger("alice@x")))
    found = await f.holders(cast(LocationMessage, Msg()))
    # alice's devices came from the remembered answer; with co-recipient sourcing off,
    # nobody else's FINGER is of use
    assert rv.asked == []
    assert "10.0.0.1:9000" in found[0].direct  # from its advertisement


async def test_a_forgotten_answer_is_asked_again() -> None:
    """A download's sender source failed (a node back on another port): the answer kept
    for it is dropped, and the next attempt asks the server what it advertises now."""
    rv = FakeRendezvous()
    f = finder(rv, co_recipients=False)
    await f.sender_holder(cast(LocationMessage, Msg()))
    await f.sender_holder(cast(LocationMessage, Msg()))
    assert rv.asked == ["alice@x"]  # kept
    f.forget("alice@x")
    found = await f.sender_holder(cast(LocationMessage, Msg()))
    assert rv.asked == ["alice@x", "alice@x"]
    assert "10.0.0.1:9000" in found.direct


class _HeldLookup:
    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def find(self, content_id: bytes, *, exclude: set[bytes]) -> list[Record]:
        await self.go.wait()
        return [Record(PEER_ID, ["10.0.0.2:9000"]), Record(b"o" * 32, ["10.0.0.3:9000"])]


async def test_the_sender_is_known_while_the_lookup_runs() -> None:
    """The sender's holder does not wait for the DHT lookup. A provider that no
    co-recipient's FINGER lists is looked for among the sender's devices (asked once)."""
    rv, held = FakeRendezvous(), _HeldLookup()

    async def finger(address: str) -> Info:
        rv.asked.append(address)
        own = [Device(b"o" * 32, {"addrs": ["10.0.0.3:9000"]})] if address == "alice@x" else []
        return Info([*own, *(await FakeRendezvous().finger(address)).devices])

    rv.finger = finger  # type: ignore[method-assign]
    f = HolderFinder("bob@x", cast(RendezvousClient, rv), cast(ProviderDirectory, held),
                     cast(ConnectionLadder, None), co_recipients=True, refresh=10.0)
    msg = cast(LocationMessage, Msg())
    async with asyncio.TaskGroup() as tg:
        others = tg.create_task(f.co_holders(msg))
        async with asyncio.timeout(5):
            sender = await f.sender_holder(msg)
        assert sender.peer_id == SENDER_ID and not others.done()
        held.go.set()
    assert [(h.peer_id, h.address) for h in others.result()] == [
        (PEER_ID, "carol@x"), (b"o" * 32, "alice@x")]
    assert sorted(rv.asked) == ["alice@x", "carol@x"]
