"""A NAT lab of Linux network namespaces: two NATed homes and a public server.

    with NatLab(h1=NatMode.EIM, h2=NatMode.SYMMETRIC) as lab:
        srv = lab.run("server", [sys.executable, "-m", "some.server"])
        lab.addr_of("server")     # "198.18.0.10"

Topology (every name below is prefixed with a per-lab prefix, so labs never collide):

    h1 (10.1.0.2) -- r1 [NAT] (198.18.0.1) --+
                                             +-- inet: bridge "the internet" -- server
    h2 (10.2.0.2) -- r2 [NAT] (198.18.0.2) --+        (198.18.0.10 and .11)
                                             +-- pub (198.18.0.20): a host with no NAT

The public segment uses 198.18.0.0/24 (RFC 2544's benchmarking range) and the homes use
RFC 1918 nets; all of them exist only inside the namespaces made here. The server has two
addresses so a client can ask STUN at two destinations and see whether its NAT maps them
to the same public port. `pub` is an ordinary directly reachable host on the public
segment (a co-recipient with a public address, say).

NAT modes, built with nftables on each router (`wan` is the public side, `lan` the home):
- `EIM`: plain masquerade (endpoint-independent mapping, port kept where free) and only
  replies let in: unsolicited WAN packets are dropped in a filter rule. Without that drop
  an early punch packet creates a conntrack entry that moves the later mapping.
- `FULL_CONE`: masquerade plus a DNAT of every inbound UDP packet to the one host, so any
  outside address can reach a mapped port (the home has one host, and masquerade keeps
  its port, so this is the classic full cone).
- `SYMMETRIC`: `masquerade fully-random`: a fresh random port per destination.

`up()` takes well under a second; a lab is meant to be fresh for each test (conntrack state
and rule changes never leak between tests) and `down()` always runs in `__exit__`.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Self

REQUIRED_TOOLS = ("ip", "nft")
_counter = itertools.count()


class NatMode(enum.Enum):
    EIM = "eim"
    FULL_CONE = "full-cone"
    SYMMETRIC = "symmetric"


class LabError(Exception):
    """Setting up the lab or a process in it failed; the text has the command and output."""


_ADDRS = {
    "server": "198.18.0.10",
    "server2": "198.18.0.11",
    "r1": "198.18.0.1",
    "r2": "198.18.0.2",
    "h1": "10.1.0.2",
    "h2": "10.2.0.2",
    "pub": "198.18.0.20",
}


def _nat_rules(mode: NatMode, host: str) -> str:
    masq = "masquerade fully-random" if mode is NatMode.SYMMETRIC else "masquerade"
    cone = mode is NatMode.FULL_CONE
    pre = (f'chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; '
           f'iifname "wan" meta l4proto udp dnat to {host}; }}') if cone else ""
    return f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
                       oifname "wan" {masq}; }}
  {pre}
}}
table inet filter {{
  chain forward {{ type filter hook forward priority filter; policy drop;
                   iifname "lan" accept; ct state established,related accept;
                   {"ct status dnat accept;" if cone else ""} }}
  chain input {{ type filter hook input priority filter; policy accept;
                 iifname "wan" ct state established,related accept; iifname "wan" drop; }}
}}
"""


