"""The NAT lab: a home router forgets its mappings (`conntrack -F`) under an idle node.

The router is made to behave like a NAT that lost the mapping: a TCP segment of a flow it
no longer tracks is not picked up again (`nf_conntrack_tcp_loose=0`) but dropped, both
ways, without a reset. Neither end hears anything; only the keepalive can notice. With
the production defaults (the node PINGs after 20 s of silence and gives up after 45 s
without a byte back; the server closes a silent session after 45 s) the node is back
online within 60 s of the flush, the server logs the dead session, and a message sent
afterwards reaches the node.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.natlab.lab import NatLab, NatMode
from tests.natlab.nodes import LabNetwork

pytestmark = pytest.mark.netns

BACK_WITHIN = 60.0  # the promise: a dead mapping is noticed and replaced within this


@pytest.fixture
def net(nat_lab: Callable[[NatMode, NatMode], NatLab], tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[LabNetwork]:
    if shutil.which("conntrack") is None:
        reason = "conntrack is not installed (apt-get install -y conntrack)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must run the NAT lab, but: {reason}")
        pytest.skip(reason)
    lab = nat_lab(NatMode.EIM, NatMode.EIM)
    network = LabNetwork(lab, tmp_path / "net")
    request.node.natlab_logs = [("net", network.logs)]
    try:
        network.start_server()
        yield network
    finally:
        network.close()


def _forget_mappings(lab: NatLab, router: str) -> None:
    """Flush `router`'s conntrack table; segments of the forgotten flows are then dropped
    in both directions (no loose pickup, invalid state dropped), as a NAT that lost its
    mappings does."""
    for argv in (["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
                 ["nft", "insert", "rule", "inet", "filter", "forward", "ct", "state",
                  "invalid", "drop"],
                 ["conntrack", "-F"]):
        r = lab.exec(router, argv)
        assert r.returncode == 0, f"{' '.join(argv)} in {router}: {r.stderr.strip()}"


def test_a_node_whose_nat_forgot_the_mapping_is_back_online_within_60_s(
        net: LabNetwork, tmp_path: Path) -> None:
    alice = net.add_node("alice", "h1")
    bob = net.add_node("bob", "pub")
    net.start_node(alice)
    net.start_node(bob)
    assert alice.proc is not None and net.server is not None

    _forget_mappings(net.lab, "r1")
    flushed = time.monotonic()

    net.server.lines.wait_for(
        re.compile(r"conn\.close .*keepalive timeout.*alice@example\.net"), BACK_WITHIN,
        "the server to close alice's dead session")
    alice.proc.lines.wait_for(re.compile(r"client\.keepalive_timeout"), BACK_WITHIN,
                              "alice to take the server for gone")
    alice.proc.lines.wait_for(re.compile(r"client\.connected .*alice@example\.net"),
                              BACK_WITHIN, "alice to reconnect")
    took = time.monotonic() - flushed
    assert took < BACK_WITHIN, f"alice was back {took:.1f} s after the flush"

    clip = tmp_path / "after.bin"
    clip.write_bytes(random.Random(7).randbytes(20_000))
    out = net.cli(bob, "send", str(clip), "--to", alice.address).stdout
    m = re.search(r"\b[0-9a-f]{32}\b", out)
    assert m, f"`peerpost send` printed no message id: {out!r}"
    entry = net.wait_until(lambda: net.inbox_entry(alice, m.group(0)), 30,
                           "the message sent after the flush to reach alice", interval=0.5)
    assert entry["id"] == m.group(0)
