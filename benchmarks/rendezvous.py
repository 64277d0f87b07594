"""Rendezvous server under load: `python -m benchmarks rendezvous [--quick]`.

The server runs as its own process (`python -m rendezvous serve`, uvloop, SQLite with
`synchronous=FULL`, default limits, TLS 1.3 on its self-signed certificate as in service;
`--plaintext` turns TLS off on both ends for comparison); this process drives the clients
(also on uvloop).

1. Idle sessions: open N authenticated connections (each a registered device) and read
   the server's RSS before and after: KiB per idle connection. They stay open while the
   next phases run, as they would on a real server.
2. Throughput: S senders SEND to R receivers (one 512-byte sealed blob each, acked only
   after commit); each receiver REMOVEs every envelope it is pushed (the delivery
   acknowledgement), so the queue stays small as in steady state. Delivered SEND→DELIVER
   messages per second, from the first SEND to the last DELIVER.
3. Latency at a fixed offered load (1,000 msg/s by default): p50/p99 from the SEND call
   to the DELIVER arriving at the receiver, same processes, same clock.
4. Storage: K envelopes queued for an offline device; bytes the database grew by
   (pages in use, read through SQLite) per message.

With `--store postgresql` the same run then starts a PostgreSQL server of its own
(Debian's, as tests/pgtest.py does: fsync, full_page_writes and synchronous_commit on, so
an acknowledged SEND is on disk) and repeats phases 2 and 3 with one `serve --store` and
then with two `serve --store` processes on one database, senders and receivers split
between them (half the messages cross from one instance to the other). Where the time
goes: server CPU per message (every instance), PostgreSQL CPU per message (the postmaster
and all its children, from /proc), and messages per PostgreSQL commit (`xact_commit` of
pg_stat_database: the group commit's batch size, plus the instances' own small
transactions).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report
from crypto.address import parse_hostport
from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient
from rendezvous.errors import ConnectionLostError
from rendezvous.messages import Deliver

DOMAIN = "bench.test"
BLOB = 512


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks rendezvous")
    p.add_argument("--quick", action="store_true", help="small, short run")
    p.add_argument("--idle", type=int, help="idle connections (default 10000, quick 1000)")
    p.add_argument("--messages", type=int, help="throughput messages (default 30000)")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--receivers", type=int, default=16)
    p.add_argument("--window", type=int, default=32, help="SENDs in flight per sender")
    p.add_argument("--rate", type=float, default=1000.0, help="offered load, msg/s")
    p.add_argument("--seconds", type=float, help="latency phase length (default 10)")
    p.add_argument("--plaintext", action="store_true",
                   help="no TLS between clients and server (for comparison)")
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                   help="postgresql: also measure one and two `serve --store` instances on "
                        "one PostgreSQL, next to the SQLite figures")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.idle = a.idle or (1000 if a.quick else 10_000)
    a.messages = a.messages or (5_000 if a.quick else 30_000)
    a.seconds = a.seconds or (3.0 if a.quick else 10.0)
    return a


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loop_thread_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process's main thread (the server's event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_sum(pids: list[int]) -> float:
    """CPU seconds of the processes of `pids` still running."""
    total = 0.0
    for pid in pids:
        try:
            total += _cpu_s(pid)
        except OSError:
            pass  # ended (a backend whose connection closed)
    return total


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _db_bytes(path: Path) -> int:
    """Bytes of database pages in use, as the latest commit sees them (WAL included)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)
    finally:
        conn.close()


class Driver:
    def __init__(self, port: int, args: argparse.Namespace, first: int = 0) -> None:
        self.port = port
        self.args = args
        self.n = first  # identities first+1, first+2, ...: drivers of one domain differ

    def client(self, name: str, **kw: Any) -> RendezvousClient:
        self.n += 1
        ident = DeviceIdentity.from_seed(self.n.to_bytes(32, "big"))
        return RendezvousClient("127.0.0.1", self.port, ident, f"{name}@{DOMAIN}",
                                register=True, request_timeout=60.0,
                                tls=not self.args.plaintext, **kw)

    async def open_many(self, prefix: str, count: int, **kw: Any) -> list[RendezvousClient]:
        clients = [self.client(f"{prefix}{i}", **kw) for i in range(count)]
        gate = asyncio.Semaphore(256)

        async def one(c: RendezvousClient) -> None:
            async with gate:
                await c.start()

        await asyncio.gather(*(one(c) for c in clients))
        return clients


REMOVE_WINDOW = 64


