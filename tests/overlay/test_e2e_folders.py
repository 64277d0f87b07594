"""End to end: a folder, or several files, sent as one message, with real nodes, a real
server and the `peerpost` CLI. The receiver gets the same tree (names and bytes); the
sender writes no archive, only a small map, which goes once nobody needs it while the
sender's files stay; a hostile archive is refused member by member with nothing written
outside its folder; a folder larger than the sender's free space is sent, and a home with
no room even for the map says so and keeps nothing."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.app.control_wire import ControlError
from overlay.app.control_wire import call as control_call
from overlay.app.lab import LocalNetwork, NodeHandle
from overlay.content.archive import OUTGOING_DIR
from overlay.mail.folders import plan_pack, write_map
from tests.overlay.test_e2e_disk_full import _tmpfs, fill
from tests.overlay.test_e2e_trust import second_device
from tests.web.test_web_access import request
from tests.web.test_web_actions import login

# One network for the module (a worker of its own under --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-folders")]
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    root = tmp_path_factory.mktemp("folders")
    with LocalNetwork(root / "lab") as net:
        net.start_server()
        net.start_nodes("alice", "bob")
        net.add_node("carol")  # never started: a recipient who is away
        yield net


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, by relative name."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = Path(dirpath, f)
            out[os.path.relpath(p, root)] = None if p.is_symlink() else p.read_bytes()
    return out


def outgoing(node: NodeHandle) -> list[str]:
    folder = node.home / "store" / OUTGOING_DIR
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def sent(net: LocalNetwork, node: NodeHandle, mid: str) -> dict[str, Any]:
    (m,) = [m for m in net.cli_json(node, "status") if m["id"] == mid]
    return dict(m)


def test_a_folder_arrives_as_the_same_tree(lab: LocalNetwork, tmp_path: Path) -> None:
    alice, bob = lab.nodes["alice"], lab.nodes["bob"]
    src = tmp_path / "sunday"
    (src / "beach" / "ünïcode 日本").mkdir(parents=True)
    (src / "empty folder").mkdir()
    (src / "beach" / "ünïcode 日本" / "café.jpg").write_bytes(os.urandom(300_000))
    (src / "beach" / "big.bin").write_bytes(os.urandom(3 * MiB + 17))
    (src / "zero bytes").write_bytes(b"")
    (src / "notes.txt").write_text("sunday at the beach\n")
    (src / "passwords").symlink_to("/etc")  # skipped: never followed out of the tree
    want = {k: v for k, v in tree(src).items() if k != "passwords"}

    received = bob.home / "received"
    before = set(os.listdir(received)) if received.is_dir() else set()
    res = lab.cli(alice, "send", str(src), "--to", bob.address)
    mid = res.stdout.strip()
    assert len(mid) == 32, res.stdout  # stdout is the id alone
    assert "passwords: a symlink" in res.stderr and "skipped 1" in res.stderr
    # No archive was written: at most the map, a few KiB (gone once bob has it).
    assert all(n == "sunday.map" for n in outgoing(alice)), outgoing(alice)
    assert sum((alice.home / "store" / OUTGOING_DIR / n).stat().st_size
               for n in outgoing(alice)) < 32 * 1024

    got = lab.wait_complete(bob, mid, 60, "bob's folder")
    folder = Path(got["path"])
    assert folder.name == "sunday" and folder.is_dir()
    assert folder.parent == received
    assert tree(folder) == want
    # The archive carries no folder times: its folders have the time they were made.
    assert all(os.stat(folder / d).st_mtime > 1e9 for d in ("beach", "empty folder")), \
        [os.stat(folder / d).st_mtime for d in ("beach", "empty folder")]
    assert got["folder"] == {"name": "sunday", "files": 4, "folders": 3,
                             "size": 3 * MiB + 17 + 300_000 + 20}
    assert got["title"] == "sunday/: 4 files, 3.3 MiB"
    # The .tar is not left beside it, and nothing else was written there.
    assert set(os.listdir(received)) - before - {".peerpost-partial"} == {"sunday"}

    # Once bob has it, alice's map goes; her folder is untouched.
    lab.wait_until(lambda: sent(lab, alice, mid)["recipients"][0]["state"] == "downloaded",
                   30, "bob's receipt")
    lab.wait_until(lambda: outgoing(alice) == [], 30, "the map deleted")
    assert tree(src) == {**want, "passwords": None}
    # `status` says so: not "copy deleted" (the node's map went, never the folder).
    lab.wait_until(lambda: sent(lab, alice, mid)["retention_done"], 30, "the retention step")
    shown = " ".join(lab.cli(alice, "status", mid).stdout.replace("│", " ").split())
    assert "everyone has it; folder kept (its map deleted)" in shown, shown

    # The web inbox lists it and says what it is; no one file to save.
    base, headers = login(lab, bob)
    cookie = {"Cookie": headers["Cookie"]}
    status, _, page = request(base, "GET", "/", cookie)
    assert status == 200 and b"sunday/: 4 files, 3.3 MiB" in page
    status, _, page = request(base, "GET", f"/message/{mid}", cookie)
    assert status == 200 and b"folder of 4 files" in page
    assert b"<dt>folder name</dt><dd>sunday/</dd>" in page and b"<dt>file name" not in page
    assert re.search(rb'<p data-states="" hidden><a id="save"', page), page

    # The same name again: `sunday (1)`, the first one untouched.
    mid2 = lab.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    again = Path(lab.wait_complete(bob, mid2, 60, "the second copy")["path"])
    assert again.name == "sunday (1)" and tree(again) == want == tree(folder)


def test_two_files_sent_together(lab: LocalNetwork, tmp_path: Path) -> None:
    alice, bob = lab.nodes["alice"], lab.nodes["bob"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = tmp_path / "a" / "clip.mp4"
    two = tmp_path / "b" / "clip.mp4"  # the same name from another folder
    one.write_bytes(os.urandom(200_000))
    two.write_bytes(os.urandom(100_000))
    mid = lab.cli(alice, "send", str(one), str(two), "--to", bob.address).stdout.strip()
    got = lab.wait_complete(bob, mid, 60, "bob's two files")
    folder = Path(got["path"])
    assert folder.name == "2 files"
    assert tree(folder) == {"clip.mp4": one.read_bytes(), "clip (1).mp4": two.read_bytes()}
    assert got["title"].startswith("2 files, 293.0 KiB: clip.mp4, clip.mp4")
    # `rm --delete-file` deletes the folder, as it deletes a received file.
    res = lab.cli_json(bob, "rm", mid, "--delete-file")
    assert res["removed"][0]["deleted_file"] == str(folder) and not folder.exists()


def test_a_folder_sent_to_your_own_address_is_the_folder_itself(lab: LocalNetwork,
                                                                tmp_path: Path) -> None:
    """As a file mailed to oneself is the file sent, the folder is: the inbox points at
    it, not at the node's map (deleted once nobody needs it, so the entry opened to
    nothing before), no copy lands in received/, and neither retention (`delete`, the
    harshest, which keeps a file mailed to oneself too) nor `rm --delete-file` deletes
    any of it."""
    alice = lab.nodes["alice"]
    src = tmp_path / "photos"
    (src / "beach").mkdir(parents=True)
    (src / "a.jpg").write_bytes(os.urandom(200_000))
    (src / "notes.txt").write_text("to myself\n")
    (src / "beach" / "b.jpg").write_bytes(os.urandom(100_000))
    want = tree(src)
    received = alice.home / "received"
    before = set(os.listdir(received)) if received.is_dir() else set()
    clip = tmp_path / "clip.bin"
    clip.write_bytes(clip_data := os.urandom(50_000))
    lab.cli(alice, "prefs", "set", "retention", "delete")
    try:
        mid = lab.cli(alice, "send", str(src), "--to", alice.address).stdout.strip()
        got = lab.wait_complete(alice, mid, 60, "the folder in alice's own inbox")
        # Retention's sweep ran; the map stays while the inbox holds the message.
        lab.wait_until(lambda: sent(lab, alice, mid)["retention_done"], 30, "retention")
        assert Path(sent(lab, alice, mid)["path"]).exists()
        # A file mailed to oneself is kept too: `delete` took the inbox's file with it.
        one = lab.cli(alice, "send", str(clip), "--to", alice.address).stdout.strip()
        assert lab.wait_complete(alice, one, 60, "the file")["path"] == str(clip)
        lab.wait_until(lambda: sent(lab, alice, one)["retention_done"], 30, "retention")
        assert sent(lab, alice, one)["retention_done"] == "keep"
        assert clip.read_bytes() == clip_data
    finally:
        lab.cli(alice, "prefs", "set", "retention", "keep")
    (e,) = [e for e in lab.cli_json(alice, "inbox") if e["id"] == mid]
    assert e["path"] == str(src) == got["path"] and e["state"] == "complete"
    assert e["folder"] == {"name": "photos", "files": 3, "folders": 1, "size": 300_010}
    assert tree(Path(e["path"])) == want
    assert (set(os.listdir(received)) if received.is_dir() else set()) - before \
        - {".peerpost-partial"} == set()
    assert str(src) in lab.cli(alice, "inbox").stdout.replace("\n", "")

    res = lab.cli_json(alice, "rm", mid, "--delete-file")
    (gone,) = res["removed"]
    assert gone["deleted_file"] is None
    assert gone["kept_file"] == (f"{src} is kept: it is the folder you sent as message "
                                 f"{mid[:12]}")
    assert tree(src) == want and lab.inbox_entry(alice, mid) is None
    assert not Path(sent(lab, alice, mid)["path"]).exists()  # the map goes with it


def test_several_files_sent_to_your_own_address_land_in_received(lab: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    """Several files sent together are in no one folder: they are unpacked into
    received/ as a recipient's node unpacks them (the same names, `clip (1).mp4` for the
    second), read from the files themselves; that copy stays once the map is gone, and
    `rm --delete-file` deletes it, never the files sent."""
    alice = lab.nodes["alice"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"
    one.write_bytes(os.urandom(200_000))
    two.write_bytes(os.urandom(100_000))
    want = {"clip.mp4": one.read_bytes(), "clip (1).mp4": two.read_bytes()}
    mid = lab.cli(alice, "send", str(one), str(two), "--to", alice.address).stdout.strip()
    got = lab.wait_complete(alice, mid, 60, "the two files in alice's own inbox")
    lab.wait_until(lambda: sent(lab, alice, mid)["retention_done"], 30, "retention")
    assert Path(sent(lab, alice, mid)["path"]).exists()
    folder = Path(got["path"])
    assert folder.parent == alice.home / "received" and folder.name.startswith("2 files")
    assert tree(folder) == want

    res = lab.cli_json(alice, "rm", mid, "--delete-file")
    assert res["removed"][0]["deleted_file"] == str(folder) and not folder.exists()
    assert not list((alice.home / "received" / ".peerpost-partial").glob("*.copy"))
    assert not Path(sent(lab, alice, mid)["path"]).exists()
    assert (one.read_bytes(), two.read_bytes()) == (want["clip.mp4"], want["clip (1).mp4"])


def test_a_folder_in_received_sent_to_yourself_is_kept(lab: LocalNetwork) -> None:
    """A folder that already lies in received/ (one received earlier, say) and is sent to
    one's own address is, in the inbox, that folder: `rm --delete-file` of the self-sent
    message keeps it with the same names and bytes, as it keeps a file sent to oneself,
    after retention's pass."""
    alice = lab.nodes["alice"]
    received = alice.home / "received"
    src = received / "from bob earlier"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(150_000))
    (src / "sub" / "b.txt").write_text("kept\n")
    want = tree(src)
    mid = lab.cli(alice, "send", str(src), "--to", alice.address).stdout.strip()
    assert lab.wait_complete(alice, mid, 60, "the folder in alice's inbox")["path"] == str(src)
    lab.wait_until(lambda: sent(lab, alice, mid)["retention_done"], 30, "retention")
    assert Path(sent(lab, alice, mid)["path"]).exists()

    (gone,) = lab.cli_json(alice, "rm", mid, "--delete-file")["removed"]
    assert gone["deleted_file"] is None
    assert gone["kept_file"] == (f"{src} is kept: it is the folder you sent as message "
                                 f"{mid[:12]}")
    assert tree(src) == want and lab.inbox_entry(alice, mid) is None
    assert not Path(sent(lab, alice, mid)["path"]).exists()


