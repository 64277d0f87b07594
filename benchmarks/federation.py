"""Server-to-server forwarding: `python -m benchmarks federation [--quick]`.

Two real servers (`python -m rendezvous serve`, uvloop, SQLite WAL `synchronous=FULL`, TLS
1.3 on self-signed certificates as in service), a.test and b.test on loopback, find each
other through a real name server: dnsmasq serving the SRV/TXT lines `peerpost-rendezvous
dns-records` prints (tests/dnstest.py starts it; without dnsmasq the benchmark says so and
stops). The server link between them is the production one (TLS, LINK signed with a.test's
domain key and checked against the TXT key, b.test's reply checked the same way);
`--link-rate 0` lifts the receiver's per-domain cap (200 envelopes/s by default) and
`--request-rate 100000` its per-connection request rate (2,000/s by default: a link
carries one SEND per message, so at default limits a link tops out at 2,000 msg/s, and
the 429 past the burst sends the outbound queue into its Backoff, seconds of delay).

1. Throughput: S senders on a.test SEND to R recipients on b.test (one 512-byte blob
   each). a.test acknowledges a SEND once its outbound queue has committed it; it forwards
   over the link; b.test commits it (`synchronous=FULL`) and pushes DELIVER to the
   recipient, which REMOVEs it. A message counts once its DELIVER arrived: forwarded
   messages per second from the first SEND to the last DELIVER.
2. Latency at a fixed offered load (500 msg/s by default): SEND call to DELIVER at a
   recipient on b.test, and the same from senders on a.test to recipients on a.test (the
   path within one server); the added latency is the difference of the p99s. Also shown:
   from a.test's SEND acknowledgement to the DELIVER on b.test.
CPU per message is both servers' user+system CPU over the throughput phase.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import report
from benchmarks.rendezvous import REMOVE_WINDOW, _cpu_s, _raise_nofile, _self_cpu_s
from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient
from rendezvous.errors import ConnectionLostError
from rendezvous.messages import Deliver

A, B = "a.test", "b.test"
BLOB = 512


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks federation")
    p.add_argument("--quick", action="store_true", help="small, short run")
    p.add_argument("--messages", type=int, help="throughput messages (default 30000)")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--receivers", type=int, default=16)
    p.add_argument("--window", type=int, default=32, help="SENDs in flight per sender")
    p.add_argument("--rate", type=float, default=500.0, help="offered load, msg/s")
    p.add_argument("--seconds", type=float, help="latency phase length (default 10)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.messages = a.messages or (3_000 if a.quick else 30_000)
    a.seconds = a.seconds or (3.0 if a.quick else 10.0)
    return a


class Servers:
    """dnsmasq and the two `serve` processes; `close()` stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.ports: dict[str, int] = {}
        self.dns: Any = None

    async def start(self) -> None:
        from tests.dnstest import _free_port, start_dnsmasq

        zone: list[str] = []
        for d in (A, B):
            self.ports[d] = _free_port()  # `dns-records` needs the port before `serve`
            rec = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "rendezvous", "dns-records", "--data",
                str(self.tmp / d), "--domain", d, "--host", f"rv.{d}", "--port",
                str(self.ports[d]), stdout=asyncio.subprocess.PIPE)
            out, _ = await rec.communicate()
            if rec.returncode != 0:
                raise RuntimeError(f"dns-records for {d} failed")
            zone += out.decode().splitlines()
        self.dns = await asyncio.to_thread(start_dnsmasq, zone,
                                           {f"rv.{d}": "127.0.0.1" for d in (A, B)})
        env = os.environ | {"PEERPOST_RESOLVER": self.dns.hostport}
        for d in (A, B):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "rendezvous", "serve", "--domain", d, "--listen",
                f"127.0.0.1:{self.ports[d]}", "--data", str(self.tmp / d),
                "--open-registration", "--log-level", "warning", "--sessions-per-ip", "0",
                # The per-domain link cap (1,000 envelopes/s by default) is policy;
                # this measures what the link and both stores carry. STUN and DHT take
                # free ports (their default, P and P+1, may be another server's).
                "--link-rate", "0", "--request-rate", "100000",
                "--stun-port", "0", "--dht-port", "0",
                stdout=asyncio.subprocess.PIPE, env=env)
            self.procs[d] = proc
            if proc.stdout is None:
                raise RuntimeError("no stdout")
            await asyncio.wait_for(proc.stdout.readline(), 30)  # "listening HOST:PORT ..."

    def cpu_s(self) -> float:
        return sum(_cpu_s(p.pid) for p in self.procs.values())

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
        if self.dns is not None:
            self.dns.stop()


