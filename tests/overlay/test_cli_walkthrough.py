"""What a newcomer following the README trips on: the messages of the usual mistakes and
the tables they read, with a real server and real nodes on loopback."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.app import cli
from overlay.app.config import NodeConfig
from overlay.app.control_wire import ControlError
from overlay.app.control_wire import call as control_call
from overlay.app.home import NodeHome
from overlay.app.lab import LocalNetwork, NodeHandle, _script
from tests.present import present

MiB = 1 << 20
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
    from overlay.mail.prefs import SETTABLE  # `prefs --help` named none of them

    assert all(f" {key} " in helptext("prefs") for key in SETTABLE), helptext("prefs")


def test_the_sims_help_examples_set_keys_that_exist() -> None:
    help_text = subprocess.run([_script("peerpost-sim"), "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    sets = re.findall(r"--set (\S+=\S+)", help_text)
    assert sets, help_text
    res = subprocess.run([_script("peerpost-sim"), "validate", "dht-lookup",
                          *(f for kv in sets for f in ("--set", kv))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def read_terminal(master: int, proc: subprocess.Popen[Any], deadline: float,
                  until: bytes | None = None) -> bytes:
    """What a program wrote to its terminal, read from the pty's `master` side until
    `until` shows (None: until the program ends), the terminal closes, or `deadline`."""
    seen = b""
    while time.monotonic() < deadline:
        done = proc.poll() is not None if until is None else until in seen
        if done:
            break
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                seen += os.read(master, 4096)
            except OSError:  # the terminal's other side has closed
                break
    return seen


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path_factory.mktemp("walk") / "lab") as n:
        n.start_server()
        for name in ("alice", "bob"):
            n.start_node(n.add_node(name))
        n.add_node("carol")  # set up, never started
        yield n


@pytest.mark.slow
def test_init_prints_no_log_lines(net: LocalNetwork) -> None:
    dave = NodeHandle("dave", f"dave@{net.domain}", net.root / "dave")
    res = run(net, dave, "init", "--address", dave.address, "--server", net.server_hostport,
              "--listen", "127.0.0.1:0")
    assert res.returncode == 0, res.stderr
    assert f"registered {dave.address}" in res.stdout
    assert res.stderr == ""  # was: ts=... level=info ... event=client.connected ...


@pytest.mark.slow
def test_init_prints_the_command_to_start_the_node_on_one_line(net: LocalNetwork) -> None:
    # Folded at 80 columns, the command broke in two where it was to be copied from.
    frank = NodeHandle("frank", f"frank@{net.domain}", net.root / ("frank-" + "f" * 40))
    res = run(net, frank, "init", "--address", frank.address, "--server",
              net.server_hostport, "--listen", "127.0.0.1:0", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"home: {frank.home}; start the node with `peerpost --home {frank.home} node`" in (
        lines), res.stdout
    assert any(line.startswith("server key: SHA256:") and line.endswith(
        "(pinned on first use; compare it with what the server's operator publishes)")
        for line in lines), res.stdout


@pytest.mark.slow
def test_init_into_a_file_is_refused_before_the_address_is_taken(net: LocalNetwork) -> None:
    # It registered first and then failed to make the folder, with a traceback: the address
    # was bound to a key never saved (and an invite, had there been one, used up).
    gina = NodeHandle("gina", f"gina@{net.domain}", net.root / "gina-file")
    gina.home.write_text("notes\n")
    for home, why in ((gina.home, f"--home {gina.home} is a file, not a folder: choose "
                                  "another --home"),
                      (gina.home / "sub", f"--home {gina.home / 'sub'} can't be made: "
                                          f"{gina.home} is a file")):
        res = run(net, NodeHandle("gina", gina.address, home), "init", "--address",
                  gina.address, "--server", net.server_hostport, "--listen", "127.0.0.1:0")
        assert (res.returncode, res.stderr) == (1, f"error: {why}\n")
        res = run(net, NodeHandle("gina", gina.address, home), "devices", "key")
        assert (res.returncode, res.stderr) == (1, f"error: {why}\n")
    res = run(net, NodeHandle("gina", gina.address, net.root / "gina"), "init", "--address",
              gina.address, "--server", net.server_hostport, "--listen", "127.0.0.1:0",
              "--download-dir", str(gina.home))
    # Every download into it failed: "cannot store the file: [Errno 17] File exists: ...".
    assert (res.returncode, res.stderr) == (
        1, f"error: --download-dir {gina.home} is a file, not a folder\n")
    res = run(net, NodeHandle("gina", gina.address, net.root / "gina"), "init", "--address",
              gina.address, "--server", net.server_hostport, "--listen", "127.0.0.1:0")
    assert res.returncode == 0, res.stderr  # the address is still free


@pytest.mark.slow
def test_init_download_dir_is_the_shells_folder(net: LocalNetwork, tmp_path: Path) -> None:
    erin = NodeHandle("erin", f"erin@{net.domain}", net.root / "erin")
    res = subprocess.run([_script("peerpost"), "--home", str(erin.home), "init", "--address",
                          erin.address, "--server", net.server_hostport, "--listen",
                          "127.0.0.1:0", "--download-dir", "dl"], capture_output=True,
                         text=True, env=net.env, timeout=60, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    # Was "dl": the node, started from another folder, put received files there.
    config = json.loads((erin.home / "config.json").read_text())
    assert config["download_dir"] == str(tmp_path / "dl")


@pytest.mark.slow
def test_sending_what_is_not_a_file_says_what_it_is(net: LocalNetwork,
                                                    tmp_path: Path) -> None:
    # (A folder is sent as one archive: test_e2e_folders.py.)
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    res = run(net, alice, "send", str(tmp_path / "gone.bin"), "--to", bob.address)
    assert f"no such file: {tmp_path / 'gone.bin'}" in res.stderr
    os.mkfifo(tmp_path / "pipe")
    for odd in ("/dev/zero", str(tmp_path / "pipe")):  # it said "no such file" for these
        res = run(net, alice, "send", odd, "--to", bob.address)
        assert res.returncode == 1
        assert f"{odd} is not a regular file (a device, a pipe or a socket)" in res.stderr
    # One of several paths that is none of these is named before anything is packed.
    res = run(net, alice, "send", str(tmp_path / "pipe"), "/etc/hostname", "--to",
              bob.address)
    assert res.returncode == 1 and f"{tmp_path / 'pipe'} is not a regular file" in res.stderr


@pytest.mark.slow
def test_a_misspelt_preference_names_the_right_one(net: LocalNetwork) -> None:
    bob = net.nodes["bob"]
    res = run(net, bob, "prefs", "set", "auto-downlod", "off")
    assert res.returncode == 2
    assert "unknown preference 'auto-downlod': did you mean auto-download?" in res.stderr
    assert "auto-download-max" in res.stderr and "max-upload-rate" in res.stderr
    assert net.cli_json(bob, "prefs")["auto_download"] is True  # nothing changed
    # Every name the CLI lets through is one the node knows (and shows).
    from overlay.mail.prefs import SETTABLE

    shown = {k.replace("_", "-") for k in net.cli_json(bob, "prefs")}
    assert set(SETTABLE) <= shown
    # A client other than the CLI (the web inbox) gets the same answer from the node.
    with pytest.raises(ControlError, match=r"did you mean retention\?"):
        control_call(bob.home / "control.sock", "prefs_set", key="retenton", value="keep")
    res = run(net, bob, "prefs", "set", "auto_download", "on")  # `prefs --json`'s spelling
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_prefs_show_sizes_in_the_unit_they_were_given_in(net: LocalNetwork) -> None:
    bob = net.nodes["bob"]
    try:
        for key, value, shown in (("auto-download-max", "2GB", "2.0 GB"),
                                  ("auto-download-max", "1GiB", "1.0 GiB"),
                                  ("max-upload-rate", "500KiB/s", "500.0 KiB/s (4.1 Mbit/s)"),
                                  # bytes, as `prefs set`'s help says; the line speed
                                  # beside it shows a reader who meant 500 kbit/s
                                  ("max-upload-rate", "500kb", "500.0 kB/s (4 Mbit/s)"),
                                  ("max-upload-rate", "1.5MB/s", "1500.0 kB/s (12 Mbit/s)")):
            res = run(net, bob, "prefs", "set", key, value, env={"COLUMNS": "100"})
            assert res.returncode == 0, res.stderr
            (row,) = [line for line in res.stdout.splitlines() if f" {key} " in line]
            assert f" {shown} " in row, row
    finally:
        net.cli(bob, "prefs", "set", "auto-download-max", "2GiB")
        net.cli(bob, "prefs", "set", "max-upload-rate", "none")


@pytest.mark.slow
def test_cancel_of_an_unknown_id_says_both_lists_were_looked_in(net: LocalNetwork) -> None:
    res = run(net, net.nodes["alice"], "cancel", "deadbeef", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"] == (
        "'deadbeef' is in neither `peerpost status` nor `peerpost inbox`")


@pytest.mark.slow
def test_web_of_a_stopped_node_names_its_home(net: LocalNetwork) -> None:
    carol = net.nodes["carol"]
    res = run(net, carol, "web", "--url")
    assert res.returncode == 3
    assert f"start `peerpost --home {carol.home} node`" in flat(res.stderr)


def alice_to_bob(net: LocalNetwork, src: Path, size: int, *send_args: str) -> str:
    """Send `size` random bytes from alice to bob; the message id, once bob has them."""
    src.write_bytes(os.urandom(size))
    mid = net.cli(net.nodes["alice"], "send", str(src), "--to", net.nodes["bob"].address,
                  *send_args).stdout.strip()
    net.wait_complete(net.nodes["bob"], mid, 60, "bob's copy")
    return mid


@pytest.mark.slow
def test_status_fits_80_columns_and_says_what_retention_did(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    mid = alice_to_bob(net, tmp_path / "clip.bin", 256 * 1024, "--title", "Grandma's 90th")
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


@pytest.mark.slow
def test_ctrl_c_during_fetch_wait_says_the_download_goes_on(net: LocalNetwork,
                                                            tmp_path: Path) -> None:
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    net.cli(bob, "prefs", "set", "auto-download", "off")
    net.cli(alice, "prefs", "set", "max-upload-rate", "1MiB/s")
    try:
        src = tmp_path / "slow.bin"
        src.write_bytes(os.urandom(6 * MiB))
        mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
        net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "offered",
                       60, "the offer at bob")
        # On a terminal, so that the progress bar shows once it is waiting.
        master, slave = pty.openpty()
        proc = subprocess.Popen([_script("peerpost"), "--home", str(bob.home), "fetch",
                                 mid[:8], "--wait"], stdout=slave, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, env=net.env)
        os.close(slave)
        deadline = time.monotonic() + 30
        seen = read_terminal(master, proc, deadline, b"MiB")
        assert b"MiB" in seen, seen
        proc.send_signal(signal.SIGINT)
        read_terminal(master, proc, deadline + 30)
        _, err = proc.communicate(timeout=30)
        os.close(master)
        assert proc.returncode == 130
        assert (f"interrupted: the node goes on downloading {mid[:8]} (`peerpost fetch "
                f"--wait {mid[:8]}` shows it again") in flat(err)
        # The cap kept it downloading until the Ctrl-C; the rest comes at full speed.
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
        got = net.wait_complete(bob, mid, 60, "the download after Ctrl-C")
        assert Path(got["path"]).read_bytes() == src.read_bytes()
    finally:
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
        net.cli(bob, "prefs", "set", "auto-download", "on")


def test_a_node_still_loading_its_code_is_called_starting(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # `peerpost node` spends about 0.9 s importing the node before it runs; a command in
    # that time said "not running (start it with `peerpost ... node`)", and a second node
    # started on that advice was refused as "already running". The node's code is held
    # back here by an import hook, in this process, while another process asks.
    home = NodeHome(tmp_path / "h")
    home.create(NodeConfig(address="erin@example.net", server="127.0.0.1:9"),
                DeviceIdentity.generate())
    importing, go = threading.Event(), threading.Event()

    class HeldBack(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "overlay.app.node":
                return None
            importing.set()
            go.wait(30)
            return importlib.util.spec_from_loader(name, self)

        def create_module(self, spec: Any) -> None:
            return None

        def exec_module(self, module: Any) -> None:
            module.run_node = lambda home, args: 0

    real = sys.modules.pop("overlay.app.node", None)
    monkeypatch.setattr(sys, "meta_path", [HeldBack(), *sys.meta_path])
    monkeypatch.setattr(cli, "_setup_logging", lambda args, home: None)
    codes: list[int] = []
    starting = threading.Thread(target=lambda: codes.append(
        cli.main(["--home", str(home.root), "node"])))
    starting.start()
    try:
        assert importing.wait(30)
        res = subprocess.run([_script("peerpost"), "--home", str(home.root), "info"],
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    finally:
        go.set()
        starting.join(30)
        sys.modules.pop("overlay.app.node", None)
        if real is not None:
            sys.modules["overlay.app.node"] = real
    assert codes == [0]
    assert res.returncode == 3
    assert (f"the peerpost node for {home.root} (pid {os.getpid()}) does not answer yet"
            in flat(res.stderr)), res.stderr
    assert "start it with" not in res.stderr


@pytest.mark.slow
def test_a_node_waiting_for_its_server_is_not_called_not_running(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        dave = net.add_node("dave")
        assert net.server is not None
        net.server.stop()
        node = net._spawn("dave", [_script("peerpost"), "--home", str(dave.home), "node"])
        try:
            node.lines.wait_for(re.compile("not reachable"), 30, "the node waiting for its server")
            res = run(net, dave, "info")
            assert res.returncode == 3
            err = flat(res.stderr)
            assert (f"the peerpost node for {dave.home} (pid {node.popen.pid}) does not answer"
                    " yet: it answers once it has logged in to its server") in err, err
            assert "start it with" not in err
        finally:
            node.kill()  # SIGTERM does not end a node still waiting for its first login
        res = run(net, dave, "info")  # no daemon at all: the usual text
        assert res.returncode == 3
        assert f"start it with `peerpost --home {dave.home} node`" in flat(res.stderr)


@pytest.mark.slow
def test_a_node_whose_account_was_deleted_says_so_without_a_traceback(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        eve = net.add_node("eve")
        gone = subprocess.run([_script("peerpost-rendezvous"), "accounts", "delete",
                               eve.address, "--data", str(net.data_dir)],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 0, gone.stderr
        res = subprocess.run([_script("peerpost"), "--home", str(eve.home), "node"],
                             capture_output=True, text=True, env=net.env, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 1
        assert "Traceback" not in res.stderr, res.stderr
        assert (f"error: the server refused this node's login: 401 no account {eve.address}"
                in flat(res.stderr)), res.stderr
        # And the way back: this home is done with.
        assert ("this home can't log in again: ask the server's operator for an invite and "
                "set this device up anew in another home (`peerpost --home NEW init ... "
                "--invite TOKEN`)") in flat(res.stderr), res.stderr


@pytest.mark.slow
def test_a_running_node_whose_account_is_deleted_says_it_was_refused(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        eve, bob = net.add_node("eve"), net.add_node("bob")
        net.start_node(eve)
        assert net.cli_json(eve, "info")["connected"] is True
        gone = subprocess.run([_script("peerpost-rendezvous"), "accounts", "delete",
                               eve.address, "--data", str(net.data_dir)],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 0, gone.stderr
        info = net.wait_until(lambda: (i := net.cli_json(eve, "info"))["refused"] and i,
                              30, "eve's node to be refused")
        assert info["connected"] is False
        assert f"no account {eve.address}" in info["refused"]
        shown = run(net, eve, "info")
        assert "login refused: 401 no account" in flat(shown.stdout), shown.stdout
        src = tmp_path / "x.bin"
        src.write_bytes(b"x" * 1000)
        res = run(net, eve, "send", str(src), "--to", bob.address)
        assert res.returncode == 1
        assert "the server refused this node's login (401 no account" in flat(res.stderr)


@pytest.mark.slow
def test_closing_the_terminal_during_the_demo_leaves_nothing_running() -> None:
    # The terminal's hangup goes to the demo's whole process group: the demo, its server
    # (which takes SIGHUP as "reload") and its nodes. A short TMPDIR: the nodes' control
    # sockets must fit a Unix socket path, which pytest's own folders don't.
    tmp = Path(tempfile.mkdtemp(prefix="pp-"))
    try:
        _hang_up_the_demo(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hang_up_the_demo(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([_script("peerpost"), "demo", "--size-mib", "1"], stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    os.close(slave)
    deadline = time.monotonic() + 120
    try:
        seen = read_terminal(master, proc, deadline, b"press Enter")
        assert b"press Enter" in seen, seen.decode(errors="replace")
        assert list(tmp_path.glob("peerpost-demo-*"))
        os.killpg(proc.pid, signal.SIGHUP)
        # The stop gets its own minute: in a full run at load 10 the start had taken most
        # of the first budget, and the wait below ran out 30 s after it.
        read_terminal(master, proc, time.monotonic() + 60)
        # As Ctrl-C ends it: 0 at the prompt, 130 a moment before it (the line that
        # asks for Enter is out before the wait for it starts).
        assert proc.wait(timeout=30) in (0, 130)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list(tmp_path.glob("peerpost-demo-*"))  # its folder is gone
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # and no process of it runs, the server included


# The demo's wait for Enter, in a process of its own: SIGHUP raises KeyboardInterrupt as in
# the demo, and the main thread blocks SIGHUP, so the kernel hands it to another thread.
# That thread's C handler notes it, as it does when the hangup lands in the instant
# before the main thread's read starts; the main thread is not woken from its read.
_WAIT_FOR_ENTER = """
import signal, sys, threading
from overlay.app.demo import wait_for_enter
def hang_up(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGHUP, hang_up)
threading.Thread(target=threading.Event().wait, daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
print("waiting", flush=True)
try:
    wait_for_enter()
except KeyboardInterrupt:
    sys.exit("hung up")
print("Enter pressed")
"""


def _asleep(pid: int) -> bool:
    # The third field of /proc/PID/stat is the main thread's state: S, blocked in a call.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"


@pytest.mark.parametrize("press", [b"", b"\n"], ids=["hangup", "enter"])
def test_the_demos_wait_for_enter_ends_at_a_hangup_already_caught(press: bytes) -> None:
    # Under load a hangup at the prompt could land after the last check for a caught
    # signal and before input()'s read: the demo then waited for an Enter that never
    # came, its nodes gone, its server and its folder left behind.
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_FOR_ENTER], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    try:
        assert present(proc.stdout).readline() == "waiting\n"
        # Sent once the wait blocks (no event says so; the kernel's state does).
        deadline = time.monotonic() + 30
        while not _asleep(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if press:
            os.write(master, press)
        else:
            os.kill(proc.pid, signal.SIGHUP)
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if press:
        assert (proc.returncode, out, err) == (0, "Enter pressed\n", "")
    else:
        assert (proc.returncode, out, err) == (1, "", "hung up\n")


@pytest.mark.slow
def test_demo_json_prints_one_json_report_and_the_story_on_stderr() -> None:
    # A script runs `peerpost demo --json | jq .ok`: stdout must be the report alone.
    tmp = Path(tempfile.mkdtemp(prefix="pp-"))
    try:
        res = subprocess.run([_script("peerpost"), "demo", "--size-mib", "1", "--json"],
                             capture_output=True, text=True, timeout=180,
                             stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["ok"] is True
    assert all(report["checks"].values()) and len(report["checks"]) == 5
    # Read from the server's relay counter, which a server with its relay on keeps.
    assert "the server relayed no media (its relay counter: 0 bytes)" in report["checks"]
    assert [r["address"].split("@")[0] for r in report["receivers"]] == ["bob", "carol", "dave"]
    for r in report["receivers"]:
        assert sum(s["bytes"] for s in r["sources"]) >= report["size"] > MiB // 2
    assert "alice" not in {s["name"] for s in report["receivers"][2]["sources"]}
    assert "peerpost demo" in res.stderr and "byte-identical" in res.stderr
    # Each receiver's finished bar gives the rate its table row gives (first byte to
    # complete); the bar used to count the wait before the first byte (85 against 593).
    for r in report["receivers"]:
        name = r["address"].split("@")[0]
        bar = [ln for ln in res.stderr.splitlines()
               if ln.strip().startswith(name) and "complete" in ln and "MiB/s" in ln]
        assert bar, res.stderr[-2000:]
        shown = float(present(re.search(r"([\d.]+) MiB/s", bar[-1])).group(1))
        assert shown == pytest.approx(r["bytes_per_s"] / MiB, abs=0.06), bar[-1]


@pytest.mark.slow
def test_devices_key_and_vouch_print_only_the_line_to_paste_on_stdout(net: LocalNetwork) -> None:
    bob = net.nodes["bob"]
    laptop = NodeHandle("laptop", bob.address, net.root / "laptop")
    res = run(net, laptop, "devices", "key")
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()  # was: the key, then "on a device already registered ..."
    assert len(key.splitlines()) == 1 and re.fullmatch(r"[0-9a-f]{64}", key), res.stdout
    assert "peerpost devices vouch KEY" in res.stderr
    res = run(net, bob, "devices", "vouch", key)
    assert res.returncode == 0, res.stderr
    vouch = res.stdout.strip()  # what `init --vouch "$(peerpost devices vouch KEY)"` takes
    assert len(vouch.splitlines()) == 1 and re.fullmatch(r"[0-9a-f]+", vouch), res.stdout
    assert "compare that fingerprint with the new device's" in flat(res.stderr)
    token = subprocess.run([_script("peerpost-rendezvous"), "invite", bob.address, "--data",
                            str(net.data_dir)], capture_output=True, text=True, check=True,
                           env=net.env).stdout.strip()
    res = run(net, laptop, "init", "--address", bob.address, "--server", net.server_hostport,
              "--invite", token, "--vouch", vouch, "--listen", "127.0.0.1:0")
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_archive_dir_is_the_shells_folder_and_none_unsets_it(net: LocalNetwork,
                                                             tmp_path: Path) -> None:
    bob = net.nodes["bob"]
    try:
        # The node runs in a folder of its own; it archived into ITS "old-clips".
        res = subprocess.run([_script("peerpost"), "--home", str(bob.home), "prefs", "set",
                              "archive-dir", "old-clips"], capture_output=True, text=True,
                             env=net.env, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert net.cli_json(bob, "prefs")["archive_dir"] == str(tmp_path / "old-clips")
        # "none", as `prefs` shows an unset one, unsets it (it was a folder named none).
        res = run(net, bob, "prefs", "set", "archive-dir", "none", env={"COLUMNS": "200"})
        assert net.cli_json(bob, "prefs")["archive_dir"] is None
        # ... and says where `retention archive` moves files then: the home's archive/.
        assert f"│ none ({bob.home / 'archive'})" in res.stdout, res.stdout
        # Another client (the web inbox) can't leave a relative path to the node's cwd.
        with pytest.raises(ControlError, match="archive-dir must be an absolute path"):
            control_call(bob.home / "control.sock", "prefs_set", key="archive-dir",
                         value="old-clips")
    finally:
        net.cli(bob, "prefs", "set", "archive-dir", "none")


@pytest.mark.slow
def test_info_says_its_counters_count_since_the_node_started(net: LocalNetwork,
                                                             tmp_path: Path) -> None:
    bob = net.nodes["bob"]
    alice_to_bob(net, tmp_path / "counted.bin", 64 * 1024)
    res = run(net, bob, "info", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = [flat(line.replace("│", " ")) for line in res.stdout.splitlines()]
    # "received 1" (or "unverified 1", of mail since accepted) read as the inbox now.
    assert "since the node started" in lines, res.stdout
    at = lines.index("since the node started")
    assert any(line.startswith("received ") for line in lines[at:]), res.stdout
    assert not any(line.startswith("received ") for line in lines[:at]), res.stdout