def test_a_folder_sent_to_your_own_address_reaches_your_other_device(tmp_path: Path) -> None:
    """Alice's laptop sends a folder to her own address while her phone is off: the
    laptop's own download counts as the address's, yet retention waits for the phone,
    which gets the same tree from the laptop's map, which has it alone; `rm` on the
    laptop then releases the map (the folder stays)."""
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        (laptop,) = net.start_nodes("alice")
        phone = second_device(net, "phone", laptop.address, vouch_from=laptop)
        net.stop_node(phone)
        src = tmp_path / "trip"
        (src / "day 2").mkdir(parents=True)
        (src / "a.jpg").write_bytes(os.urandom(300_000))
        (src / "day 2" / "b.jpg").write_bytes(os.urandom(100_000))
        want = tree(src)
        mid = net.cli(laptop, "send", str(src), "--to", laptop.address).stdout.strip()
        assert net.wait_complete(laptop, mid, 60, "the laptop's own copy")["path"] == str(src)
        net.wait_until(lambda: sent(net, laptop, mid)["recipients"][0]["state"] ==
                       "downloaded", 30, "the laptop's own receipt")
        assert sent(net, laptop, mid)["retention_done"] is None  # the phone may come

        net.start_node(phone)
        got = net.wait_complete(phone, mid, 60, "the folder on alice's phone")
        assert tree(Path(got["path"])) == want
        net.wait_until(lambda: sent(net, laptop, mid)["retention_done"], 30, "retention")

        net.cli(laptop, "rm", mid)
        assert not Path(sent(net, laptop, mid)["path"]).exists() and tree(src) == want


