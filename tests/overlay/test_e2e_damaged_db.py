"""A node's SQLite files damaged on disk (a bad sector, a bad copy): the node refuses to
start, names the file and says what to do, and doing that loses none of the files sent
or received (real processes; the damage is a page of noise where a table's root was)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from overlay.app.lab import LocalNetwork, NodeHandle


def _damage(path: Path) -> None:
    """Noise over the second page (a table's root), as a bad sector leaves it."""
    assert path.stat().st_size > 8192
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))


def _refused(net: LocalNetwork, node: NodeHandle, damaged: Path) -> str:
    """Start the node, expect the refusal naming `damaged`; the command it advises."""
    res = net.cli(node, "node", "--web", "127.0.0.1:0", check=False, timeout=60)
    err = " ".join(res.stderr.split())
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"error: {damaged} is damaged (" in err, err
    assert "the node does not start with it. Restore it from a backup" in err, err
    assert "Traceback" not in res.stderr
    advice = re.search(r"`(mkdir -p [^`]+)`", err)
    assert advice is not None, err
    return advice.group(1)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_damaged_databases_are_named_and_setting_them_aside_loses_no_file(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.env["COLUMNS"] = "4000"  # one line per error: paths are not folded
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        first = _file(tmp_path / "first.bin", 300_000)
        mid = net.cli(alice, "send", str(first), "--to", bob.address).stdout.strip()
        received = Path(net.wait_complete(bob, mid, 60)["path"])

        # The receiver's node.db: the inbox list starts over, the received file stays.
        net.stop_node(bob)
        _damage(bob.home / "node.db")
        subprocess.run(["bash", "-c", _refused(net, bob, bob.home / "node.db")], check=True)
        assert (bob.home / "damaged" / "node.db").exists()  # kept for whoever can mend it
        net.start_node(bob)
        assert received.read_bytes() == first.read_bytes()
        assert net.cli_json(bob, "inbox", "--all") == []
        second = _file(tmp_path / "second.bin", 200_000)
        mid2 = net.cli(alice, "send", str(second), "--to", bob.address).stdout.strip()
        assert Path(net.wait_complete(bob, mid2, 60)["path"]).read_bytes() == second.read_bytes()

        # The sender's content store: what it sent is served again once resent.
        net.stop_node(alice)
        store = alice.home / "store" / "content.sqlite"
        _damage(store)
        subprocess.run(["bash", "-c", _refused(net, alice, store)], check=True)
        net.start_node(alice)
        again = net.cli(alice, "resend", mid2).stdout.strip()
        got = Path(net.wait_complete(bob, again, 60)["path"])
        assert got.read_bytes() == second.read_bytes()
        assert [e["id"] for e in net.cli_json(bob, "inbox", "--all")].count(again) == 1
