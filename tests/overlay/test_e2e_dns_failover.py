"""End to end: a node whose server was found in DNS, started while that server is down,
logs in to another SRV target of its domain (asking the name server `init --resolver`
recorded), refusing a target that proves another domain key, and mail flows through the
server it failed over to."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.app.home import NodeHome
from overlay.app.lab import LISTENING, LocalNetwork, NodeHandle, Proc, listening
from overlay.app.setup import register
from rendezvous.domainkey import fingerprint, load_or_create
from tests.dnstest import Dnsmasq

pytestmark = pytest.mark.slow

DOMAIN = "a.test"
RENDEZVOUS = Path(sys.executable).with_name("peerpost-rendezvous")
def srv_line(data: Path, host: str, port: int, priority: int) -> list[str]:
    """The SRV line, then the TXT line, `dns-records` prints for one target."""
    argv = [str(RENDEZVOUS), "dns-records", "--data", str(data), "--domain", DOMAIN,
            "--port", str(port), "--host", host, "--priority", str(priority)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.splitlines()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path / "lab", domain=DOMAIN) as n:
        n.env.pop("PEERPOST_RESOLVER", None)
        yield n


@pytest.fixture
def extra_servers(net: LocalNetwork) -> Iterator[Callable[[str, Path], tuple[Proc, int]]]:
    """Start more `serve` processes of the domain, each with its own --data."""
    started: list[Proc] = []

    def start(name: str, data: Path) -> tuple[Proc, int]:
        argv = [str(RENDEZVOUS), "serve", "--domain", DOMAIN, "--listen", "127.0.0.1:0",
                "--data", str(data), "--open-registration"]
        proc = net._spawn(name, argv)
        started.append(proc)
        m = proc.lines.wait_for(LISTENING, 30, name)
        return proc, listening(m)[1][1]

    yield start
    for proc in started:
        proc.stop()


def test_node_fails_over_to_a_target_proving_the_pinned_key(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq],
        extra_servers: Callable[[str, Path], tuple[Proc, int]], tmp_path: Path) -> None:
    net.data_dir.mkdir(mode=0o700, parents=True)
    key = load_or_create(net.data_dir)
    # A second instance of the domain: the same domain key, copied before its first start.
    second = net.root / "second-data"
    second.mkdir(mode=0o700)
    shutil.copy2(net.data_dir / "domain_key.json", second / "domain_key.json")
    _, port1 = net.start_server()
    _, port2 = extra_servers("second", second)
    # A target that proves another key (a stale record, or someone in the way).
    _, port3 = extra_servers("impostor", net.root / "impostor-data")
    other = load_or_create(net.root / "impostor-data")
    assert other.public != key.public

    zone = (srv_line(net.data_dir, "rv1.a.test", port1, 0)[:1]
            + srv_line(net.data_dir, "evil.a.test", port3, 5)[:1]
            + srv_line(net.data_dir, "rv2.a.test", port2, 10))
    ns = dns_server(zone, {"rv1.a.test": "127.0.0.1", "rv2.a.test": "127.0.0.1",
                           "evil.a.test": "127.0.0.1"})

    nodes: list[NodeHandle] = []
    for name in ("alice", "bob"):
        node = NodeHandle(name, f"{name}@{DOMAIN}", net.root / name)
        net.cli(node, "init", "--address", node.address, "--resolver", ns.hostport,
                "--listen", "127.0.0.1:0")
        config = json.loads((node.home / "config.json").read_text())
        assert config["server"] == f"127.0.0.1:{port1}"
        assert config["resolver"] == ns.hostport
        assert config["srv"] is True
        # The same account at the second instance (its own accounts database).
        identity = NodeHome(node.home).load_identity()
        asyncio.run(register("127.0.0.1", port2, identity, node.address, None,
                             server_key=key.public, domain=DOMAIN))
        net.nodes[name] = node
        nodes.append(node)

    assert net.server is not None
    net.server.stop()  # the configured server is down when the nodes start
    for node in nodes:
        net.start_node(node, timeout=60)
        assert node.proc is not None
        log = " ".join(node.proc.log().split())
        assert (f"refusing the server at 127.0.0.1:{port3}: the server's identity does not "
                f"match the key pinned for it (expected {fingerprint(key.public)}, seen "
                f"{fingerprint(other.public)})") in log, log
        assert f"failed over from 127.0.0.1:{port1} to 127.0.0.1:{port2}" in log, log
        config = json.loads((node.home / "config.json").read_text())
        assert config["server"] == f"127.0.0.1:{port2}"

    alice, bob = nodes
    src = tmp_path / "hello.bin"
    src.write_bytes(bytes(range(256)) * 2048)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert Path(str(got["path"])).read_bytes() == src.read_bytes()
