"""Adaptive RPC timeouts: RFC 6298's SRTT + 4*RTTVAR, kept per node and overall.

The package waits a fixed 5 s for every reply; here a node we have measured gets its own
timeout, others get the overall estimate, and both are clamped to [0.1 s, 2 s].
"""

from __future__ import annotations

from collections import OrderedDict

MIN_RTO = 0.1
MAX_RTO = 2.0
INITIAL_RTO = 1.0
MAX_TRACKED_NODES = 4096


class RttEstimator:
    """One smoothed round-trip estimate (RFC 6298 section 2)."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        """Fold in one measured round trip, in seconds."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def rto(self) -> float:
        """The retransmission (here: give-up) timeout, clamped."""
        if self.srtt is None:
            return INITIAL_RTO
        return min(MAX_RTO, max(MIN_RTO, self.srtt + 4 * self.rttvar))


class RttTable:
    """A global estimator plus a bounded LRU of per-node ones."""

    def __init__(self, max_nodes: int = MAX_TRACKED_NODES) -> None:
        self.overall = RttEstimator()
        self._nodes: OrderedDict[bytes, RttEstimator] = OrderedDict()
        self._max = max_nodes

    def sample(self, node_id: bytes | None, rtt: float) -> None:
        """Record a reply that took `rtt` seconds (node_id None: not yet known)."""
        self.overall.sample(rtt)
        if node_id is None:
            return
        est = self._nodes.pop(node_id, None) or RttEstimator()
        est.sample(rtt)
        self._nodes[node_id] = est
        while len(self._nodes) > self._max:
            self._nodes.popitem(last=False)

    def timeout_for(self, node_id: bytes | None) -> float:
        """How long to wait for this node's reply."""
        est = self._nodes.get(node_id) if node_id is not None else None
        return (est or self.overall).rto()