def test_a_withdrawn_folder_send_deletes_the_map_not_the_files(lab: LocalNetwork,
                                                              tmp_path: Path) -> None:
    alice, carol = lab.nodes["alice"], lab.nodes["carol"]
    src = tmp_path / "for carol"
    src.mkdir()
    data = os.urandom(50_000)
    (src / "x.bin").write_bytes(data)
    mid = lab.cli(alice, "send", str(src), "--to", carol.address).stdout.strip()
    assert outgoing(alice) == ["for carol.map"]  # carol is away: it waits for her
    lab.cli(alice, "cancel", mid)
    assert outgoing(alice) == []
    assert os.listdir(src) == ["x.bin"] and (src / "x.bin").read_bytes() == data
    res = lab.cli(alice, "resend", mid, check=False)
    assert res.returncode == 1 and "send the folder again" in res.stderr, res.stderr


def test_a_folder_its_only_recipient_declines_releases_the_map_not_the_files(
        lab: LocalNetwork, tmp_path: Path) -> None:
    """Bob removes the folder message unread: alice's node is told, deletes its map and
    stops serving, and her folder stays as it was (nobody has another copy). The map
    stayed until `cancel` before."""
    alice, bob = lab.nodes["alice"], lab.nodes["bob"]
    src = tmp_path / "monday"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "a.bin").write_bytes(os.urandom(200_000))
    (src / "b.txt").write_text("monday\n")
    want = tree(src)
    lab.cli(bob, "prefs", "set", "auto-download", "off")
    try:
        mid = lab.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
        assert outgoing(alice) == ["monday.map"]
        lab.wait_until(lambda: lab.inbox_entry(bob, mid), 30, "the message at bob's")
        lab.cli(bob, "rm", mid)
    finally:
        lab.cli(bob, "prefs", "set", "auto-download", "on")
    lab.wait_until(lambda: outgoing(alice) == [], 30, "the map released")
    (r,) = sent(lab, alice, mid)["recipients"]
    assert (r["state"], r["reason"]) == ("declined", "removed by the recipient")
    assert tree(src) == want
    lab.wait_until(lambda: sent(lab, alice, mid)["retention_done"], 30, "the retention step")
    shown = " ".join(lab.cli(alice, "status", mid).stdout.replace("│", " ").split())
    assert "nobody will download it; your folder is kept (its map deleted)" in shown, shown
    base, headers = login(lab, alice)
    status, _, page = request(base, "GET", "/sent", {"Cookie": headers["Cookie"]})
    assert status == 200 and b"will not download it (removed by the recipient)" in page


