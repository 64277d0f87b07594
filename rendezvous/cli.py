"""`peerpost-rendezvous`: run a domain's rendezvous server, issue invites, show stats.

    peerpost-rendezvous serve --domain D --listen HOST:PORT [--listen HOST:PORT] --data DIR
                              [--config FILE]
                              [--open-registration]
                              [--tls-cert PEM --tls-key PEM | --plaintext]
                              [--stun-port N|off] [--dht-port N|off]
                              [--relay-rate BYTES_PER_S] [--relay-daily BYTES]
                              [--sessions-per-device N] [--sessions-per-account N]
                              [--sessions-per-ip N] [--push-buffer-total BYTES]
                              [--sender-quota-count N] [--sender-quota-bytes BYTES]
                              [--finger-open] [--outbound-expiry DAYS] [--block-domain D ...]
                              [--store postgresql://USER@HOST:PORT/DB]
                              [--advertise HOST:PORT] [--instance-heartbeat SECONDS]
                              [--outbound-claim SECONDS]
    peerpost-rendezvous invite ADDRESS --data DIR|--store URL [--days N]
    peerpost-rendezvous stats --data DIR [--store URL] [--json]
    peerpost-rendezvous migrate --store URL|--data DIR [--json]
    peerpost-rendezvous accounts list|show ADDRESS|delete ADDRESS --data DIR|--store URL
                                                                      [--json]
    peerpost-rendezvous devices revoke ADDRESS PEER_ID --data DIR|--store URL [--json]
    peerpost-rendezvous backup DEST --data DIR [--json]
    peerpost-rendezvous restore SRC --data DIR [--force] [--json]
    peerpost-rendezvous dns-records --data DIR --domain D --host NAME [--host NAME...]
                                    --port P [--priority N...] [--weight N...]

`serve` listens with TLS 1.3: the certificate of `--tls-cert/--tls-key`, else a
self-signed one it makes once in DATA (tls_cert.pem, tls_key.pem). Its domain key (Ed25519,
DATA/domain_key.json, 0600) is made on the first start; its fingerprint and the DNS TXT
value that publishes it are logged at every start. Nodes pin it (`peerpost init`).
`--plaintext` is for the simulator and benchmarks only.

`serve` prints one machine-readable line `listening HOST:PORT` on stdout (flushed) once
the socket is bound (an IPv6 host in brackets, `listening [::1]:8470`, as --listen takes
it), so `--listen 127.0.0.1:0` can be read back, then `stun listening
HOST:PORT` and `dht listening HOST:PORT` for the services it runs (by default both, on
the --listen host, UDP: STUN at the --listen port, the DHT at the port above; port 0: any
free port; serveconfig.py; `--listen` given twice, at one port, e.g. 0.0.0.0:4500 and
[::]:4500: each line once for each address, the ports the same), then `metrics listening
HOST:PORT` with
`--metrics` (Prometheus /metrics and /healthz, rendezvous/metrics.py). Logs go to stderr
as key=value lines, or JSON lines with `--log-format json` (logfmt.py). Once serving it
tells systemd READY=1 when $NOTIFY_SOCKET is set (sdnotify.py). SIGTERM or
SIGINT shut it down cleanly; SIGHUP re-reads `--config` (limits, block list, registration,
log level) and the TLS certificate and key, keeping every session; SIGUSR1 (sent by
`accounts delete` and `devices revoke`) re-reads accounts and ends the sessions of removed
devices (with `--store`, the commands announce the change to every instance on the
database instead). One `serve` per data folder:
it holds an fcntl lock on DATA/serve.lock (datalock.py), and the folder keeps the domain
it was first served for. It uses uvloop when installed.
Every few seconds it writes DATA/stats.json, which `stats` reads for the online sessions,
relay counters and the services' counters; the other figures `stats` shows come from the
SQLite file directly (see stats.py), or from PostgreSQL with `--store`.

The store is SQLite in DATA unless `--store postgresql://...` names a PostgreSQL database,
which several `serve` processes of the domain may share (storecli.py, pg_store.py).
`migrate` brings a database's schema to this version; `serve` refuses one it does not know.
The instances on one database share presence and push to each other (instances.py):
`--advertise` is where the others send relay callees to reach this one, and `stats
--store` shows each instance and the domain's totals.

The DHT bootstrap node comes from the overlay package, loaded by name only when it is
run (services.py explains why that is the least bad way); its identity
is DATA/server-identity.json (0600). The relay caps apply per account (the caller's);
0 turns one off, as it does for the session caps and the per-sender quotas.
FINGER shows presence and reachability only between accounts that have exchanged mail
(server.py explains); `--finger-open` shows them to every account (demos, tests).

Federation: mail for other domains waits in the server's outbound queue until the other
domain's server (found in DNS, `PEERPOST_RESOLVER` picks the name server) takes it, and
bounces after `--outbound-expiry` days (default 5). `--block-domain D` (repeatable)
refuses links, and so mail, from D.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto.address import format_hostport, normalize_address, parse_hostport
from crypto.errors import DecodeError
from rendezvous import defaults
from rendezvous.cliutil import (
    FORMATS,
    LEVELS,
    ArgumentParser,
    add_completion,
    add_version,
    completion_script,
    reader_may_leave,
)
from rendezvous.defaults import DAY
from rendezvous.serveconfig import (
    RESTART_KEYS,
    ConfigError,
    apply_config,
    read_config,
    service_port,
    service_ports,
)
from rendezvous.storecli import STORE_HELP, add_migrate_command, store_url

# Building the parser loads only the modules above: each command imports what it runs
# (the server, dnspython, the stores) when it runs, so `--help`, `accounts list` or a
# cron `backup` do not pay for `serve`'s imports.
if TYPE_CHECKING:
    import logging
    from collections.abc import Coroutine

    from rendezvous.limits import Limits
    from rendezvous.metrics import ServerMetrics
    from rendezvous.server import RendezvousServer
    from rendezvous.services import ExtraService

OPERATOR_COMMANDS = ("accounts", "devices", "backup", "restore")  # run by opcli.py
_RELAY_COUNTERS = ("relayed_bytes", "relay_sessions", "relay_active", "relay_refused",
                   "relay_expired", "relay_cut_daily")
# What `stats` shows of the running server's refusals and its links with other domains,
# under the names it prints (the snapshot's names where they differ).
_REFUSAL_COUNTERS = {"sessions_refused": "sessions_refused",
                     "slow_readers_dropped": "slow_readers_dropped",
                     "bad_input": "bad_input", "links_refused": "links_refused",
                     "links_refused_alignment": "link_refused_alignment",
                     "links_refused_blocked": "link_refused_blocked",
                     "links_rate_limited": "link_rate_limited"}
_LINK_COUNTERS = {"links_in": "links_in", "links_out": "fed_links_open",
                  "forwarded": "fed_forwarded", "bounced": "fed_bounced",
                  "link_failures": "fed_link_failures",
                  "links_refused_identity": "fed_links_refused_identity",
                  "links_refused_by_them": "fed_links_refused"}


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("rendezvous.cli")


def _domain(text: str) -> str:
    """A mail domain as addresses carry it (lower case, no trailing dot): `--domain
    Example.NET` served a domain that no normalised address belongs to, so every invite
    was refused ("DATA serves Example.NET, not example.net")."""
    domain = str(text).strip().rstrip(".")
    try:
        return normalize_address(f"postmaster@{domain}").rpartition("@")[2]
    except DecodeError:
        raise argparse.ArgumentTypeError(f"not a mail domain: {text!r}") from None


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what="--listen", default_host="0.0.0.0")
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _ListenAction(argparse._AppendAction):
    """`--listen` may be given twice; the command line's replace the default's (or the
    --config file's) instead of adding to them, as the other flags override."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        items = [] if given is self.default or given is None else list(given)
        setattr(namespace, self.dest, [*items, values])


def _split_listen(args: argparse.Namespace) -> None:
    """`args.listen` becomes the first --listen and `args.listen_also` the other host: a
    second address shares the first's port (its services' ports are announced once)."""
    given = list(args.listen) if isinstance(args.listen, list) else [args.listen]
    if len(given) > 2:
        raise ConfigError("--listen at most twice (an IPv4 and an IPv6 address)")
    if len(given) == 2 and given[1][1] != given[0][1]:
        raise ConfigError(f"the second --listen takes the first's port: "
                          f"{given[0][1]}, not {given[1][1]} (e.g. --listen 0.0.0.0:4500 "
                          "--listen [::]:4500)")
    args.listen = given[0]
    args.listen_also = [host for host, _ in given[1:]]


def _metrics_listen(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what="--metrics", default_host="127.0.0.1")
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return int(text)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {text!r}")
    return value


def _advertise(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, what="--advertise")
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not port:
        raise argparse.ArgumentTypeError(f"--advertise needs a port, got {text!r}")
    return host, port


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number 0 or more, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = ArgumentParser(
        prog="peerpost-rendezvous", description="The rendezvous server of one peerpost domain.",
        epilog="exit status: 0 ok, 1 error, 2 usage error")
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with a key per flag (relay_rate = 1000000, ...); flags "
                        "override it; SIGHUP re-reads it")
    s.add_argument("--domain", type=_domain,
                   help="the mail domain this server is for (required, here or in --config)")
    s.add_argument("--listen", type=_listen, action=_ListenAction, default=[("127.0.0.1", 0)],
                   metavar="HOST:PORT",
                   help="where to listen (port 0: any free port, printed); give it twice, "
                        "at one port, to serve IPv4 and IPv6 (0.0.0.0:4500 and [::]:4500): "
                        "the mailbox, STUN (UDP and TCP) and the DHT then answer at the "
                        "same ports on both (default: 127.0.0.1:0)")
    s.add_argument("--data", type=Path, help="data folder (SQLite, keys, stats; required, "
                                             "here or in --config)")
    s.add_argument("--store", type=store_url, metavar="URL", help=STORE_HELP)
    s.add_argument("--advertise", type=_advertise, metavar="HOST:PORT",
                   help="with a PostgreSQL --store: where the domain's other instances send "
                        "relay callees to reach this one (default: the --listen address)")
    s.add_argument("--instance-heartbeat", type=_positive, default=2.0, metavar="SECONDS",
                   help="with a PostgreSQL --store: how often this instance renews its "
                        "lease; its sessions count as online for 3 times that")
    s.add_argument("--outbound-claim", type=_positive, default=60.0, metavar="SECONDS",
                   help="with a PostgreSQL --store: how long this instance holds the mail "
                        "for other domains it took to forward; a dead instance's goes to "
                        "another after this (default %(default)g)")
    s.add_argument("--open-registration", action="store_true",
                   help="anyone may create an account (demos and tests)")
    s.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="TLS certificate (chain); default: a self-signed one made in --data. "
                        "SIGHUP reads it and --tls-key again (a renewed certificate)")
    s.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    s.add_argument("--plaintext", action="store_true",
                   help="no TLS: only for the simulator and benchmarks, never in service "
                        "(clients can then be impersonated by anyone on the path)")
    s.add_argument("--max-envelope", type=int, default=defaults.MAX_ENVELOPE, metavar="BYTES",
                   help="largest envelope (sealed location message) a SEND may carry")
    s.add_argument("--max-frame", type=int, default=defaults.MAX_FRAME, metavar="BYTES",
                   help="largest protocol frame read from a client")
    s.add_argument("--quota-count", type=int, default=defaults.QUOTA_COUNT, metavar="N",
                   help="envelopes queued for one recipient")
    s.add_argument("--quota-bytes", type=int, default=defaults.QUOTA_BYTES, metavar="BYTES",
                   help="bytes queued for one recipient")
    s.add_argument("--request-rate", type=_positive, default=defaults.REQUEST_RATE,
                   metavar="N", help="requests per second per connection")
    s.add_argument("--envelope-days", type=float, default=defaults.ENVELOPE_TTL / DAY,
                   metavar="DAYS", help="an undelivered envelope is dropped after this long")
    s.add_argument("--stats-interval", type=_positive, default=2.0, metavar="SECONDS",
                   help="how often DATA/stats.json is written")
    s.add_argument("--stun-port", type=service_port, metavar="N|off",
                   help="answer STUN on this UDP port (default: the --listen port, UDP; "
                        "0: any free port; off: no STUN); rate-limited per client IP address "
                        "or IPv6 /64")
    s.add_argument("--dht-port", type=service_port, metavar="N|off",
                   help="run the DHT bootstrap node on this UDP port (default: the --listen "
                        "port + 1; 0: any free port; off: no DHT node, and nodes then find "
                        "no co-recipients to fetch from)")
    s.add_argument("--relay-rate", type=_non_negative, default=defaults.RELAY_RATE,
                   metavar="BYTES_PER_S",
                   help="relayed bytes per second per account (0: no cap; default %(default)g)")
    s.add_argument("--relay-daily", type=_non_negative, default=defaults.RELAY_DAILY,
                   metavar="BYTES",
                   help="relayed bytes per account per UTC day (0: no cap; default %(default)g)")
    s.add_argument("--sessions-per-device", type=_count,
                   default=defaults.SESSIONS_PER_DEVICE, metavar="N",
                   help="live sessions per device (0: no cap; default %(default)s)")
    s.add_argument("--sessions-per-account", type=_count,
                   default=defaults.SESSIONS_PER_ACCOUNT, metavar="N",
                   help="live sessions per account (0: no cap; default %(default)s)")
    s.add_argument("--sessions-per-ip", type=_count, default=defaults.SESSIONS_PER_IP,
                   metavar="N", help="live sessions per client IP address, an IPv6 "
                                     "client's per /64 (0: no cap; default %(default)s)")
    s.add_argument("--push-buffer-total", type=_count, default=defaults.PUSH_BUFFER_TOTAL,
                   metavar="BYTES", help="unsent push bytes of all sessions together; over "
                                         "it the slowest readers are dropped "
                                         "(default %(default)s)")
    s.add_argument("--sender-quota-count", type=_count,
                   default=defaults.SENDER_QUOTA_COUNT, metavar="N",
                   help="envelopes one sender may have queued for one recipient "
                        "(0: no cap; default %(default)s)")
    s.add_argument("--sender-quota-bytes", type=_count,
                   default=defaults.SENDER_QUOTA_BYTES, metavar="BYTES",
                   help="bytes one sender may have queued for one recipient "
                        "(0: no cap; default %(default)s)")
    s.add_argument("--keepalive-timeout", type=_non_negative,
                   default=defaults.KEEPALIVE_TIMEOUT, metavar="SECONDS",
                   help="close a session whose client announced PINGs after this long "
                        "without a byte from it (0: never)")
    s.add_argument("--finger-open", action="store_true",
                   help="FINGER shows presence and reachability to every account, not only "
                        "to those that exchanged mail (demos and tests)")
    s.add_argument("--outbound-expiry", type=_non_negative, metavar="DAYS",
                   default=defaults.OUTBOUND_EXPIRY / DAY,
                   help="mail for another domain bounces after waiting this long (default 5)")
    s.add_argument("--link-rate", type=_non_negative, metavar="N",
                   default=defaults.LINK_RATE,
                   help="envelopes per second each other domain may forward here (0: no "
                        f"cap; default {defaults.LINK_RATE:g})")
    s.add_argument("--block-domain", action="append", default=[], metavar="DOMAIN",
                   help="refuse server links, and so mail, from DOMAIN (repeatable)")
    s.add_argument("--resolver", metavar="HOST:PORT", default=None,
                   help="the name server that finds other domains' servers and keys "
                        "(default: $PEERPOST_RESOLVER, else the system's)")
    s.add_argument("--log-level", default="info", choices=LEVELS, help="log detail")
    s.add_argument("--log-format", default="text", choices=FORMATS,
                   help="text: key=value lines; json: one JSON object per line")
    s.add_argument("--metrics", type=_metrics_listen, metavar="HOST:PORT",
                   help="serve Prometheus /metrics and /healthz here over HTTP (port 0: any "
                        "free port, printed as `metrics listening HOST:PORT`)")
    i = sub.add_parser("invite", help="issue a single-use invite token for an address")
    i.add_argument("address", help="NAME@DOMAIN the invite lets one device register")
    where = i.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="the data folder `serve` uses")
    where.add_argument("--store", type=store_url, metavar="URL", help=STORE_HELP)
    i.add_argument("--days", type=float, default=14.0, help="how long the invite is valid")
    st = sub.add_parser("stats", help="accounts, queued envelopes, online sessions, bytes")
    st.add_argument("--data", type=Path, required=True, help="the data folder `serve` uses")
    st.add_argument("--store", type=store_url, metavar="URL",
                    help="read the counts from this PostgreSQL database (the one `serve "
                         "--store` uses)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    d = sub.add_parser("dns-records", help="print the DNS records that publish this domain "
                                           "(SRV per instance, TXT with the domain key)")
    d.add_argument("--data", type=Path, required=True,
                   help="the data folder `serve` uses (its domain key is made if missing)")
    d.add_argument("--domain", required=True, help="the mail domain the records publish")
    d.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="host name of an instance (repeat for several)")
    d.add_argument("--port", type=_port, action="append", required=True,
                   help="the port `serve` listens on: once for all hosts or once per --host")
    d.add_argument("--priority", type=_count, action="append", metavar="N",
                   help="SRV priority, lower tried first: once for all hosts or once per "
                        "--host (default 10)")
    d.add_argument("--weight", type=_count, action="append", metavar="N",
                   help="SRV weight within a priority: once for all hosts or once per "
                        "--host (default 0)")
    add_operator_commands(sub)
    add_migrate_command(sub)
    add_completion(sub, p.prog)
    return p


