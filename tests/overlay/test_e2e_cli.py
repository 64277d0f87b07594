"""End to end: real `peerpost-rendezvous serve` and `peerpost node` processes on
loopback, driven only through the `peerpost` CLI, exactly as a person would."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, dir_size

pytestmark = pytest.mark.slow

MiB = 1 << 20


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    # Incompressible and distinct per seed, written in 1 MiB steps to keep memory flat.
    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(MiB, left))
            f.write(block)
            left -= len(block)
    return path


def same_bytes(a: Path, b: Path) -> bool:
    def digest(p: Path) -> bytes:
        d = hashlib.blake2b()
        with p.open("rb") as f:
            while chunk := f.read(MiB):
                d.update(chunk)
        return d.digest()

    return a.stat().st_size == b.stat().st_size and digest(a) == digest(b)


def mid_transfer(net: LocalNetwork, tmp_path: Path, *, size: int, rate: int, seed: int,
                 bob_extra: tuple[str, ...] = (), lo: float = 0.2, hi: float = 0.8,
                 ) -> tuple[NodeHandle, NodeHandle, Path, str]:
    """Alice, her uploads capped at `rate` bytes/s, sends `size` bytes to bob; returns
    (alice, bob, the file, the message id) once bob holds between `lo` and `hi` of it."""
    alice = net.add_node("alice", extra=["--max-upload-rate", str(rate)])
    bob = net.add_node("bob", extra=list(bob_extra))
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "big.bin", size, seed=seed)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and lo < e["progress"] < hi,
                   60, "a partial download", interval=0.1)
    return alice, bob, src, mid


def test_delivery_to_two_receivers_one_offline(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob, carol = net.add_node("alice"), net.add_node("bob"), net.add_node("carol")
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "clip.bin", 50 * MiB)
    before = dir_size(net.data_dir)

    mid = net.cli(alice, "send", str(src), "--to", f"{bob.address},{carol.address}",
                  "--title", "Grandma's 90th").stdout.strip()
    assert len(mid) == 32

    got = net.wait_complete(bob, mid, 120, "bob's download")
    assert got["from"] == alice.address and got["title"] == "Grandma's 90th"
    assert same_bytes(src, Path(got["path"]))
    assert got["sources"] and all(s["path"] == "tcp" for s in got["sources"])
    # Every byte fetched shows, up to the last chunk's (sealed: up to 28 bytes a chunk more).
    size = src.stat().st_size
    assert size <= sum(s["bytes"] for s in got["sources"]) <= size + 50 * 28, got["sources"]

    # Carol was offline at send time: she gets it when she comes back.
    net.start_node(carol)
    got = net.wait_complete(carol, mid, 120, "carol's download")
    assert same_bytes(src, Path(got["path"]))

    # The server held location messages only, never media.
    assert dir_size(net.data_dir) - before < 1 * MiB
    assert dir_size(net.data_dir) < 1 * MiB

    # The sender sees both recipients' receipts.
    def both_downloaded() -> Any:
        (msg,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        return all(r["state"] == "downloaded" for r in msg["recipients"]) and msg
    msg = net.wait_until(both_downloaded, 60, "receipts at the sender")
    assert {r["address"] for r in msg["recipients"]} == {bob.address, carol.address}


def test_resume_after_kill_9_refetches_nothing_verified(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob, src, mid = mid_transfer(net, tmp_path, size=40 * MiB, rate=8 * MiB, seed=2)
    net.kill_node(bob)
    net.cli(alice, "prefs", "set", "max-upload-rate", "none")  # the cap caught it midway
    net.start_node(bob)
    got = net.wait_complete(bob, mid, 120, "the resumed download")
    assert same_bytes(src, Path(got["path"]))

    (sent,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
    chunks = sent["chunk_count"]
    in_flight_bound = sent["max_in_flight"]
    assert chunks <= sent["chunks_served"] <= chunks + in_flight_bound


def test_sender_offline_receiver_retries_then_completes(net: LocalNetwork, tmp_path: Path) -> None:
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--retry-base", "0.5", "--retry-max", "2"])
    net.start_node(alice)
    src = make_file(tmp_path / "a.bin", 3 * MiB, seed=3)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.stop_node(alice)

    net.start_node(bob)
    e = net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "retrying" and x,
                       60, "bob to show retrying")
    assert e["next_attempt"] > 0
    net.start_node(alice)
    got = net.wait_complete(bob, mid, 90, "completion after the sender returns")
    assert same_bytes(src, Path(got["path"]))


def test_a_retry_reaches_a_sender_back_on_another_port_directly(net: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    # Alice's port is taken while she is away (any program's connection can be given it),
    # so she comes back on another. Bob's retry must dial the port she has now: the answer
    # to his FINGER from before, kept 30 s, named the old one, direct TCP was refused and
    # the retry went up the ladder (the punch here; the relay under load).
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--retry-base", "0.5", "--retry-max", "2"])
    net.start_node(alice)
    old = net.cli_json(alice, "info")["listen"][1]
    src = make_file(tmp_path / "a.bin", 3 * MiB, seed=5)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.stop_node(alice)
    net.start_node(bob)
    net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "retrying",
                   60, "bob to show retrying")
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        other.bind(("127.0.0.1", old))
        other.listen()
        net.start_node(alice)
    assert net.cli_json(alice, "info")["listen"][1] != old
    got = net.wait_complete(bob, mid, 90, "completion after the sender returns")
    assert same_bytes(src, Path(got["path"]))
    assert [s["path"] for s in got["sources"]] == ["tcp"], got["sources"]


def test_bytes_fetched_before_a_retry_still_show_in_sources(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    alice, bob, src, mid = mid_transfer(net, tmp_path, size=40 * MiB, rate=8 * MiB, seed=4,
                                        bob_extra=("--retry-base", "0.5", "--retry-max", "2"))
    net.stop_node(alice)
    e = net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "retrying" and x,
                       60, "bob to show retrying")
    before = sum(s["bytes"] for s in e["sources"])
    assert before >= 0.2 * src.stat().st_size, e["sources"]
    assert all(s["rate"] == 0 for s in e["sources"]), e["sources"]

    alice.extra = []  # back uncapped: the cap was there to stop her midway
    net.start_node(alice)
    got = net.wait_complete(bob, mid, 120, "completion after the sender returns")
    assert same_bytes(src, Path(got["path"]))
    # Summed over both attempts: every byte of the file came from alice, part before the
    # retry and the rest after it (one view per peer and path). The punch wins on loopback
    # only when direct TCP fails; a FINGER answer from before her restart no longer makes
    # it so (test_a_retry_reaches_a_sender_back_on_another_port_directly), but a fresh-
    # clone run at efbef44 still saw the retry come by the punch once, and three runs in a
    # row on a busy machine: the ladder's log line says why when it happens again.
    assert len({s["peer"] for s in got["sources"]}) == 1, got["sources"]
    paths = [s["path"] for s in got["sources"]]
    ladder = [line for line in (bob.home / "node.log").read_text().splitlines()
              if "reached by" in line or "retry" in line.lower()]
    assert len(set(paths)) == len(paths) and set(paths) <= {"tcp", "tcp-punch"}, (
        paths, ladder)
    assert sum(s["bytes"] for s in got["sources"]) >= src.stat().st_size > before


def test_junk_never_fetched_and_priority_first(net: LocalNetwork, tmp_path: Path) -> None:
    # Alice's upload is slow, so her ordinary message is still downloading when (or if) the
    # priority one turns up: it must still come first.
    alice = net.add_node("alice", extra=["--max-upload-rate", str(2 * MiB)])
    dave, erin = net.add_node("dave"), net.add_node("erin")
    bob = net.add_node("bob")
    for n in (alice, dave, erin, bob):
        net.start_node(n)
    net.cli(bob, "prefs", "junk", "add", dave.address)
    net.cli(bob, "prefs", "priority", "add", erin.address)
    net.stop_node(bob)

    files = {n.name: make_file(tmp_path / f"{n.name}.bin", 4 * MiB, seed=i + 10)
             for i, n in enumerate((alice, dave, erin))}
    ordinary = net.cli(alice, "send", str(files["alice"]), "--to", bob.address).stdout.strip()
    junk = net.cli(dave, "send", str(files["dave"]), "--to", bob.address).stdout.strip()
    urgent = net.cli(erin, "send", str(files["erin"]), "--to", bob.address).stdout.strip()

    net.start_node(bob)
    a = net.wait_complete(bob, ordinary, 90, "the ordinary message")
    u = net.wait_complete(bob, urgent, 90, "the priority message")
    assert u["completed_at"] <= a["completed_at"], "the priority sender's message comes first"

    listed = {e["id"] for e in net.cli_json(bob, "inbox")}
    assert junk not in listed, "junk is hidden from the default listing"
    shown = net.cli(bob, "inbox").stdout
    assert junk[:8] not in shown and ordinary[:8] in shown
    assert "1 message from junk senders hidden: `peerpost inbox --all` shows them" in shown
    assert junk[:8] in net.cli(bob, "inbox", "--all").stdout
    assert "hidden" not in net.cli(bob, "inbox", "--all").stdout
    j = net.inbox_entry(bob, junk)
    assert j is not None and j["junk"] and j["state"] == "offered" and j["progress"] == 0
    (sent,) = [m for m in net.cli_json(dave, "status") if m["id"] == junk]
    assert sent["chunks_served"] == 0, "nothing was fetched from the junk sender"


def test_priority_remove_leaves_a_junk_sender_junk(net: LocalNetwork, tmp_path: Path) -> None:
    # `prefs priority remove` took the address off whichever list had it: a junk sender
    # left the junk list without a word, and its held message was listed and downloaded.
    dave, bob = net.add_node("dave"), net.add_node("bob")
    net.start_node(dave)
    net.start_node(bob)
    net.cli(bob, "prefs", "junk", "add", dave.address)
    junk = net.cli(dave, "send", str(make_file(tmp_path / "d.bin", 4096)), "--to",
                   bob.address).stdout.strip()
    net.wait_until(lambda: net.inbox_entry(bob, junk), 30, "the junk message")

    res = net.cli(bob, "prefs", "priority", "remove", dave.address, check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"error: {dave.address} is on the junk list, not the priority list; nothing "
        "changed (`prefs junk remove` takes it off that one)")
    assert net.cli_json(bob, "prefs")["junk_senders"] == [dave.address]
    assert junk[:8] not in net.cli(bob, "inbox").stdout, "still hidden as junk"
    j = net.inbox_entry(bob, junk)
    assert j is not None and j["junk"] and j["state"] == "offered"

    net.cli(bob, "prefs", "junk", "remove", dave.address)  # the list that has it
    assert net.cli_json(bob, "prefs")["junk_senders"] == []
    net.wait_complete(bob, junk, 60, "the message of a sender no longer junk")


def test_clear_errors_for_bad_send_and_no_daemon(net: LocalNetwork, tmp_path: Path) -> None:
    alice = net.add_node("alice")
    res = net.cli(alice, "inbox", check=False)
    assert res.returncode == 3 and "not running" in res.stderr
    net.start_node(alice)
    res = net.cli(alice, "send", str(tmp_path / "nope.bin"), "--to", "bob@example.net",
                  check=False)
    assert res.returncode == 1 and "no such file" in res.stderr
    f = make_file(tmp_path / "x.bin", 1000)
    res = net.cli(alice, "send", str(f), "--to", "nobody@example.net", check=False)
    assert res.returncode == 1
    assert "error: no such address: nobody@example.net" in res.stderr  # no status code
    assert res.stderr.count("nobody@example.net") == 1, res.stderr
    assert net.cli_json(alice, "status") == []  # nothing half-sent


@pytest.mark.parametrize("policy", ["archive", "delete"])
def test_sender_applies_retention_once_everyone_has_it(net: LocalNetwork, tmp_path: Path,
                                                       policy: str) -> None:
    alice, bob, carol = net.add_node("alice"), net.add_node("bob"), net.add_node("carol")
    for n in (alice, bob):
        net.start_node(n)
    archive = tmp_path / "sent-archive"
    net.cli(alice, "prefs", "set", "retention", policy)
    net.cli(alice, "prefs", "set", "archive-dir", str(archive))
    src = make_file(tmp_path / "party.bin", 2 * MiB, seed=7)
    original = src.read_bytes()
    mid = net.cli(alice, "send", str(src), "--to", f"{bob.address},{carol.address}").stdout.strip()
    net.wait_complete(bob, mid, 60, "bob's download")

    def sent() -> Any:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        return m
    # Carol hasn't got it yet: the sender keeps its copy.
    assert src.exists() and sent()["retention_done"] is None

    net.start_node(carol)
    net.wait_complete(carol, mid, 60, "carol's download")
    m = net.wait_until(lambda: (x := sent())["retention_done"] and x, 30, "retention")
    assert m["retention_done"] == policy
    assert not src.exists()
    if policy == "archive":
        assert (archive / "party.bin").read_bytes() == original
        assert m["path"] == str(archive / "party.bin")  # was: the path it had been sent from
    else:
        assert not archive.exists() or not any(archive.iterdir())


def test_a_recipient_who_removes_it_unread_declines_and_retention_runs(
        net: LocalNetwork, tmp_path: Path) -> None:
    """Bob removes the message before downloading it; alice's `status` shows him as
    declined with his reason, and once carol has it the retention preference runs. Bob
    used to stay `sent` for ever, and alice's copy with him."""
    alice, bob, carol = net.add_node("alice"), net.add_node("bob"), net.add_node("carol")
    for n in (alice, bob, carol):
        net.start_node(n)
    net.cli(bob, "prefs", "set", "auto-download", "off")
    net.cli(carol, "prefs", "set", "auto-download", "off")  # until bob has declined
    net.cli(alice, "prefs", "set", "retention", "delete")
    src = make_file(tmp_path / "party.bin", 2 * MiB, seed=8)
    mid = net.cli(alice, "send", str(src), "--to", f"{bob.address},{carol.address}").stdout.strip()
    net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the message in bob's inbox")
    said = net.cli(bob, "rm", mid[:8]).stdout
    assert f"{alice.address} is told you will not download it" in said, said

    def sent() -> dict[str, Any]:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        return dict(m)

    def states() -> dict[str, tuple[str, str | None]]:
        return {r["address"]: (r["state"], r["reason"]) for r in sent()["recipients"]}

    net.wait_until(lambda: states()[bob.address][0] == "declined", 30, "bob's decline")
    assert states()[bob.address] == ("declined", "removed by the recipient")
    # Carol has not got it yet: the copy stays, and is served to her.
    assert src.exists() and sent()["retention_done"] is None
    net.cli(carol, "fetch", mid[:8])
    net.wait_complete(carol, mid, 60, "carol's download")
    m = net.wait_until(lambda: (x := sent())["retention_done"] and x, 30, "retention")
    assert m["retention_done"] == "delete" and not src.exists()
    assert {r["address"]: (r["state"], r["reason"], r["shown"]) for r in m["recipients"]} == {
        bob.address: ("declined", "removed by the recipient",
                      "declined (removed by the recipient)"),
        carol.address: ("downloaded", None, "downloaded")}
    # Watching it ends at once: bob's state is final, and not having it is the error.
    res = net.cli(alice, "status", mid[:8], "--wait", check=False)
    assert f"{bob.address}: declined (removed by the recipient)" in res.stdout, res.stdout
    assert res.returncode == 1 and "1 of 2 recipients have it; " in res.stderr, res.stderr
    shown = " ".join(net.cli(alice, "status", mid[:8]).stdout.replace("│", " ").split())
    assert "everyone has it or declined it; copy deleted" in shown, shown
    assert bob.proc is not None and bob.proc.log().count("told alice@") == 1

    # Nobody downloads the next one: `delete` would lose the only copy; it is kept.
    other = make_file(tmp_path / "draft.bin", MiB, seed=9)
    original = other.read_bytes()
    mid = net.cli(alice, "send", str(other), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the second message at bob's")
    assert net.cli_json(bob, "rm", mid[:8])["removed"][0]["sender_told"] == alice.address
    m = net.wait_until(lambda: (x := sent())["retention_done"] and x, 30, "retention")
    assert m["recipients"][0]["state"] == "declined" and other.read_bytes() == original
    shown = " ".join(net.cli(alice, "status", mid[:8]).stdout.replace("│", " ").split())
    assert "nobody will download it; your file is kept, no longer served" in shown, shown


def test_a_decline_made_while_the_server_is_down_survives_a_kill(net: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    """Bob removes the message while his server is down and is killed before it is back:
    the decline waits in node.db and reaches alice after both come back."""
    alice, bob = net.add_node("alice"), net.add_node("bob")
    for n in (alice, bob):
        net.start_node(n)
    net.cli(bob, "prefs", "set", "auto-download", "off")
    src = make_file(tmp_path / "clip.bin", MiB, seed=12)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "the message in bob's inbox")
    assert net.server is not None
    net.server.stop()
    net.cli(bob, "rm", mid[:8])
    net.kill_node(bob)
    net.start_server()
    net.start_node(bob)

    def bob_state() -> tuple[str, str | None]:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        (r,) = m["recipients"]
        return r["state"], r["reason"]

    net.wait_until(lambda: bob_state()[0] == "declined", 60, "alice to hear bob declined")
    assert bob_state() == ("declined", "removed by the recipient")


def test_a_receipt_the_server_missed_is_sent_when_it_can_be(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    # Bob finishes while his server is down (the bytes come from alice, peer to peer), and
    # is killed before the receipt got through. Nothing is lost: after both come back,
    # alice learns that bob has it, so she can apply her retention policy.
    alice, bob, src, mid = mid_transfer(net, tmp_path, size=8 * MiB, rate=2 * MiB, seed=11,
                                        lo=0.0, hi=1.01)  # started; it may even be done
    assert net.server is not None
    net.server.stop()
    net.cli(alice, "prefs", "set", "max-upload-rate", "none")  # the rest at full speed

    e = net.wait_complete(bob, mid, 60, "bob's download, server down")
    assert same_bytes(Path(e["path"]), src)
    net.kill_node(bob)  # before the client's own retries could reach a server
    net.start_server()
    net.start_node(bob)

    def bob_state() -> str:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        (r,) = m["recipients"]
        return str(r["state"])

    net.wait_until(lambda: bob_state() == "downloaded", 60, "alice to hear that bob has it")


def test_a_receipt_the_server_missed_goes_when_the_server_is_back(net: LocalNetwork,
                                                                   tmp_path: Path) -> None:
    """Bob finishes while his server is down and stays up: once his receipt has failed,
    it goes at his reconnect, and alice hears within seconds of the server's return. It
    waited for the next round of owed receipts, a minute after the failure."""
    alice, bob, src, mid = mid_transfer(net, tmp_path, size=8 * MiB, rate=2 * MiB, seed=13)
    assert net.server is not None and bob.proc is not None
    net.server.stop()
    net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    e = net.wait_complete(bob, mid, 60, "bob's download, server down")
    assert same_bytes(Path(e["path"]), src)
    bob.proc.lines.wait_for(re.compile(rf"receipt for {mid}\w* not sent"), 60,
                            "bob's receipt failing")
    net.start_server()

    def bob_state() -> str:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == mid]
        (r,) = m["recipients"]
        return str(r["state"])

    # Both nodes reconnect within their backoff (8 s at this point); the next round of
    # owed receipts would have been 60 s after the failure.
    net.wait_until(lambda: bob_state() == "downloaded", 40, "alice to hear that bob has it")


def test_a_node_started_while_its_server_is_down_waits_for_it(net: LocalNetwork,
                                                              tmp_path: Path) -> None:
    # A home device boots before its network (or during the server's restart): the daemon
    # waits and logs in when the server is back, rather than exiting. The server comes back
    # once the node has said it could not reach it: a timer of 2 s was passed by a node
    # that took longer than that to start under load, and it never saw the server down.
    alice, bob = net.add_node("alice"), net.add_node("bob")
    assert net.server is not None
    net.server.stop()
    net.start_node(alice, ready=False)
    assert alice.proc is not None
    alice.proc.lines.wait_for(re.compile(r"not reachable"), 45, "alice's first login failing")
    net.start_server()
    alice.proc.lines.wait_for(re.compile(r"^ready\b"), 45, "alice, ready once logged in")
    net.start_node(bob)
    src = make_file(tmp_path / "after.bin", MiB, seed=12)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    e = net.wait_complete(bob, mid, 60, "bob's download")
    assert same_bytes(Path(e["path"]), src)


def test_a_node_waiting_for_its_server_stops_on_sigterm(net: LocalNetwork) -> None:
    # `systemctl stop` (or Ctrl-C) while the server is down: the daemon ends at once, and
    # the home is free for the next start.
    alice = net.add_node("alice")
    assert net.server is not None
    net.server.stop()
    net.start_node(alice, ready=False)
    assert alice.proc is not None
    alice.proc.lines.wait_for(re.compile("not reachable"), 30, "alice waiting for its server")
    assert alice.proc.stop(timeout=10) == 0
    assert "stopped before it was serving" in alice.proc.log()
    net.start_server()
    net.start_node(alice)
    assert net.cli_json(alice, "info")["address"] == alice.address


def test_rm_during_a_download_stops_it_without_an_error(net: LocalNetwork,
                                                        tmp_path: Path) -> None:
    alice, bob, _, mid = mid_transfer(net, tmp_path, size=24 * MiB, rate=4 * MiB, seed=7,
                                      lo=0.1, hi=0.9)
    assert "removed" in net.cli(bob, "rm", mid[:12]).stdout
    assert net.inbox_entry(bob, mid) is None
    later = net.cli(alice, "send", str(make_file(tmp_path / "small.bin", MiB, seed=8)),
                    "--to", bob.address).stdout.strip()
    net.wait_complete(bob, later, 60, "the next message")
    assert bob.proc is not None
    errors = [line for line in bob.proc.log().splitlines() if "level=error" in line]
    assert errors == []
    assert net.inbox_entry(bob, mid) is None  # not fetched again
    assert not list((bob.home / "received").glob("big.bin*"))


def test_a_send_just_after_the_server_returns_goes_through(net: LocalNetwork,
                                                           tmp_path: Path) -> None:
    # After seconds of outage the node's reconnect backoff waits seconds between tries; a
    # send made as the server comes back tries at once instead of saying "offline".
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    assert net.server is not None and alice.proc is not None
    net.server.stop()
    net.wait_until(lambda: "attempt=6" in alice.proc.log(), 30, "alice's sixth reconnect try")
    net.start_server()
    src = make_file(tmp_path / "now.bin", MiB, seed=21)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob, mid, 60, "bob's download")
    assert same_bytes(src, Path(got["path"]))