def missing_tools() -> list[str]:
    """Tools the lab needs that are not on PATH."""
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def natlab_unavailable() -> str | None:
    """Why the NAT lab can't run here (not Linux, not root, tools missing, no network
    namespaces), or None."""
    if sys.platform != "linux":
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, nftables)"
    missing = missing_tools()
    if missing:
        return (f"missing {', '.join(missing)}: "
                "apt-get install -y iproute2 nftables conntrack")
    probe = f"pplprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class NatLab:
    """Namespaces, veths, a bridge and NAT rules; processes run inside by host name."""

    HOSTS = ("server", "h1", "h2", "r1", "r2", "pub", "inet")

    def __init__(self, h1: NatMode = NatMode.EIM, h2: NatMode = NatMode.EIM, *,
                 prefix: str | None = None, log_dir: Path | None = None) -> None:
        self.modes = {"r1": h1, "r2": h2}
        self.hosts: tuple[str, ...] = self.HOSTS
        self.prefix = prefix or f"ppl{os.getpid() % 100000}x{next(_counter)}"
        self.log_dir = log_dir
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    # --- naming ------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        """The namespace name of `host` (one of `hosts`)."""
        if host not in self.hosts:
            raise ValueError(f"no host {host!r} in the lab")
        return f"{self.prefix}-{host}"

    def addr_of(self, host: str) -> str:
        """The IPv4 address of a host: a router's is its public (WAN) one."""
        return _ADDRS[host]

    @property
    def server_addrs(self) -> tuple[str, str]:
        """The public server's two addresses (for telling NAT mapping behaviours apart)."""
        return _ADDRS["server"], _ADDRS["server2"]

    # --- building ----------------------------------------------------------------------
    def _ip(self, *args: str, ns: str | None = None) -> None:
        self._cmd(["ip", *(["-n", self.ns(ns)] if ns else []), *args])

    def _cmd(self, argv: Sequence[str], stdin: str | None = None) -> None:
        r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                           timeout=30, check=False)
        if r.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")

    def _sysctl(self, host: str, setting: str, *, required: bool = True) -> None:
        r = subprocess.run(["ip", "netns", "exec", self.ns(host), "sysctl", "-qw", setting],
                           capture_output=True, text=True, timeout=10, check=False)
        if r.returncode != 0 and required:
            raise LabError(f"sysctl {setting} in {host}: {r.stderr.strip()}")

    def up(self) -> Self:
        """Build the whole topology; on any failure tear down what was made and raise."""
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for host in self.hosts:
                self._cmd(["ip", "netns", "add", self.ns(host)])
                self._made.append(host)
                self._ip("link", "set", "lo", "up", ns=host)
            self._ip("link", "add", "br0", "type", "bridge", ns="inet")
            self._ip("link", "set", "br0", "up", ns="inet")
            # The bridge must not send frames through the (routers') netfilter hooks.
            self._sysctl("inet", "net.bridge.bridge-nf-call-iptables=0", required=False)
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        """What hangs on the bridge: the server, the public host, and two NATed homes."""
        self._wire("server", "eth0", "srv", [f"{_ADDRS['server']}/24",
                                             f"{_ADDRS['server2']}/24"])
        self._wire("pub", "eth0", "pub", [f"{_ADDRS['pub']}/24"])
        for n in ("1", "2"):
            router, host = f"r{n}", f"h{n}"
            self._wire(router, "wan", router, [f"{_ADDRS[router]}/24"])
            self._ip("link", "add", "eth0", "type", "veth", "peer", "name", "lan",
                     "netns", self.ns(router), ns=host)
            self._ip("addr", "add", f"10.{n}.0.1/24", "dev", "lan", ns=router)
            self._ip("link", "set", "lan", "up", ns=router)
            self._ip("addr", "add", f"{_ADDRS[host]}/24", "dev", "eth0", ns=host)
            self._ip("link", "set", "eth0", "up", ns=host)
            self._ip("route", "add", "default", "via", f"10.{n}.0.1", ns=host)
            self._sysctl(router, "net.ipv4.ip_forward=1")
            self._cmd(["ip", "netns", "exec", self.ns(router), "nft", "-f", "-"],
                      stdin=_nat_rules(self.modes[router], _ADDRS[host]))

    def _wire(self, host: str, inner: str, port: str, addrs: list[str]) -> None:
        """A veth from `host` (named `inner`) to the bridge (named `port`)."""
        self._ip("link", "add", inner, "type", "veth", "peer", "name", port,
                 "netns", self.ns("inet"), ns=host)
        self._ip("link", "set", port, "master", "br0", "up", ns="inet")
        for a in addrs:
            self._ip("addr", "add", a, "dev", inner, ns=host)
        self._ip("link", "set", inner, "up", ns=host)

    def down(self) -> None:
        """Stop every process started here, then delete our namespaces (and their links)."""
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        for host in reversed(self._made):
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True,
                           timeout=30, check=False)
        self._made.clear()

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- processes ---------------------------------------------------------------------
    def run(self, host: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, **popen: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host`'s namespace (stdout piped); stopped by `down()`."""
        popen.setdefault("stdout", subprocess.PIPE)
        if self.log_dir is not None and "stderr" not in popen:
            log = (self.log_dir / f"{host}-{len(self._procs)}.log").open("wb")
            self._logs.append(log)
            popen["stderr"] = log
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                                env=env, cwd=cwd, **popen)
        self._procs.append(proc)
        return proc

    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 30,
             env: dict[str, str] | None = None, cwd: str | Path | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host` to completion and return its output (no check)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)


    def forget_mappings(self, router: str) -> None:
        """Flush `router`'s conntrack table; segments of the forgotten flows are then
        dropped in both directions (no loose pickup, invalid state dropped), as a NAT that
        lost its mappings does. Neither end hears anything; new flows go through."""
        for argv in (["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
                     ["nft", "insert", "rule", "inet", "filter", "forward", "ct", "state",
                      "invalid", "drop"],
                     ["conntrack", "-F"]):
            self._cmd(["ip", "netns", "exec", self.ns(router), *argv])

    def lose_udp(self, router: str, percent: int) -> None:
        """Drop `percent` % of the UDP datagrams `router` forwards, at random, each way (this
        kernel has no netem); 0 stops the loss. Packets to and from the router itself (none
        of the lab's traffic) are untouched.

        A sender using UDP GSO (QUIC does) hands the kernel one packet of up to 64
        datagrams, and veths and the bridge pass it on whole, so the router would drop
        whole bursts at a time. The two links into the router (its home's `eth0`, its port
        on the bridge) are set to cut such packets into datagrams before they reach it,
        as a real NIC does before the wire."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0-100 %, not {percent}")
        if router not in self.modes:
            raise ValueError(f"{router!r} is not a NAT router of the lab")
        self._ip("link", "set", "eth0", "gso_max_segs", "1", ns=f"h{router[1:]}")
        self._ip("link", "set", router, "gso_max_segs", "1", ns="inet")
        nft = ["ip", "netns", "exec", self.ns(router), "nft"]
        self._cmd([*nft, "add", "chain", "inet", "filter", "loss",
                   "{ type filter hook forward priority filter - 10; policy accept; }"])
        self._cmd([*nft, "flush", "chain", "inet", "filter", "loss"])
        if percent:
            self._cmd([*nft, "add", "rule", "inet", "filter", "loss", "meta", "l4proto",
                       "udp", "numgen", "random", "mod", "100", "<", str(percent), "counter",
                       "drop"])

    def udp_lost(self, router: str) -> int:
        """UDP packets `lose_udp` has dropped at `router` so far."""
        r = subprocess.run(["ip", "netns", "exec", self.ns(router), "nft", "list", "chain",
                            "inet", "filter", "loss"], capture_output=True, text=True,
                           timeout=10, check=False)
        if r.returncode != 0:
            return 0
        found = re.search(r"counter packets (\d+)", r.stdout)
        return int(found.group(1)) if found else 0


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """The next stdout line of `proc` within `timeout` s; LabError if it exits or is silent."""
    out: IO[bytes] | None = proc.stdout
    if out is None:
        raise LabError(f"{what}: stdout is not piped")
    fd = out.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"{what}: no output line within {timeout} s (got {bytes(buf)!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        byte = os.read(fd, 1)  # one byte at a time: nothing is read past the line
        if not byte:
            raise LabError(f"{what}: exited ({proc.wait()}) before a full line: {bytes(buf)!r}")
        if byte == b"\n":
            return buf.decode()
        buf += byte