def add_operator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The flags of OPERATOR_COMMANDS; rendezvous/opcli.py runs them."""

    def data_and_json(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--data", type=Path, help="the data folder `serve` uses")
        where.add_argument("--store", type=store_url, metavar="URL", help=STORE_HELP)
        p.add_argument("--json", action="store_true", help="machine-readable output")

    a = sub.add_parser("accounts", help="list, show or delete accounts")
    asub = a.add_subparsers(dest="action", required=True)
    data_and_json(asub.add_parser("list", help="every account with its devices and queue"))
    show = asub.add_parser("show", help="one account and its devices (peer ids)")
    show.add_argument("address", help="NAME@DOMAIN")
    data_and_json(show)
    delete = asub.add_parser("delete", help="remove an account, its devices and its queue; "
                                            "a running server ends its sessions")
    delete.add_argument("address", help="NAME@DOMAIN")
    data_and_json(delete)
    d = sub.add_parser("devices", help="revoke a device of an account")
    dsub = d.add_subparsers(dest="action", required=True)
    revoke = dsub.add_parser("revoke", help="unbind a device (lost or stolen); a running "
                                            "server ends its sessions")
    revoke.add_argument("address", help="NAME@DOMAIN")
    revoke.add_argument("peer_id", help="the device's peer id (hex, as `accounts show` "
                                        "prints it; 8 digits or more of it)")
    data_and_json(revoke)
    b = sub.add_parser("backup", help="copy the database (consistent while serving) and "
                                      "the keys into a new folder")
    b.add_argument("dest", type=Path, help="a folder that does not exist yet (or is empty)")
    data_and_json(b)
    r = sub.add_parser("restore", help="put a backup in place as a data folder (the server "
                                       "must be stopped)")
    r.add_argument("src", type=Path, help="a folder made by `backup`")
    data_and_json(r)
    r.add_argument("--force", action="store_true",
                   help="replace the database a stopped server left in --data")


@reader_may_leave
def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peerpost-rendezvous` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    if args.command == "serve":
        return _serve(argv, args)
    if args.command in OPERATOR_COMMANDS:
        from rendezvous.opcli import run_operator_command

        return run_operator_command(args)
    if args.command == "invite":
        return _invite(args)
    if args.command == "migrate":
        from rendezvous.storecli import migrate_command

        return migrate_command(args)
    if args.command == "dns-records":
        return _dns_records(args)
    return _stats(args)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _raise_nofile() -> None:
    import resource

    # Every session is a socket; let the server use as many as the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gc() -> None:
    import gc

    # Each session keeps a few dozen small objects alive for as long as it is connected,
    # so with 10,000 sessions a full collection walks hundreds of thousands of them. At
    # the default gen-0 threshold (700) the objects of requests in flight (waiting for a
    # commit) outlive a few young collections, get promoted, and full collections come
    # every few thousand messages: 15-20 us of CPU per message at 10,000 sessions in
    # `python -m benchmarks rendezvous`. A larger young generation lets them die young.
    # What was imported at startup never becomes garbage: freeze it out of every walk.
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _serve_args(argv: list[str] | None) -> argparse.Namespace:
    """`serve`'s arguments: the command line over --config FILE over the defaults."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        apply_config(_subparser(parser, "serve"), read_config(args.config), args.config)
        args = parser.parse_args(argv)
    _split_listen(args)
    missing = [f"--{k}" for k in ("domain", "data") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"serve needs {' and '.join(missing)} (a flag or a key of --config)")
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def _limits(args: argparse.Namespace) -> Limits:
    from rendezvous.limits import Limits

    return Limits(max_envelope=args.max_envelope, max_frame=args.max_frame,
                  quota_count=args.quota_count, quota_bytes=args.quota_bytes,
                  request_rate=args.request_rate,
                  request_burst=max(args.request_rate * 2, 1.0),
                  envelope_ttl=args.envelope_days * DAY, relay_rate=args.relay_rate,
                  relay_daily=int(args.relay_daily),
                  sessions_per_device=args.sessions_per_device,
                  sessions_per_account=args.sessions_per_account,
                  sessions_per_ip=args.sessions_per_ip,
                  push_buffer_total=args.push_buffer_total,
                  sender_quota_count=args.sender_quota_count,
                  sender_quota_bytes=args.sender_quota_bytes,
                  keepalive_timeout=args.keepalive_timeout,
                  outbound_expiry=args.outbound_expiry * DAY,
                  link_rate=args.link_rate)


