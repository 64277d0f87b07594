"""`peerpost backup` beside a running node and `peerpost restore` into a lost home: the
restored node logs in as the same device, its inbox and pinned keys are back, and mail
goes on arriving (real processes)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from crypto.identity import DeviceIdentity
from overlay.app.config import NodeConfig
from overlay.app.home import NodeHome
from overlay.app.lab import LocalNetwork, _script


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_backup_restores_a_lost_home(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.env["COLUMNS"] = "4000"
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        first = tmp_path / "first.bin"
        first.write_bytes(os.urandom(200_000))
        mid = net.cli(alice, "send", str(first), "--to", bob.address).stdout.strip()
        received = Path(net.wait_complete(bob, mid, 60)["path"])
        pinned = net.cli_json(bob, "contacts")

        dest = tmp_path / "bob-backup"
        res = net.cli(bob, "backup", str(dest))  # while bob's node runs
        assert res.stdout.startswith(f"backed up {bob.home} to {dest}: identity.json, "
                                     "config.json, node.db, store/content.sqlite;"), res.stdout
        assert _mode(dest) == 0o700 and _mode(dest / "identity.json") == 0o600
        again = net.cli(bob, "backup", str(dest), check=False)
        assert again.returncode == 1
        assert f"{dest} exists and is not an empty folder" in again.stderr
        busy = net.cli(bob, "restore", str(dest), check=False)
        assert busy.returncode == 1 and "already running" in busy.stderr, busy.stderr

        net.stop_node(bob)
        for entry in bob.home.iterdir():  # the home is lost; the received files are not
            if entry.name != "received":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        res = net.cli(bob, "restore", str(dest))
        assert "restored identity.json, config.json, node.db, store/content.sqlite" in res.stdout
        net.start_node(bob)
        back = net.inbox_entry(bob, mid)
        assert back is not None and back["state"] == "complete" and back["path"] == str(received)
        assert received.read_bytes() == first.read_bytes()
        assert net.cli_json(bob, "contacts") == pinned
        second = tmp_path / "second.bin"
        second.write_bytes(os.urandom(100_000))
        mid2 = net.cli(alice, "send", str(second), "--to", bob.address).stdout.strip()
        assert Path(net.wait_complete(bob, mid2, 60)["path"]).read_bytes() == second.read_bytes()

        carol = net.add_node("carol")  # another device's home: not replaced by mistake
        other = net.cli(carol, "restore", str(dest), check=False)
        assert other.returncode == 1
        assert "holds another device" in other.stderr and "--force" in other.stderr
        assert "restored" in net.cli(carol, "restore", str(dest), "--force").stdout


def test_backup_names_the_folder_it_made(tmp_path: Path) -> None:
    # `backup run1/../bk` said "backed up ... to /tmp/x/run1/../bk": the path as typed.
    home = NodeHome(tmp_path / "run1" / "home")
    home.create(NodeConfig("bob@example.net", "127.0.0.1:4500"), DeviceIdentity.generate())

    def backup(dest: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_script("peerpost"), "--home", "run1/home", "backup", dest],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "4000"})

    res = backup("run1/../bk")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"backed up {home.root} to {tmp_path.resolve() / 'bk'}: "), \
        res.stdout
    assert (tmp_path / "bk" / "identity.json").is_file()
    inside = backup("run1/x/../home/bk")
    assert inside.returncode == 1
    assert f"{home.root.resolve() / 'bk'} is inside the home folder" in inside.stderr
