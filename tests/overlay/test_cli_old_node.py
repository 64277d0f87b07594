"""A peerpost upgraded while `peerpost node` runs on: the new CLI talks to the old node.

Whatever the old node lacks (a field of an answer, an operation, an argument), each
command says that the node is older than this peerpost, with both versions, and to restart
it: exit status 1 as for other refusals of the node, and never a traceback. First through
a control socket answering as an old node did (the CLI layer, in this process), then
against a real node of an older commit (a tree of it on PYTHONPATH, as
`benchmarks transfer --baseline` runs one).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from crypto.codec import Fields
from overlay.app import cli
from overlay.app.control import ControlError, ControlServer
from overlay.app.lab import LocalNetwork
from rendezvous.cliutil import package_version

ALICE, BOB = "alice@example.net", "bob@example.net"
MID = "5e" * 16
RESTART = "restart it (stop `peerpost node` and start it again)"

# `ping` as nodes answered it before e6a044f (12-05): no inbox, refused, mismatch, reach,
# nor the version, which came with this test.
OLD_PING = {"address": ALICE, "peer_id": "00" * 16, "fingerprint": "ab cd ef",
            "listen": ["127.0.0.1", 4000], "connected": True, "counters": {"receipts": 1}}
ENTRY = {"id": MID, "from": BOB, "title": "clip", "note": "", "size": 4096,
         "file_name": "clip.bin", "media_type": "application/octet-stream",
         "state": "downloading", "progress": 0.5, "path": None, "junk": False,
         "priority": False, "received_at": 1.0, "next_attempt": None, "attempts": 1,
         "error": None, "started_at": 2.0, "first_byte_at": 3.0, "completed_at": None,
         "sources": []}
SENT: dict[str, Any] = {"id": MID, "title": "clip", "size": 4096, "path": "/tmp/clip.bin",
        "content_id": "00" * 32, "created_at": 1.0, "chunk_count": 1, "chunks_served": 0,
        "max_in_flight": 4, "retention_done": None,
        "recipients": [{"address": BOB, "state": "sent", "updated_at": 1.0, "reason": None,
                        "shown": "sent"}]}
# `contacts` as before 7677177 and a218c25 (12-06): no keys, alerts, keys_confirmed_at.
OLD_CONTACT = {"address": BOB, "fingerprints": ["ab cd"], "first_seen": 1.0,
               "changed": False, "pending": [], "unvouched": [], "retired": []}


def without(d: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


@contextlib.contextmanager
def old_node(home: Path, answers: dict[str, Any]) -> Iterator[None]:
    """A control socket in `home` with only the operations of `answers`, each answering
    its value (or raising it, a ControlError: the node's refusal), as a node started
    before the upgrade would."""
    def op(answer: Any) -> Any:
        async def handler(a: Fields) -> Any:
            if isinstance(answer, Exception):
                raise answer
            return answer
        return handler

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ControlServer(home / "control.sock", {k: op(v) for k, v in answers.items()})
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home the CLI takes as set up (it reads neither file: the node answers)."""
    h = tmp_path / "home"
    h.mkdir()
    (h / "identity.json").write_text("{}")
    (h / "config.json").write_text("{}")
    return h


def run_cli(monkeypatch: pytest.MonkeyPatch, home: Path, *argv: str) -> tuple[int, str, str]:
    """`peerpost --home HOME ARGV` in this process: exit status, stdout, stderr. A
    traceback (KeyError) would escape main() and fail the test."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=400))
    monkeypatch.setattr(cli, "err_console", Console(file=err, width=400, soft_wrap=True))
    with contextlib.redirect_stdout(out):
        rc = cli.main(["--home", str(home), *argv])
    return rc, out.getvalue(), err.getvalue()


def older(why: str, node: str = "the node does not say its version") -> str:
    return (f"the running node is older than this peerpost ({package_version()}; {node}): "
            f"{RESTART}; {why}")


# Each command, the old node it meets, and what that node lacks. Where no released node
# lacked a field a command reads, the field is left out anyway: it stands for one a later
# peerpost adds.
CASES: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "contacts": (["contacts"], {"ping": OLD_PING, "contacts": [OLD_CONTACT]},
                 "it answered `contacts` without `keys`"),
    "contacts accept": (["contacts", "accept", BOB],
                        {"ping": OLD_PING, "contacts_accept": [], "contacts": [OLD_CONTACT]},
                        "it answered `contacts` without `keys`"),
    # Before 650933a (12-05) a sender could not withdraw nor resend.
    "cancel": (["cancel", MID], {"ping": OLD_PING, "status": [SENT]},
               "it does not know the operation `withdraw`"),
    "resend": (["resend", MID], {"ping": OLD_PING, "status": [SENT]},
               "it does not know the operation `resend`"),
    # Before e6a044f (12-05): no rm, no prune, no auto-download-max.
    "rm": (["rm", MID, "--delete-file"], {"ping": OLD_PING, "inbox": [ENTRY]},
           "it does not know the operation `rm`"),
    "inbox --prune": (["inbox", "--prune", "--days", "0"], {"ping": OLD_PING, "inbox": []},
                      "it does not know the operation `prune`"),
    "prefs set": (["prefs", "set", "auto-download-max", "1GB"],
                  {"ping": OLD_PING,
                   "prefs_set": ControlError("unknown preference 'auto-download-max'"),
                   "prefs": {"auto_download": True}},
                  "it does not know the preference auto-download-max"),
    "inbox": (["inbox"], {"ping": OLD_PING, "inbox": [without(ENTRY, "sources")]},
              "it answered `inbox` without `sources`"),
    "info": (["info"], {"ping": without(OLD_PING, "counters")},
             "it answered `ping` without `counters`"),
    "status": (["status"], {"ping": OLD_PING, "status": [without(SENT, "recipients")]},
               "it answered `status` without `recipients`"),
    "fetch --wait": (["fetch", "--wait", MID],
                     {"ping": OLD_PING, "fetch": ENTRY, "progress": without(ENTRY, "progress")},
                     "it answered `progress` without `progress`"),
    "prefs": (["prefs"], {"ping": OLD_PING}, "it does not know the operation `prefs`"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_command_says_restart_the_older_node(
        case: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv, answers, why = CASES[case]
    with old_node(home, answers):
        rc, out, err = run_cli(monkeypatch, home, *argv)
        assert (rc, err.strip()) == (cli.EXIT_ERROR, f"error: {older(why)}")
        rc, out, err = run_cli(monkeypatch, home, *argv, "--json")
    if rc == 0:  # a listing's --json prints what the node sent, as it sent it
        assert "without" in why and json.loads(out)
    else:
        assert rc == cli.EXIT_ERROR
        assert json.loads(out.splitlines()[-1]) == {"error": older(why), "code": rc}


def test_send_wait_reads_a_nested_field_the_node_lacks(
        home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`send --wait` watches `status`: a recipient's map without a field is named too."""
    src = tmp_path / "clip.bin"
    src.write_bytes(b"x" * 4096)
    sent = {**SENT, "recipients": [without(SENT["recipients"][0], "address")]}
    with old_node(home, {"ping": OLD_PING, "send": {"id": MID}, "status": [sent]}):
        rc, out, err = run_cli(monkeypatch, home, "send", str(src), "--to", BOB, "--wait")
    assert out == f"{MID}\n"  # sent: the id is there to watch it again after the restart
    assert err.strip() == f"error: {older('it answered `status` without `address`')}"
    assert rc == cli.EXIT_ERROR


def test_a_folder_goes_only_to_a_node_that_says_its_version(
        home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A node from before folders ignores `folder` and would send the map as a file; one
    of the first folder sends took a tar: nothing is mapped, nothing sent."""
    (tmp_path / "sunday").mkdir()
    (tmp_path / "sunday" / "a.jpg").write_bytes(b"a" * 100)
    with old_node(home, {"ping": OLD_PING, "send": {"id": MID}, "status": []}):
        rc, _, err = run_cli(monkeypatch, home, "send", str(tmp_path / "sunday"), "--to", BOB)
    why = "it does not say its version, and this peerpost sends a folder only to a node that does"
    assert (rc, err.strip()) == (cli.EXIT_ERROR, f"error: {older(why)}")
    assert not (home / "store").exists()


def test_both_versions_are_named_when_the_node_says_its_own(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ping = {**OLD_PING, "version": "0.0.9"}
    with old_node(home, {"ping": ping, "contacts": [OLD_CONTACT]}):
        rc, _, err = run_cli(monkeypatch, home, "contacts")
    assert rc == cli.EXIT_ERROR
    assert err.strip() == "error: " + older("it answered `contacts` without `keys`",
                                            "the node runs 0.0.9")


def test_info_says_a_node_without_a_version_is_older(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing `info` reads is missing from an old node's ping: the table is drawn, and
    its version row says to restart the node."""
    with old_node(home, {"ping": OLD_PING}):
        rc, out, err = run_cli(monkeypatch, home, "info")
    assert (rc, err) == (0, "")
    assert (f"not said: the node is older than this peerpost ({package_version()}); "
            f"{RESTART}") in out
    assert "ab cd ef" in out


# The commit before 650933a (12-05 02:58): its node has no withdraw and no resend, and
# answers contacts without keys and alerts; the oldest node this tree's lab still starts.
OLD_COMMIT = "34bb814cb180e6cf6db3226a7c43d5295bd34f0d"


def old_tree(dest: Path) -> Path:
    """The source of OLD_COMMIT in `dest`, from this checkout's history."""
    repo = Path(__file__).resolve().parents[2]
    try:
        data = subprocess.run(["git", "-C", str(repo), "archive", OLD_COMMIT],
                              capture_output=True, check=True, timeout=120).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no history of {OLD_COMMIT[:7]} here (not a git checkout, or shallow)")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python before 3.11.4 (Debian 12's is 3.11.2) has no filters: our own history
            tar.extractall(dest)
    return dest


@pytest.mark.slow
def test_this_cli_against_a_real_node_of_an_older_commit(tmp_path: Path) -> None:
    old = old_tree(tmp_path / "old")
    with LocalNetwork(tmp_path / "lab") as net:
        ours = dict(net.env)
        net.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(old), os.environ.get("PYTHONPATH")) if p)
        net.start_server()  # the server, `init` and the nodes are the old commit's
        alice, bob = net.add_node("alice"), net.add_node("bob")
        net.start_node(alice)
        net.start_node(bob)
        net.env = ours  # from here every `peerpost` command is this tree's

        def peerpost(node: Any, *args: str, rc: int = 0) -> str:
            res = net.cli(node, *args, check=False)
            assert "Traceback" not in res.stderr + res.stdout, (args, res.stderr)
            assert res.returncode == rc, (args, res.stdout, res.stderr)
            return res.stdout + res.stderr

        src = tmp_path / "clip.bin"
        src.write_bytes(os.urandom(300_000))
        mid = peerpost(alice, "send", str(src), "--to", bob.address, "--wait").split()[0]
        assert "every recipient has clip.bin" in peerpost(alice, "send", str(src), "--to",
                                                          bob.address, "--wait")
        assert f"complete: {bob.home}" in peerpost(bob, "fetch", "--wait", mid)
        assert mid[:8] in peerpost(bob, "inbox")
        assert mid[:8] in peerpost(alice, "status")
        assert "not said: the node is older than this peerpost" in peerpost(alice, "info")
        assert "auto-download" in peerpost(alice, "prefs")
        assert peerpost(alice, "devices", "key").strip()
        assert f"removed {mid[:12]}" in peerpost(bob, "rm", mid)
        assert "removed" in peerpost(bob, "inbox", "--prune", "--days", "0")

        for args, why in (
                (("cancel", mid), "it does not know the operation `withdraw`"),
                (("resend", mid), "it does not know the operation `resend`"),
                (("contacts",), "it answered `contacts` without `keys`")):
            said = peerpost(alice, *args, rc=cli.EXIT_ERROR)
            assert older(why) in " ".join(said.split()), args

        folder = tmp_path / "sunday"
        folder.mkdir()
        (folder / "a.jpg").write_bytes(os.urandom(1000))
        sent_before = net.cli_json(alice, "status")
        said = peerpost(alice, "send", str(folder), "--to", bob.address, rc=cli.EXIT_ERROR)
        assert "sends a folder only to a node that does" in " ".join(said.split())
        assert net.cli_json(alice, "status") == sent_before  # nothing sent
        assert not list((alice.home / "store").rglob("*.map"))