def _serve(argv: list[str] | None, args: argparse.Namespace) -> int:
    import signal

    from rendezvous.admin import AdminError, record_domain
    from rendezvous.datalock import DataInUse, DataLock
    from rendezvous.heap import keep_heap
    from rendezvous.logfmt import configure, kv
    from rendezvous.sqlite_store import DB_NAME
    from rendezvous.staged import finish_interrupted
    from rendezvous.stats import write_stopped
    from rendezvous.tls import tls_files_problem

    try:
        args = _serve_args(argv)
    except ConfigError as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 2
    configure(args.log_level, args.log_format)
    if (args.tls_cert is None) != (args.tls_key is None):
        print("peerpost-rendezvous: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.plaintext and args.tls_cert is not None:
        print("peerpost-rendezvous: --plaintext and --tls-cert exclude each other",
              file=sys.stderr)
        return 2
    if args.tls_cert is not None:
        problem = tls_files_problem(args.tls_cert, args.tls_key)
        if problem is not None:  # before DATA is made: a typo leaves no folder behind
            print(f"peerpost-rendezvous: {problem}", file=sys.stderr)
            return 1
    try:
        args.data.mkdir(parents=True, exist_ok=True)
        lock = DataLock.acquire(args.data)
    except DataInUse as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # was "[Errno 17] File exists: 'DATA'", naming no flag
        why = "it is a file" if isinstance(exc, FileExistsError) else exc.strerror or exc
        print(f"peerpost-rendezvous: cannot use --data {args.data} as the data folder: {why}",
              file=sys.stderr)
        return 1
    # Until the loop's handlers are in place, these must not end the process (SIGUSR1
    # comes from `accounts delete`/`devices revoke`, SIGHUP from an operator's reload).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        # A restore killed while it put its files in place: finished before anything opens
        # the folder, so the server never starts on its keys without its database.
        if finished := finish_interrupted(args.data):
            _log().warning(kv("restore.finished", files=",".join(finished),
                           note="a restore stopped midway was finished"))
        write_stopped(args.data, now=time.time())  # a killed predecessor's file says running
        if args.store is None:  # PostgreSQL: at open
            # Only checked here: a start that fails (a port in use) must not bind a new
            # folder to a mistyped domain. Recorded once it listens.
            record_domain(args.data / DB_NAME, args.domain, record=False)
        _raise_nofile()
        _tune_gc()
        keep_heap()
        return _run(_serve_async(argv, args, _limits(args)))
    except (AdminError, OSError, RuntimeError) as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()


async def _serve_async(argv: list[str] | None, args: argparse.Namespace,
                       limits: Limits) -> int:
    import asyncio
    import signal
    import ssl

    from rendezvous.admin import record_domain
    from rendezvous.dns import DnsResolver, DomainLookupError
    from rendezvous.domainkey import load_or_create, txt_value
    from rendezvous.instances import make_bus
    from rendezvous.logfmt import kv
    from rendezvous.sdnotify import notify
    from rendezvous.server import RendezvousServer
    from rendezvous.services import BothFamilies
    from rendezvous.sqlite_store import DB_NAME
    from rendezvous.storecli import make_store
    from rendezvous.tls import self_signed, server_tls

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    wake = asyncio.Event()  # a signal arrived: stop, reload or re-read
    asked: set[str] = set()

    def on_signal(what: str) -> None:
        asked.add(what)
        if what == "stop":
            stop.set()
        wake.set()

    for sig, what in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"),
                      (signal.SIGHUP, "reload"), (signal.SIGUSR1, "reread")):
        loop.add_signal_handler(sig, on_signal, what)
    data: Path = args.data
    try:
        services = await _start_services(args)
    except (OSError, LookupError, ConfigError) as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    try:
        resolver = DnsResolver(args.resolver)
        domain_key = load_or_create(data)
        tls = None if args.plaintext else server_tls(
            *((args.tls_cert, args.tls_key) if args.tls_cert is not None
              else self_signed(data, args.domain)))
    except (OSError, ValueError, ssl.SSLError, DomainLookupError) as exc:
        for svc in services.values():
            await svc.aclose()
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    _log().info(kv("server.domain_key", fingerprint=domain_key.fingerprint,
                txt=f"_peerpost.{args.domain} TXT \"{txt_value(domain_key.public)}\""))
    if tls is None:
        _log().warning(kv("server.plaintext", note="no TLS: for the simulator and benchmarks only"))
    else:
        _log().info(kv("server.tls", sha256=tls.binding.hex(), not_after=tls.not_after.isoformat()))
    store = make_store(args.store, data, args.domain, outbound_claim=args.outbound_claim,
                       domain_key=domain_key.public)
    server = RendezvousServer(args.domain, store,
                              open_registration=args.open_registration, limits=limits,
                              services=services, domain_key=domain_key, tls=tls,
                              finger_open=args.finger_open,
                              blocked_domains={d.strip().lower() for d in args.block_domain},
                              resolver=resolver,
                              bus=make_bus(args.store, advertise=args.advertise,
                                           heartbeat=args.instance_heartbeat))
    try:
        # Opened here, not inside start(): a database that does not answer is an OSError
        # too, and must not read "cannot listen on ...".
        await store.open()
    except (OSError, RuntimeError) as exc:
        await server.aclose()  # closes the services too
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    try:
        host, port = await server.start(*args.listen, also=args.listen_also)
    except OSError as exc:
        await server.aclose()  # closes the services too
        bound = len(server.addresses)
        if bound >= 1 + len(args.listen_also[:1]):
            # Every address listened: what failed came after (the instance bus reaching
            # PostgreSQL, federation), and its own text says what.
            print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
            return 1
        # The first address did not bind, or it did and the second (--listen twice) did not.
        failed = (args.listen if bound == 0 else
                  (args.listen_also[0], server.addresses[0][1]))
        print(f"peerpost-rendezvous: cannot listen on {format_hostport(*failed)} "
              f"(TCP): {_bind_reason(exc)}", file=sys.stderr)
        return 1
    except BaseException:
        await server.aclose()  # closes the services too
        raise
    if args.store is None:
        record_domain(data / DB_NAME, args.domain)  # checked before: this one is ours
    print(f"listening {format_hostport(host, port)}", flush=True)
    if tls is not None:  # a plaintext server is the simulator's or a benchmark's
        server.check_own_records(port)
    for other in server.addresses[1:]:  # --listen given twice
        print(f"listening {format_hostport(*other)}", flush=True)
    for name, svc in services.items():
        print(f"{name} listening {format_hostport(*svc.address)}", flush=True)
    for name, svc in services.items():
        if isinstance(svc, BothFamilies):
            print(f"{name} listening {format_hostport(*svc.members[1].address)}", flush=True)
    metrics: ServerMetrics | None = None
    try:
        if args.metrics is not None:
            from rendezvous.metrics import (  # aiohttp, prometheus_client
                ServerMetrics,
                postgres_counts,
                sqlite_counts,
            )

            metrics = ServerMetrics(server, counts=sqlite_counts(data / DB_NAME)
                                    if args.store is None else postgres_counts(args.store))
            try:
                mhost, mport = await metrics.start(*args.metrics)
            except OSError as exc:
                metrics = None
                print(f"peerpost-rendezvous: cannot serve metrics on "
                      f"{format_hostport(*args.metrics)} (TCP): {_bind_reason(exc)} (--metrics)",
                      file=sys.stderr)
                return 1
            print(f"metrics listening {format_hostport(mhost, mport)}", flush=True)
        notify("READY=1", f"STATUS=serving {args.domain} on {format_hostport(host, port)}")
        stats_failing: str | None = None
        while not stop.is_set():
            stats_failing = _refresh_stats(data, server.snapshot(), stats_failing)
            try:
                await asyncio.wait_for(wake.wait(), args.stats_interval)
            except TimeoutError:
                pass
            wake.clear()
            if "reload" in asked and not stop.is_set():
                asked.discard("reload")
                args = _reload(argv, args, server)
            if "reread" in asked and not stop.is_set():
                asked.discard("reread")
                await _reread_accounts(server)
    finally:
        _log().info(kv("server.stopping", reason="signal" if stop.is_set() else "error"))
        notify("STOPPING=1")
        try:
            await server.aclose()
            if metrics is not None:
                await metrics.aclose()
        finally:
            _refresh_stats(data, server.snapshot(), None, running=False)
    return 0


