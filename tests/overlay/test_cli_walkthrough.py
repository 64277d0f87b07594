"""What a newcomer following the README trips on: the messages of the usual mistakes and
the tables they read, with a real server and real nodes on loopback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, _script

BORDERS = ("┃", "│", "┓", "┩", "┘", "┐", "┤", "┫")


def run(net: LocalNetwork, node: NodeHandle, *args: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script("peerpost"), "--home", str(node.home), *args],
                          capture_output=True, text=True, env={**net.env, **(env or {})},
                          timeout=60, stdin=subprocess.DEVNULL)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_help_names_what_the_readme_says() -> None:
    def helptext(*argv: str) -> str:
        res = subprocess.run([_script("peerpost"), *argv, "--help"], capture_output=True,
                             text=True, env={**os.environ, "COLUMNS": "200"}, timeout=60)
        assert res.returncode == 0, res.stderr
        return flat(res.stdout)

    assert "PEERPOST_EVENT (arrived or complete)" in helptext("node")
    assert "(default: received/ in the home folder)" in helptext("init")
    assert "(default: 23, a real WebM clip" in helptext("demo")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path_factory.mktemp("walk") / "lab") as n:
        n.start_server()
        for name in ("alice", "bob"):
            n.start_node(n.add_node(name))
        n.add_node("carol")  # set up, never started
        yield n


@pytest.mark.slow
def test_status_fits_80_columns_and_says_what_retention_did(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    src = tmp_path / "clip.bin"
    src.write_bytes(os.urandom(256 * 1024))
    mid = net.cli(alice, "send", str(src), "--to", bob.address, "--title",
                  "Grandma's 90th").stdout.strip()
    net.wait_complete(bob, mid, 60, "bob's copy")
    net.wait_until(lambda: any(m["id"] == mid and m["retention_done"]
                               for m in net.cli_json(alice, "status")), 60,
                   "alice's retention step")
    res = run(net, alice, "status", mid[:8], env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert all(line.rstrip().endswith(BORDERS) for line in lines[1:] if line.strip())
    row = [line for line in lines if mid[:8] in line]
    assert row and bob.address in row[0] and "downloaded" in row[0], res.stdout
    assert "everyone has it; copy kept" in flat(res.stdout.replace("│", " "))
