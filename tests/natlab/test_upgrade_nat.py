"""The NAT lab: a download that had to start on the server's relay moves to direct TCP once
the sender takes connections again, with real `peerpost` processes.

Alice is on the public side; bob behind a NAT. At first alice's host refuses every TCP
connection from bob's router at once and drops its UDP (a node starting again, a firewall
briefly in the way), so bob's ladder climbs to the relay; then the rule goes, and bob's
download, still running, dials alice directly again and moves over.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.natlab.lab import LabError, NatLab, NatMode
from tests.natlab.test_nodes import (  # noqa: F401 (nat_net: the fixture)
    MakeNet,
    _complete,
    _digest,
    _entry,
    _file,
    _paths,
    _send,
    _server_stats,
    nat_net,
)

pytestmark = pytest.mark.netns

SIZE = 24_000_000  # 12 s at the relay's 2 MB/s
TABLE = "upgradetest"


def _shut(lab: NatLab, host: str, peer: str) -> None:
    """`host` refuses TCP from `peer` at once (a reset, as a closed port does) and drops
    its UDP."""
    nft = ["nft", "-f", "-"]
    rules = f"""
table inet {TABLE} {{
  chain input {{ type filter hook input priority filter - 5; policy accept;
                 ip saddr {peer} tcp flags & (syn | ack) == syn reject with tcp reset;
                 ip saddr {peer} meta l4proto udp drop; }}
}}
"""
    r = lab.exec(host, ["sh", "-c", f"echo '{rules}' | {' '.join(nft)}"])
    if r.returncode != 0:
        raise LabError(f"nft in {host} failed: {r.stderr.strip()}")


def _open(lab: NatLab, host: str) -> None:
    r = lab.exec(host, ["nft", "delete", "table", "inet", TABLE])
    if r.returncode != 0:
        raise LabError(f"nft in {host} failed: {r.stderr.strip()}")


def test_a_download_on_the_relay_moves_to_tcp_once_the_sender_takes_connections(
        nat_net: MakeNet, tmp_path: Path) -> None:  # noqa: F811
    net = nat_net(NatMode.EIM, NatMode.EIM)
    alice = net.add_node("alice", "pub")
    bob = net.add_node("bob", "h1", extra=["--no-quic"])
    net.start_node(alice)
    net.start_node(bob)
    _shut(net.lab, "pub", net.lab.addr_of("r1"))
    clip = _file(tmp_path, "clip.bin", SIZE)
    mid = _send(net, alice, clip, bob)
    net.wait_until(lambda: _paths(_entry(net, bob, mid)).get("relay", 0) > 0, 90,
                   "bob's first bytes over the relay", interval=0.5)
    _open(net.lab, "pub")
    opened = time.monotonic()
    entry = _complete(net, bob, mid)
    took = time.monotonic() - opened

    assert _digest(entry["path"]) == _digest(clip)
    paths = _paths(entry)
    assert set(paths) == {"relay", "tcp"}, entry["sources"]
    assert paths["relay"] + paths["tcp"] >= SIZE, entry["sources"]
    # Moved at the first attempt, 3 s after the relayed session opened: the relay carried
    # a few seconds' worth, not the 12 s it needed for the whole file.
    assert paths["relay"] < SIZE // 2, entry["sources"]
    assert took < 20, took
    assert bob.proc is not None
    moved = re.findall(r"moved from relay to tcp after ([\d.]+) s", bob.proc.log())
    assert len(moved) == 1, bob.proc.log()[-4000:]
    # The server relayed what bob got over the relay (and the frames around it), no more.
    net.wait_until(lambda: _server_stats(net)["relayed_bytes"] >= paths["relay"], 10,
                   "the server to count the relayed bytes", interval=0.5)
    assert _server_stats(net)["relayed_bytes"] < paths["relay"] + SIZE // 10