def test_a_received_folder_deleted_mid_download_is_started_again(net: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    # Its .part went with it: the download failed at the end with FileNotFoundError, and
    # every `fetch` after that failed the same way, the store handing back the deleted file.
    # Retries at most 2 s apart (the first is 5 s by default): that it starts again is
    # tested, not the backoff. The cap catches the download midway; then it is lifted.
    alice, bob, src, mid = mid_transfer(net, tmp_path, size=6 * MiB, rate=MiB, seed=41,
                                        bob_extra=("--retry-base", "0.5", "--retry-max", "2"))
    shutil.rmtree(bob.home / "received")
    net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    got = net.wait_complete(bob, mid, 90, "bob's download, started again")
    assert same_bytes(src, Path(got["path"]))
    assert Path(got["path"]).parent == bob.home / "received"
    log = (bob.home / "node.log").read_text()
    assert "was deleted during the download: it starts again" in log
    assert "FileNotFoundError" not in log


def test_a_file_whose_name_is_longer_than_a_title_is_sent(net: LocalNetwork,
                                                          tmp_path: Path) -> None:
    # 250 characters is a legal name here; send said "control request.args.title: length
    # 250 outside 0..200", then "location.d.name: longer than 241 bytes". The name is cut
    # as the receiver cuts it, the extension kept.
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / ("family picnic by the lake " * 10 + ".mp4")[-250:], 200_000)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob, mid, 60)
    name = Path(got["path"]).name
    assert name.endswith(".mp4") and len(name.encode()) <= 241 and name.startswith("by the")
    assert same_bytes(src, Path(got["path"]))
    assert got["title"].endswith("…") and len(got["title"]) == 200
    res = net.cli(alice, "send", str(src), "--to", bob.address, "--title", "t" * 201, check=False)
    assert res.returncode == 2
    assert "--title takes at most 200 characters (this one has 201)" in res.stderr
