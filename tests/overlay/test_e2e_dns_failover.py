"""End to end: a node whose server was found in DNS, started while that server is down or
failing its logins, logs in to another SRV target of its domain (asking the name server
`init --resolver` recorded), refusing a target that proves another domain key, and mail
flows through the server it failed over to."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.app.home import NodeHome
from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.app.setup import register
from rendezvous.domainkey import DomainKey, fingerprint, load_or_create
from rendezvous.sqlite_store import DB_NAME
from tests.dnstest import Dnsmasq
from tests.overlay.srv_domain import init_from_dns, srv_zone

pytestmark = pytest.mark.slow

DOMAIN = "a.test"
HOSTS = {"rv1.a.test": "127.0.0.1", "rv2.a.test": "127.0.0.1", "evil.a.test": "127.0.0.1"}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path / "lab", domain=DOMAIN) as n:
        n.env.pop("PEERPOST_RESOLVER", None)
        yield n


def two_instances(net: LocalNetwork) -> tuple[DomainKey, int, int]:
    """The lab's server and a second instance of the domain with its own accounts
    database and the same domain key, copied before its first start; their ports."""
    net.data_dir.mkdir(mode=0o700, parents=True)
    key = load_or_create(net.data_dir)
    second = net.root / "second-data"
    second.mkdir(mode=0o700)
    shutil.copy2(net.data_dir / "domain_key.json", second / "domain_key.json")
    _, port1 = net.start_server()
    _, (_, port2) = net.start_extra_server("second", second)
    return key, port1, port2


def also_at(port: int, key: DomainKey, nodes: list[NodeHandle]) -> None:
    """The nodes' accounts at the instance at `port` too (its own accounts database)."""
    for node in nodes:
        identity = NodeHome(node.home).load_identity()
        asyncio.run(register("127.0.0.1", port, identity, node.address, None,
                             server_key=key.public, domain=DOMAIN))


def send_and_receive(net: LocalNetwork, nodes: list[NodeHandle], tmp_path: Path) -> None:
    alice, bob = nodes
    src = tmp_path / "hello.bin"
    src.write_bytes(os.urandom(300_000))
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert Path(str(got["path"])).read_bytes() == src.read_bytes()


def test_node_fails_over_to_a_target_proving_the_pinned_key(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq], tmp_path: Path) -> None:
    key, port1, port2 = two_instances(net)
    # A target that proves another key (a stale record, or someone in the way).
    _, (_, port3) = net.start_extra_server("impostor", net.root / "impostor-data")
    other = load_or_create(net.root / "impostor-data")
    assert other.public != key.public

    ns = dns_server(srv_zone(net.data_dir, DOMAIN, [
        ("rv1.a.test", port1, 0), ("evil.a.test", port3, 5), ("rv2.a.test", port2, 10)]),
        HOSTS)
    nodes = init_from_dns(net, ns, "alice", "bob")
    for node in nodes:
        config = json.loads((node.home / "config.json").read_text())
        assert config["server"] == f"127.0.0.1:{port1}"
        assert config["resolver"] == ns.hostport
        assert config["srv"] is True
    also_at(port2, key, nodes)

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

    send_and_receive(net, nodes, tmp_path)


def test_node_fails_over_from_an_instance_whose_logins_fail(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq], tmp_path: Path) -> None:
    """The configured instance is up but its store fails every login (500): the node logs
    in to the domain's other instance in the same round, without waiting a backoff step
    (it kept retrying the broken one), and mail flows there."""
    key, port1, port2 = two_instances(net)
    ns = dns_server(srv_zone(net.data_dir, DOMAIN, [
        ("rv1.a.test", port1, 0), ("rv2.a.test", port2, 10)]), HOSTS)
    nodes = init_from_dns(net, ns, "alice", "bob")
    also_at(port2, key, nodes)

    # The login writes the device's last_seen; a trigger makes that write fail in the
    # first instance's store, which answers '500 server error while authenticating'.
    db = sqlite3.connect(net.data_dir / DB_NAME, isolation_level=None)
    db.execute("CREATE TRIGGER fail_login BEFORE UPDATE ON devices "
               "BEGIN SELECT RAISE(ABORT, 'the test fails the login'); END")
    try:
        for node in nodes:
            net.start_node(node, timeout=60)
            assert node.proc is not None
            log = " ".join(node.proc.log().split())
            assert (f"server 127.0.0.1:{port1} did not log this node in (500 server error "
                    "while authenticating); trying the other 1 server(s) of a.test") in log, log
            assert f"failed over from 127.0.0.1:{port1} to 127.0.0.1:{port2}" in log, log
            assert "trying again in" not in log, log  # not one backoff step waited
            config = json.loads((node.home / "config.json").read_text())
            assert config["server"] == f"127.0.0.1:{port2}"
    finally:
        db.execute("DROP TRIGGER IF EXISTS fail_login")
        db.close()

    send_and_receive(net, nodes, tmp_path)
