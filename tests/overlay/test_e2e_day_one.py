"""End to end: what a family member runs into on day one with a real server and real
`peerpost node` processes: a second daemon for the same home, --home after the command,
preferences that apply at once, a file changed after sending, cancel and resend, and the
new-message hook."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, _script

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture
def net(tmp_path: Path):
    with LocalNetwork(tmp_path / "lab") as n:
        n.start_server()
        yield n


def peerpost(net: LocalNetwork, *args: str,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script("peerpost"), *args], capture_output=True, text=True,
                          env=net.env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_one_daemon_per_home_and_home_after_the_command(net: LocalNetwork) -> None:
    alice = net.add_node("alice")
    net.start_node(alice)
    assert alice.proc is not None
    pid = alice.proc.popen.pid

    second = peerpost(net, "--home", str(alice.home), "node")
    assert second.returncode != 0
    assert "already running" in second.stderr and f"pid {pid}" in second.stderr
    # The first daemon still has its control socket; --home after the command works too.
    res = peerpost(net, "info", "--home", str(alice.home), "--json")
    assert res.returncode == 0, res.stderr
    assert alice.address in res.stdout

    # A daemon killed with SIGKILL leaves its socket and lock file; the next one starts.
    net.kill_node(alice)
    assert (alice.home / "control.sock").exists()
    net.start_node(alice)
    assert net.cli_json(alice, "info")["address"] == alice.address


def test_default_home_follows_xdg_unless_dot_peerpost_exists(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    env = dict(net.env, HOME=str(tmp_path / "h"), XDG_DATA_HOME=str(tmp_path / "xdg"))
    env.pop("PEERPOST_HOME", None)
    (tmp_path / "h").mkdir()

    def where() -> str:
        res = subprocess.run([_script("peerpost"), "inbox"], capture_output=True, text=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 3
        return res.stderr
    assert str(tmp_path / "xdg" / "peerpost") in where()
    (tmp_path / "h" / ".peerpost").mkdir()
    assert str(tmp_path / "h" / ".peerpost") in where()