async def _receive(rx: RendezvousClient, sink: dict[bytes, float], done: asyncio.Event,
                   want: list[int]) -> None:
    """Count each DELIVER as it arrives; REMOVE it (up to REMOVE_WINDOW in flight).

    A fixed set of workers does the REMOVEs: a task (and a semaphore round) per message
    cost the driver more CPU than the client library's own work for it.
    """
    acks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def ack() -> None:
        while (message_id := await acks.get()) is not None:
            try:
                await rx.remove(message_id)
            except ConnectionLostError:
                pass  # the run is over and the receiver closed

    async with asyncio.TaskGroup() as tg:
        for _ in range(REMOVE_WINDOW):
            tg.create_task(ack())
        async for push in rx.pushes():
            if not isinstance(push, Deliver):
                continue
            sink[push.envelope.message_id] = time.perf_counter()
            if len(sink) >= want[0]:
                done.set()
            acks.put_nowait(push.envelope.message_id)
        for _ in range(REMOVE_WINDOW):
            acks.put_nowait(None)


async def _throughput(senders: list[RendezvousClient], receivers: list[RendezvousClient],
                      total: int, window: int, sink: dict[bytes, float], done: asyncio.Event,
                      want: list[int]) -> float:
    targets = [(r.address, r.identity.peer_id) for r in receivers]
    blob = os.urandom(BLOB)
    sink.clear()
    done.clear()
    per = total // len(senders)
    want[0] = per * len(senders)

    async def run(i: int, tx: RendezvousClient) -> None:
        # `window` workers share this sender's messages: `window` SENDs in flight.
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
    await asyncio.wait_for(done.wait(), 120)
    return per * len(senders) / (max(sink.values()) - start)


async def _latency(senders: list[RendezvousClient], receivers: list[RendezvousClient],
                   rate: float, seconds: float, sink: dict[bytes, float], done: asyncio.Event,
                   want: list[int]) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    targets = [(r.address, r.identity.peer_id) for r in receivers]
    blob = os.urandom(BLOB)
    total = int(rate * seconds)
    sink.clear()
    done.clear()
    want[0] = total
    sent: dict[bytes, float] = {}
    tick = 0.005
    per_tick = rate * tick
    start = loop.time()
    async with asyncio.TaskGroup() as tg:
        k = 0
        owed = 0.0
        while k < total:
            owed += per_tick
            while owed >= 1 and k < total:
                owed -= 1
                m = os.urandom(16)
                sent[m] = time.perf_counter()
                to, dev = targets[k % len(targets)]
                tg.create_task(senders[k % len(senders)].send(m, [(to, dev, blob)]))
                k += 1
            await asyncio.sleep(max(0.0, start + (k / rate) - loop.time()) or tick / 5)
    await asyncio.wait_for(done.wait(), 60)
    achieved = total / (time.perf_counter() - start)
    return sorted((sink[m] - t) * 1000 for m, t in sent.items()), achieved


