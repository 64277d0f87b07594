"""End to end (real server and node processes, driven through the CLI): a device key no
trusted device vouched for is neither trusted for receiving nor sealed to."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, _script

from .test_e2e_cli import MiB, make_file, same_bytes

pytestmark = pytest.mark.slow


def invite(net: LocalNetwork, address: str) -> str:
    res = subprocess.run([_script("peerpost-rendezvous"), "invite", address, "--data",
                          str(net.data_dir)], capture_output=True, text=True, check=True,
                         env=net.env)
    return res.stdout.split()[0]


def second_device(net: LocalNetwork, name: str, address: str, *,
                  vouch_from: NodeHandle | None = None) -> NodeHandle:
    """Another device of `address`, with an invite; vouched for by `vouch_from` if given."""
    node = NodeHandle(name, address, net.root / name)
    args = ["init", "--address", address, "--server", net.server_hostport,
            "--listen", "127.0.0.1:0", "--invite", invite(net, address)]
    if vouch_from is not None:
        key = net.cli(node, "devices", "key").stdout.split()[0]
        vouch = net.cli(vouch_from, "devices", "vouch", key).stdout.split()[0]
        args += ["--vouch", vouch]
    net.cli(node, *args)
    net.nodes[name] = node
    net.start_node(node)
    return node


def entry(net: LocalNetwork, node: NodeHandle, mid: str) -> dict[str, Any] | None:
    return net.inbox_entry(node, mid)


def contact(net: LocalNetwork, node: NodeHandle, address: str) -> dict[str, Any] | None:
    return next((c for c in net.cli_json(node, "contacts") if c["address"] == address), None)


def test_mail_from_an_unvouched_device_waits_for_accept(net: LocalNetwork,
                                                       tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    first = make_file(tmp_path / "first.bin", 1 * MiB, seed=1)
    mid = net.cli(alice, "send", str(first), "--to", bob.address).stdout.strip()
    # first contact: the signing key is the one FINGER returns, so it is trusted
    net.wait_complete(bob, mid, 60, "bob's first download")

    alice2 = second_device(net, "alice2", alice.address)  # no vouch
    src = make_file(tmp_path / "second.bin", 3 * MiB, seed=2)
    mid2 = net.cli(alice2, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: (c := contact(net, bob, alice.address)) and c["unvouched"], 30,
                   "bob's lookup of alice's keys")
    held = entry(net, bob, mid2)
    assert held is not None and held["state"] == "unverified" and held["progress"] == 0
    refused = net.cli(bob, "fetch", mid2, check=False)
    assert refused.returncode != 0 and "contacts accept" in refused.stderr + refused.stdout
    assert [e["state"] for e in net.cli_json(bob, "inbox") if e["id"] == mid2] == ["unverified"]

    net.cli(bob, "contacts", "accept", alice.address)
    got = net.wait_complete(bob, mid2, 60, "bob's download after accept")
    assert same_bytes(src, Path(got["path"]))


def test_a_rogue_key_is_not_sealed_to_and_a_vouched_one_is(net: LocalNetwork,
                                                          tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "clip.bin", 1 * MiB)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_complete(bob, mid, 60, "bob's download")  # bob pinned

    rogue = second_device(net, "rogue", bob.address)  # what a malicious server can add
    mid2 = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_complete(bob, mid2, 60, "bob's second download")
    c = contact(net, alice, bob.address)
    assert c is not None and len(c["fingerprints"]) == 1 and len(c["unvouched"]) == 1
    assert entry(net, rogue, mid2) is None  # nothing was sealed to the rogue key

    bob2 = second_device(net, "bob2", bob.address, vouch_from=bob)
    mid3 = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob2, mid3, 60, "the vouched device")
    assert same_bytes(src, Path(got["path"]))
    assert entry(net, rogue, mid3) is None

    net.cli(alice, "contacts", "accept", bob.address)  # the user checked it after all
    mid4 = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: entry(net, rogue, mid4), 30, "the accepted device")
