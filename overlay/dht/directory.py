"""The node's use of the DHT: say what we hold, find who else holds something.

A node announces a signed provider record for every content it can serve: what it sent,
and what it received (from the first verified chunk on: partial holders serve what they
have). A downloader asks the DHT for providers when it starts and again every
`REFRESH_INTERVAL` during a long download, so co-recipients that got the file earlier,
or started later, become sources. Announcing runs
in tasks this object owns; a failed announce is logged and retried by the DHT's own
republishing, and never stops a download.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode, ProviderRecord
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.providers")

REFRESH_INTERVAL = 10.0  # seconds between provider lookups during one download
LOOKUP_TIMEOUT = 10.0


class ProviderDirectory:
    """Announce and look up provider records through one DhtNode."""

    def __init__(self, identity: DeviceIdentity, *, wall: Callable[[], float],
                 rng: random.Random, client_only: bool = False) -> None:
        self.identity = identity
        self.dht = DhtNode(identity, client_only=client_only, wall=wall, rng=rng)
        self._tasks = TaskSet("dht-announce", logger=log)
        self._announced: set[bytes] = set()
        self.addresses: list[str] = []
        self.home_server = ""

    async def start(self, host: str, bootstrap: list[tuple[str, int]]) -> tuple[str, int]:
        """Bind the DHT's UDP socket on `host` and join through `bootstrap`."""
        bound = await self.dht.listen(host, 0)
        if bootstrap:
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT):
                    found = await self.dht.bootstrap(bootstrap)
                log.info("DHT joined through %s: %d contact%s in the routing table",
                         bootstrap, found, "" if found == 1 else "s")
            except (TimeoutError, OSError) as exc:
                log.warning("DHT bootstrap through %s failed: %s", bootstrap, exc)
        return bound

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self.dht.aclose()

    def announce(self, content_id: bytes) -> None:
        """Publish (once) that we hold `content_id`; the DHT keeps it fresh."""
        if content_id in self._announced or not self.addresses:
            return
        if self._tasks.closed:
            return
        self._announced.add(content_id)
        self._tasks.spawn(self._announce(content_id), name=f"announce-{content_id.hex()[:8]}")

    async def _announce(self, content_id: bytes) -> None:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT * 3):
                n = await self.dht.announce(content_id, self.addresses, self.home_server)
            log.info("announced %s to %d DHT nodes", content_id.hex()[:16], n)
        except (TimeoutError, OSError, ValueError) as exc:
            self._announced.discard(content_id)  # try again at the next chance
            log.warning("announcing %s failed: %s", content_id.hex()[:16], exc)

    def readdress(self, addresses: list[str]) -> int:
        """Our addresses changed (the host moved to another network): announce every
        content again with the new ones; the records already stored name the old
        addresses until they expire. Returns how many contents are announced again."""
        if addresses == self.addresses:
            return 0
        self.addresses = list(addresses)
        return self.announce_again()

    def announce_again(self) -> int:
        """Announce every content again now (the host woke from sleep: the DHT's
        republishing waits on asyncio's clock, which stood still, so our records may have
        expired at the nodes that stored them). Returns how many are announced again."""
        if not self.addresses:
            return 0  # nothing to announce with (yet): what was announced stays listed
        again = list(self._announced)
        self._announced.clear()
        for content_id in again:
            self.announce(content_id)
        return len(again)

    async def withdraw(self, content_id: bytes) -> None:
        self._announced.discard(content_id)
        await self.dht.withdraw(content_id)

    async def find(self, content_id: bytes, *, exclude: set[bytes]) -> list[ProviderRecord]:
        """Provider records for `content_id`, without ourselves and `exclude` (peer ids)."""
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                records = await self.dht.find_providers(content_id)
        except (TimeoutError, OSError) as exc:
            log.info("provider lookup for %s failed: %s", content_id.hex()[:16], exc)
            return []
        return [r for r in records
                if r.peer_id not in exclude and r.peer_id != self.identity.peer_id]
