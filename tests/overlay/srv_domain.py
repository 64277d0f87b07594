"""A mail domain run by several `serve` instances and published in a real name server
(tests/dnstest.py's dnsmasq): the zone `peerpost-rendezvous dns-records` prints for its
SRV targets, and nodes set up from it with `init --resolver`, as the failover tests need."""

from __future__ import annotations

import subprocess
from pathlib import Path

from overlay.app.lab import LocalNetwork, NodeHandle, _script
from tests.dnstest import Dnsmasq

RENDEZVOUS = _script("peerpost-rendezvous")


def srv_zone(data: Path, domain: str, targets: list[tuple[str, int, int]]) -> list[str]:
    """One SRV line per (host, port, priority) target, in that order, then the TXT line
    with the domain key in `data`."""
    srv: list[str] = []
    txt: list[str] = []
    for host, port, priority in targets:
        argv = [RENDEZVOUS, "dns-records", "--data", str(data), "--domain", domain,
                "--port", str(port), "--host", host, "--priority", str(priority)]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        line, *txt = res.stdout.splitlines()
        srv.append(line)
    return srv + txt


def init_from_dns(net: LocalNetwork, ns: Dnsmasq, *names: str) -> list[NodeHandle]:
    """`peerpost init` for NAME@domain of the lab, each finding its server through `ns`
    (recorded as the node's resolver); added to the lab, not started."""
    return [net.add_node(name, resolver=ns.hostport) for name in names]