async def _reread_accounts(server: RendezvousServer) -> None:
    """SIGUSR1: end the sessions of devices an operator removed. A store that can't answer
    now (PostgreSQL restarting) is logged and the server serves on; the next SIGUSR1 tries
    again. The error ended the server: a SIGUSR1 while PostgreSQL was down stopped it
    ('cannot connect to ...: Connection refused')."""
    from rendezvous.errors import is_disk_full
    from rendezvous.logfmt import kv

    try:
        ended = await server.reread_accounts()
    except Exception as exc:
        if isinstance(exc, OSError | RuntimeError) or is_disk_full(exc):  # can't connect
            _log().error(kv("server.accounts_reread_failed", error=str(exc) or repr(exc)))
        else:
            _log().exception(kv("server.accounts_reread_failed"))
        return
    _log().info(kv("server.accounts_reread", sessions_ended=ended))


def _refresh_stats(data: Path, snapshot: dict[str, Any], failing: str | None, *,
                   running: bool = True) -> str | None:
    """Rewrite DATA/stats.json; a disk that refuses it (full, read-only) is logged when it
    starts and stops doing so, and the server goes on serving: what it returns is the
    error now (None once the file is written again), for the next call's `failing`."""
    from rendezvous.errors import is_disk_full
    from rendezvous.logfmt import kv
    from rendezvous.stats import STATS_NAME, write_stats

    try:
        write_stats(data, snapshot, running=running, now=time.time())
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc.strerror or exc}"
        if why != failing:
            _log().error(kv("storage.full" if is_disk_full(exc) else "stats.unwritable",
                         file=str(data / STATS_NAME), error=why))
        return why
    if failing is not None:
        _log().info(kv("stats.written_again", file=str(data / STATS_NAME)))
    return None


