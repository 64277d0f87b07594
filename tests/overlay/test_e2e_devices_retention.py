"""End to end (real server and node processes): a sender's `delete` waits for every
device of a recipient the message was sealed to, not only the first one whose receipt
comes in; bob's phone, coming online after his laptop downloaded and went off, still
gets the bytes from the sender. A device the recipient's server no longer lists (revoked)
is not waited for once the sender's node has looked the address up again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from overlay.app.control_wire import KEEP_ON_TEXT
from overlay.app.lab import LocalNetwork, NodeHandle

from .test_e2e_cli import MiB, make_file
from .test_e2e_revoke import operator
from .test_e2e_trust import entry, second_device

pytestmark = pytest.mark.slow


def sent(net: LocalNetwork, alice: NodeHandle, mid: str) -> Any:
    (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
    return m


def test_delete_waits_for_the_phone_after_the_laptop_downloaded(net: LocalNetwork,
                                                                tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")  # bob: his phone
    net.start_node(alice)
    net.start_node(bob)
    laptop = second_device(net, "laptop", bob.address, vouch_from=bob)
    net.stop_node(bob)  # the phone is off
    net.cli(alice, "prefs", "set", "retention", "delete")
    src = make_file(tmp_path / "party.bin", 2 * MiB, seed=11)
    original = src.read_bytes()
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

    net.wait_complete(laptop, mid, 60, "the laptop's download")
    net.wait_until(lambda: sent(net, alice, mid)["recipients"][0]["state"] == "downloaded",
                   30, "the laptop's receipt at alice")
    # The laptop's receipt was filed (and a retention pass ran on it): the phone has not
    # got it, so alice keeps her copy. Deleted here on the old code.
    assert src.exists() and sent(net, alice, mid)["retention_done"] is None
    # ... and alice is asked to stay on for it, though bob shows `downloaded`.
    assert sent(net, alice, mid)["recipients"][0]["owed"] is True
    assert KEEP_ON_TEXT in " ".join(net.cli(alice, "status").stdout.split())

    net.stop_node(laptop)
    net.start_node(bob)
    done = net.wait_complete(bob, mid, 60, "the phone's download from alice")
    assert Path(done["path"]).read_bytes() == original
    assert entry(net, bob, mid) is not None
    # Now every device bob's server listed has it: the preference applies.
    m = net.wait_until(lambda: (x := sent(net, alice, mid))["retention_done"] and x, 30,
                       "alice's retention once the phone has it")
    assert m["retention_done"] == "delete" and not src.exists()
    assert m["recipients"][0]["owed"] is False
    assert KEEP_ON_TEXT not in " ".join(net.cli(alice, "status").stdout.split())


def test_delete_does_not_wait_for_a_revoked_phone(net: LocalNetwork, tmp_path: Path) -> None:
    """The phone is revoked before it fetched the message: alice's next send to bob looks
    him up, retires the phone's key, and her copy of the first message goes then, though
    no receipt comes in (the laptop is off too)."""
    alice, bob = net.add_node("alice"), net.add_node("bob")  # bob: his phone
    net.start_node(alice)
    net.start_node(bob)
    laptop = second_device(net, "laptop", bob.address, vouch_from=bob)
    phone = net.cli_json(bob, "info")
    net.stop_node(bob)
    net.cli(alice, "prefs", "set", "retention", "delete")
    src = make_file(tmp_path / "party.bin", 1 * MiB, seed=12)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_complete(laptop, mid, 60, "the laptop's download")
    net.wait_until(lambda: sent(net, alice, mid)["recipients"][0]["state"] == "downloaded",
                   30, "the laptop's receipt at alice")
    assert src.exists()  # the phone may still come for it
    net.stop_node(laptop)  # no receipt of the next message runs a retention pass

    operator(net, "devices", "revoke", bob.address, phone["peer_id"][:16])
    note = make_file(tmp_path / "note.bin", 4096, seed=13)
    net.cli(alice, "send", str(note), "--to", bob.address)
    m = net.wait_until(lambda: (x := sent(net, alice, mid))["retention_done"] and x, 30,
                       "alice's retention once the phone is revoked")
    assert m["retention_done"] == "delete" and not src.exists()
