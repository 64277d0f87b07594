"""Prometheus metrics and a health check over HTTP, for the server (and, reused, the node).

`MetricsHttp` is a small aiohttp app on the running loop with two routes:

- `/metrics`: the text exposition of one `CollectorRegistry` (each process object has its
  own; the library's global registry is never used);
- `/healthz`: 200 with a one-line reason while the process serves, 503 with the reason
  otherwise.

`ServerMetrics` reads what `RendezvousServer` already counts: its `snapshot()` (sessions,
requests, messages in and out, refusals, relay, federation, the extra services' counters)
at scrape time, and the two figures only the database knows (envelopes queued for
devices, envelopes waiting in the outbound queue), read at most every `db_every` seconds
on a read-only connection in a thread. The one thing it records itself is time: the
server calls `observe` (its `on_reply` hook) for every reply, which feeds the request
latency histogram by verb, the replies by verb and status, and the SEND-to-ack histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from crypto.address import format_hostport
from rendezvous.logfmt import kv

if TYPE_CHECKING:
    from rendezvous.server import RendezvousServer

log = logging.getLogger("rendezvous.metrics")

Health = Callable[[], tuple[bool, str]]
# Request handling on loopback takes 50 us..50 ms (a SEND waits for its group commit).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class MetricsHttp:
    """`/metrics` and `/healthz` on HOST:PORT, served by the running event loop."""

    def __init__(self, registry: CollectorRegistry, health: Health, *,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.registry = registry
        self.health = health
        self.refresh = refresh
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0: any free port); return the bound address."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        log.info(kv("metrics.listening", host=self.address[0], port=self.address[1]))
        return self.address

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            try:
                await self.refresh()
            except Exception as exc:  # stale figures beat no figures
                log.warning(kv("metrics.refresh_failed", error=exc))
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, reason = self.health()
        return web.Response(text=reason + "\n", status=200 if ok else 503)


def counter(name: str, doc: str, value: float,
            labels: Iterable[tuple[dict[str, str], float]] = ()) -> CounterMetricFamily:
    """A counter family: one unlabelled value, or `labels` (label dict, value) pairs."""
    rows = list(labels)
    fam = CounterMetricFamily(name, doc, labels=sorted(rows[0][0]) if rows else None)
    if not rows:
        fam.add_metric([], value)
    for lab, val in rows:
        fam.add_metric([lab[k] for k in sorted(lab)], val)
    return fam


def gauge(name: str, doc: str, value: float,
          labels: Iterable[tuple[dict[str, str], float]] = ()) -> GaugeMetricFamily:
    """A gauge family, as `counter`."""
    rows = list(labels)
    fam = GaugeMetricFamily(name, doc, labels=sorted(rows[0][0]) if rows else None)
    if not rows:
        fam.add_metric([], value)
    for lab, val in rows:
        fam.add_metric([lab[k] for k in sorted(lab)], val)
    return fam


# snapshot key -> refusal reason (peerpost_rendezvous_refusals_total{reason})
_REFUSALS = {
    "sessions_refused": "session_cap",
    "slow_readers_dropped": "slow_reader",
    "bad_input": "bad_input",
    "connections_failed": "connection_failed",
    "links_refused": "link_refused",
    "link_refused_alignment": "link_alignment",
    "link_refused_blocked": "link_blocked",
    "link_rate_limited": "link_rate",
    "relay_refused": "relay_refused",
    "relay_cut_daily": "relay_daily_cap",
    "relay_expired": "relay_expired",
    "fed_links_refused_identity": "link_identity",
}
# extra services' counters that are sizes, not events
_SERVICE_GAUGES = {"contacts", "records"}


class ServerCollector(Collector):
    """Families read from a live `RendezvousServer` at scrape time."""

    def __init__(self, server: RendezvousServer, counts: Counts | None, *,
                 db_every: float = 5.0) -> None:
        self.server = server
        self.counts = counts
        self.db_every = db_every
        self._db: dict[str, int] = {}
        self._db_at = -1e18

    async def refresh(self) -> None:
        """Re-read the database counts if the last read is older than `db_every`."""
        if self.counts is None or time.monotonic() - self._db_at < self.db_every:
            return
        try:
            self._db = await self.counts()
        except Exception as exc:  # a database away for a moment: the rest still serves
            log.warning(kv("metrics.counts_failed", error=str(exc)))
        self._db_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        snap = self.server.snapshot()
        n = _snap_int(snap)
        p = "peerpost_rendezvous_"
        yield gauge(p + "connections", "open connections (sessions, relay, links)",
                    n("connections"))
        yield gauge(p + "sessions", "authenticated device sessions online",
                    n("online_sessions"))
        yield gauge(p + "devices_online", "devices with at least one session",
                    n("online_devices"))
        yield counter(p + "requests", "requests of authenticated sessions", n("requests"))
        yield counter(p + "messages_in", "SEND requests stored (messages in)", n("sends"))
        yield counter(p + "messages_out", "envelopes delivered to online devices "
                      "(messages out)", n("delivered"))
        yield counter(p + "pipes_relayed", "PIPE messages handed to an online device",
                      n("pipes_relayed"))
        yield counter(p + "pipes_held", "PIPE messages held for an offline device",
                      n("pipes_held"))
        yield gauge(p + "unsent_bytes", "push bytes waiting in session write buffers",
                    n("unsent_bytes"))
        yield counter(p + "refusals", "refused or dropped, by reason", 0,
                      [({"reason": r}, n(k)) for k, r in _REFUSALS.items()])
        yield counter(p + "relay_bytes", "bytes relayed between spliced devices",
                      n("relayed_bytes"))
        yield counter(p + "relay_sessions", "relay sessions spliced", n("relay_sessions"))
        yield gauge(p + "relay_active", "relay splices now", n("relay_active"))
        yield gauge(p + "relay_pending", "relay sessions offered, not yet accepted",
                    n("relay_pending"))
        if self.counts is not None:
            yield gauge(p + "queue_depth", "envelopes queued for devices",
                        self._db.get("queued", 0))
            yield gauge(p + "outbound_queue_depth", "envelopes waiting to be forwarded "
                        "to other domains", self._db.get("outbound", 0))
        yield from self._instances(p)
        yield counter(p + "federation_forwarded", "envelopes forwarded to other domains",
                      n("fed_forwarded"))
        yield counter(p + "federation_bounced", "envelopes bounced to their sender",
                      n("fed_bounced"))
        yield counter(p + "federation_link_failures", "failed attempts to link to a domain",
                      n("fed_link_failures"))
        yield counter(p + "federation_links_refused", "links another domain refused for "
                      "good (403): mail waiting for it bounced", n("fed_links_refused"))
        yield gauge(p + "federation_links_out", "open links to other domains",
                    n("fed_links_open"))
        yield gauge(p + "federation_links_in", "open links from other domains", n("links_in"))
        yield counter(p + "federation_links_accepted", "links from other domains accepted",
                      n("links_accepted"))
        for name in sorted(self.server.services):
            prefix = name + "_"
            events = [({"event": k[len(prefix):]}, float(v)) for k, v in sorted(snap.items())
                      if k.startswith(prefix) and isinstance(v, int)
                      and k[len(prefix):] not in _SERVICE_GAUGES]
            sizes = [({"name": k[len(prefix):]}, float(v)) for k, v in sorted(snap.items())
                     if k.startswith(prefix) and k[len(prefix):] in _SERVICE_GAUGES]
            if events:
                yield counter(f"{p}{name}_events", f"{name} service traffic by event", 0,
                              events)
            if sizes:
                yield gauge(f"{p}{name}_size", f"{name} service table sizes", 0, sizes)


    def _instances(self, p: str) -> Iterator[Metric]:
        """This instance's id, and with several instances on one database the domain's
        figures per instance (as each last renewed its lease: rendezvous/instances.py)."""
        bus = self.server.bus
        address = bus.address or self.server.address
        yield gauge(p + "instance", "this instance of the domain (always 1)", 0,
                    [({"instance_id": bus.instance,
                       "address": format_hostport(*address) if address else ""}, 1.0)])
        rows = bus.instances()
        if not rows:
            return
        live = [r for r in rows if r.alive]
        yield gauge(p + "domain_instances", "instances of the domain by lease state", 0,
                    [({"state": "alive"}, float(len(live))),
                     ({"state": "expired"}, float(len(rows) - len(live)))])
        for key, name, doc, make in (
                ("online_sessions", "domain_sessions", "sessions per live instance", gauge),
                ("delivered", "domain_messages_out", "envelopes pushed per live instance",
                 counter),
                ("sends", "domain_messages_in", "SEND requests stored per live instance",
                 counter)):
            yield make(p + name, doc, 0, [({"instance_id": r.id}, _num(r.stats.get(key)))
                                          for r in live])


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _snap_int(snap: dict[str, Any]) -> Callable[[str], float]:
    def get(key: str) -> float:
        value = snap.get(key, 0)
        return float(value) if isinstance(value, int | float) else 0.0
    return get


Counts = Callable[[], Awaitable[dict[str, int]]]  # queue depths, read at most every 5 s


def sqlite_counts(path: Path) -> Counts:
    """Queue depths read from the SQLite file (read-only, in a thread)."""
    return lambda: asyncio.to_thread(_db_counts, path)


def postgres_counts(url: str) -> Counts:
    """Queue depths read over a connection of their own: the store's writer batches SENDs,
    and a count(*) inside a batch would hold their acknowledgements up."""
    async def counts() -> dict[str, int]:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5.0)
        try:
            return {"queued": int(await conn.fetchval("SELECT count(*) FROM envelopes")),
                    "outbound": int(await conn.fetchval(
                        "SELECT count(*) FROM outbound WHERE state = 'queued'"))}
        finally:
            await conn.close()
    return counts


def _db_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        out = {"queued": int(conn.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])}
        with contextlib.suppress(sqlite3.OperationalError):  # before the outbound table
            out["outbound"] = int(conn.execute(
                "SELECT COUNT(*) FROM outbound WHERE state='queued'").fetchone()[0])
        return out
    finally:
        conn.close()


class ServerMetrics:
    """The registry, histograms and HTTP endpoint of one `RendezvousServer`."""

    def __init__(self, server: RendezvousServer, *, counts: Counts | None = None) -> None:
        """`counts`: `sqlite_counts` or `postgres_counts` of the server's store."""
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = ServerCollector(server, counts)
        self.registry.register(self.collector)
        p = "peerpost_rendezvous_"
        self.request_seconds = Histogram(
            p + "request_seconds", "from a decoded request to its reply, by verb", ["verb"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.send_ack_seconds = Histogram(
            p + "send_ack_seconds", "from a decoded SEND to its acknowledgement "
            "(committed to the queue)", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.replies = Counter(p + "replies", "replies by verb and status",
                               ["verb", "status"], registry=self.registry)
        self.http = MetricsHttp(self.registry, self.health, refresh=self.collector.refresh)
        server.on_reply = self.observe

    def observe(self, verb: str, status: int, seconds: float) -> None:
        """The server's `on_reply` hook."""
        self.request_seconds.labels(verb).observe(seconds)
        self.replies.labels(verb, str(int(status))).inc()
        if verb == "SEND" and status == 200:
            self.send_ack_seconds.observe(seconds)

    def health(self) -> tuple[bool, str]:
        srv = self.server
        if srv.address is None:
            return False, "not listening yet"
        if srv.closing:
            return False, "shutting down"
        return True, f"serving {srv.domain} on {format_hostport(*srv.address)}"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        return await self.http.start(host, port)

    async def aclose(self) -> None:
        if self.server.on_reply == self.observe:
            self.server.on_reply = None
        await self.http.aclose()