def _bind_reason(exc: OSError) -> str:
    """The OS's reason a bind failed ("Address already in use"). uvloop's UDP bind raises
    "could not bind to local_addr ..." without an errno, the OSError with it as the cause."""
    seen: BaseException | None = exc
    for _ in range(4):
        if isinstance(seen, OSError) and seen.errno:
            # A host name that does not resolve is a gaierror, errno -2: its strerror is
            # "Name or service not known", os.strerror's "Unknown error -2". asyncio's
            # own bind errors carry errno 98 and a strerror of its making.
            return os.strerror(seen.errno) if seen.errno > 0 else str(seen.strerror)
        if seen is None:
            break
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _tcp_in_use(host: str, port: int) -> str | None:
    """"Address already in use" when something listens on TCP host:port (a bind with
    SO_REUSEADDR, as the server's own, fails only beside a listener), or why the host is
    none of this machine's; else None."""
    import socket

    for family, kind, proto, _, addr in socket.getaddrinfo(host, port,
                                                           type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return os.strerror(exc.errno)
                if exc.errno == errno.EADDRNOTAVAIL:
                    return (f"{os.strerror(exc.errno)} (not an address of this host: check "
                            "--listen)")
    return None


async def _start_services(args: argparse.Namespace) -> dict[str, ExtraService]:
    """STUN and the DHT bootstrap node on the --listen host (UDP), at the ports
    `service_ports` derives from --listen unless given or turned off; with a second
    --listen, on its host too at the same ports (`BothFamilies`)."""
    from rendezvous.services import BothFamilies

    services = await _start_services_on(args, args.listen[0])
    for host in args.listen_also:
        try:
            more = await _start_services_on(args, host, {n: s.address[1]
                                                         for n, s in services.items()})
        except BaseException:
            for svc in services.values():
                await svc.aclose()
            raise
        services = {name: BothFamilies(svc, more[name]) for name, svc in services.items()}
    return services


async def _start_services_on(args: argparse.Namespace, host: str,
                             same_as: dict[str, int] | None = None
                             ) -> dict[str, ExtraService]:
    """The services on `host`: at the ports of `same_as` (the first host's) when given."""
    import asyncio
    import socket

    from rendezvous.services import StunService, load_starter, server_identity, start_stun_tcp

    try:  # else the first service to bind would blame its own port for a typo in the host
        await asyncio.get_running_loop().getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {format_hostport(host, args.listen[1])}: "
                          f"{exc.strerror} (--listen HOST:PORT)") from None
    if busy := await asyncio.to_thread(_tcp_in_use, host, args.listen[1]):
        # Else a second server on the same --listen was told to move its STUN port, and
        # one on an address this host does not have, to move it or turn it off.
        raise ConfigError(f"cannot listen on {format_hostport(host, args.listen[1])} (TCP): "
                          f"{busy}")
    ports = service_ports(args.listen[1], args.stun_port, args.dht_port)
    if same_as is not None:
        ports = {name: port for name, port in same_as.items() if name != "stun_tcp"}
    services: dict[str, ExtraService] = {}
    try:
        for name, port in ports.items():
            try:
                if name == "stun":
                    services[name] = await StunService.start(host, port)
                else:
                    start_dht = load_starter("dht")
                    identity = await asyncio.to_thread(server_identity, args.data)
                    services[name] = await start_dht(host, port, identity)
            except OSError as exc:
                reason = _bind_reason(exc)
                raise ConfigError(f"cannot run {name.upper()} on {format_hostport(host, port)} "
                                  f"(UDP): {reason} (--{name}-port N moves it, off turns "
                                  "it off)") from None
        if "stun" in ports:
            # STUN over TCP, for hole punching, runs and stops with STUN: on TCP the
            # STUN's own number, except that STUN at the listen port P puts it at TCP
            # P + 1 (the DHT has UDP P + 1); any free port when STUN's is 0.
            listen, port = args.listen[1], ports["stun"]
            if port == listen and listen:
                port = listen + 1 if listen < 65535 else 0
            if same_as is not None:
                port = same_as["stun_tcp"]
            try:
                services["stun_tcp"] = await start_stun_tcp(host, port)
            except OSError as exc:
                reason = _bind_reason(exc)
                raise ConfigError(f"cannot run STUN on {format_hostport(host, port)} (TCP): "
                                  f"{reason} (--stun-port off turns it off)") from None
    except BaseException:
        for svc in services.values():
            await svc.aclose()
        raise
    return services


