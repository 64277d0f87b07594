"""A real name server for tests: Debian's dnsmasq on a loopback port, serving the records
`peerpost-rendezvous dns-records` prints (plus the A records of their targets).

    def test_x(dns_server):
        ns = dns_server(bind_lines, hosts={"rv.a.test": "127.0.0.1"})
        DnsResolver(ns.hostport)          # or PEERPOST_RESOLVER=ns.hostport

dnsmasq answers only for the names it is given and is authoritative for `.test`
(`--local=/test/`): any other name under `.test` is NXDOMAIN, so a missing record is
missing, not a failure of the name server. dnsmasq cannot bind port 0; the fixture finds a
port free for both UDP and TCP, releases it and starts dnsmasq there, retrying on a clash.
Without dnsmasq the tests skip with the reason (`apt-get install -y dnsmasq-base`); under
CI=true that is an error, since CI installs it.
"""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

START_TIMEOUT = 10.0
_ATTEMPTS = 5


class DnsmasqError(Exception):
    pass


def dnsmasq_missing() -> str | None:
    """Why dnsmasq cannot run here, or None."""
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        return "dnsmasq is not installed: apt-get install -y dnsmasq-base"
    return None


def _dnsmasq_path() -> str:
    return shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def _free_port() -> int:
    """A loopback port free for UDP and TCP at the time of asking."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def flags_from_bind(lines: Iterable[str]) -> list[str]:
    """dnsmasq flags serving the SRV and TXT lines of `dns-records` (BIND syntax)."""
    flags: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        parts = shlex.split(line)  # the TXT value is one quoted string
        if len(parts) < 5 or parts[2] != "IN":
            raise DnsmasqError(f"not a zone line: {line!r}")
        name, rtype = parts[0].rstrip("."), parts[3]
        if rtype == "SRV" and len(parts) == 8:
            prio, weight, port, target = parts[4:8]
            target = target.rstrip(".")
            if target:
                flags.append(f"--srv-host={name},{target},{port},{prio},{weight}")
            else:  # "." : the service is not offered
                flags.append(f"--srv-host={name}")
        elif rtype == "TXT" and len(parts) == 5:
            if "," in parts[4]:
                raise DnsmasqError("dnsmasq splits a --txt-record at commas")
            flags.append(f"--txt-record={name},{parts[4]}")
        else:
            raise DnsmasqError(f"unsupported zone line: {line!r}")
    return flags


@dataclass
class Dnsmasq:
    """One running dnsmasq; `hostport` is what PEERPOST_RESOLVER takes."""

    proc: subprocess.Popen[str]
    port: int
    argv: list[str]
    log: list[str] = field(default_factory=list)

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _pump(stream: IO[str], log: list[str], lines: queue.Queue[str | None]) -> None:
    for ln in stream:
        log.append(ln.rstrip("\n"))
        lines.put(ln)
    lines.put(None)


def start_dnsmasq(zone_lines: Iterable[str], hosts: Mapping[str, str] | None = None,
                  *, extra: Iterable[str] = (), local: Iterable[str] = ("test",)) -> Dnsmasq:
    """Start dnsmasq serving `zone_lines` (BIND syntax) and `hosts` (name -> IPv4/IPv6)."""
    flags = flags_from_bind(zone_lines)
    for name, addr in (hosts or {}).items():
        flags.append(f"--host-record={name},{addr}")
    flags += [f"--local=/{d}/" for d in local]
    flags += list(extra)
    last = ""
    for _ in range(_ATTEMPTS):
        port = _free_port()
        argv = [_dnsmasq_path(), "--keep-in-foreground", "--no-resolv", "--no-hosts",
                "--conf-file=/dev/null", "--bind-interfaces", "--listen-address=127.0.0.1",
                f"--port={port}", "--pid-file=", "--log-facility=-",
                *(["--user=root"] if os.geteuid() == 0 else []), *flags]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        server = Dnsmasq(proc, port, argv)

        threading.Thread(target=_pump, args=(proc.stdout, server.log, lines),
                         daemon=True).start()
        seen: list[str] = []
        while True:
            try:
                ln = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                server.stop()
                raise DnsmasqError(f"dnsmasq did not start within {START_TIMEOUT} s: "
                                   f"{''.join(seen)}") from None
            if ln is None:  # exited
                proc.wait(10)
                last = "".join(seen)
                break
            seen.append(ln)
            if "started, version" in ln:
                return server
        if "in use" not in last:
            raise DnsmasqError(f"dnsmasq exited {proc.returncode}: {last}\n{shlex.join(argv)}")
    raise DnsmasqError(f"no free port for dnsmasq after {_ATTEMPTS} tries: {last}")


@pytest.fixture
def dns_server() -> Iterator[Callable[..., Dnsmasq]]:
    """A factory: `dns_server(zone_lines, hosts)` starts a dnsmasq, stopped after the test."""
    reason = dnsmasq_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must run the DNS tests, but: {reason}")
        pytest.skip(reason)
    started: list[Dnsmasq] = []

    def make(zone_lines: Iterable[str], hosts: Mapping[str, str] | None = None, *,
             extra: Iterable[str] = (), local: Iterable[str] = ("test",)) -> Dnsmasq:
        server = start_dnsmasq(zone_lines, hosts, extra=extra, local=local)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
