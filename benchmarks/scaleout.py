"""What an ISP needs per million devices: `python -m benchmarks scaleout [--quick]`.

Measured on this machine, one `serve --store postgresql://...` (TLS 1.3, uvloop) on a
durable PostgreSQL of its own (fsync, full_page_writes, synchronous_commit on):

1. Per message (SEND, DELIVER pushed, REMOVE): server CPU, PostgreSQL CPU (the
   postmaster and its children, from /proc), WAL bytes (`pg_current_wal_lsn`), and
   messages per PostgreSQL commit, at full speed with 8 senders and 8 receivers.
2. Per idle connection: server RSS (KiB) with N authenticated TLS sessions open; and the
   keepalive: the same sessions PING every second for a few seconds, server CPU per PING.
3. Per reconnect: a known device's TLS handshake (full, no resumption), AUTHORIZATION,
   empty queue flush, presence, and close: server and PostgreSQL CPU per reconnect.

Then the estimate, from those figures and stated assumptions (flags): messages per
device per day, the peak hour's factor over the day's average, reconnects per device per
day (mobile devices change networks), the client's keepalive interval (20 s by default),
and the CPU share an instance may use at the peak (headroom for a failed instance's
devices). An instance is one `serve` process: one event loop, one core. Instances =
peak server CPU / (utilisation); database = peak PostgreSQL CPU / utilisation, its commit
and WAL rates, and the memory of all sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report
from benchmarks.rendezvous import (
    Driver,
    _cpu_s,
    _cpu_sum,
    _pg_commits,
    _raise_nofile,
    _receive,
    _rss_kib,
    _serve,
    _throughput,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks scaleout")
    p.add_argument("--quick", action="store_true", help="small, short run")
    p.add_argument("--devices", type=float, default=1e6, help="devices to plan for")
    p.add_argument("--messages-per-day", type=float, default=50.0,
                   help="messages each device receives per day (default 50)")
    p.add_argument("--peak", type=float, default=4.0,
                   help="peak hour rate over the day's average (default 4)")
    p.add_argument("--reconnects-per-day", type=float, default=48.0,
                   help="new sessions per device per day (default 48: every 30 min)")
    p.add_argument("--keepalive", type=float, default=20.0,
                   help="seconds between a client's PINGs (the client's default 20)")
    p.add_argument("--utilisation", type=float, default=0.5,
                   help="CPU share of a core an instance (and the database) may use at the "
                        "peak (default 0.5: room for a dead instance's devices)")
    p.add_argument("--idle", type=int, help="idle sessions measured (default 3000, quick 500)")
    p.add_argument("--messages", type=int, help="messages measured (default 20000)")
    p.add_argument("--reconnects", type=int, help="reconnects measured (default 1000)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.idle = a.idle or (500 if a.quick else 3000)
    a.messages = a.messages or (4000 if a.quick else 20_000)
    a.reconnects = a.reconnects or (200 if a.quick else 1000)
    a.plaintext = False
    return a


async def _wal_lsn(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


async def _measure(args: argparse.Namespace, url: str, cluster: Any,
                   tmp: Path) -> dict[str, float]:
    proc, port = await _serve(tmp / "data", args, "--store", url)
    m: dict[str, float] = {}
    try:
        pg_pids = cluster.postgres_pids()  # now with the backends of serve's connections
        drv = Driver(port, args)
        # 1. per message
        senders = await drv.open_many("tx", 8)
        receivers = await drv.open_many("rx", 8)
        sink: dict[bytes, float] = {}
        done = asyncio.Event()
        want = [0]
        async with asyncio.TaskGroup() as tg:
            consumers = [tg.create_task(_receive(r, sink, done, want)) for r in receivers]
            await _throughput(senders, receivers, 2000, 32, sink, done, want)  # warm-up
            cpu0, pg0 = _cpu_s(proc.pid), _cpu_sum(pg_pids)
            wal0, commits0 = await _wal_lsn(url), await _pg_commits(url)
            m["msg_rate"] = await _throughput(senders, receivers, args.messages, 32, sink,
                                              done, want)
            n = want[0]
            m["msg_server_us"] = (_cpu_s(proc.pid) - cpu0) / n * 1e6
            m["msg_pg_us"] = (_cpu_sum(pg_pids) - pg0) / n * 1e6
            m["msg_wal_bytes"] = (await _wal_lsn(url) - wal0) / n
            m["msg_per_commit"] = n / max(1, await _pg_commits(url) - commits0 - 2)
            for r in receivers:
                await r.aclose()
            for t in consumers:
                await t
        for c in senders:
            await c.aclose()
        # 2. idle sessions and their keepalive
        await asyncio.sleep(0.5)
        gc.collect()
        rss0 = _rss_kib(proc.pid)
        idle = await drv.open_many("idle", args.idle, reconnect=False,
                                   keepalive_interval=1.0)
        await asyncio.sleep(1.0)
        m["idle_kib"] = (_rss_kib(proc.pid) - rss0) / args.idle
        window = 3.0 if args.quick else 6.0
        cpu0, pg0 = _cpu_s(proc.pid), _cpu_sum(pg_pids)
        await asyncio.sleep(window)
        pings = args.idle * window  # one PING per session per second
        m["ping_server_us"] = (_cpu_s(proc.pid) - cpu0) / pings * 1e6
        m["ping_pg_us"] = (_cpu_sum(pg_pids) - pg0) / pings * 1e6
        for c in idle:
            await c.aclose()
        # 3. reconnects of known devices
        first = drv.n
        known = [drv.client(f"rc{i}", reconnect=False) for i in range(args.reconnects)]
        gate = asyncio.Semaphore(32)

        async def session(c: Any) -> None:
            async with gate:
                await c.start()
                await c.aclose()

        await asyncio.gather(*(session(c) for c in known))  # registers them
        same = Driver(port, args, first=first)  # the same devices, new sessions
        again = [same.client(f"rc{i}", reconnect=False) for i in range(args.reconnects)]
        await asyncio.sleep(0.5)
        cpu0, pg0 = _cpu_s(proc.pid), _cpu_sum(pg_pids)
        t0 = time.perf_counter()
        await asyncio.gather(*(session(c) for c in again))
        m["reconnect_rate"] = args.reconnects / (time.perf_counter() - t0)
        await asyncio.sleep(0.3)  # the server's side of the closes
        m["reconnect_server_us"] = (_cpu_s(proc.pid) - cpu0) / args.reconnects * 1e6
        m["reconnect_pg_us"] = (_cpu_sum(pg_pids) - pg0) / args.reconnects * 1e6
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
    return m


def estimate(m: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """Instances and database load for `args.devices` at the peak hour."""
    per_s = args.devices / 86400 * args.peak
    msg_s = per_s * args.messages_per_day
    rc_s = per_s * args.reconnects_per_day
    ping_s = args.devices / args.keepalive  # all day long, not only at the peak
    server = (msg_s * m["msg_server_us"] + rc_s * m["reconnect_server_us"]
              + ping_s * m["ping_server_us"]) / 1e6
    pg = (msg_s * m["msg_pg_us"] + rc_s * m["reconnect_pg_us"]
          + ping_s * m["ping_pg_us"]) / 1e6
    instances = max(2, math.ceil(server / args.utilisation))  # never fewer than two
    return {
        "peak_msg_s": msg_s, "peak_reconnect_s": rc_s, "ping_s": ping_s,
        "server_cores": server, "instances": instances,
        "sessions_per_instance": args.devices / instances,
        "session_memory_gib": args.devices * m["idle_kib"] / 2**20,
        "db_cores": pg, "db_cores_provisioned": math.ceil(pg / args.utilisation),
        "db_commits_s": msg_s / max(1.0, m["msg_per_commit"]),
        "db_wal_mib_s": msg_s * m["msg_wal_bytes"] / 2**20,
        "share_messages": msg_s * m["msg_server_us"] / 1e6 / server if server else 0.0,
        "share_reconnects": rc_s * m["reconnect_server_us"] / 1e6 / server if server else 0.0,
        "share_keepalive": ping_s * m["ping_server_us"] / 1e6 / server if server else 0.0,
    }


async def _run(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    from tests.pgtest import PgCluster, unavailable

    if (why := unavailable()) is not None:
        raise SystemExit(f"scaleout needs PostgreSQL: {why}")
    _raise_nofile()
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp, \
            tempfile.TemporaryDirectory(prefix="scaleout-pg-") as pg_base:
        cluster = await asyncio.to_thread(PgCluster.start, Path(pg_base), durable=True)
        try:
            url = await asyncio.to_thread(cluster.create_database)
            measured = await _measure(args, url, cluster, Path(tmp))
        finally:
            await asyncio.to_thread(cluster.stop)
    return measured, estimate(measured, args)


def _row(metric: str, value: float, unit: str, digits: int = 0) -> dict[str, Any]:
    return {"metric": metric, "value": round(value, digits) if digits else round(value),
            "unit": unit, "target": "", "ok": None}


def main(argv: list[str]) -> int:
    """Measure, estimate, print the table, write JSON."""
    args = _parse(argv)
    load_before = os.getloadavg()[0]
    gc.set_threshold(20_000, 10, 10)
    try:
        import uvloop

        m, e = uvloop.run(_run(args))
    except ImportError:
        m, e = asyncio.run(_run(args))
    per = f"per {args.devices / 1e6:g}M devices"
    rows = [
        _row("measured: server CPU per message (SEND+DELIVER+REMOVE)", m["msg_server_us"], "µs"),
        _row("measured: PostgreSQL CPU per message", m["msg_pg_us"], "µs"),
        _row("measured: WAL per message", m["msg_wal_bytes"], "B"),
        _row("measured: messages per commit at full speed", m["msg_per_commit"], "msg", 1),
        _row("measured: full speed, one instance", m["msg_rate"], "msg/s"),
        _row("measured: server RSS per idle TLS session", m["idle_kib"], "KiB", 1),
        _row("measured: server CPU per keepalive PING", m["ping_server_us"], "µs", 1),
        _row("measured: server CPU per reconnect (TLS handshake, auth, close)",
             m["reconnect_server_us"], "µs"),
        _row("measured: PostgreSQL CPU per reconnect", m["reconnect_pg_us"], "µs"),
        _row(f"peak messages/s {per}", e["peak_msg_s"], "msg/s"),
        _row(f"peak reconnects/s {per}", e["peak_reconnect_s"], "/s"),
        _row(f"keepalive PINGs/s {per}", e["ping_s"], "/s"),
        _row(f"server CPU at the peak {per}", e["server_cores"], "cores", 2),
        _row("  of which messages / reconnects / keepalive (%)",
             0, f"{100 * e['share_messages']:.0f} / {100 * e['share_reconnects']:.0f} / "
                f"{100 * e['share_keepalive']:.0f}"),
        _row(f"instances {per} (one core each, {args.utilisation:.0%} busy at the peak)",
             e["instances"], "instances"),
        _row("sessions per instance", e["sessions_per_instance"], "sessions"),
        _row(f"session memory {per} (all instances)", e["session_memory_gib"], "GiB", 1),
        _row(f"database CPU at the peak {per}", e["db_cores"], "cores", 2),
        _row(f"database cores to provision ({args.utilisation:.0%} busy)",
             e["db_cores_provisioned"], "cores"),
        _row(f"database commits/s at the peak {per} (at full-speed batching: a floor)",
             e["db_commits_s"], "/s"),
        _row(f"database WAL at the peak {per}", e["db_wal_mib_s"], "MiB/s", 2),
    ]
    meta = {"assumptions": {"devices": args.devices, "messages_per_device_day":
                            args.messages_per_day, "peak_factor": args.peak,
                            "reconnects_per_device_day": args.reconnects_per_day,
                            "keepalive_s": args.keepalive, "utilisation": args.utilisation},
            "measured": m, "estimate": e, "idle_sessions": args.idle,
            "messages": args.messages, "reconnects": args.reconnects, "quick": args.quick,
            "server": "python -m rendezvous serve --store postgresql:// (uvloop, TLS 1.3)",
            "postgresql": "PostgreSQL 15 (Debian), fsync, full_page_writes and "
                          "synchronous_commit on", "cpus": os.cpu_count(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    report("scaleout", rows, out=args.out, meta=meta)
    return 0
