"""End to end: `peerpost init --address NAME@DOMAIN` with no --server finds the domain's
server in DNS (a real dnsmasq serving what `peerpost-rendezvous dns-records` prints) and
pins the key published there; a node made that way sends and receives; a server that does
not prove the published key is refused."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, _script
from rendezvous.domainkey import DomainKey, encode_key, fingerprint, load_or_create, txt_value
from tests.dnstest import Dnsmasq

pytestmark = pytest.mark.slow

DOMAIN = "a.test"
RENDEZVOUS = _script("peerpost-rendezvous")


def dns_records(data: Path, port: int, *hosts: str, priorities: tuple[int, ...] = ()) -> list[str]:
    argv = [RENDEZVOUS, "dns-records", "--data", str(data), "--domain", DOMAIN,
            "--port", str(port)]
    for h in hosts:
        argv += ["--host", h]
    for p in priorities:
        argv += ["--priority", str(p)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.splitlines()


def closed_port() -> int:
    """A loopback TCP port nobody listens on (connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path / "lab", domain=DOMAIN) as n:
        yield n


def init(net: LocalNetwork, name: str, domain: str = DOMAIN,
         check: bool = True) -> tuple[NodeHandle, subprocess.CompletedProcess[str]]:
    node = NodeHandle(name, f"{name}@{domain}", net.root / name)
    res = net.cli(node, "init", "--address", node.address, "--listen", "127.0.0.1:0",
                  check=check)
    if res.returncode == 0:
        net.nodes[name] = node
    return node, res


def test_init_through_dns_pins_the_published_key_and_mail_flows(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq], tmp_path: Path) -> None:
    # The records go out before the server's first start; serve then uses that key.
    first = dns_records(net.data_dir, 4500, "rv.a.test")
    key = load_or_create(net.data_dir)
    host, port = net.start_server()
    # Two instances: the preferred one (priority 5) is down, so init fails over.
    lines = dns_records(net.data_dir, closed_port(), "down.a.test", priorities=(5,))[:1] + \
        dns_records(net.data_dir, port, "rv.a.test")
    assert lines[-1] == first[-1] == f'_peerpost.{DOMAIN}. 300 IN TXT "{txt_value(key.public)}"'
    ns = dns_server(lines, {"down.a.test": "127.0.0.1", "rv.a.test": host})
    net.env["PEERPOST_RESOLVER"] = ns.hostport

    alice, res = init(net, "alice")
    out = " ".join(res.stdout.split())  # rich wraps long lines
    assert f"registered alice@{DOMAIN} with {host}:{port}" in out
    assert fingerprint(key.public) in out
    assert f"_peerpost.{DOMAIN} TXT" in out
    config = json.loads((alice.home / "config.json").read_text())
    assert config["server"] == f"{host}:{port}"
    assert config["server_key"] == encode_key(key.public)

    bob, _ = init(net, "bob")
    net.start_node(alice)
    net.start_node(bob)
    src = tmp_path / "hello.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert Path(str(got["path"])).read_bytes() == src.read_bytes()
    assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(mid) == 1


def test_init_refuses_a_server_whose_key_is_not_published(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq]) -> None:
    host, port = net.start_server()
    real = load_or_create(net.data_dir)
    other = DomainKey.generate()
    lines = dns_records(net.data_dir, port, "rv.a.test")
    lines[-1] = f'_peerpost.{DOMAIN}. 300 IN TXT "{txt_value(other.public)}"'
    ns = dns_server(lines, {"rv.a.test": host})
    net.env["PEERPOST_RESOLVER"] = ns.hostport

    carol, res = init(net, "carol", check=False)
    err = " ".join(res.stderr.split())
    assert res.returncode != 0
    assert (f"refusing the server at {host}:{port}: it shows the key "
            f"{fingerprint(real.public)}, but _peerpost.{DOMAIN} TXT publishes "
            f"{fingerprint(other.public)}") in err, err
    assert not (carol.home / "config.json").exists()
    # Refused before anything was sent: the address is still free at that server.
    res = net.cli(carol, "init", "--address", carol.address, "--server", f"{host}:{port}",
                  "--listen", "127.0.0.1:0")
    assert fingerprint(real.public) in " ".join(res.stdout.split())


def test_init_names_the_missing_srv_record(
        net: LocalNetwork, dns_server: Callable[..., Dnsmasq]) -> None:
    ns = dns_server([], {})
    net.env["PEERPOST_RESOLVER"] = ns.hostport
    dave, res = init(net, "dave", domain="nosrv.test", check=False)
    assert res.returncode != 0
    assert ("error: cannot find the server of nosrv.test: no _peerpost._tcp.nosrv.test SRV "
            "record; if its operator gave you the server's address, give it as --server "
            "HOST:PORT") == " ".join(res.stderr.split())  # what to do without the records
    assert not (dave.home / "config.json").exists()


def test_server_flag_still_pins_on_first_use(net: LocalNetwork) -> None:
    net.start_server()
    key = load_or_create(net.data_dir)
    net.env["PEERPOST_RESOLVER"] = "127.0.0.1:9"  # never asked with --server
    erin = net.add_node("erin")
    config = json.loads((erin.home / "config.json").read_text())
    assert config["server"] == net.server_hostport
    assert config["server_key"] == encode_key(key.public)
