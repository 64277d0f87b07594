"""`peerpost-rendezvous`: run a domain's rendezvous server, issue invites, show stats.

    peerpost-rendezvous serve --domain D --listen HOST:PORT --data DIR [--open-registration]
    peerpost-rendezvous invite ADDRESS --data DIR [--days N]
    peerpost-rendezvous stats --data DIR [--json]

`serve` prints one machine-readable line `listening HOST:PORT` on stdout (flushed) once
the socket is bound, so `--listen 127.0.0.1:0` can be read back; logs go to stderr as
key=value lines. SIGTERM or SIGINT shut it down cleanly. It uses uvloop when installed.
Every few seconds it writes DATA/stats.json, which `stats` reads for the online sessions;
the other figures `stats` shows come from the SQLite file directly (see stats.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import secrets
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from crypto.address import normalize_address
from crypto.errors import DecodeError
from rendezvous.limits import DAY, Limits
from rendezvous.logfmt import configure, kv
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import DB_NAME, SqliteStore, create_invite, read_stats
from rendezvous.stats import read_live_stats, write_stats

log = logging.getLogger("rendezvous.cli")
_DEFAULTS = Limits()


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peerpost-rendezvous",
                                description="The rendezvous server of one peerpost domain.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--domain", required=True, help="the mail domain this server is for")
    s.add_argument("--listen", type=_listen, default=("127.0.0.1", 0), help="HOST:PORT")
    s.add_argument("--data", type=Path, required=True, help="data folder (SQLite, stats)")
    s.add_argument("--open-registration", action="store_true",
                   help="anyone may create an account (demos and tests)")
    s.add_argument("--max-envelope", type=int, default=_DEFAULTS.max_envelope, metavar="BYTES")
    s.add_argument("--max-frame", type=int, default=_DEFAULTS.max_frame, metavar="BYTES")
    s.add_argument("--quota-count", type=int, default=_DEFAULTS.quota_count)
    s.add_argument("--quota-bytes", type=int, default=_DEFAULTS.quota_bytes)
    s.add_argument("--request-rate", type=float, default=_DEFAULTS.request_rate,
                   help="requests per second per connection")
    s.add_argument("--envelope-days", type=float, default=_DEFAULTS.envelope_ttl / DAY)
    s.add_argument("--stats-interval", type=float, default=2.0, metavar="SECONDS")
    s.add_argument("--log-level", default="info")
    i = sub.add_parser("invite", help="issue a single-use invite token for an address")
    i.add_argument("address")
    i.add_argument("--data", type=Path, required=True)
    i.add_argument("--days", type=float, default=14.0, help="validity")
    st = sub.add_parser("stats", help="accounts, queued envelopes, online sessions, bytes")
    st.add_argument("--data", type=Path, required=True)
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peerpost-rendezvous` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "invite":
        return _invite(args)
    return _stats(args)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _raise_nofile() -> None:
    # Every session is a socket; let the server use as many as the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args: argparse.Namespace) -> int:
    configure(getattr(logging, str(args.log_level).upper(), logging.INFO))
    _raise_nofile()
    args.data.mkdir(parents=True, exist_ok=True)
    limits = Limits(max_envelope=args.max_envelope, max_frame=args.max_frame,
                    quota_count=args.quota_count, quota_bytes=args.quota_bytes,
                    request_rate=args.request_rate,
                    request_burst=max(args.request_rate * 2, 1.0),
                    envelope_ttl=args.envelope_days * DAY)
    return _run(_serve_async(args, limits))


async def _serve_async(args: argparse.Namespace, limits: Limits) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    data: Path = args.data
    server = RendezvousServer(args.domain, SqliteStore(data / DB_NAME),
                              open_registration=args.open_registration, limits=limits)
    host, port = await server.start(*args.listen)
    print(f"listening {host}:{port}", flush=True)
    try:
        while not stop.is_set():
            write_stats(data, server.snapshot(), running=True, now=time.time())
            try:
                await asyncio.wait_for(stop.wait(), args.stats_interval)
            except TimeoutError:
                pass
    finally:
        log.info(kv("server.stopping", reason="signal" if stop.is_set() else "error"))
        await server.aclose()
        write_stats(data, server.snapshot(), running=False, now=time.time())
    return 0


def _invite(args: argparse.Namespace) -> int:
    try:
        address = normalize_address(args.address)
    except DecodeError as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(18)
    now = time.time()
    args.data.mkdir(parents=True, exist_ok=True)
    create_invite(args.data / DB_NAME, address, token, now, now + args.days * DAY)
    print(token)
    print(f"invite for {address}, valid {args.days:g} days, single use", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    db = args.data / DB_NAME
    if not db.exists():
        print(f"peerpost-rendezvous: no database in {args.data}", file=sys.stderr)
        return 1
    st = read_stats(db)
    live = read_live_stats(args.data)
    doc = {
        "accounts": st.accounts,
        "devices": st.devices,
        "queued_envelopes": st.queued_envelopes,
        "bytes_stored": st.bytes_stored,
        "database_bytes": st.file_bytes,
        "server_running": live is not None,
        "online_sessions": live.get("online_sessions", 0) if live else 0,
        "online_devices": live.get("online_devices", 0) if live else 0,
        "connections": live.get("connections", 0) if live else 0,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        for key, value in doc.items():
            print(f"{key.replace('_', ' ')}: {value}")
    return 0