def _reload(argv: list[str] | None, current: argparse.Namespace,
            server: RendezvousServer) -> argparse.Namespace:
    """SIGHUP: read --config again and apply what a running server can change (limits,
    block list, registration, FINGER, log level, stats interval); sessions stay."""
    import logging

    from rendezvous.logfmt import kv

    try:
        new = _serve_args(argv)
    except (ConfigError, SystemExit) as exc:
        _log().error(kv("server.reload_failed", error=str(exc), note="the old settings stay"))
        return current
    kept = [k for k in (*RESTART_KEYS, "log_format", "metrics")
            if hasattr(current, k) and getattr(new, k, None) != getattr(current, k)]
    for key in kept:
        setattr(new, key, getattr(current, key))
    # What the reload applied, so an operator sees the edit took (or that it did not).
    applied = sorted(k for k, v in vars(new).items()
                     if k not in kept and k != "config" and not callable(v)
                     and getattr(current, k, None) != v)
    logging.getLogger().setLevel(str(new.log_level).upper())
    if server.tls is not None and not _reload_tls(new, server):
        # The old certificate stays, and so do its paths: not reported as changed.
        new.tls_cert, new.tls_key = current.tls_cert, current.tls_key
        applied = [k for k in applied if k not in ("tls_cert", "tls_key")]
    server.reconfigure(_limits(new),
                       blocked_domains={d.strip().lower() for d in new.block_domain},
                       finger_open=new.finger_open, open_registration=new.open_registration)
    _log().info(kv("server.reloaded", config=str(new.config) if new.config else "-",
                changed=",".join(applied) or "-", needs_restart=",".join(kept) or "-"))
    return new