def test_a_hostile_archive_is_refused_member_by_member(lab: LocalNetwork,
                                                       tmp_path: Path) -> None:
    alice, bob = lab.nodes["alice"], lab.nodes["bob"]
    # Crafted with tarfile and put where alice's node keeps its archives, then sent
    # through the real send path as a folder archive.
    archive = alice.home / "store" / OUTGOING_DIR / "evil.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("evil/fine.txt", b"fine"), ("evil/../x", b"escaped"),
                           ("/tmp/abs-from-evil", b"absolute")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil/etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    size = archive.stat().st_size
    received = bob.home / "received"
    before = set(os.listdir(received)) if received.is_dir() else set()
    res = control_call(alice.home / "control.sock", "send", path=str(archive),
                       to=[bob.address], title="evil", note="",
                       folder={"name": "evil", "files": 3, "folders": 0, "size": 20})
    mid = res["id"]

    def failed() -> dict[str, Any] | None:
        e = lab.inbox_entry(bob, mid)
        return e if e and e["state"] == "failed" else None
    e = lab.wait_until(failed, 60, "the refusal")
    error = e["error"]
    for said in ("'evil/../x': '..' in its name (it would leave the folder)",
                 "'/tmp/abs-from-evil': an absolute name",
                 "'evil/etc': 'evil/etc' is a link to an absolute path"):
        assert said in error, error
    assert "'evil/fine.txt'" not in error
    kept = received / "evil.tar"
    assert f"the archive is kept at {kept}" in error
    assert kept.stat().st_size == size  # nothing lost
    assert set(os.listdir(received)) == before | {".peerpost-partial", "evil.tar"}
    assert os.listdir(received / ".peerpost-partial") == []
    assert not (bob.home / "x").exists() and not (received / "x").exists()
    assert not Path("/tmp/abs-from-evil").exists()
    # Alice is told why, without bob's paths, and her archive goes: nobody will fetch it.
    lab.wait_until(lambda: sent(lab, alice, mid)["recipients"][0]["state"] == "declined",
                   30, "bob's decline")
    reason = sent(lab, alice, mid)["recipients"][0]["reason"]
    assert reason.startswith("refused: ") and "'evil/../x': '..' in its name" in reason, reason
    assert str(bob.home) not in reason
    lab.wait_until(lambda: "evil.tar" not in outgoing(alice), 30, "alice's archive released")


