"""End to end (real server and node processes): a sender's `delete` waits for every
device of a recipient the message was sealed to, not only the first one whose receipt
comes in; bob's phone, coming online after his laptop downloaded and went off, still
gets the bytes from the sender. A device the recipient's server no longer lists (revoked)
is not waited for once the sender's node has looked the address up again."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pytest

from overlay.app.control_wire import KEEP_ON_TEXT
from overlay.app.lab import LocalNetwork, NodeHandle
from tests.web.test_web_access import request
from tests.web.test_web_actions import login

from .test_e2e_cli import MiB, make_file
from .test_e2e_revoke import operator
from .test_e2e_trust import entry, second_device

pytestmark = pytest.mark.slow


def sent(net: LocalNetwork, alice: NodeHandle, mid: str) -> Any:
    (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
    return m


def table_states(stdout: str) -> list[str]:
    """The state column of `peerpost status`'s table, each cell's folded lines joined."""
    cells: list[list[str]] = []
    for line in stdout.splitlines():
        columns = line.split("│")
        if len(columns) != 8:
            continue
        if columns[1].strip():  # a message's first row
            cells.append([])
        if text := columns[5].strip():
            cells[-1].append(text)
    return [" ".join(c) for c in cells]


def sent_page(net: LocalNetwork, alice: NodeHandle) -> str:
    base, headers = login(net, alice)
    status, _, page = request(base, "GET", "/sent", {"Cookie": headers["Cookie"]})
    assert status == 200, page
    return html.unescape(page.decode())


def test_delete_waits_for_the_phone_after_the_laptop_downloaded(net: LocalNetwork,
                                                                tmp_path: Path) -> None:
    """`status` says why alice is asked to stay on though bob shows `downloaded`: one more
    device of his is still to fetch it (the table, --json and the web Sent page); plain
    `downloaded` once his phone has it too. It said `downloaded` alone next to the warning."""
    alice = net.add_node("alice", extra=["--web", "127.0.0.1:0"])
    bob = net.add_node("bob")  # bob: his phone
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
    # ... and alice is asked to stay on for it, told that bob's other device has yet to
    # fetch it, while `state` stays `downloaded` for scripts.
    (r,) = sent(net, alice, mid)["recipients"]
    assert (r["state"], r["shown"], r["devices_owed"], r["owed"]) == (
        "downloaded", "downloaded (1 more device to fetch)", 1, True)
    table = net.cli(alice, "status").stdout
    assert table_states(table) == ["downloaded (1 more device to fetch)"], table
    assert KEEP_ON_TEXT in " ".join(table.split())
    page = sent_page(net, alice)
    assert '<td class="state">has it (1 more device to fetch)</td>' in page
    assert 'id="sent-owed"' in page
    # Watching it ends: bob has it, as far as a recipient goes.
    watched = net.cli(alice, "status", "--wait", mid, check=False)
    assert watched.returncode == 0 and "every recipient has party.bin" in watched.stdout, (
        watched.stdout + watched.stderr)

    net.stop_node(laptop)
    net.start_node(bob)
    done = net.wait_complete(bob, mid, 60, "the phone's download from alice")
    assert Path(done["path"]).read_bytes() == original
    assert entry(net, bob, mid) is not None
    # Now every device bob's server listed has it: the preference applies.
    m = net.wait_until(lambda: (x := sent(net, alice, mid))["retention_done"] and x, 30,
                       "alice's retention once the phone has it")
    assert m["retention_done"] == "delete" and not src.exists()
    (r,) = m["recipients"]
    assert (r["state"], r["shown"], r["devices_owed"], r["owed"]) == (
        "downloaded", "downloaded", 0, False)
    table = net.cli(alice, "status").stdout
    assert "more device" not in table and KEEP_ON_TEXT not in " ".join(table.split())
    page = sent_page(net, alice)
    assert '<td class="state">has it</td>' in page and 'id="sent-owed"' not in page


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
