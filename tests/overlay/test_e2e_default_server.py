"""End to end: a server started with nothing but `serve --domain D --listen H:P --data DIR`
(plus --open-registration, so `peerpost init` needs no invite) is the whole system: its
default DHT bootstrap node lets a late recipient fetch the file from a co-recipient after
the sender has gone for good."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes

pytestmark = pytest.mark.slow


def test_the_minimal_serve_command_lets_a_late_recipient_fetch_from_a_co_recipient(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab", hold_port=False) as net:
        net.start_server()
        assert net.server is not None
        argv = net.server.popen.args
        assert isinstance(argv, list)  # the lab spawns it from an argv list
        assert argv[1:] == ["serve", "--domain", net.domain, "--listen", "127.0.0.1:0",
                            "--data", str(net.data_dir), "--open-registration"]
        # The services' lines follow the `listening` line the lab waited for.
        net.server.lines.wait_for(re.compile(r"^stun listening "), 10, "STUN")
        net.server.lines.wait_for(re.compile(r"^dht listening "), 10, "the DHT node")

        alice, r1, r2 = net.add_node("alice"), net.add_node("r1"), net.add_node("r2")
        net.start_node(alice)
        net.start_node(r1)
        src = make_file(tmp_path / "clip.bin", 6 * MiB, seed=31)
        mid = net.cli(alice, "send", str(src), "--to",
                      f"{r1.address},{r2.address}").stdout.strip()
        net.wait_complete(r1, mid, 60, "r1's download")
        net.stop_node(alice)  # the sender is gone for good

        net.start_node(r2)
        got = net.wait_complete(r2, mid, 90, "r2's download from r1")
        assert same_bytes(src, Path(got["path"]))
        r1_id = net.cli_json(r1, "info")["peer_id"][:16]
        assert [s["peer"] for s in got["sources"] if s["bytes"]] == [r1_id]
