"""The NAT lab with two mail domains: alice@a.test behind one home router, bob@b.test
behind the other, each node set up with `peerpost init --address` alone.

Both servers live on the public segment, in the lab's `server` namespace: a.test's
`peerpost-rendezvous serve` on 198.18.0.10, b.test's on 198.18.0.11, each with its STUN
and DHT bootstrap node. DNS inside the lab is a dnsmasq in that same namespace, on
198.18.0.10 port 53 (the namespace is the lab's own, so the port is free), serving both
domains' `dns-records` lines; nodes and both servers' resolvers point at it through
PEERPOST_RESOLVER. A cross-domain pair behind cone NATs delivers over a TCP hole punch
signalled through both servers and their link (each node learns its mapping from its own
server's STUN over TCP); behind symmetric NATs on both sides it delivers
through the relay, which the *caller's* server (b.test: bob fetches) hosts while alice
joins there on the invitation her own server forwarded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LISTENING, LabError, NodeHandle, _script, listening
from tests.dnstest import flags_from_bind
from tests.natlab.lab import NatLab, NatMode, read_line
from tests.natlab.nodes import LabNetwork

pytestmark = pytest.mark.netns

A, B = "a.test", "b.test"
SIZE = 3_000_000
DELIVERY_TIMEOUT = 90.0
DNS_PORT = 53


class DomainNetwork(LabNetwork):
    """One domain's server (on `addr`) and nodes in the lab, nodes set up through DNS."""

    def __init__(self, lab: NatLab, root: Path, domain: str, addr: str,
                 resolver: str) -> None:
        super().__init__(lab, root)
        self.domain = domain
        self.addr = addr
        self.env["PEERPOST_RESOLVER"] = resolver
        self.hosts = {"server": "server"}

    def start_server(self, timeout: float = 30.0) -> tuple[str, int]:
        if self.addr == self.lab.server_addrs[0]:
            return super().start_server(timeout)  # and the second STUN for assert_nat
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain,
                "--listen", f"{self.addr}:0", "--data", str(self.data_dir),
                "--open-registration", *self.server_args]
        self.server = self._spawn("server", argv)
        m = self.server.lines.wait_for(LISTENING, timeout, f"{self.domain}'s server")
        self.server_addr = listening(m)[1]
        return self.server_addr

    def dns_records(self) -> list[str]:
        assert self.server_addr is not None
        res = subprocess.run([_script("peerpost-rendezvous"), "dns-records", "--data",
                              str(self.data_dir), "--domain", self.domain, "--host",
                              f"rv.{self.domain}", "--port", str(self.server_addr[1])],
                             capture_output=True, text=True, timeout=60, check=True)
        return res.stdout.splitlines()

    def add_node(self, name: str, host: str = "h1", *, extra: list[str] | None = None,
                 listen: str = "0.0.0.0:0", resolver: str | None = None) -> NodeHandle:
        """`peerpost init --address NAME@DOMAIN` inside `host`: the server and its key
        come from DNS (this domain's name server, or `resolver`)."""
        node = NodeHandle(name, f"{name}@{self.domain}", self.root / name, extra=extra or [])
        self.hosts[name] = host
        dns = ["--resolver", resolver] if resolver else []
        argv = [_script("peerpost"), "--home", str(node.home), "init", "--address",
                node.address, *dns, "--listen", listen]
        res = self.lab.exec(host, argv, timeout=60, env=self.env)
        if res.returncode != 0:
            raise LabError(f"`peerpost init` for {name} in {host} exited {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
        self.nodes[name] = node
        return node


def _start_dns(lab: NatLab, lines: list[str], hosts: dict[str, str]) -> None:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    flags = flags_from_bind(lines) + [f"--host-record={n},{a}" for n, a in hosts.items()]
    proc = lab.run("server", [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                              "--conf-file=/dev/null", "--bind-interfaces",
                              f"--listen-address={lab.server_addrs[0]}", f"--port={DNS_PORT}",
                              "--pid-file=", "--log-facility=-", "--user=root",
                              "--local=/test/", *flags], stderr=subprocess.STDOUT)
    for _ in range(50):
        if "started, version" in read_line(proc, 10, "dnsmasq in the lab"):
            return
    raise LabError("dnsmasq in the lab did not say it started")


Domains = Callable[[NatMode, NatMode], tuple[DomainNetwork, DomainNetwork]]


@pytest.fixture
def domains(nat_lab: Callable[[NatMode, NatMode], NatLab], tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[Domains]:
    made: list[DomainNetwork] = []

    def make(h1: NatMode, h2: NatMode) -> tuple[DomainNetwork, DomainNetwork]:
        if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
            pytest.skip("dnsmasq is not installed: apt-get install -y dnsmasq-base")
        lab = nat_lab(h1, h2)
        resolver = f"{lab.server_addrs[0]}:{DNS_PORT}"
        a = DomainNetwork(lab, tmp_path / A, A, lab.server_addrs[0], resolver)
        b = DomainNetwork(lab, tmp_path / B, B, lab.server_addrs[1], resolver)
        made.extend((a, b))
        request.node.natlab_logs = [(n.domain, n.logs) for n in made]
        a.start_server()
        b.start_server()
        _start_dns(lab, a.dns_records() + b.dns_records(),
                   {f"rv.{A}": lab.server_addrs[0], f"rv.{B}": lab.server_addrs[1]})
        a.assert_nat("h1", h1)
        a.assert_nat("h2", h2)
        return a, b

    try:
        yield make
    finally:
        for net in made:
            net.close()


def _file(tmp: Path, size: int = SIZE) -> Path:
    path = tmp / "clip.bin"
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def _digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _deliver(a: DomainNetwork, b: DomainNetwork, tmp: Path) -> dict[str, Any]:
    """alice@a.test (h1) sends to bob@b.test (h2); bob's finished inbox entry."""
    alice, bob = a.add_node("alice", "h1"), b.add_node("bob", "h2")
    a.start_node(alice)
    b.start_node(bob)
    clip = _file(tmp)
    out = a.cli(alice, "send", str(clip), "--to", bob.address).stdout
    m = re.search(r"\b[0-9a-f]{32}\b", out)
    assert m, out
    mid = m.group(0)

    def done() -> dict[str, Any] | None:
        e = b.inbox_entry(bob, mid)
        assert e is None or e["state"] != "failed", f"bob gave up: {e}"
        return e if e and e["state"] == "complete" else None

    entry: dict[str, Any] = b.wait_until(done, DELIVERY_TIMEOUT, "bob's download",
                                         interval=0.5)
    assert entry["from"] == alice.address
    assert _digest(entry["path"]) == _digest(clip)
    return entry


def _stats(net: DomainNetwork) -> dict[str, Any]:
    r = subprocess.run([_script("peerpost-rendezvous"), "stats", "--data", str(net.data_dir),
                        "--json"], capture_output=True, text=True, timeout=30, check=True)
    stats: dict[str, Any] = json.loads(r.stdout)
    return stats


def _paths(entry: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in entry["sources"]:
        out[s["path"]] = out.get(s["path"], 0) + int(s["bytes"])
    return out


def test_cross_domain_pair_behind_cone_nats_delivers_over_a_tcp_punch(
        domains: Domains, tmp_path: Path) -> None:
    a, b = domains(NatMode.EIM, NatMode.EIM)
    entry = _deliver(a, b, tmp_path)
    paths = _paths(entry)
    assert set(paths) == {"tcp-punch"} and paths["tcp-punch"] >= SIZE, entry["sources"]


def test_cross_domain_pair_behind_symmetric_nats_delivers_through_the_relay(
        domains: Domains, tmp_path: Path) -> None:
    a, b = domains(NatMode.SYMMETRIC, NatMode.SYMMETRIC)
    entry = _deliver(a, b, tmp_path)
    paths = _paths(entry)
    assert set(paths) == {"relay"} and paths["relay"] >= SIZE, entry["sources"]
    # bob fetched, so his server hosted the splice (his account paid); alice joined it
    # there on the invitation a.test pushed. The counters reach `stats` every 2 s.
    b.wait_until(lambda: _stats(b)["relayed_bytes"] >= SIZE, 10,
                 "b.test to count the relayed bytes", interval=0.5)
    assert _stats(a)["relayed_bytes"] == 0
