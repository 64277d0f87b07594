"""End to end across two domains, one DHT: real `peerpost-rendezvous serve` processes for
a.test and b.test (each with its DHT bootstrap node), one dnsmasq serving both domains'
`dns-records` lines, nodes made with `peerpost init --address NAME@DOMAIN` alone. A
co-recipient in the other domain serves every chunk to a late recipient after the sender
has gone: the servers' bootstrap nodes joined each other when a.test linked to b.test, so
carol@a.test finds bob@b.test as a provider."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, _script
from tests.dnstest import Dnsmasq
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes

pytestmark = pytest.mark.slow

A, B = "a.test", "b.test"
RENDEZVOUS = _script("peerpost-rendezvous")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dns_records(data: Path, domain: str, port: int) -> list[str]:
    res = subprocess.run([RENDEZVOUS, "dns-records", "--data", str(data), "--domain",
                          domain, "--host", f"rv.{domain}", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.splitlines()


@pytest.fixture
def nets(tmp_path: Path, dns_server: Callable[..., Dnsmasq]) -> Iterator[dict[str, LocalNetwork]]:
    made = {d: LocalNetwork(tmp_path / d, domain=d) for d in (A, B)}
    try:
        lines: list[str] = []
        for d, net in made.items():
            net.server_addr = ("127.0.0.1", _free_port())  # the port DNS names
            lines += _dns_records(net.data_dir, d, net.server_addr[1])
        ns = dns_server(lines, {f"rv.{d}": "127.0.0.1" for d in made})
        for net in made.values():
            net.env["PEERPOST_RESOLVER"] = ns.hostport
            net.start_server()
        yield made
    finally:
        for net in made.values():
            net.close()


def _init(net: LocalNetwork, name: str) -> NodeHandle:
    node = NodeHandle(name, f"{name}@{net.domain}", net.root / name)
    net.cli(node, "init", "--address", node.address, "--listen", "127.0.0.1:0")
    net.nodes[name] = node
    return node


def test_co_recipient_in_the_other_domain_serves_a_late_recipient(
        nets: dict[str, LocalNetwork], tmp_path: Path) -> None:
    a, b = nets[A], nets[B]
    alice, carol = _init(a, "alice"), _init(a, "carol")
    bob = _init(b, "bob")
    a.start_node(alice)
    b.start_node(bob)
    src = make_file(tmp_path / "clip.bin", 8 * MiB, seed=31)
    mid = a.cli(alice, "send", str(src), "--to", f"{bob.address},{carol.address}").stdout.strip()
    # The link a.test opened to b.test made a.test's bootstrap node join b.test's.
    assert a.server is not None
    a.server.lines.wait_for(re.compile(r"event=dht\.joined_domain .*domain=b\.test"), 60,
                            "a.test's DHT joining b.test's")
    got_bob = b.wait_complete(bob, mid, 120, "bob's download")
    assert same_bytes(src, Path(got_bob["path"]))
    a.stop_node(alice)  # the sender is gone for good

    a.start_node(carol)
    got = a.wait_complete(carol, mid, 120, "carol's download from bob")
    assert same_bytes(src, Path(got["path"]))
    bob_id = b.cli_json(bob, "info")["peer_id"][:16]
    delivered = {s["peer"]: s["bytes"] for s in got["sources"] if s["bytes"]}
    assert list(delivered) == [bob_id], f"every byte came from bob: {got['sources']}"
    assert sum(delivered.values()) >= src.stat().st_size