def _reload_tls(args: argparse.Namespace, server: RendezvousServer) -> bool:
    """SIGHUP: read the certificate and key again (a renewed certificate at the same paths,
    or new paths in --config) and present them from the next handshake on. Files that
    can't serve (half written, a key of another certificate) are logged and the old
    certificate stays, as it does for a config that names one of the two files only (at
    start that is a usage error; here an exception would end serve). False if so."""
    import ssl

    from rendezvous.logfmt import kv
    from rendezvous.tls import ServerTls, self_signed, server_tls, tls_files_problem

    tls: ServerTls | None = None
    if (args.tls_cert is None) != (args.tls_key is None):
        problem: str | None = "--tls-cert and --tls-key go together"
    else:
        try:
            cert, key = ((args.tls_cert, args.tls_key) if args.tls_cert is not None
                         else self_signed(args.data, args.domain))
            problem = tls_files_problem(cert, key)
            if problem is None:
                tls = server_tls(cert, key)
        except (OSError, ValueError, ssl.SSLError) as exc:  # replaced since it was checked,
            problem = str(exc)  # or DATA refusing a self-signed one
    if problem is not None or tls is None:
        _log().error(kv("server.tls_reload_failed", error=problem,
                     note="the old certificate stays"))
        return False
    if tls.binding == server.binding:
        return True
    server.reload_tls(tls)
    _log().info(kv("server.tls_reloaded", cert=str(cert), sha256=tls.binding.hex(),
                not_after=tls.not_after.isoformat()))
    return True


def new_invite_token() -> str:
    """A single-use invite token: 128 random bits as hex. Hex, because a token printed
    for `peerpost init --invite TOKEN` must never start with '-', which the command line
    takes for an option (base64url tokens did, one in 64)."""
    import secrets

    return secrets.token_hex(16)


