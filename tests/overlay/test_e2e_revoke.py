"""End to end (real server and node processes, the operator's real command): a device the
operator revoked is retired by a contact at its next lookup of the address, and mail goes
on to the devices still bound."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, _script

from .test_e2e_cli import MiB, make_file, same_bytes
from .test_e2e_trust import contact, entry, second_device
from .test_e2e_trust import net as net  # the fixture: a lab with its server started

pytestmark = pytest.mark.slow


def operator(net: LocalNetwork, *args: str) -> Any:
    res = subprocess.run([_script("peerpost-rendezvous"), *args, "--data", str(net.data_dir),
                          "--json"], capture_output=True, text=True, check=True, env=net.env)
    return json.loads(res.stdout)


def test_a_revoked_device_is_retired_and_mail_goes_to_the_other(net: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    laptop = second_device(net, "laptop", bob.address, vouch_from=bob)
    first = make_file(tmp_path / "first.bin", 1 * MiB, seed=1)
    mid = net.cli(alice, "send", str(first), "--to", bob.address).stdout.strip()
    net.wait_complete(bob, mid, 60, "bob's first download")
    net.wait_until(lambda: entry(net, laptop, mid), 30, "the laptop's copy of the message")
    c = contact(net, alice, bob.address)
    assert c is not None and len(c["fingerprints"]) == 2 and c["retired"] == []

    # The laptop is stolen: the operator revokes it.
    stolen = net.cli_json(laptop, "info")
    operator(net, "devices", "revoke", bob.address, stolen["peer_id"][:16])
    # Bob's other device is offline, so what alice sends waits in the server's store,
    # where it shows which devices it was sealed to.
    remaining = net.cli_json(bob, "info")["peer_id"]
    net.stop_node(bob)
    second = make_file(tmp_path / "second.bin", 3 * MiB, seed=2)
    mid2 = net.cli(alice, "send", str(second), "--to", bob.address).stdout.strip()
    (device,) = operator(net, "accounts", "show", bob.address)["device_list"]
    assert (device["peer_id"], device["queued_envelopes"]) == (remaining, 1)

    c = contact(net, alice, bob.address)
    assert c is not None and len(c["fingerprints"]) == 1
    assert stolen["fingerprint"] not in c["fingerprints"]
    assert [r["fingerprint"] for r in c["retired"]] == [stolen["fingerprint"]]
    assert c["retired"][0]["retired_at"] > 0
    shown = net.cli(alice, "contacts").stdout
    assert "(retired " in shown and "no longer lists it" in shown

    net.start_node(bob)
    got = net.wait_complete(bob, mid2, 60, "bob's download on his remaining device")
    assert same_bytes(second, Path(got["path"]))
    assert entry(net, laptop, mid2) is None