async def _storage(drv: Driver, senders: list[RendezvousClient], data: Path,
                   count: int) -> float:
    offline = drv.client("offline")
    await offline.start()
    await offline.aclose()
    db = data / "rendezvous.sqlite3"
    before = _db_bytes(db)
    blob = os.urandom(BLOB)
    dev = offline.identity.peer_id
    gate = asyncio.Semaphore(64)

    async def one(k: int) -> None:
        async with gate:
            await senders[k % len(senders)].send(os.urandom(16), [(offline.address, dev, blob)])

    await asyncio.gather(*(one(k) for k in range(count)))
    return (_db_bytes(db) - before) / count


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    _raise_nofile()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rv-bench-") as tmp:
        data = Path(tmp) / "data"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN, "--listen",
            "127.0.0.1:0", "--data", str(data), "--open-registration", "--log-level", "warning",
            # Every client comes from 127.0.0.1 here, standing for thousands of hosts.
            "--sessions-per-ip", "0",
            *(["--plaintext"] if args.plaintext else []), stdout=asyncio.subprocess.PIPE)
        try:
            if proc.stdout is None:
                raise RuntimeError("no stdout")
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            port = parse_hostport(line.split()[1])[1]
            drv = Driver(port, args)
            # Warm the server up (imports, SQLite cache, first allocations) before measuring.
            warm = await drv.open_many("warm", 50, reconnect=False)
            for c in warm:
                await c.aclose()
            await asyncio.sleep(0.5)
            rss0 = _rss_kib(proc.pid)
            t0 = time.perf_counter()
            idle = await drv.open_many("idle", args.idle, reconnect=False)
            connect_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)
            rss1 = _rss_kib(proc.pid)
            per_conn = (rss1 - rss0) / args.idle
            rows.append({"metric": f"RSS per idle authenticated connection ({args.idle:,})",
                         "value": round(per_conn, 2), "unit": "KiB", "target": "<= 30",
                         "ok": per_conn <= 30})
            rows.append({"metric": "server RSS with the idle connections", "value":
                         round(rss1 / 1024, 1), "unit": "MiB", "target": "", "ok": None})
            rows.append({"metric": "connect+register+authenticate rate", "value":
                         round(args.idle / connect_s), "unit": "sessions/s", "target": "",
                         "ok": None})

            senders = await drv.open_many("tx", args.senders)
            receivers = await drv.open_many("rx", args.receivers)
            # The idle clients live to the end: keep the driver's garbage collector from
            # walking them again and again (it costs the driver, not the server, CPU).
            gc.freeze()
            sink: dict[bytes, float] = {}
            done = asyncio.Event()
            want = [0]
            async with asyncio.TaskGroup() as tg:
                consumers = [tg.create_task(_receive(r, sink, done, want)) for r in receivers]
                await _throughput(senders, receivers, min(2000, args.messages), args.window,
                                  sink, done, want)  # warm-up
                cpu0, drv0 = _cpu_s(proc.pid), _self_cpu_s()
                loop0 = _loop_thread_cpu_s(proc.pid)
                rate = await _throughput(senders, receivers, args.messages, args.window, sink,
                                         done, want)
                n = want[0]
                server_us = (_cpu_s(proc.pid) - cpu0) / n * 1e6
                driver_us = (_self_cpu_s() - drv0) / n * 1e6
                # Everything but the event loop thread: the SQLite writer thread.
                writer_us = server_us - (_loop_thread_cpu_s(proc.pid) - loop0) / n * 1e6
                rows.append({"metric": "delivered SEND→DELIVER, durable acks", "value":
                             round(rate), "unit": "msg/s", "target": ">= 5,000",
                             "ok": rate >= 5000})
                rows.append({"metric": "server CPU per delivered message (SEND+DELIVER+REMOVE)",
                             "value": round(server_us), "unit": "µs", "target": "", "ok": None})
                rows.append({"metric": "of which outside the event loop (SQLite writer)", "value":
                             round(writer_us), "unit": "µs", "target": "", "ok": None})
                rows.append({"metric": "driver (clients) CPU per message", "value":
                             round(driver_us), "unit": "µs", "target": "", "ok": None})
                lat, achieved = await _latency(senders, receivers, args.rate, args.seconds,
                                               sink, done, want)
                p50 = statistics.median(lat)
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                rows.append({"metric": f"latency p50 at {args.rate:,.0f} msg/s offered",
                             "value": round(p50, 2), "unit": "ms", "target": "", "ok": None})
                rows.append({"metric": f"latency p99 at {args.rate:,.0f} msg/s offered",
                             "value": round(p99, 2), "unit": "ms", "target": "< 50",
                             "ok": p99 < 50})
                rows.append({"metric": "achieved rate in the latency phase", "value":
                             round(achieved), "unit": "msg/s", "target": "", "ok": None})
                for r in receivers:
                    await r.aclose()
                for t in consumers:
                    await t
            count = 2000 if args.quick else 10_000
            per_msg = await _storage(drv, senders, data, count)
            rows.append({"metric": f"bytes stored per message ({BLOB}-byte blob, {count:,})",
                         "value": round(per_msg), "unit": "B", "target": "", "ok": None})
            for c in [*senders, *idle]:
                await c.aclose()
        finally:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
    return rows


async def _serve(data: Path, args: argparse.Namespace,
                 *extra: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN, "--listen",
        "127.0.0.1:0", "--data", str(data), "--open-registration", "--log-level", "warning",
        "--sessions-per-ip", "0", "--stun-port", "off", "--dht-port", "off",
        *(["--plaintext"] if args.plaintext else []), *extra, stdout=asyncio.subprocess.PIPE)
    if proc.stdout is None:
        raise RuntimeError("no stdout")
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"serve did not start: {line!r}")
    return proc, parse_hostport(line.split()[1])[1]