def _invite(args: argparse.Namespace) -> int:
    from rendezvous.admin import served_domain
    from rendezvous.sqlite_store import DB_NAME, create_invite
    from rendezvous.storecli import pg_create_invite

    try:
        address = normalize_address(args.address)
    except DecodeError as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 2
    if args.store is not None:
        token = new_invite_token()
        now = time.time()
        try:
            refusal = pg_create_invite(args.store, address, token, now,
                                       now + args.days * DAY)
        except (OSError, RuntimeError) as exc:
            refusal = str(exc)
        if refusal is not None:
            print(f"peerpost-rendezvous: {refusal}", file=sys.stderr)
            return 1
        print(token)
        print(f"invite for {address}, valid {args.days:g} days, single use", file=sys.stderr)
        return 0
    db = args.data / DB_NAME
    if not args.data.is_dir():
        print(f"peerpost-rendezvous: no data folder {args.data}", file=sys.stderr)
        return 1
    domain = served_domain(db) if db.is_file() else None
    if domain is None:
        # `serve` without --domain is refused, and a `serve` that could not listen (its
        # port taken) left this folder so: the hint says both.
        print(f"peerpost-rendezvous: {args.data} is not a server's data folder yet: no "
              "`serve` has listened with it (one that failed to start, say on a port in "
              "use, does not count: its error says why); start `peerpost-rendezvous serve "
              f"--domain DOMAIN --data {args.data}` first", file=sys.stderr)
        return 1
    if address.rpartition("@")[2] != domain:
        print(f"peerpost-rendezvous: {args.data} serves {domain}, not "
              f"{address.rpartition('@')[2]}", file=sys.stderr)
        return 1
    token = new_invite_token()
    now = time.time()
    create_invite(args.data / DB_NAME, address, token, now, now + args.days * DAY)
    print(token)
    print(f"invite for {address}, valid {args.days:g} days, single use", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from rendezvous.instances import instances_lines, instances_report, read_instances
    from rendezvous.sqlite_store import DB_NAME, read_stats
    from rendezvous.stats import read_live_stats
    from rendezvous.storecli import pg_read_stats

    db = args.data / DB_NAME
    if args.store is not None:
        try:
            st = pg_read_stats(args.store)
        except (OSError, RuntimeError) as exc:
            print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
            return 1
    elif not db.exists():
        print(f"peerpost-rendezvous: no database in {args.data}", file=sys.stderr)
        return 1
    else:
        st = read_stats(db)
    live = read_live_stats(args.data)
    doc = {
        "accounts": st.accounts,
        "devices": st.devices,
        "queued_envelopes": st.queued_envelopes,
        "bytes_stored": st.bytes_stored,
        "outbound_queued": st.outbound_queued,
        "database_bytes": st.file_bytes,
        "server_running": live is not None,
        "online_sessions": live.get("online_sessions", 0) if live else 0,
        "online_devices": live.get("online_devices", 0) if live else 0,
        "connections": live.get("connections", 0) if live else 0,
    }
    for key in _RELAY_COUNTERS:
        doc[key] = live.get(key, 0) if live else 0
    for shown, key in (*_REFUSAL_COUNTERS.items(), *_LINK_COUNTERS.items()):
        doc[shown] = live.get(key, 0) if live else 0
    if live:
        # The extra services' counters, as the server named them (stun_*, dht_*).
        doc.update({k: v for k, v in live.items()
                    if k.startswith(("stun_", "dht_")) and isinstance(v, int)})
    instances: dict[str, Any] | None = None
    if args.store is not None:
        try:
            instances = instances_report(asyncio.run(read_instances(args.store)))
        except Exception as exc:  # asyncpg's errors, a refused connection
            print(f"peerpost-rendezvous: cannot read the instances: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({**doc, **(instances or {})}))
    else:
        for key, value in doc.items():
            print(f"{key.replace('_', ' ')}: {value}")
        for line in instances_lines(instances) if instances else ():
            print(line)
    return 0


DNS_TTL = 300


def _dns_records(args: argparse.Namespace) -> int:
    """The zone lines (BIND syntax) that publish the domain: an SRV line per --host and the
    TXT line with the domain key, made in --data if missing so the records can be
    published before the first `serve`, which then uses the same key."""
    from rendezvous.domainkey import load_or_create, txt_value

    hosts: list[str] = args.host
    per_host: dict[str, list[int]] = {}
    # A repeated --port was once taken as the last one for every host.
    for name, given, low in (("port", args.port, 1), ("priority", args.priority or [10], 0),
                             ("weight", args.weight or [0], 0)):
        values = given * len(hosts) if len(given) == 1 else given
        if len(values) != len(hosts) or any(v > 65535 for v in values):
            print(f"peerpost-rendezvous: give --{name} ({low}..65535) once, or once per "
                  "--host", file=sys.stderr)
            return 2
        per_host[name] = values
    domain = str(args.domain).strip().rstrip(".").lower()
    if not domain or any(not h.strip(". ") for h in hosts):
        print("peerpost-rendezvous: --domain and --host must be host names", file=sys.stderr)
        return 2
    try:
        args.data.mkdir(parents=True, exist_ok=True)
        domain_key = load_or_create(args.data)
    except (OSError, DecodeError) as exc:
        print(f"peerpost-rendezvous: {exc}", file=sys.stderr)
        return 1
    for host, port, prio, weight in zip(hosts, per_host["port"], per_host["priority"],
                                        per_host["weight"], strict=True):
        target = host.strip().rstrip(".") + "."
        print(f"_peerpost._tcp.{domain}. {DNS_TTL} IN SRV {prio} {weight} {port} {target}")
    print(f"_peerpost.{domain}. {DNS_TTL} IN TXT \"{txt_value(domain_key.public)}\"")
    print(f"domain key {domain_key.fingerprint} ({args.data / 'domain_key.json'})",
          file=sys.stderr)
    return 0
