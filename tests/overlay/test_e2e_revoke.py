"""End to end (real server and node processes, the operator's real command): a device the
operator revoked is retired by a contact at its next lookup of the address, and mail goes
on to the devices still bound; that lookup comes, past KEYS_FRESH, with the next envelope
the revoked device signed, though the contact never sent to the address again."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, _script
from overlay.mail.contacts import KEYS_FRESH

from .test_e2e_cli import MiB, make_file, same_bytes
from .test_e2e_trust import contact, entry, second_device

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
    # The note column wraps at 80 columns; its words are read across the table's lines.
    shown = " ".join(net.cli(alice, "contacts").stdout.replace("\u2502", " ").split())
    assert "(retired " in shown and "no longer lists it" in shown

    net.start_node(bob)
    got = net.wait_complete(bob, mid2, 60, "bob's download on his remaining device")
    assert same_bytes(second, Path(got["path"]))
    assert entry(net, laptop, mid2) is None


def queued_for(net: LocalNetwork, node: NodeHandle) -> int:
    (device,) = operator(net, "accounts", "show", node.address)["device_list"]
    return int(device["queued_envelopes"])


def test_what_a_device_revoked_since_the_last_lookup_signs_is_not_believed(
        net: LocalNetwork, tmp_path: Path) -> None:
    """The laptop, stolen, declines alice's clip and writes to her while she is offline;
    its operator revokes it. More than KEYS_FRESH after alice last looked bob up (her
    node.db's record of it set back by that much: a node's clock can't be moved), her node
    comes up, and with nothing sent to bob looks him up before believing the laptop: its
    message is held, its decline dropped, and her file stays until bob's phone has it."""
    alice, bob, carol = net.add_node("alice"), net.add_node("bob"), net.add_node("carol")
    for n in (alice, bob, carol):
        net.start_node(n)
    laptop = second_device(net, "laptop", bob.address, vouch_from=bob)
    net.cli(laptop, "prefs", "set", "auto-download", "off")
    net.stop_node(bob)  # bob's phone is off
    net.cli(alice, "prefs", "set", "retention", "delete")
    src = make_file(tmp_path / "party.bin", 1 * MiB, seed=3)
    original = src.read_bytes()
    mid = net.cli(alice, "send", str(src), "--to", f"{bob.address},{carol.address}"
                  ).stdout.strip()
    net.wait_complete(carol, mid, 60, "carol's download")
    net.wait_until(lambda: entry(net, laptop, mid), 30, "the message on the laptop")
    net.stop_node(alice)

    # The thief, before the revoke: alice gets them when she is back.
    net.cli(laptop, "rm", mid[:8])
    note = make_file(tmp_path / "note.bin", 4096, seed=4)
    sent = net.cli(laptop, "send", str(note), "--to", alice.address).stdout.strip()
    net.wait_until(lambda: queued_for(net, alice) == 2, 30, "the laptop's decline and message")
    stolen = net.cli_json(laptop, "info")
    net.stop_node(laptop)
    operator(net, "devices", "revoke", bob.address, stolen["peer_id"][:16])

    with sqlite3.connect(alice.home / "node.db") as db:
        db.execute("UPDATE contact SET keys_confirmed_at = keys_confirmed_at - ? "
                   "WHERE address = ?", (KEYS_FRESH + 60, bob.address))
    db.close()
    net.start_node(alice)
    net.wait_until(lambda: queued_for(net, alice) == 0, 30, "alice taking her mail")
    got = entry(net, alice, sent)
    assert got is not None and got["state"] == "unverified", got  # offered on the old code
    (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
    states = {r["address"]: r["state"] for r in m["recipients"]}
    assert states == {bob.address: "sent", carol.address: "downloaded"}  # bob: declined
    assert src.exists()  # deleted on the old code (carol has it, bob "declined")
    c = contact(net, alice, bob.address)
    assert c is not None and [r["fingerprint"] for r in c["retired"]] == [stolen["fingerprint"]]
    assert c["keys_confirmed_at"] is not None

    net.start_node(bob)  # the phone: it gets the clip from alice, then her copy goes
    done = net.wait_complete(bob, mid, 60, "bob's download on his phone")
    assert Path(done["path"]).read_bytes() == original
    net.wait_until(lambda: not src.exists(), 30, "alice's retention once bob has it")
