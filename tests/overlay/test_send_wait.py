"""`send --wait` and `status ID --wait`: the sender watches until every recipient has the
file, with real server and node processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, _script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path_factory.mktemp("sendwait")) as n:
        n.start_server()
        for name in ("alice", "bob", "carol", "dave"):
            n.add_node(name)
        for name in ("alice", "bob"):
            n.start_node(n.nodes[name])
        yield n


def watch(net: LocalNetwork, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([_script("peerpost"), "--home", str(net.nodes["alice"].home),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=net.env, stdin=subprocess.DEVNULL)


def until_line(proc: subprocess.Popen[str], text: str) -> list[str]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never came: {lines} {proc.stderr and proc.stderr.read()}")


def test_send_wait_returns_once_the_recipient_has_it(net: LocalNetwork, tmp_path: Path) -> None:
    clip = tmp_path / "clip.bin"
    clip.write_bytes(os.urandom(3 << 20))
    res = net.cli(net.nodes["alice"], "send", str(clip), "--to", "bob@example.net", "--wait")
    lines = res.stdout.splitlines()
    mid = lines[0]
    assert len(mid) == 32
    assert any(line.endswith(" bob@example.net: downloaded") for line in lines), lines
    assert lines[-1] == "every recipient has clip.bin"
    got = net.inbox_entry(net.nodes["bob"], mid)
    assert got is not None and Path(got["path"]).read_bytes() == clip.read_bytes()
    # --json: the status of the message once everyone has it, and nothing else
    res = net.cli(net.nodes["alice"], "send", str(clip), "--to", "bob@example.net", "--wait",
                  "--json")
    (rec,) = json.loads(res.stdout)["recipients"]
    assert rec["state"] == "downloaded"


def test_the_sender_sees_a_recipient_downloading(net: LocalNetwork, tmp_path: Path) -> None:
    """Between `sent` and `downloaded` the sender sees the recipient `downloading`: the
    recipient's node says so once its first chunk is stored. Alice serves at 768 KiB/s, so
    bob's 3 MiB (three chunks) take about 4 s."""
    clip = tmp_path / "slow.bin"
    clip.write_bytes(os.urandom(3 << 20))
    alice = net.nodes["alice"]
    net.cli(alice, "prefs", "set", "max-upload-rate", "768KiB/s")
    try:
        proc = watch(net, "send", str(clip), "--to", "bob@example.net", "--wait")
        try:
            lines = until_line(proc, "bob@example.net: downloading")
            assert not any("downloaded" in line for line in lines), lines
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    finally:
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    assert proc.returncode == 0, err
    assert "bob@example.net: downloaded" in out and "every recipient has slow.bin" in out


def test_status_wait_follows_an_offline_recipient_until_it_has_it(
        net: LocalNetwork, tmp_path: Path) -> None:
    clip = tmp_path / "late.bin"
    clip.write_bytes(os.urandom(1 << 20))
    mid = net.cli(net.nodes["alice"], "send", str(clip), "--to",
                  "bob@example.net,carol@example.net").stdout.strip()
    proc = watch(net, "status", mid[:8], "--wait")
    try:
        until_line(proc, "bob@example.net: downloaded")
        assert proc.poll() is None  # carol is offline: still watching
        net.start_node(net.nodes["carol"])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "carol@example.net: downloaded" in out and "every recipient has late.bin" in out


def test_status_wait_ends_with_an_error_when_a_recipient_cannot_get_it(
        net: LocalNetwork, tmp_path: Path) -> None:
    clip = tmp_path / "gone.bin"
    clip.write_bytes(os.urandom(1 << 20))
    alice = net.nodes["alice"]
    mid = net.cli(alice, "send", str(clip), "--to", "dave@example.net").stdout.strip()
    proc = watch(net, "status", mid, "--wait")
    try:
        until_line(proc, "dave@example.net: sent")  # dave is offline
        net.cli(alice, "cancel", mid)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "dave@example.net: cancelled" in out
    assert "error: 0 of 1 recipients have it; dave@example.net: cancelled" in err

    # Ctrl-C stops the watching, not the message.
    mid = net.cli(alice, "send", str(clip), "--to", "dave@example.net").stdout.strip()
    proc = watch(net, "status", mid, "--wait")
    try:
        until_line(proc, "dave@example.net: sent")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert f"the message {mid[:8]} stays sent (`peerpost status {mid[:8]} --wait`" in err
    (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
    assert m["recipients"][0]["state"] == "sent"


def test_status_wait_needs_one_message(net: LocalNetwork) -> None:
    res = net.cli(net.nodes["alice"], "status", "--wait", check=False)
    assert res.returncode == 2
    assert "status --wait watches one message: give its id" in res.stderr


def test_fetch_wait_says_what_becomes_of_a_download_whose_node_stops(
        net: LocalNetwork, tmp_path: Path) -> None:
    """`fetch --wait` whose node is stopped under it says what became of the download and
    how to watch again (exit 3), not that "the node closed the control connection"; the node
    started again finishes it, the bytes equal."""
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    clip = tmp_path / "stopped.bin"
    clip.write_bytes(os.urandom(4 << 20))
    net.cli(alice, "prefs", "set", "max-upload-rate", "1MiB/s")
    net.cli(bob, "prefs", "set", "auto-download", "off")
    try:
        mid = net.cli(alice, "send", str(clip), "--to", "bob@example.net").stdout.strip()
        net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "offered",
                       30, "the offer at bob")
        proc = subprocess.Popen([_script("peerpost"), "--home", str(bob.home), "fetch",
                                 mid[:8], "--wait"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=net.env,
                                stdin=subprocess.DEVNULL)
        try:
            net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["progress"] > 0,
                           30, "bob's first chunk")
            net.stop_node(bob)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 3, err
        assert (f"the node stopped while you watched {mid[:8]}: the download resumes from its "
                f"verified chunks once `peerpost node` runs again (`peerpost fetch --wait "
                f"{mid[:8]}` shows it)") in " ".join(err.split()), err
        net.start_node(bob)
        got = net.wait_complete(bob, mid, 60, "bob's download, resumed")
    finally:
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    net.cli(bob, "prefs", "set", "auto-download", "on")
    assert Path(got["path"]).read_bytes() == clip.read_bytes()
