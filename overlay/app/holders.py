"""Who holds a message's content, and how to reach each of them.

The sender always, and, with co-recipient sourcing on, every device the DHT names as a
provider. FINGER at the server tells what each device advertises now (direct addresses,
a NAT in front, the address to signal through); the connection ladder turns each holder
into a source the Downloader can connect to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from crypto.location import MAX_RECIPIENTS, LocationMessage
from overlay.dht.directory import ProviderDirectory
from overlay.transfer.downloader import Downloader
from overlay.transports.ladder import ConnectionLadder, Holder, Source, sender_addresses
from rendezvous.client import RendezvousClient, RendezvousError
from rendezvous.records import FingerResult

log = logging.getLogger("peerpost.node")

# Seconds between lookups of the co-recipients while a download is stuck (its sources show
# none of its missing chunks), until it probes the sender (`Downloader.probe_after`): two
# in a 5 s wait. 2 MiB to three recipients online at once from a sender capped at
# 512 KiB/s: the first asks for both chunks, the sender's super-seeding shows the other two
# nothing, and they took them from the first once it held them: all three done after
# 3.9 s. Looked up only every `refresh` seconds (10 by default), they waited for the
# probe and took what was left from the sender: the last done after 10.0 s. Every 1 s
# instead of 2 was no faster there, and in the simulator's nat-mix (seeds 1-12) the
# completion p90 came out 1.3 s later on average than with no such lookups, against 0.7.
STUCK_LOOKUP = 2.0
FINGER_CACHE = 30.0  # seconds a co-recipient's FINGER answer is reused while downloading
Device = tuple[bytes, tuple[str, dict[str, Any]]]  # peer id, (address, advertisement)


class HolderFinder:
    """Finds the holders of a message's content: FINGER for the devices, the DHT directory
    for the co-recipients that provide it (when `co_recipients`)."""

    def __init__(self, address: str, rendezvous: RendezvousClient,
                 providers: ProviderDirectory, ladder: ConnectionLadder, *,
                 co_recipients: bool, refresh: float) -> None:
        self.address = address
        self.rendezvous = rendezvous
        self.providers = providers
        self.ladder = ladder
        self.co_recipients = co_recipients
        self.refresh_every = refresh
        self._finger_cache: dict[str, tuple[float, list[Device]]] = {}

    async def sources(self, msg: LocationMessage) -> list[Source]:
        """Every holder of `msg`'s content, as a source on the connection ladder."""
        return [self.ladder.source(h) for h in await self.holders(msg)]

    async def sender_source(self, msg: LocationMessage) -> Source:
        """The sender, on the connection ladder: a download starts from it at once."""
        return self.ladder.source(await self.sender_holder(msg))

    async def co_sources(self, msg: LocationMessage) -> list[Source]:
        """The co-recipients the DHT names, on the connection ladder (`co_holders`)."""
        return [self.ladder.source(h) for h in await self.co_holders(msg)]

    async def refresh(self, dl: Downloader, msg: LocationMessage,
                      stuck: asyncio.Event | None = None) -> None:
        """Look the providers up again every `refresh` seconds during a long download:
        co-recipients that got chunks since it started become sources too, and a holder
        that failed earlier (a sender that was away) is tried again. Runs until cancelled.

        `stuck` is set when the download's sources show none of its missing chunks (a
        super-seeding sender shows them to other recipients first): the co-recipients are
        then looked up every STUCK_LOOKUP seconds until the download probes the sender,
        and those that got chunks meanwhile serve them."""
        loop = asyncio.get_running_loop()
        full_at = loop.time() + self.refresh_every
        while True:
            if stuck is None or not self.co_recipients:
                await asyncio.sleep(full_at - loop.time())
            else:
                with contextlib.suppress(TimeoutError):  # the full refresh is due
                    async with asyncio.timeout_at(full_at):
                        await stuck.wait()
                        stuck.clear()
                        await self._while_stuck(dl, msg, full_at)
                        continue
            full_at = loop.time() + self.refresh_every
            self._add(dl, msg, await self.sources(msg))

    async def _while_stuck(self, dl: Downloader, msg: LocationMessage, until: float) -> None:
        """The co-recipients, every STUCK_LOOKUP seconds while `dl` stays stuck, until
        its probe (`probe_after`) or the full refresh at `until` (loop time)."""
        loop = asyncio.get_running_loop()
        ends = min(loop.time() + dl.probe_after, until)
        while loop.time() + STUCK_LOOKUP < ends:
            await asyncio.sleep(STUCK_LOOKUP)
            if not dl.scheduler.stuck():
                return
            self._add(dl, msg, await self.co_sources(msg))

    @staticmethod
    def _add(dl: Downloader, msg: LocationMessage, sources: list[Source]) -> None:
        for source in sources:
            if dl.add_source(source):  # False while in use, or if it lied
                log.info("message %s: new source %s", msg.headers.message_id.hex(),
                         source.label)

    async def holders(self, msg: LocationMessage) -> list[Holder]:
        """The sender and every co-recipient the DHT names as a provider, with what FINGER
        says about reaching each (addresses now, NAT, the address to signal through).
        The sender's FINGER and the DHT lookup are independent round trips and go out
        together."""
        async with asyncio.TaskGroup() as tg:  # neither raises (both log and go on)
            others = tg.create_task(self.co_holders(msg))
            sender = await self.sender_holder(msg)
        return [sender, *others.result()]

    async def sender_holder(self, msg: LocationMessage) -> Holder:
        """The sender, with what its FINGER says (or the message's own addresses if the
        FINGER fails). It is always a holder: a download needs nothing else to start, and
        waits for no DHT walk (a few round trips, more with dead nodes to time out)."""
        sender = msg.headers.sender_peer_id
        devices = await self.devices([msg.headers.sender])
        s_addr, s_adv = devices.get(sender, (msg.headers.sender, {}))
        return Holder(sender, s_addr, tuple(sender_addresses(msg, _addrs(s_adv))),
                      bool(s_adv.get("nat")))

    async def co_holders(self, msg: LocationMessage) -> list[Holder]:
        """Every device the DHT names as a provider of `msg`'s content but the sender's
        (none unless `co_recipients`), with what FINGER says of it. The co-recipients'
        FINGERs go out with the lookup; a provider none of them lists (another device of
        the sender) is looked for among the sender's devices once the lookup is back,
        whose FINGER the download asked for at the start (an answer, by then, that is
        remembered)."""
        if not self.co_recipients:
            return []
        sender = msg.headers.sender_peer_id
        async with asyncio.TaskGroup() as tg:  # neither raises (both log and go on)
            asked = tg.create_task(self.devices(list(msg.headers.recipients)))
            providers = await self.providers.find(msg.handle.content_id, exclude={sender})
        devices = asked.result()
        if any(rec.peer_id not in devices for rec in providers):
            devices |= await self.devices([msg.headers.sender])
        holders = []
        for rec in providers:
            addr, adv = devices.get(rec.peer_id, (None, {}))
            holders.append(Holder(rec.peer_id, addr, tuple(rec.addresses),
                                  bool(adv.get("nat"))))
        return holders

    def remember(self, address: str, info: FingerResult) -> list[Device]:
        """Keep the answer to a FINGER of `address` for FINGER_CACHE seconds, whoever
        asked: the inbox looks a first contact's keys up just before its download starts,
        and the download asked the server the same again, a round trip on the way to the
        first chunk. Returns its devices."""
        found = [(d.peer_id, (address, dict(d.advertise))) for d in info.devices]
        self._finger_cache[address] = (asyncio.get_running_loop().time(), found)
        return found

    def forget(self, address: str) -> None:
        """Drop the FINGER answer kept for `address`: a source it named failed. The next
        attempt asks what the device advertises now; a device restarted on another port
        (its own was taken meanwhile) is reached directly again, where the kept answer
        sent the retry to the port it left and on up the ladder (punch, QUIC, WebRTC,
        the relay) for up to FINGER_CACHE seconds."""
        self._finger_cache.pop(address, None)

    async def devices(self, addresses: list[str]) -> dict[bytes, tuple[str, dict[str, Any]]]:
        """peer id -> (address, advertisement) for the devices of `addresses` (FINGER)."""
        loop = asyncio.get_running_loop()

        async def one(address: str) -> list[Device]:
            # Every provider refresh asks again; with a hundred co-recipients that is a
            # hundred FINGERs. An answer younger than FINGER_CACHE seconds is reused.
            cached = self._finger_cache.get(address)
            if cached is not None and loop.time() - cached[0] < FINGER_CACHE:
                return cached[1]
            try:
                info = await self.rendezvous.finger(address)
            except (RendezvousError, OSError) as exc:
                log.info("FINGER %s failed: %s", address, exc)
                return []
            return self.remember(address, info)

        wanted = [a for a in dict.fromkeys(addresses) if a != self.address][:MAX_RECIPIENTS]
        found = await asyncio.gather(*(one(a) for a in wanted))
        return dict(pair for pairs in found for pair in pairs)


def _addrs(advertise: dict[str, Any]) -> list[str]:
    return [a for a in advertise.get("addrs", []) if isinstance(a, str)][:8]
