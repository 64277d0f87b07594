"""`peerpost node --metrics HOST:PORT`: Prometheus /metrics and /healthz of a running node.

Served by the node's own event loop (rendezvous.metrics.MetricsHttp, aiohttp), from a
`CollectorRegistry` of this node alone. The figures are read at scrape time from what the
parts already count: the inbox's rows by state (node.db), the mail counters of
IncomingMail (with the PIPE messages dropped as not signalling), the offers of unknown
rungs answered 'unsupported' (overlay.transports.signalling) and the offers of our own
rungs rejected as invalid (overlay.transports.endpoint), the download queue's
counters and running downloads, the transfer server's counters (what this node serves),
the DHT node's counters and table sizes, the `--on-message` hook's counters (`info`'s
`on-message ran/failed/timed-out/deferred`), and whether the rendezvous session is up
(also the health: 200 while connected, 503 otherwise).

Downloads are measured where they run, by `overlay.app.fetchmeter.FetchMeter` around
the download queue's fetcher: attempts by outcome, bytes by path (tcp, webrtc, relay),
the sources of running downloads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from overlay.app.fetchmeter import FetchMeter
from overlay.app.operations import mismatch_state
from rendezvous.metrics import MetricsHttp, counter, gauge

if TYPE_CHECKING:
    from overlay.app.node import Node

INBOX_STATES = ("unverified", "offered", "downloading", "retrying", "complete", "failed")
_DHT_GAUGES = {"contacts", "records"}


class NodeCollector(Collector):
    """Families read from a running `Node` at scrape time."""

    def __init__(self, node: Node, meter: FetchMeter) -> None:
        self.node = node
        self.meter = meter

    def collect(self) -> Iterator[Metric]:
        node, meter = self.node, self.meter
        p = "peerpost_node_"
        yield gauge(p + "connected", "1 while the rendezvous session is up",
                    1.0 if node.rendezvous.connected else 0.0)
        states = dict.fromkeys(INBOX_STATES, 0)
        for state, count in node.db.query("SELECT state, count(*) FROM inbox GROUP BY state"):
            states[str(state)] = int(count)
        yield gauge(p + "inbox_messages", "inbox messages by state", 0,
                    [({"state": s}, float(n)) for s, n in states.items()])
        yield gauge(p + "inbox_max", "messages the inbox keeps before refusing new ones",
                    node.inbox.max_entries)
        yield counter(p + "mail_events", "incoming mail by what happened to it", 0,
                      [({"event": k}, float(v))
                       for k, v in sorted({"received": 0, **node.incoming.counters}.items())])
        yield counter(p + "unknown_offers", "PIPE offers of a rung this node does not know: "
                      "answered 'unsupported', or dropped over the sender's reply rate "
                      "(limited) or over the total (limited-all)", 0,
                      [({"event": k}, float(v)) for k, v in sorted(
                          {"answered": 0, "limited": 0, "limited-all": 0,
                           **node.links.unknown.counters}.items())])
        links = node.links
        yield counter(p + "bad_offers", "PIPE offers of a rung of ours that do not decode: "
                      "rejected with the reason, or unanswered (over the sender's reply rate "
                      "or the total, or with no session to name)", 0,
                      [({"rung": name, "event": event}, float(n))
                       for name, rung in (("tcp-punch", links.punch), ("quic", links.quic),
                                          ("webrtc", links.rtc))
                       for event, n in (("rejected", rung.stats.bad_offers_rejected),
                                        ("unanswered", rung.stats.bad_offers_unanswered))])
        yield gauge(p + "downloads_running", "download attempts running", meter.running)
        yield counter(p + "downloads", "download attempts by outcome", 0,
                      [({"outcome": k}, float(v)) for k, v in sorted(meter.outcomes.items())])
        yield counter(p + "download_retries", "download attempts that will be retried "
                      "(no source reachable)", meter.outcomes["retry"])
        yield counter(p + "download_bytes", "content bytes received, by path", 0,
                      [({"path": k}, float(v))
                       for k, v in sorted(meter.bytes_by_path().items())])
        yield gauge(p + "download_sources", "sources of running downloads, by path", 0,
                    [({"path": k}, float(v))
                     for k, v in sorted(meter.sources_by_path().items())])
        yield counter(p + "downloads_failed", "downloads marked failed",
                      node.downloads.counters.get("failed", 0))
        yield counter(p + "upload_events", "what this node's transfer server did", 0,
                      [({"event": k.replace(".", "_")}, float(v)) for k, v in sorted(
                          {"chunks_served": 0, "sessions": 0,
                           **node.transfer.counters}.items())])
        stats = node.providers.dht.stats()
        yield counter(p + "dht_events", "DHT traffic by event", 0,
                      [({"event": k.replace(".", "_")}, float(v)) for k, v in
                       sorted({"datagrams_in": 0, **stats}.items())
                       if k not in _DHT_GAUGES])
        yield counter(p + "on_message_events", "--on-message hook events since the node "
                      "started: commands that ran to their end (ran), could not start "
                      "(failed) or were killed over the timeout (timed-out), and events "
                      "left owed in node.db for want of room (deferred)", 0,
                      [({"event": k}, float(v)) for k, v in sorted(
                          {"ran": 0, "failed": 0, "timed-out": 0, "deferred": 0,
                           **node.hook.counters}.items())])
        yield gauge(p + "dht_size", "DHT routing table contacts and records held", 0,
                    [({"name": k}, float(stats.get(k, 0))) for k in sorted(_DHT_GAUGES)])


class NodeMetrics:
    """The registry and HTTP endpoint of one node."""

    def __init__(self, node: Node, meter: FetchMeter) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NodeCollector(node, meter))
        self.http = MetricsHttp(self.registry, self.health)

    def health(self) -> tuple[bool, str]:
        node = self.node
        if node.rendezvous.connected:
            return True, f"connected to {node.config.server} as {node.address}"
        if (refused := node.rendezvous.refused) is not None:
            return False, f"the server {node.config.server} refused this node's login: {refused}"
        if (m := mismatch_state(node.rendezvous)) is not None:
            return False, f"not logged in: {m['text']}; next try in {m['next_try_in']:.0f} s"
        return False, f"not connected to the server {node.config.server}"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.http.start(host, port)

    async def aclose(self) -> None:
        await self.http.aclose()