@pytest.mark.parametrize(("field", "said"), [
    ({"name": "monday"}, "its name 'monday' is not the archive's top folder 'sunday'"),
    ({"name": "a/b"}, "not a plain file name"),
    ({"size": 1 << 40}, "more than the archive holds"),
    ({"files": 60_000, "folders": 40_000}, "more than 100,000 files and folders"),
])
def test_the_send_op_refuses_a_folder_field_every_recipient_would(
        lab: LocalNetwork, tmp_path: Path, field: dict[str, Any], said: str) -> None:
    # A client other than our CLI: a real map, a folder field that does not describe it.
    alice, bob = lab.nodes["alice"], lab.nodes["bob"]
    src = tmp_path / "sunday"
    src.mkdir()
    (src / "a.jpg").write_bytes(os.urandom(1000))
    plan = plan_pack([src])
    path, info = write_map(plan, alice.home / "store")
    sent_before = len(lab.cli_json(alice, "status"))
    fields = {"name": info.name, "files": info.files, "folders": info.folders,
              "size": info.size} | field
    with pytest.raises(ControlError) as err:
        control_call(alice.home / "control.sock", "send", path=str(path),
                     to=[bob.address], title="t", note="", folder=fields)
    text = str(err.value)
    assert "the folder field is refused: " in text and said in text, text
    assert "nothing was sent" in text
    assert len(lab.cli_json(alice, "status")) == sent_before
    path.unlink()