class Driver:
    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.n = 0

    def client(self, name: str, domain: str) -> RendezvousClient:
        self.n += 1
        ident = DeviceIdentity.from_seed(self.n.to_bytes(32, "big"))
        return RendezvousClient("127.0.0.1", self.servers.ports[domain], ident,
                                f"{name}@{domain}", register=True, request_timeout=60.0,
                                tls=True)

    async def open_many(self, prefix: str, domain: str, count: int) -> list[RendezvousClient]:
        clients = [self.client(f"{prefix}{i}", domain) for i in range(count)]
        await asyncio.gather(*(c.start() for c in clients))
        return clients


class Sink:
    """DELIVER arrival times by message id; `wait(n)` until n have arrived."""

    def __init__(self) -> None:
        self.at: dict[bytes, float] = {}
        self.want = 0
        self.done = asyncio.Event()

    def expect(self, n: int) -> None:
        self.at.clear()
        self.want = n
        self.done.clear()

    def got(self, mid: bytes) -> None:
        self.at[mid] = time.perf_counter()
        if len(self.at) >= self.want:
            self.done.set()


async def _receive(rx: RendezvousClient, sink: Sink) -> None:
    """Record each DELIVER; REMOVE it (a fixed pool of workers, as benchmarks.rendezvous)."""
    acks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def ack() -> None:
        while (message_id := await acks.get()) is not None:
            try:
                await rx.remove(message_id)
            except ConnectionLostError:
                pass

    async with asyncio.TaskGroup() as tg:
        for _ in range(REMOVE_WINDOW):
            tg.create_task(ack())
        async for push in rx.pushes():
            if isinstance(push, Deliver):
                sink.got(push.envelope.message_id)
                acks.put_nowait(push.envelope.message_id)
        for _ in range(REMOVE_WINDOW):
            acks.put_nowait(None)


Target = tuple[str, bytes]


async def _throughput(senders: list[RendezvousClient], targets: list[Target], total: int,
                      window: int, sink: Sink) -> float:
    blob = os.urandom(BLOB)
    per = total // len(senders)
    sink.expect(per * len(senders))

    async def run(i: int, tx: RendezvousClient) -> None:
        ks = iter(range(per))

        async def worker() -> None:
            for k in ks:
                to, dev = targets[(i * per + k) % len(targets)]
                await tx.send(os.urandom(16), [(to, dev, blob)])

        async with asyncio.TaskGroup() as tg:
            for _ in range(window):
                tg.create_task(worker())

    start = time.perf_counter()
    await asyncio.gather(*(run(i, tx) for i, tx in enumerate(senders)))
    await asyncio.wait_for(sink.done.wait(), 300)
    return per * len(senders) / (max(sink.at.values()) - start)


async def _latency(senders: list[RendezvousClient], targets: list[Target], rate: float,
                   seconds: float, sink: Sink) -> tuple[list[float], list[float], float]:
    """SEND call -> DELIVER and SEND ack -> DELIVER (ms, sorted), and the achieved rate."""
    loop = asyncio.get_running_loop()
    blob = os.urandom(BLOB)
    total = int(rate * seconds)
    sink.expect(total)
    called: dict[bytes, float] = {}
    acked: dict[bytes, float] = {}

    async def one(tx: RendezvousClient, m: bytes, to: str, dev: bytes) -> None:
        await tx.send(m, [(to, dev, blob)])
        acked[m] = time.perf_counter()

    start = loop.time()
    async with asyncio.TaskGroup() as tg:
        for k in range(total):
            m = os.urandom(16)
            called[m] = time.perf_counter()
            to, dev = targets[k % len(targets)]
            tg.create_task(one(senders[k % len(senders)], m, to, dev))
            await asyncio.sleep(max(0.0, start + (k + 1) / rate - loop.time()))
    await asyncio.wait_for(sink.done.wait(), 60)
    achieved = total / (loop.time() - start)
    return (sorted((sink.at[m] - t) * 1000 for m, t in called.items()),
            sorted((sink.at[m] - t) * 1000 for m, t in acked.items()), achieved)


