"""End to end: what a family member runs into on day one with a real server and real
`peerpost node` processes: a second daemon for the same home, --home after the command,
preferences that apply at once, a file changed after sending, cancel and resend, and the
new-message hook."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, _script
from tests.overlay.test_e2e_cli import make_file, same_bytes

pytestmark = pytest.mark.slow

MiB = 1 << 20


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
        assert res.returncode != 0
        return res.stderr.replace("\n", "")
    assert "xdg/peerpost" in where()
    (tmp_path / "h" / ".peerpost").mkdir()
    assert "h/.peerpost" in where()


def test_upload_cap_applies_at_once_and_prefs_show_set_names(net: LocalNetwork,
                                                             tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    shown = net.cli(alice, "prefs", "set", "max-upload-rate", "1MiB/s").stdout
    for name in ("auto-download", "auto-download-max", "retention", "archive-dir",
                 "max-upload-rate"):
        assert name in shown
    assert "1.0 MiB/s" in shown
    assert net.cli_json(alice, "prefs")["max_upload_rate"] == MiB
    bad = net.cli(alice, "prefs", "set", "max-upload-rate", "fast", check=False)
    assert bad.returncode == 1 and "not a rate" in bad.stderr

    src = make_file(tmp_path / "capped.bin", 4 * MiB, seed=21)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob, mid, 60, "bob's capped download")
    assert same_bytes(src, Path(got["path"]))
    # 4 MiB under a 1 MiB/s cap set while the node ran (a 100 KiB burst): over 3 s.
    assert got["completed_at"] - got["started_at"] >= 3.0
    # 0 lifts the cap, as `none` does (the README and the help say both), and shows so.
    shown = net.cli(alice, "prefs", "set", "max-upload-rate", "0").stdout
    row = next(line for line in shown.splitlines() if "max-upload-rate" in line)
    assert row.split("│")[2].strip() == "none", shown
    assert net.cli_json(alice, "prefs")["max_upload_rate"] is None


RECORDER = """\
import json, os, sys
keys = ("PEERPOST_ID", "PEERPOST_FROM", "PEERPOST_TITLE", "PEERPOST_STATE", "PEERPOST_PATH",
        "PEERPOST_EVENT")
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}) + "\\n")
"""


def test_on_message_runs_the_command_with_fields_in_the_environment(
        net: LocalNetwork, tmp_path: Path) -> None:
    import json
    import shlex
    import sys

    script = tmp_path / "record hook.py"  # a space: split once, never by a shell
    script.write_text(RECORDER)
    out = tmp_path / "events.jsonl"
    cmd = shlex.join([sys.executable, str(script), str(out)])
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--on-message", cmd])
    net.start_node(alice)
    net.start_node(bob)
    src = make_file(tmp_path / "hooked.bin", MiB, seed=31)
    title = "Tom's $(touch pwned) `x` ; party"
    mid = net.cli(alice, "send", str(src), "--to", bob.address,
                  "--title", title).stdout.strip()
    got = net.wait_complete(bob, mid, 60, "bob's download")

    def events() -> list[dict[str, str]]:
        if not out.exists():
            return []
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return rows if {r["PEERPOST_EVENT"] for r in rows} == {"arrived", "complete"} else []
    rows = net.wait_until(events, 30, "both hook runs")
    assert len(rows) == 2
    for r in rows:
        assert r["argv"] == [str(out)]
        assert r["PEERPOST_ID"] == mid and r["PEERPOST_FROM"] == alice.address
        assert r["PEERPOST_TITLE"] == title
    done = next(r for r in rows if r["PEERPOST_EVENT"] == "complete")
    assert done["PEERPOST_STATE"] == "complete" and done["PEERPOST_PATH"] == got["path"]
    arrived = next(r for r in rows if r["PEERPOST_EVENT"] == "arrived")
    assert arrived["PEERPOST_PATH"] == ""
    assert arrived["PEERPOST_STATE"] == "offered"  # told before the download started
    assert not (net.root / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_a_file_edited_after_sending_fails_clearly_and_resend_delivers(
        net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    src = make_file(tmp_path / "edited.bin", 2 * MiB, seed=41)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    make_file(src, 2 * MiB + 5, seed=42)  # edited before bob fetched anything

    def sent(m_id: str) -> Any:
        (m,) = [m for m in net.cli_json(alice, "status") if m["id"] == m_id]
        return m
    m = sent(mid)
    assert m["source_changed"] and m["recipients"][0]["shown"] == "source changed"
    assert "resend" in net.cli(alice, "status").stdout  # the table says what to do

    net.start_node(bob)
    e = net.wait_until(lambda: (x := net.inbox_entry(bob, mid)) and x["state"] == "failed"
                       and x, 60, "bob's download to fail")
    assert e["error"].startswith("source changed")
    assert "alice" not in e["error"] and str(src) not in e["error"]  # no sender path leaked

    # Bob, its only recipient, declined it: alice stops serving it. Bob's Try again says
    # at once that she may have, and ends when nobody serves it: it waited at `no source
    # reachable` for ever.
    assert bob.proc is not None
    net.wait_until(lambda: f"told {alice.address} that message {mid}" in bob.proc.log(), 30,
                   "bob's decline to go")
    net.wait_until(lambda: sent(mid)["retention_done"] is not None, 30, "alice's retention")
    res = net.cli(bob, "fetch", mid[:10], "--wait", check=False, timeout=90)
    told = f"{alice.address} was told you would not download it (source changed)"
    assert told in " ".join(res.stdout.split()), res.stdout
    err = " ".join(res.stderr.split())
    assert res.returncode == 1 and f"failed: no source has it: {told}" in err, err
    # Removing it says what alice heard, and when: not 'is told' as though it were news.
    said = " ".join(net.cli(bob, "rm", mid[:10]).stdout.split())
    assert f"{alice.address} was already told you will not download it (source " \
        "changed)" in said, said

    new = net.cli(alice, "resend", mid[:10]).stdout.strip()
    assert len(new) == 32 and new != mid
    got = net.wait_complete(bob, new, 60, "the resent message")
    assert same_bytes(src, Path(got["path"]))


def test_sender_cancel_withdraws_and_receiver_rm_stays(net: LocalNetwork,
                                                      tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    src = make_file(tmp_path / "oops.bin", MiB, seed=51)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    out = net.cli(alice, "cancel", mid[:12]).stdout
    assert "withdrew" in out and bob.address in out
    (m,) = net.cli_json(alice, "status")
    assert m["recipients"][0]["shown"] == "cancelled"
    assert src.exists()  # the user's file is never touched

    assert "1 queued copy taken back from the server" in out  # bob was offline

    # A later message reaches bob; the withdrawn one never does.
    good = make_file(tmp_path / "good.bin", MiB, seed=52)
    later = net.cli(alice, "send", str(good), "--to", bob.address).stdout.strip()
    net.start_node(bob)
    net.wait_until(lambda: (x := net.inbox_entry(bob, later)) and x["state"] == "complete",
                   60, "bob's later message")
    assert net.inbox_entry(bob, mid) is None
    # The receiver removes a message with `rm`.
    assert "removed" in net.cli(bob, "rm", later[:12]).stdout
    assert net.inbox_entry(bob, later) is None
