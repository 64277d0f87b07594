"""The package's k-buckets on the event loop's clock, without unowned tasks.

`kademlia.routing` stamps buckets with `time.monotonic()` (wrong under a simulated loop)
and, when a full bucket meets a newcomer, pings the bucket's head through a bare
`asyncio.ensure_future`. These subclasses take the clock from outside and hand the
liveness check to a callback (the protocol sends a ping whose reply or timeout updates
the table; no task is created). `find_neighbors` is rewritten too: the package's
`TableTraverser` stops as soon as one side runs out of buckets while it stands on an
empty one, so a table with 30 contacts could answer "no neighbours" (seen at 150 nodes).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

Clock = Callable[[], float]


class ClockedKBucket(KBucket):  # type: ignore[misc]
    """A k-bucket whose freshness stamp comes from `clock` (the loop's time)."""

    def __init__(self, lower: int, upper: int, ksize: int, clock: Clock) -> None:
        self._clock = clock  # before super().__init__, which stamps the bucket
        super().__init__(lower, upper, ksize)

    def touch_last_updated(self) -> None:
        self.last_updated = self._clock()

    def split(self) -> tuple[ClockedKBucket, ClockedKBucket]:
        midpoint = (self.range[0] + self.range[1]) // 2
        one = ClockedKBucket(self.range[0], midpoint, self.ksize, self._clock)
        two = ClockedKBucket(midpoint + 1, self.range[1], self.ksize, self._clock)
        for node in [*self.nodes.values(), *self.replacement_nodes.values()]:
            (one if node.long_id <= midpoint else two).add_node(node)
        return one, two


class ClockedRoutingTable(RoutingTable):  # type: ignore[misc]
    """Kademlia's routing table (section 4.2 splitting, replacement cache) on `clock`.

    `on_full_bucket(head)` is called when a newcomer finds its bucket full and unsplittable:
    the caller pings `head` and removes it if it does not answer, which promotes the most
    recent replacement (kademlia paper section 2.2).
    """

    def __init__(self, ksize: int, node: Node, clock: Clock,
                 on_full_bucket: Callable[[Node], None]) -> None:
        self._clock = clock
        self._on_full_bucket = on_full_bucket
        super().__init__(None, ksize, node)

    def flush(self) -> None:
        self.buckets = [ClockedKBucket(0, 2**160, self.ksize, self._clock)]
        self._flat: dict[int, Node] | None = None  # live contacts by long id
        self._uppers: list[int] | None = None  # each bucket's range[1], in order

    def split_bucket(self, index: int) -> None:
        super().split_bucket(index)
        self._flat = self._uppers = None

    def get_bucket_for(self, node: Node) -> int:
        """The package's rule (first bucket whose range[1] exceeds the id), by bisection:
        it ran on every contact seen and every find served."""
        uppers = self._uppers
        if uppers is None:
            uppers = self._uppers = [b.range[1] for b in self.buckets]
        return bisect.bisect_right(uppers, node.long_id)

    def remove_contact(self, node: Node) -> None:
        super().remove_contact(node)  # may promote a replacement
        self._flat = None

    def lonely_buckets(self) -> list[Any]:
        """Buckets not looked up in the last hour (paper section 2.3)."""
        hour_ago = self._clock() - 3600
        return [b for b in self.buckets if b.last_updated < hour_ago]

    def add_contact(self, node: Node) -> None:
        if node.id == self.node.id:
            return
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            if self._flat is not None:
                self._flat[node.long_id] = node  # a new member, or an old one's address
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self._on_full_bucket(bucket.head())

    def find_neighbors(self, node: Node, k: int | None = None,
                       exclude: Node | None = None) -> list[Node]:
        """The k contacts closest to `node` (all of them ranked: a few thousand at most).

        Nodes serve a find for every hop of every lookup that passes them, so an index of
        the contacts by id is kept up to date instead of walking the buckets each time.
        """
        self.buckets[self.get_bucket_for(node)].touch_last_updated()
        target = node.long_id
        flat = self._flat
        if flat is None:
            flat = self._flat = {n.long_id: n for b in self.buckets for n in b.nodes.values()}
        # Rank the ids by XOR distance in C (int.__xor__ as the key), then skip the few
        # excluded ones from the front.
        want = k or self.ksize
        out: list[Node] = []
        for long_id in sorted(flat, key=target.__xor__):
            n = flat[long_id]
            if long_id == target or (exclude is not None and n.same_home_as(exclude)):
                continue
            out.append(n)
            if len(out) == want:
                break
        return out

    def size(self) -> int:
        """How many live contacts the table holds (replacements not counted)."""
        return sum(len(b) for b in self.buckets)

    def contacts(self) -> list[Node]:
        return [n for b in self.buckets for n in b.get_nodes()]