def _p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    _raise_nofile()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fed-bench-") as tmp:
        servers = Servers(Path(tmp))
        try:
            await servers.start()
            drv = Driver(servers)
            senders = await drv.open_many("tx", A, args.senders)
            remote = await drv.open_many("rx", B, args.receivers)
            local = await drv.open_many("lx", A, args.receivers)
            gc.freeze()
            sink = Sink()
            to_remote = [(r.address, r.identity.peer_id) for r in remote]
            to_local = [(r.address, r.identity.peer_id) for r in local]
            async with asyncio.TaskGroup() as tg:
                consumers = [tg.create_task(_receive(r, sink)) for r in [*remote, *local]]
                # Warm-up: the link opens (DNS, TLS, LINK), caches fill.
                await _throughput(senders, to_remote, min(2000, args.messages), args.window,
                                  sink)
                cpu0, drv0 = servers.cpu_s(), _self_cpu_s()
                rate = await _throughput(senders, to_remote, args.messages, args.window, sink)
                n = sink.want
                server_us = (servers.cpu_s() - cpu0) / n * 1e6
                driver_us = (_self_cpu_s() - drv0) / n * 1e6
                rows.append({"metric": "forwarded a.test→b.test, durable acks at both ends",
                             "value": round(rate), "unit": "msg/s", "target": ">= 3,000",
                             "ok": rate >= 3000})
                rows.append({"metric": "both servers' CPU per forwarded message", "value":
                             round(server_us), "unit": "µs", "target": "", "ok": None})
                rows.append({"metric": "driver (clients) CPU per message", "value":
                             round(driver_us), "unit": "µs", "target": "", "ok": None})
                lat: dict[str, tuple[list[float], list[float], float]] = {}
                for name, targets in (("local", to_local), ("remote", to_remote)):
                    lat[name] = await _latency(senders, targets, args.rate, args.seconds, sink)
                fed_call, fed_ack, fed_rate = lat["remote"]
                loc_call, _, _ = lat["local"]
                added = _p(fed_call, 0.99) - _p(loc_call, 0.99)
                r = f"{args.rate:,.0f} msg/s"
                show: list[tuple[str, float, Callable[[float], bool] | None, str]] = [
                    (f"within a.test: SEND→DELIVER p50 at {r}", statistics.median(loc_call),
                     None, ""),
                    (f"within a.test: SEND→DELIVER p99 at {r}", _p(loc_call, 0.99), None, ""),
                    (f"a.test→b.test: SEND→DELIVER p50 at {r}", statistics.median(fed_call),
                     None, ""),
                    (f"a.test→b.test: SEND→DELIVER p99 at {r}", _p(fed_call, 0.99), None, ""),
                    (f"a.test→b.test: SEND ack→DELIVER p99 at {r}", _p(fed_ack, 0.99), None,
                     ""),
                    (f"added by the server link, p99 at {r}", added, lambda v: v < 20, "< 20"),
                ]
                for metric, value, ok, target in show:
                    rows.append({"metric": metric, "value": round(value, 2), "unit": "ms",
                                 "target": target, "ok": None if ok is None else ok(value)})
                rows.append({"metric": "achieved rate in the latency phase (b.test)",
                             "value": round(fed_rate), "unit": "msg/s", "target": "",
                             "ok": None})
                for c in [*remote, *local]:
                    await c.aclose()
                for t in consumers:
                    await t
            for c in senders:
                await c.aclose()
        finally:
            await servers.close()
    return rows


def main(argv: list[str]) -> int:
    """Run the benchmark, print the table, write JSON."""
    from tests.dnstest import dnsmasq_missing

    args = _parse(argv)
    if (why := dnsmasq_missing()) is not None:
        print(f"benchmarks federation needs a real name server: {why}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    gc.set_threshold(20_000, 10, 10)
    try:
        import uvloop

        rows: list[dict[str, Any]] = uvloop.run(_run(args))
    except ImportError:
        rows = asyncio.run(_run(args))
    meta = {"messages": args.messages, "senders": args.senders, "receivers": args.receivers,
            "window": args.window, "blob_bytes": BLOB, "offered_rate": args.rate,
            "latency_seconds": args.seconds, "quick": args.quick,
            "servers": "2 x python -m rendezvous serve (uvloop, SQLite WAL synchronous=FULL)",
            "tls": "TLS 1.3, self-signed, clients and the server link",
            "dns": "dnsmasq on loopback serving `dns-records` output (PEERPOST_RESOLVER)",
            "cpus": os.cpu_count(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    report("federation", rows, out=args.out, meta=meta)
    return 0
