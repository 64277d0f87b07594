"""The node's pinned server key: an old config without it stays readable (the next start
pins the key the server shows), a damaged one is refused, and `init` prints and pins it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto.errors import DecodeError
from overlay.app.config import NodeConfig
from overlay.app.lab import LocalNetwork, NodeHandle
from rendezvous.domainkey import DOMAIN_KEY_NAME, DomainKey, encode_key


def test_a_config_from_before_pinning_reads_with_no_key() -> None:
    old = {"version": 1, "address": "a@example.net", "server": "127.0.0.1:1"}
    cfg = NodeConfig.from_json(json.dumps(old))
    assert cfg.server_key == "" and cfg.pinned_key() is None and not cfg.plaintext
    cfg.server_key = encode_key(bytes(32))
    assert NodeConfig.from_json(cfg.to_json()).pinned_key() == bytes(32)


def test_a_damaged_pinned_key_is_refused() -> None:
    bad = {"version": 1, "address": "a@example.net", "server": "127.0.0.1:1",
           "server_key": "AAAA"}
    with pytest.raises(DecodeError, match="server_key"):
        NodeConfig.from_json(json.dumps(bad))


@pytest.mark.slow
def test_init_pins_and_prints_the_server_key_and_an_old_home_pins_on_start(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path, server_args=[]) as net:
        net.start_server()
        key = DomainKey.from_json((net.data_dir / DOMAIN_KEY_NAME).read_text())
        alice = NodeHandle("alice", f"alice@{net.domain}", tmp_path / "alice")
        res = net.cli(alice, "init", "--address", alice.address, "--server",
                      net.server_hostport, "--listen", "127.0.0.1:0")
        assert f"server key: {key.fingerprint}" in " ".join(res.stdout.split())
        net.nodes["alice"] = alice
        cfg = json.loads((alice.home / "config.json").read_text())
        assert cfg["server_key"] == encode_key(key.public)
        # A home from before keys were pinned: the node pins on its next start.
        del cfg["server_key"]
        (alice.home / "config.json").write_text(json.dumps(cfg))
        net.start_node(alice)
        net.wait_until(lambda: json.loads((alice.home / "config.json").read_text())
                       .get("server_key"), 30, "the key pinned on start")
        assert json.loads((alice.home / "config.json").read_text())["server_key"] == \
            encode_key(key.public)
        assert alice.proc is not None and key.fingerprint in alice.proc.log()
