"""A continuous alpha-parallel Kademlia lookup: the core (no I/O) and its asyncio driver.

The package's `SpiderCrawl` works in rounds: it sends alpha queries and waits for all of
them, so one dead node holds the round for the whole 5 s timeout. Here a query slot is
refilled as soon as any query answers or fails, always with the closest candidate not yet
asked, and the lookup ends once the k closest nodes that did not fail have all answered
(Maymounkov and Mazieres section 2.3; the "continuous" variant of Jimenez et al. 2011).
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections.abc import Callable, Iterable
from typing import TypeVar

from kademlia.node import Node

R = TypeVar("R")


class _State(enum.Enum):
    WAITING = "waiting"      # known, not asked
    ASKED = "asked"          # query in flight
    ANSWERED = "answered"
    FAILED = "failed"        # timed out, refused or lied about its id


class Lookup:
    """State of one lookup for `target`; feed it outcomes, ask it whom to query next."""

    def __init__(self, target: bytes, *, k: int, alpha: int, self_id: bytes,
                 max_queries: int | None = None) -> None:
        self.target = target
        self._target_long = int.from_bytes(target, "big")
        self.k = k
        self.alpha = alpha
        self._self_id = self_id
        self._max_candidates = 8 * k
        self._max_queries = max_queries if max_queries is not None else 6 * k
        self.queries = 0
        # Hops: a node from our own table is at depth 0, one a depth-d node named at d + 1;
        # `hops` is the longest chain of answers the lookup went through (depth + 1).
        self.hops = 0
        self._depth: dict[bytes, int] = {}
        self._in_flight = 0
        self._nodes: dict[bytes, Node] = {}
        self._state: dict[bytes, _State] = {}
        self._order: list[tuple[int, bytes]] = []  # (distance, id), ascending; FAILED dropped

    def add(self, nodes: Iterable[Node], depth: int = 0) -> None:
        """Learn candidates (from our table, or at `depth` from a reply)."""
        for node in nodes:
            if node.id == self._self_id or node.id in self._state:
                continue
            distance = node.long_id ^ self._target_long
            if len(self._order) >= self._max_candidates:
                if distance >= self._order[-1][0]:
                    continue
                # Make room by forgetting the farthest, whatever its state: a node asked
                # or answered keeps its state (never re-added, a late reply still counts)
                # but leaves the ranking, which only the k closest matter to.
                _, dropped = self._order.pop()
                if self._state[dropped] is _State.WAITING:
                    del self._state[dropped], self._nodes[dropped], self._depth[dropped]
            bisect.insort(self._order, (distance, node.id))
            self._nodes[node.id] = node
            self._depth[node.id] = depth
            self._state[node.id] = _State.WAITING

    def _frontier(self) -> list[bytes]:
        return [nid for _, nid in self._order[: self.k]]

    def next_queries(self) -> list[Node]:
        """Nodes to query now (marked as asked); empty if the slots are full or none is left."""
        out: list[Node] = []
        for nid in self._frontier():
            if self._in_flight >= self.alpha or self.queries >= self._max_queries:
                break
            if self._state[nid] is _State.WAITING:
                self._state[nid] = _State.ASKED
                self._in_flight += 1
                self.queries += 1
                out.append(self._nodes[nid])
        return out

    def answered(self, node_id: bytes, learned: Iterable[Node]) -> None:
        """`node_id` replied, naming `learned` as closer nodes."""
        if self._state.get(node_id) is _State.ASKED:
            self._state[node_id] = _State.ANSWERED
            self._in_flight -= 1
            depth = self._depth[node_id] + 1
            if depth > self.hops:
                self.hops = depth
            self.add(learned, depth)

    def failed(self, node_id: bytes) -> None:
        """`node_id` did not give a usable answer; it no longer counts among the closest."""
        if self._state.get(node_id) is _State.ASKED:
            self._state[node_id] = _State.FAILED
            self._in_flight -= 1
            self._order = [e for e in self._order if e[1] != node_id]

    @property
    def done(self) -> bool:
        """The k closest live candidates have answered, or there is nobody left to ask."""
        frontier = self._frontier()
        if all(self._state[n] is _State.ANSWERED for n in frontier):
            return True
        if self.queries >= self._max_queries:
            return not any(self._state[n] is _State.ASKED for n in frontier)
        return False

    def closest_answered(self) -> list[Node]:
        """Up to k nodes that answered, closest first."""
        ids = [nid for _, nid in self._order if self._state[nid] is _State.ANSWERED]
        return [self._nodes[nid] for nid in ids[: self.k]]


async def run_lookup(
    lookup: Lookup,
    query: Callable[[Node], asyncio.Future[R]],
    outcome: Callable[[Node, R], list[Node] | None],
    *,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Drive `lookup`: `query(node)` sends one RPC and returns its future (owned and always
    resolved, by reply or timeout, by the protocol); `outcome(node, result)` returns the
    nodes a reply named, or None for a failure. Ends when the lookup is done or `stop()`.

    Queries still in flight at the end are left to finish on their own: their replies still
    feed the routing table and the RTT estimates.
    """
    pending: dict[asyncio.Future[R], Node] = {}
    while not lookup.done and not stop():
        for node in lookup.next_queries():
            pending[query(node)] = node
        if not pending:
            return
        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for fut in finished:
            node = pending.pop(fut)
            learned = outcome(node, fut.result())
            if learned is None:
                lookup.failed(node.id)
            else:
                lookup.answered(node.id, learned)