def test_a_folder_bigger_than_the_free_space_is_sent_and_no_room_for_its_map_leaves_nothing(
        lab: LocalNetwork, tmp_path: Path) -> None:
    bob = lab.nodes["bob"]
    with _tmpfs(lab.root / "dave", "8m") as home_disk:
        dave = lab.add_node("dave")
        lab.start_node(dave)
        try:
            src = tmp_path / "too big"
            src.mkdir()
            for i in range(3):
                (src / f"{i}.bin").write_bytes(os.urandom(4 * MiB))
            want = tree(src)
            # 12 MiB from a home with less than 8 MiB free: nothing big is written there.
            mid = lab.cli(dave, "send", str(src), "--to", bob.address).stdout.strip()
            assert not [n for n in outgoing(dave) if not n.endswith(".map")]
            got = lab.wait_complete(bob, mid, 60, "bob's 12 MiB folder")
            assert tree(Path(got["path"])) == want

            # No room even for the map: it says so, and nothing is left or sent.
            fill(home_disk / "filler")
            sends = len(lab.cli_json(dave, "status"))
            res = lab.cli(dave, "send", str(src), "--to", bob.address, check=False)
            assert res.returncode == 1
            text = " ".join(res.stderr.split())
            assert f"not enough free space in {dave.home / 'store' / OUTGOING_DIR}" in text
            assert "for the map of too big: " in text and " free" in text, text
            (home_disk / "filler").unlink()
            assert "too big (1).map" not in outgoing(dave)
            assert not [n for n in outgoing(dave) if n.endswith(".tmp")]
            assert len(lab.cli_json(dave, "status")) == sends
            assert tree(src) == want
        finally:
            lab.stop_node(dave)


def test_a_file_edited_after_sending_stops_the_serving(lab: LocalNetwork,
                                                       tmp_path: Path) -> None:
    alice, bob, carol = lab.nodes["alice"], lab.nodes["bob"], lab.nodes["carol"]
    src = tmp_path / "edited"
    src.mkdir()
    (src / "a.jpg").write_bytes(os.urandom(200_000))
    (src / "b.jpg").write_bytes(os.urandom(100_000))
    lab.stop_node(bob)  # it fetches once the file was edited
    try:
        # Carol is away: the message still waits for her after bob's node declines it.
        mid = lab.cli(alice, "send", str(src), "--to",
                      f"{bob.address},{carol.address}").stdout.strip()
        edited = bytearray((src / "b.jpg").read_bytes())
        edited[5] ^= 1
        (src / "b.jpg").write_bytes(bytes(edited))
    finally:
        lab.start_node(bob)
    assert alice.proc is not None
    lab.wait_until(lambda: f"{src / 'b.jpg'} changed since it was sent" in alice.proc.log(),
                   60, "alice's log line")
    assert "no chunk of the folder is served any more" in alice.proc.log()
    e = lab.wait_until(lambda: (e := lab.inbox_entry(bob, mid)) and e["state"] == "failed"
                       and e, 60, "bob told it can't be had")
    assert e["error"].startswith("source changed: the sender's file was edited"), e
    assert not (bob.home / "received" / "edited").exists()
    assert (src / "b.jpg").read_bytes() == edited  # the user's edit is theirs to keep
    # Bob's node tells alice's it will never have it, and why.
    lab.wait_until(lambda: sent(lab, alice, mid)["recipients"][0]["state"] == "declined",
                   30, "bob's decline")
    assert sent(lab, alice, mid)["recipients"][0]["reason"] == "source changed"
    res = lab.cli(alice, "resend", mid, check=False)
    text = " ".join(res.stderr.split())
    assert res.returncode == 1 and "b.jpg changed since it was sent; send the folder again " \
        "with `peerpost send`; nothing was sent" in text, text
    assert "edited.map" in outgoing(alice)  # still named by the message: cancel deletes it
    # `status` gives the way that works for a folder, not `resend`.
    shown = " ".join(lab.cli(alice, "status", mid).stdout.replace("│", " ").split())
    assert "a file of the folder changed after sending: send the folder again with " \
        "`peerpost send`" in shown and "resend" not in shown, shown
