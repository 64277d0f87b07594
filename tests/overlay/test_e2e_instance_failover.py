"""End to end: a domain runs two `serve` instances on one PostgreSQL, published as two SRV
records. Both nodes are logged in to the first when it is killed (-9); their sessions
reconnect to the second within the backoff, record it in their config, move their STUN
(WebRTC and punch) and DHT bootstrap to the second's, and a message sent right after the
kill arrives whole."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from rendezvous.domainkey import load_or_create
from tests.dnstest import Dnsmasq
from tests.overlay.srv_domain import RENDEZVOUS, init_from_dns, srv_zone

pytestmark = pytest.mark.slow

DOMAIN = "a.test"


def free_port() -> int:
    """A port free on both UDP and TCP (STUN takes its number on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


@pytest.fixture
def net(tmp_path: Path, pg_url: str) -> Iterator[LocalNetwork]:
    args = ["--store", pg_url, "--instance-heartbeat", "0.5"]
    with LocalNetwork(tmp_path / "lab", domain=DOMAIN, server_args=args) as n:
        n.env.pop("PEERPOST_RESOLVER", None)
        yield n


def test_nodes_reconnect_to_the_other_instance_and_lose_nothing(
        net: LocalNetwork, pg_url: str, dns_server: Callable[..., Dnsmasq],
        tmp_path: Path) -> None:
    net.data_dir.mkdir(mode=0o700, parents=True)
    load_or_create(net.data_dir)
    second = net.root / "second-data"
    second.mkdir(mode=0o700)
    shutil.copy2(net.data_dir / "domain_key.json", second / "domain_key.json")
    _, port1 = net.start_server()
    stun2, dht2 = free_port(), free_port()
    other = net._spawn("second", [str(RENDEZVOUS), "serve", "--domain", DOMAIN, "--listen",
                                  "127.0.0.1:0", "--data", str(second), "--store", pg_url,
                                  "--open-registration", "--instance-heartbeat", "0.5",
                                  "--stun-port", str(stun2), "--dht-port", str(dht2)])
    port2 = int(other.lines.wait_for(re.compile(r"listening \S+:(\d+)"), 30,
                                     "second instance").group(1))
    ns = dns_server(srv_zone(net.data_dir, DOMAIN, [("rv1.a.test", port1, 0),
                                                    ("rv2.a.test", port2, 10)]),
                    {"rv1.a.test": "127.0.0.1", "rv2.a.test": "127.0.0.1"})
    nodes = init_from_dns(net, ns, "alice", "bob")
    for node in nodes:
        net.start_node(node, timeout=60)
    alice, bob = nodes
    for node in nodes:
        assert json.loads((node.home / "config.json").read_text())["server"] \
            == f"127.0.0.1:{port1}"

    assert net.server is not None
    net.server.kill()  # kill -9 of the instance both are logged in to
    src = tmp_path / "hello.bin"
    src.write_bytes(bytes(range(256)) * 2048)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert Path(str(got["path"])).read_bytes() == src.read_bytes()
    for node in nodes:
        assert node.proc is not None
        joined = node.proc.lines.wait_for(re.compile(
            rf"DHT joined through 127\.0\.0\.1:{dht2} after failover: (\d+) contacts? "
            r"in the routing table"),
            30, f"{node.name}'s DHT rejoin")
        assert int(joined.group(1)) >= 1  # the second instance's DHT node at least
        log = " ".join(node.proc.log().split())
        assert f"failed over from 127.0.0.1:{port1} to 127.0.0.1:{port2} (reconnect)" in log
        # WebRTC, the punch and the DHT no longer ask the dead instance.
        assert (f"now using the services of 127.0.0.1:{port2}: STUN 127.0.0.1:{stun2}, "
                f"STUN over TCP 127.0.0.1:{stun2}, DHT bootstrap 127.0.0.1:{dht2}") in log
        assert f"STUN for WebRTC now [('127.0.0.1', {stun2})]" in log
        assert f"STUN over TCP for the punch now 127.0.0.1:{stun2}" in log
        assert json.loads((node.home / "config.json").read_text())["server"] \
            == f"127.0.0.1:{port2}"
