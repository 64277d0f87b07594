"""The node's use of the DHT: say what we hold, find who else holds something.

A node announces a signed provider record for every content it can serve: what it sent,
and what it received (from the first verified chunk on: partial holders serve what they
have). A downloader asks the DHT for providers when it starts and again every
`REFRESH_INTERVAL` during a long download, so co-recipients that got the file earlier,
or started later, become sources. Announcing runs
in tasks this object owns; a failed announce is logged and retried by the DHT's own
republishing, and never stops a download.

A content the node no longer holds (retention deleted or archived it, `rm`, `cancel`, a
received file deleted from disk) is not announced again: `held(content_id)` is asked before
each announce and each 22 h republish. The node calls `withdraw()` when it drops one, and
`unserved()` when serving finds one gone (a file deleted while the node runs); the
records other DHT nodes keep can't be recalled and lapse within their 48 h TTL, so a
downloader may still find and ask us until then (we refuse: "no such content here", or
"source changed").

A withdrawal has the last word over an announce already under way (the first after a
download or a send, one at start, or a wake's): the announce checks, after its holding
check and once its DHT lookup is done, that no withdrawal came meanwhile, and sends no
STORE (which would offer the content for 48 h more) nor republishes if one did. A
withdrawal asks `held` once more when it is done, and announces the content again if the
node holds it after all (received again while the caller decided): no announce is lost to
a withdrawal decided on stale news.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Callable

from crypto.identity import DeviceIdentity
from overlay.dht import RECORD_TTL, DhtNode, ProviderRecord
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.providers")

REFRESH_INTERVAL = 10.0  # seconds between provider lookups during one download
LOOKUP_TIMEOUT = 10.0


class ProviderDirectory:
    """Announce and look up provider records through one DhtNode."""

    def __init__(self, identity: DeviceIdentity, *, wall: Callable[[], float],
                 rng: random.Random, client_only: bool = False,
                 held: Callable[[bytes], bool] | None = None) -> None:
        """`held(content_id)`: whether we serve that content now (blocking: run in a
        thread); None announces whatever `announce` is given."""
        self.identity = identity
        self._held = held
        self.dht = DhtNode(identity, client_only=client_only, wall=wall, rng=rng)
        self._tasks = TaskSet("dht-announce", logger=log)
        # Each content announced, to the mark of its latest announce (`_announce`): a
        # withdrawal removes it, a new announce replaces it.
        self._announced: dict[bytes, object] = {}
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
        mark = self._announced[content_id] = object()
        self._tasks.spawn(self._announce(content_id, mark),
                          name=f"announce-{content_id.hex()[:8]}")

    async def _announce(self, content_id: bytes, mark: object) -> None:
        short = content_id.hex()[:16]
        try:
            if not await self._still_held(content_id):
                self._forget(content_id, mark)
                log.info("not announcing %s: it is no longer held here", short)
                return
            if self._announced.get(content_id) is not mark:
                self._overtaken(content_id)
                return
            async with asyncio.timeout(LOOKUP_TIMEOUT * 3):
                # Nothing awaits between the check above and the DHT's own mark, set
                # before its first await: from here on `dht.withdraw` stops this announce.
                n = await self.dht.announce(content_id, self.addresses, self.home_server,
                                            keep=lambda: self._still_held(content_id))
            if self._announced.get(content_id) is not mark:
                self._overtaken(content_id)
                return
            log.info("announced %s to %d DHT nodes", short, n)
        except (TimeoutError, OSError, ValueError) as exc:
            self._forget(content_id, mark)  # try again at the next chance
            log.warning("announcing %s failed: %s", short, exc)

    def _forget(self, content_id: bytes, mark: object) -> None:
        """This announce of `content_id` (its `mark`) did not take: the next may."""
        if self._announced.get(content_id) is mark:
            del self._announced[content_id]

    def _overtaken(self, content_id: bytes) -> None:
        """An announce found a later one, or a withdrawal, came while it ran."""
        if content_id not in self._announced:
            log.info("not announcing %s: it was withdrawn while being announced",
                     content_id.hex()[:16])
        # else a later announce (a wake's) runs and says what it did

    async def readdress(self, addresses: list[str]) -> int:
        """Our addresses changed (the host moved to another network): announce every
        content again with the new ones; the records already stored name the old
        addresses until they expire. Returns how many contents are announced again."""
        if addresses == self.addresses:
            return 0
        self.addresses = list(addresses)
        return await self.announce_again()

    async def announce_again(self) -> int:
        """Announce every content again now (the host woke from sleep: the DHT's
        republishing waits on asyncio's clock, which stood still, so our records may have
        expired at the nodes that stored them). A content no longer held is withdrawn
        instead. Returns how many are announced again."""
        if not self.addresses:
            return 0  # nothing to announce with (yet): what was announced stays listed
        again = list(self._announced)
        held = set(await asyncio.to_thread(lambda: [c for c in again if self._holds(c)]))
        for content_id in again:
            if content_id not in self._announced:
                continue  # withdrawn meanwhile
            if content_id in held:
                del self._announced[content_id]
                self.announce(content_id)
            else:
                await self.withdraw(content_id)
        return len(held)

    async def _still_held(self, content_id: bytes, *, unsure: bool = True) -> bool:
        return await asyncio.to_thread(self._holds, content_id, unsure)

    def _holds(self, content_id: bytes, unsure: bool = True) -> bool:
        """`held(content_id)`, `unsure` when it can't tell. Blocking."""
        if self._held is None:
            return True
        try:
            return self._held(content_id)
        except (OSError, sqlite3.Error) as exc:  # node.db unreadable now: maybe not for good
            log.warning("could not tell whether %s is still held (%s); %s",
                        content_id.hex()[:16], exc,
                        "announcing it" if unsure else "it stays withdrawn")
            return unsure

    def unserved(self, content_id: bytes) -> asyncio.Task[None] | None:
        """Serving just refused `content_id` as gone (no such content here, or its file
        changed): if we announced it and it is indeed no longer held, withdraw it now,
        not at the next 22 h republish. A file found changed stays so until the node
        restarts (`LocalContent.source_changed`); a restart, or a new announce (the file
        sent again), offers it again once it is served. Returns the task that checks,
        None when there is nothing to check."""
        if content_id not in self._announced or self._tasks.closed:
            return None  # not ours to withdraw (anyone may ask for any id), or done already
        return self._tasks.spawn(self._withdraw_unserved(content_id),
                                 key=("unserved", content_id),
                                 name=f"unserved-{content_id.hex()[:8]}")

    async def _withdraw_unserved(self, content_id: bytes) -> None:
        if not await self._still_held(content_id):
            await self.withdraw(content_id)

    async def withdraw(self, content_id: bytes) -> None:
        """We no longer hold `content_id`: stop announcing it. Other DHT nodes' copies of
        our record lapse within its 48 h TTL (records.RECORD_TTL)."""
        was = self._announced.pop(content_id, None) is not None
        # Its first step, before any await, stops the announces of it still publishing.
        await self.dht.withdraw(content_id)
        if was:
            log.info("withdrew %s from the DHT: no longer held here (the records other "
                     "nodes keep lapse within %d h)", content_id.hex()[:16], RECORD_TTL // 3600)
        if self._held is not None and await self._still_held(content_id, unsure=False):
            log.info("%s is held here again: announcing it", content_id.hex()[:16])
            self.announce(content_id)

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