async def _pg_commits(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def _pg_instances(args: argparse.Namespace, cluster: Any, tmp: Path,
                        count: int) -> list[dict[str, Any]]:
    """Throughput and latency with `count` serve processes on one fresh database."""
    url = await asyncio.to_thread(cluster.create_database)
    procs: list[asyncio.subprocess.Process] = []
    rows: list[dict[str, Any]] = []
    label = "1 instance" if count == 1 else f"{count} instances"
    try:
        drivers = []
        for i in range(count):
            data = tmp / f"pg-data{count}-{i}"
            if i:  # the instances of a domain share its one domain key (serve checks)
                data.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp / f"pg-data{count}-0" / "domain_key.json",
                             data / "domain_key.json")
            proc, port = await _serve(data, args, "--store", url)
            procs.append(proc)
            drivers.append(Driver(port, args, first=(i + 1) * 1_000_000))
        senders = [c for i in range(args.senders) for c in
                   await drivers[i % count].open_many(f"tx{i}-", 1)]
        receivers = [c for i in range(args.receivers) for c in
                     await drivers[i % count].open_many(f"rx{i}-", 1)]
        sink: dict[bytes, float] = {}
        done = asyncio.Event()
        want = [0]
        pg_pids = cluster.postgres_pids()
        async with asyncio.TaskGroup() as tg:
            consumers = [tg.create_task(_receive(r, sink, done, want)) for r in receivers]
            await _throughput(senders, receivers, min(2000, args.messages), args.window,
                              sink, done, want)  # warm-up
            cpu0 = [_cpu_s(p.pid) for p in procs]
            pg0 = _cpu_sum(pg_pids)
            commits0 = await _pg_commits(url)
            rate = await _throughput(senders, receivers, args.messages, args.window, sink,
                                     done, want)
            n = want[0]
            commits = await _pg_commits(url) - commits0 - 1
            server_us = sum(_cpu_s(p.pid) - c for p, c in zip(procs, cpu0, strict=True)) / n
            pg_us = (_cpu_sum(pg_pids) - pg0) / n
            target = 5000 if count >= 2 else None
            rows.append({"metric": f"PostgreSQL, {label}: delivered SEND→DELIVER, durable "
                                   "acks", "value": round(rate), "unit": "msg/s",
                         "target": ">= 5,000" if target else "",
                         "ok": rate >= target if target else None})
            rows.append({"metric": f"PostgreSQL, {label}: server CPU per message (all "
                                   "instances)", "value": round(server_us * 1e6),
                         "unit": "µs", "target": "", "ok": None})
            rows.append({"metric": f"PostgreSQL, {label}: PostgreSQL CPU per message",
                         "value": round(pg_us * 1e6), "unit": "µs", "target": "",
                         "ok": None})
            rows.append({"metric": f"PostgreSQL, {label}: messages per commit",
                         "value": round(n / max(1, commits), 1), "unit": "msg",
                         "target": "", "ok": None})
            lat, achieved = await _latency(senders, receivers, args.rate, args.seconds,
                                           sink, done, want)
            p50 = statistics.median(lat)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            rows.append({"metric": f"PostgreSQL, {label}: latency p50 at {args.rate:,.0f} "
                                   "msg/s", "value": round(p50, 2), "unit": "ms",
                         "target": "", "ok": None})
            rows.append({"metric": f"PostgreSQL, {label}: latency p99 at {args.rate:,.0f} "
                                   "msg/s", "value": round(p99, 2), "unit": "ms",
                         "target": "< 50", "ok": p99 < 50})
            rows.append({"metric": f"PostgreSQL, {label}: achieved rate in the latency "
                                   "phase", "value": round(achieved), "unit": "msg/s",
                         "target": "", "ok": None})
            for r in receivers:
                await r.aclose()
            for t in consumers:
                await t
        for c in senders:
            await c.aclose()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
    return rows


async def _run_pg(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tests.pgtest import PgCluster, unavailable

    if (why := unavailable()) is not None:
        raise SystemExit(f"--store postgresql: {why}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rv-bench-pg-") as tmp, \
            tempfile.TemporaryDirectory(prefix="rv-bench-pgdata-") as pg_base:
        # Its own temporary folder: PgCluster hands it to the postgres user when root.
        cluster = await asyncio.to_thread(PgCluster.start, Path(pg_base), durable=True)
        try:
            for count in (1, 2):
                rows.extend(await _pg_instances(args, cluster, Path(tmp), count))
        finally:
            await asyncio.to_thread(cluster.stop)
    return rows


async def _run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = await _run(args)
    if args.store == "postgresql":
        rows.extend(await _run_pg(args))
    return rows


def main(argv: list[str]) -> int:
    """Run the benchmark, print the table, write JSON."""
    args = _parse(argv)
    load_before = os.getloadavg()[0]
    gc.set_threshold(20_000, 10, 10)  # as `rendezvous serve` does (see rendezvous/cli.py)
    try:
        import uvloop

        rows: list[dict[str, Any]] = uvloop.run(_run_all(args))
    except ImportError:
        rows = asyncio.run(_run_all(args))
    meta = {"idle_connections": args.idle, "messages": args.messages, "senders": args.senders,
            "receivers": args.receivers, "window": args.window, "blob_bytes": BLOB,
            "offered_rate": args.rate, "latency_seconds": args.seconds, "quick": args.quick,
            "server": "python -m rendezvous serve (uvloop, SQLite WAL synchronous=FULL)",
            "store": args.store,
            "postgresql": ("PostgreSQL 15 (Debian), fsync, full_page_writes and "
                           "synchronous_commit on, on this machine's disk"
                           if args.store == "postgresql" else None),
            "tls": "off" if args.plaintext else "TLS 1.3, self-signed ECDSA P-256",
            "cpus": os.cpu_count(),
            # Other work on the machine skews msg/s and latency; CPU per message less so.
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    report("rendezvous", rows, out=args.out, meta=meta)
    return 0
