"""The command line as a new user meets it: --version, help, completion, --json errors,
and the messages of the usual first mistakes. Real `peerpost`, `peerpost-rendezvous` and
`peerpost-sim` processes; a real server and nodes where a daemon is involved."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from crypto.identity import DeviceIdentity
from overlay.app import cli
from overlay.app.cli import _glue_token_values, build_parser
from overlay.app.config import NodeConfig
from overlay.app.home import NodeHome
from overlay.app.lab import LocalNetwork, NodeHandle, _script
from overlay.mail.describe import MediaInfo
from rendezvous.cli import _parser as rendezvous_parser

MiB = 1 << 20
COMMANDS = ("peerpost", "peerpost-rendezvous", "peerpost-sim")


def run(*argv: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PEERPOST_HOME", None)
    return subprocess.run([_script(argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)


# --- --version, help, completion --------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command: str) -> None:
    res = run(command, "--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"{command} 0.1.0"


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                for where, a in _options(command):
                    yield f"{name} {where}", a
        else:
            yield "", action


@pytest.mark.parametrize("parser", [build_parser(), rendezvous_parser()],
                         ids=["peerpost", "peerpost-rendezvous"])
def test_every_option_has_help(parser: argparse.ArgumentParser) -> None:
    missing = [f"{where}{'/'.join(a.option_strings) or a.dest}"
               for where, a in _options(parser) if not a.help]
    assert missing == []


def test_help_shows_defaults_and_exit_codes() -> None:
    res = run("peerpost", "--help")
    assert "exit status:" in res.stdout
    for line in ("0    ok", "2    usage error", "3    the node is not running",
                 "4    no peerpost home"):
        assert line in res.stdout
    inbox = run("peerpost", "inbox", "--help").stdout
    assert "default 30" in inbox and "--json" in inbox
    serve = run("peerpost-rendezvous", "serve", "--help").stdout
    assert "(default: 127.0.0.1:0)" in serve
    assert "(default: results/NAME)" in run("peerpost-sim", "run", "--help").stdout


def test_prefs_help_says_what_lifts_the_upload_cap(tmp_path: Path) -> None:
    # `prefs set max-upload-rate 0` lifts the cap, as `none` does: the help said only none.
    assert "max-upload-rate RATE|none (none or 0: no cap)" in " ".join(
        run("peerpost", "prefs", "--help", env={"COLUMNS": "4000"}).stdout.split())
    home = NodeHome(tmp_path / "home")
    home.create(NodeConfig("bob@example.net", "127.0.0.1:4500"), DeviceIdentity.generate())
    res = run("peerpost", "--home", str(home.root), "prefs", "set", "max-upload-rate")
    assert res.returncode == 2
    assert "max-upload-rate RATE|none (e.g. 500KiB/s, 1MB/s; none or 0: no cap; applies at " \
        "once)" in res.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_completion_bash_names_the_subcommands(command: str) -> None:
    res = run(command, "completion", "bash")
    assert res.returncode == 0, res.stderr
    names = {"peerpost": ("init", "send", "inbox", "fetch", "status", "completion"),
             "peerpost-rendezvous": ("serve", "invite", "stats", "dns-records"),
             "peerpost-sim": ("list", "run")}[command]
    for name in names:
        assert name in res.stdout
    assert "complete " in res.stdout  # the bash builtin that registers it
    assert run(command, "completion", "zsh").stdout.startswith("#compdef")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_reader_that_leaves_early_gets_no_traceback(command: str) -> None:
    # `peerpost-sim completion bash | head -1`: the reader is gone before the output is out.
    proc = subprocess.Popen([_script(command), "completion", "bash"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


# --- errors without a daemon ------------------------------------------------------------


def test_info_on_a_home_never_set_up(tmp_path: Path) -> None:
    home = tmp_path / "nothing-here"
    res = run("peerpost", "--home", str(home), "info")
    assert res.returncode == 4
    assert f"no peerpost home at {home}: run `peerpost init` first" in res.stderr
    res = run("peerpost", "info", "--home", str(home), "--json")
    assert res.returncode == 4
    err = json.loads(res.stdout)
    assert err["code"] == 4 and "run `peerpost init` first" in err["error"]


def test_usage_error_with_json_is_json(tmp_path: Path) -> None:
    res = run("peerpost", "--home", str(tmp_path), "inbox", "--days", "many", "--json")
    assert res.returncode == 2
    err = json.loads(res.stdout)
    assert err["code"] == 2 and "--days" in err["error"]


@pytest.mark.parametrize(("flags", "said"), [
    (["--days", "7"], "--days goes with --prune: `peerpost inbox --prune --days 7` "
                      "removes what is older"),
    (["--junk"], "--junk goes with --prune: `peerpost inbox --prune --junk` also removes "
                 "every junk sender's message"),
    (["--delete-file"], "--delete-file goes with --prune: `peerpost inbox --prune "
                        "--delete-file` also deletes the received files"),
    (["--delete-file", "--days", "0"], "--days and --delete-file go with --prune: `peerpost "
     "inbox --prune --days 0 --delete-file` removes what is older and also deletes the "
     "received files"),
], ids=["days", "junk", "delete-file", "two"])
def test_prune_flags_without_prune_are_a_usage_error(
        tmp_path: Path, flags: list[str], said: str) -> None:
    # `inbox --days 7`, `inbox --junk` and `inbox --delete-file` listed the whole inbox: the
    # flag was ignored, and nothing said so.
    home = NodeHome(tmp_path / "home")
    home.create(NodeConfig("bob@example.net", "127.0.0.1:4500"), DeviceIdentity.generate())
    res = run("peerpost", "--home", str(home.root), "inbox", *flags)
    assert res.returncode == 2
    assert res.stderr == f"error: {said}\n"
    res = run("peerpost", "--home", str(home.root), "inbox", *flags, "--json")
    assert json.loads(res.stdout) == {"error": said, "code": 2}


# An invite from a server of an earlier version is base64url and may begin with "-".
@pytest.mark.parametrize("invite", [[], ["--invite", "-BvjD8xk2Qe0aLmN4pR7sTw"]])
def test_init_nothing_answers(tmp_path: Path, invite: list[str]) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run("peerpost", "--home", str(tmp_path / "h"), "init", "--address", "a@x.test",
              "--server", f"127.0.0.1:{port}", *invite)
    assert res.returncode == 1
    assert f"nothing answers at 127.0.0.1:{port}" in res.stderr
    assert "refused a@x.test" not in res.stderr
    assert not (tmp_path / "h" / "config.json").exists()


def test_init_with_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    res = run("peerpost", "--home", str(tmp_path / "h"), "init", "--address", "a@x.test",
              "--server", "nosuchhost.invalid:4500")
    assert res.returncode == 1
    assert "cannot resolve nosuchhost.invalid (" in res.stderr
    assert "unknown error" not in res.stderr.lower()
    assert not (tmp_path / "h" / "config.json").exists()


def test_token_values_that_begin_with_a_dash_parse() -> None:
    argv = ["init", "--address", "a@x.test", "--invite", "-BvjD8xk2Qe0aLmN4pR7sTw",
            "--vouch", "-TmoL0c2"]
    args = build_parser().parse_args(_glue_token_values(argv))
    assert (args.invite, args.vouch) == ("-BvjD8xk2Qe0aLmN4pR7sTw", "-TmoL0c2")
    # A forgotten token still fails as one: the next option is not swallowed.
    for forgot in (["--invite", "--listen", "0.0.0.0:0"], ["--vouch", "-h"]):
        assert _glue_token_values(["init", *forgot]) == ["init", *forgot]


def test_init_against_an_http_server_says_so_quickly(tmp_path: Path) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        port = httpd.server_address[1]
        t0 = time.monotonic()
        res = run("peerpost", "--home", str(tmp_path / "h"), "init", "--address",
                  "a@x.test", "--server", f"127.0.0.1:{port}", "--json")
        took = time.monotonic() - t0
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert res.returncode == 1
    err = json.loads(res.stdout)
    assert err["error"].startswith(f"127.0.0.1:{port} is not a peerpost rendezvous server (")
    assert err["error"].endswith(")") and "()" not in err["error"]
    assert took < 8  # not the 15 s registration timeout


def test_init_against_a_port_that_resets_names_the_port_to_check(tmp_path: Path) -> None:
    # As the server's STUN-over-TCP port (the one after --listen's) answers a TLS hello.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def reset_after_hello() -> None:
            for _ in range(2):  # init's TCP probe, then its TLS hello
                conn, _ = listener.accept()
                conn.recv(4096)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        t = threading.Thread(target=reset_after_hello, daemon=True)
        t.start()
        res = run("peerpost", "--home", str(tmp_path / "h"), "init", "--address",
                  "a@x.test", "--server", f"127.0.0.1:{port}", "--invite", "abc", "--json")
        t.join(10)
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"] == (
        f"127.0.0.1:{port} is not a peerpost rendezvous server (it reset the connection at "
        "the TLS handshake): check the port in --server HOST:PORT, the one "
        "`peerpost-rendezvous serve` prints as `listening HOST:PORT`")
    assert not (tmp_path / "h").exists()


def test_demo_clip_line_names_only_present_codecs() -> None:
    from overlay.app.demo import clip_summary

    info = MediaInfo("video/mpeg", 2000, 320, 240, "mpeg2video", None, None, 0)
    assert clip_summary(info) == "mpeg2video, 320x240, 2.0 s"


# --- with a server and nodes ------------------------------------------------------------


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path_factory.mktemp("cli-ux") / "lab") as n:
        n.start_server()
        for name in ("alice", "bob", "carol"):
            n.start_node(n.add_node(name))
        yield n


def _file(tmp: Path, name: str, size: int) -> Path:
    p = tmp / name
    p.write_bytes(os.urandom(size))
    return p


def _mine(net: LocalNetwork, node: NodeHandle, *args: str,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run("peerpost", "--home", str(node.home), *args, env={**net.env, **(env or {})})


@pytest.mark.slow
def test_repeated_to_and_comma_lists_reach_everyone(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob, carol = (net.nodes[n] for n in ("alice", "bob", "carol"))
    src = _file(tmp_path, "two.bin", 64 * 1024)
    res = _mine(net, alice, "send", str(src), "--to", bob.address, "--to",
                f"{carol.address},{bob.address}", "--json")
    assert res.returncode == 0, res.stderr
    sent = json.loads(res.stdout)
    assert sent["to"] == [bob.address, carol.address]
    (msg,) = [m for m in net.cli_json(alice, "status") if m["id"] == sent["id"]]
    assert {r["address"] for r in msg["recipients"]} == {bob.address, carol.address}
    net.wait_complete(carol, sent["id"], 60, "carol's copy")
    net.wait_complete(bob, sent["id"], 60, "bob's copy")


# What the everyday commands must not import, with what each cost of their start here: the
# crypto libraries (25 ms: the node does that work), asyncio (35 ms: their requests go on
# blocking sockets), logging (5 ms: nothing in them logs) and sqlite3 (3 ms); where nothing
# is drawn, rich (38 ms) and dataclasses with inspect (7 ms) too.
NEVER_LOADED = ("nacl", "cryptography", "asyncio", "logging", "sqlite3")
LOADED_TO_DRAW = ("rich", "dataclasses", "inspect")


def _imported(res: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a command run with PYTHONPROFILEIMPORTTIME=1 imported."""
    return {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.slow
def test_everyday_commands_import_only_what_they_use(net: LocalNetwork, tmp_path: Path
                                                     ) -> None:
    """`send`, `fetch --wait --json`, `inbox` and `status` ask the node and print: a module
    that comes back into one of them fails here, with the command's name."""
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    src = _file(tmp_path, "light.bin", 1024)
    timed = {"PYTHONPROFILEIMPORTTIME": "1"}
    sent = _mine(net, alice, "send", str(src), "--title", "t", "--note", "n", "--to",
                 bob.address, env=timed)
    assert sent.returncode == 0, sent.stderr[-2000:]
    mid = sent.stdout.strip()
    runs = {  # command -> (its run, whether it draws a table)
        "send": (sent, False),
        "fetch --wait --json": (_mine(net, bob, "fetch", mid, "--wait", "--json", env=timed),
                                False),
        "inbox --json": (_mine(net, bob, "inbox", "--json", env=timed), False),
        "status --json": (_mine(net, alice, "status", "--json", env=timed), False),
        "inbox": (_mine(net, bob, "inbox", env=timed), True),
        "status": (_mine(net, alice, "status", env=timed), True),
    }
    for command, (res, draws) in runs.items():
        assert res.returncode == 0, (command, res.stderr[-2000:])
        loaded = _imported(res)
        assert "overlay.app.cli" in loaded, command  # the listing is there to read
        assert ("rich.table" in loaded) is draws, command
        banned = NEVER_LOADED if draws else NEVER_LOADED + LOADED_TO_DRAW
        assert not sorted(m for m in loaded if m.split(".")[0] in banned), command
    res = _mine(net, alice, "send", str(src), "--to", bob.address, "--title", "x" * 201)
    assert res.returncode == 2
    assert "--title takes at most 200 characters (this one has 201)" in res.stderr


def test_reading_the_command_line_needs_no_shutil() -> None:
    """argparse imports shutil (with bz2 and lzma) for the terminal's width in every help
    formatter it makes, one per argument added: 2.6 ms of each command's start before its
    request reached the node (8.2 -> 5.6 ms median here, 12 runs each). Ours finds the
    width itself; with shutil made unimportable, the command line still parses and the
    help still wraps to COLUMNS. Nor does importing the CLI load it (overlay.app.home's
    restore helpers did), nor logging.handlers (pickle, queue: 2.5 ms), which only a
    daemon's log file needs."""
    code = (
        "import sys\n"
        "from overlay.app.cli import build_parser\n"
        "assert 'shutil' not in sys.modules, 'imported with the CLI'\n"
        "assert 'logging.handlers' not in sys.modules, 'only daemons log to a file'\n"
        "sys.modules['shutil'] = None  # any import of it from here on fails\n"
        "args = build_parser().parse_args(['send', 'f', '--to', 'bob@example.net'])\n"
        "assert args.to == ['bob@example.net'], args\n"
        "build_parser().parse_args(['send', '--help'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "60"}, timeout=60)
    assert res.returncode == 0, res.stderr[-500:]
    usage = res.stdout.split("\n\n")[0].splitlines()
    assert usage[0].startswith("usage: peerpost send") and len(usage) > 2
    assert 40 < max(map(len, usage)) <= 60  # wrapped to the width COLUMNS gives


@pytest.mark.slow
def test_semicolon_list_gets_a_comma_hint(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob, carol = (net.nodes[n] for n in ("alice", "bob", "carol"))
    src = _file(tmp_path, "x.bin", 1024)
    res = _mine(net, alice, "send", str(src), "--to", f"{bob.address};{carol.address}")
    assert res.returncode == 2
    assert "separate addresses with commas" in res.stderr
    res = _mine(net, alice, "send", str(src), "--to", f"{bob.address}; {carol.address}",
                "--json")
    assert json.loads(res.stdout)["code"] == 2


@pytest.mark.slow
def test_a_blank_title_is_the_files_name(net: LocalNetwork, tmp_path: Path) -> None:
    # `send --title ""` reached bob as a message with a blank title; `--note ""` is no note.
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    src = _file(tmp_path, "holiday.bin", 1024)
    for blank in ("", "  \t"):
        mid = net.cli(alice, "send", str(src), "--to", bob.address, "--title", blank,
                      "--note", "").stdout.strip()
        got = net.wait_complete(bob, mid, 60, "bob's download")
        assert (got["title"], got["note"]) == ("holiday.bin", "")


@pytest.mark.slow
def test_too_many_addresses_and_negative_days_are_usage_errors(net: LocalNetwork,
                                                               tmp_path: Path) -> None:
    # Both reached the node and came back as "control request.args.to: 65 items, limit 64"
    # and "control request.args.days: -1 outside 0..100000", with status 1.
    alice = net.nodes["alice"]
    src = _file(tmp_path, "x.bin", 1024)
    many = ",".join(f"u{i}@{net.domain}" for i in range(65))
    res = _mine(net, alice, "send", str(src), "--to", many)
    assert res.returncode == 2
    assert res.stderr == ("error: --to names 65 addresses; a message goes to at most 64: send "
                          "it to them in several\n")
    res = _mine(net, alice, "inbox", "--prune", "--days", "-1")
    assert res.returncode == 2
    assert res.stderr.endswith("argument --days: give 0 or more days (0: whatever its age)\n")


@pytest.mark.slow
def test_fetch_and_status_mistakes(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    res = _mine(net, bob, "fetch", "")
    assert res.returncode == 2
    assert "give a message id (see `peerpost inbox`)" in res.stderr
    assert "Fields" not in res.stderr and "min_len" not in res.stderr

    res = _mine(net, alice, "status", "zzzz")
    assert res.returncode == 1
    assert "no sent message matches zzzz" in res.stderr
    res = _mine(net, alice, "status", "zzzz", "--json")
    assert json.loads(res.stdout) == {"error": "no sent message matches zzzz (`peerpost "
                                               "status` lists them)", "code": 1}

    src = _file(tmp_path, "done.bin", 256 * 1024)
    mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
    got = net.wait_complete(bob, mid, 60, "bob's download")
    res = _mine(net, bob, "fetch", mid[:8])  # the short id the inbox shows
    assert res.returncode == 0, res.stderr
    assert f"complete: {got['path']}" in res.stdout
    # The id `send` printed, fetched where it was sent from; an id nobody has.
    res = _mine(net, alice, "fetch", mid[:8])
    assert res.returncode == 1
    assert res.stderr == (f"error: {mid[:8]} is a message you sent (`peerpost status` shows "
                          "who has it)\n")
    res = _mine(net, bob, "rm", "zzzz")
    assert res.returncode == 1
    assert res.stderr == "error: no message 'zzzz' in the inbox (`peerpost inbox` lists them)\n"


@pytest.mark.slow
def test_inbox_fits_80_columns(net: LocalNetwork, tmp_path: Path) -> None:
    alice, carol = net.nodes["alice"], net.nodes["carol"]
    src = _file(tmp_path, "clip.bin", 3 * MiB)
    title = "Grandma's 90th birthday, the whole evening including the speeches and the cake"
    note = "We all sang [bold]twice[/bold].\nThe cake is at 4:10 \x1b[2J"
    mid = net.cli(alice, "send", str(src), "--to", carol.address, "--title", title,
                  "--note", note).stdout.strip()
    got = net.wait_complete(carol, mid, 60, "carol's download")
    res = _mine(net, carol, "inbox", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    table, _, notes = res.stdout.partition("files and notes")
    assert max(len(line) for line in table.splitlines()) <= 80
    row = [line for line in table.splitlines() if mid[:8] in line]
    assert row and alice.address in row[0]  # id prefix and sender whole, on one line
    assert "3.0 MiB" in row[0] and "complete" in row[0], res.stdout  # no column cut off
    assert all(line.rstrip().endswith(("┃", "│", "┓", "┩", "┘", "┐", "┤", "┫")) for line
               in table.splitlines()[1:] if line.strip())
    assert f"{mid[:8]}  {got['path']}" in notes  # the file's path, never cut
    assert "Grandma's 90th" in table
    # The sender's note, as written: markup stays text, a line break stays one, an
    # escape is shown, not run.
    assert (f"{mid[:8]}  note: We all sang [bold]twice[/bold].\n"
            f"{' ' * 16}The cake is at 4:10 \\x1b[2J\n") in notes, notes


@pytest.mark.slow
def test_rm_and_cancel_fit_80_columns(net: LocalNetwork, tmp_path: Path) -> None:
    """Every line `rm` and `cancel` print, of mail received, sent and sent to oneself,
    with a long title and 17-character addresses, fits in 80 columns, and says all it
    said. Before: the 'was told already' line was 81 columns, the two errors 96 and 107,
    those of an unknown 32-digit id 95 and 93, and `(deleted` ended one line with its
    path on the next."""
    alice, bob, carol = (net.nodes[n] for n in ("alice", "bob", "carol"))
    title = "Grandma's 90th birthday, the whole evening including the speeches and the cake"
    said: list[str] = []

    def say(node: NodeHandle, *args: str, status: int = 0) -> str:
        res = _mine(net, node, *args, env={"COLUMNS": "80"})
        assert res.returncode == status, res.stderr
        said.extend((res.stdout + res.stderr).splitlines())
        return res.stdout + res.stderr

    def send(to: str, src: Path) -> str:
        return net.cli(alice, "send", str(src), "--to", to, "--title", title).stdout.strip()

    def offered(mid: str) -> Any:
        return net.wait_until(lambda: net.inbox_entry(carol, mid), 30, "the offer at carol")

    # A name that makes the path longer than a line, whatever folder the run is in.
    long_name = "the-whole-evening-" * 4 + "a.bin"
    got = net.wait_complete(carol, send(carol.address, _file(tmp_path, long_name, 1000)), 60)
    out = say(carol, "rm", got["id"][:8], "--delete-file")
    assert f"\ndeleted {got['path']}\n" in out and "Grandma's 90th" in out
    net.cli(carol, "prefs", "set", "auto-download", "off")
    try:
        mid = send(carol.address, _file(tmp_path, "b.bin", 1000))
        offered(mid)
        assert f"\n{alice.address} is told you will not download it\n" in say(carol, "rm", mid)
        # Failed for good (the file changed after the send), its decline gone already.
        src = _file(tmp_path, "c.bin", 1000)
        mid = send(carol.address, src)
        offered(mid)
        src.write_bytes(os.urandom(1000))
        net.cli(carol, "fetch", mid[:8])
        assert carol.proc is not None
        net.wait_until(lambda: f"told {alice.address} that message {mid}" in carol.proc.log(),
                       30, "carol's decline to go")
        assert (f"\n{alice.address} was already told you will not download it (source "
                "changed)\n") in say(carol, "rm", mid)
        # A download stopped half way.
        net.cli(alice, "prefs", "set", "max-upload-rate", "128KiB/s")
        mid = send(carol.address, _file(tmp_path, "d.bin", 2 * MiB))
        offered(mid)
        net.cli(carol, "fetch", mid[:8])
        net.wait_until(lambda: (e := net.inbox_entry(carol, mid)) and e["progress"] > 0, 30,
                       "the first chunk")
        out = say(carol, "cancel", mid[:8])
        assert "\ncancelled; fetch it to go on (the chunks already here are kept)\n" in out
    finally:
        net.cli(carol, "prefs", "set", "auto-download", "on")
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    mid = net.cli(alice, "send", str(_file(tmp_path, "e.bin", 1000)), "--to",
                  f"{carol.address},{bob.address}", "--title", title).stdout.strip()
    for node in (bob, carol):
        net.wait_complete(node, mid, 60)
    out = say(alice, "cancel", mid[:8])
    assert "no longer served; cancelled for nobody (everyone has it already)" in out
    assert say(alice, "rm", mid, status=1) == (f"error: {mid[:12]} is a message you sent "
                                               "(`peerpost status` shows who has it)\n")
    assert say(alice, "cancel", "deadbeef00", status=1) == (
        "error: 'deadbeef00' is in neither `peerpost status` nor `peerpost inbox`\n")
    # An id nobody has, as long as the ids `send` prints (32 digits) or a part of one: it
    # is quoted by its first 12 digits (95 and 93 columns before at 32).
    for digits in (20, 26, 32):
        unknown = ("0f" * 16)[:digits]
        assert say(carol, "rm", unknown, status=1) == (
            "error: no message '0f0f0f0f0f0f...' in the inbox (`peerpost inbox` lists them)\n")
        assert say(carol, "cancel", unknown, status=1) == (
            "error: '0f0f0f0f0f0f...' is in neither `peerpost status` nor `peerpost inbox`\n")
    # To oneself: the inbox's file is the one sent, and stays.
    src = _file(tmp_path, "f.bin", 1000)
    mid = send(alice.address, src)
    net.wait_complete(alice, mid, 60)
    out = say(alice, "rm", mid[:8], "--delete-file")
    assert f"\n{src} is kept: it is the file you sent as message {mid[:12]}\n" in out
    # A path is printed whole, for copying, however long the folders above it make it
    # (the terminal wraps it): a run in pytest-107/popen-gw0 put `deleted` on one line
    # and carol's 72-character path on the next. Every other line fits.
    too_wide = [line for line in said if len(line) > 80
                and str(net.root) not in line and str(tmp_path) not in line]
    assert not too_wide, "\n".join(said)


@pytest.mark.parametrize("width", [80, 100, 120])
def test_inbox_with_a_download_and_long_titles_fits_without_cropping(
        monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    # The inbox of the README's walk-through: rich cropped this one at 80 columns, the
    # state column's right edge and border gone.
    def entry(n: int, title: str, size: int, state: str, progress: float = 1.0,
              sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"id": f"{n:02x}" * 16, "from": "alice@example.net", "title": title,
                "size": size, "state": state, "progress": progress, "sources": sources or [],
                "path": None, "error": None, "note": ""}

    entries = [entry(1, "big.webm", 6_000_000, "downloading", 0.5,
                     [{"path": "tcp", "bytes": 3_000_000}]),
               entry(2, "3 files, 6 B: a.jpg, a.jpg, c.mp4", 10_240, "complete"),
               entry(3, "sunday/: 4 files, 878.9 KiB", 911_360, "complete"),
               entry(4, "Grandma's 90th", 2_000_008, "complete")]

    def call(socket_path: Any, op: str, /, **args: Any) -> Any:
        return {"inbox": {"messages": 4, "max": 10}} if op == "ping" else entries

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, color_system=None))
    monkeypatch.setattr(cli, "control_call", call)
    assert cli.cmd_inbox(NodeHome("/nonexistent"), build_parser().parse_args(["inbox"])) == 0
    table = out.getvalue()
    lines = [line for line in table.splitlines()[1:] if line.strip()]
    assert all(line.rstrip().endswith(("┃", "│", "┓", "┩", "┘", "┐", "┤", "┫"))
               for line in lines), table
    assert "downloading 50%" in table and "via tcp" in table


@pytest.mark.parametrize("width", [80, 100, 120])
def test_status_keeps_each_state_word_whole(monkeypatch: pytest.MonkeyPatch,
                                            width: int) -> None:
    # At 80 columns the state column was 10 wide: "downloadin" over "g", "unreachabl" over
    # "e". The title folds instead, and nothing of it is cut.
    def recipient(address: str, shown: str) -> dict[str, Any]:
        return {"address": address, "state": "sent", "updated_at": 1.8e9, "reason": None,
                "shown": shown}

    titles = ("Grandma's 90th birthday, the whole evening", "big.webm")
    items = [{"id": "ab" * 16, "title": titles[0], "size": 23_000_000,
              "recipients": [recipient("bob@example.net", "downloading"),
                             recipient("carol@example.net", "downloaded")]},
             {"id": "cd" * 16, "title": titles[1], "size": 6_000_000,
              "recipients": [recipient("dave@example.net", "queued at b.example (b.example "
                                       "unreachable since 12:00)")],
              "source_changed": "the file changed"}]
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, color_system=None))
    monkeypatch.setattr(cli, "control_call",
                        lambda _, op, **__: items if op == "status" else {})  # and ping
    assert cli.cmd_status(NodeHome("/nonexistent"), build_parser().parse_args(["status"])) == 0
    table = out.getvalue()
    rows = [line.split("│") for line in table.splitlines() if line.startswith("│")]
    assert rows and all(len(cells) == 8 for cells in rows), table  # no column cropped
    states = [word for cells in rows for word in cells[5].split()]
    for word in ("downloading", "downloaded", "unreachable", "`peerpost", "resend"):
        assert word in states, table
    assert "".join("".join(cells[2].split()) for cells in rows) == "".join(
        "".join(title.split()) for title in titles), table


@pytest.mark.slow
def test_an_empty_inbox_says_so(net: LocalNetwork) -> None:
    erin = net.add_node("erin")
    net.start_node(erin)
    res = _mine(net, erin, "inbox")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "no messages\n"  # and no line about hidden junk: there is none
    assert "┃" not in res.stdout  # no empty table
    assert _mine(net, erin, "inbox", "--all").stdout.startswith("no messages\n")


@pytest.mark.slow
def test_fetch_wait_shows_mib_and_a_rate(net: LocalNetwork, tmp_path: Path) -> None:
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    net.cli(bob, "prefs", "set", "auto-download", "off")
    try:
        src = _file(tmp_path, "later.bin", 6 * MiB)
        mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
        net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "offered",
                       60, "the offer at bob")
        res = _mine(net, bob, "fetch", mid[:8], "--wait", env={"COLUMNS": "120"})
    finally:
        net.cli(bob, "prefs", "set", "auto-download", "on")
    assert res.returncode == 0, res.stderr
    bar = [line for line in res.stdout.splitlines() if "MiB" in line and "/s" in line]
    assert bar, res.stdout
    assert "6.0/6.0 MiB" in bar[-1] and " MiB/s" in bar[-1]
    assert "?" not in bar[-1] and " MB" not in bar[-1]
    assert "complete: " in res.stdout


@pytest.mark.slow
def test_a_download_waiting_its_turn_says_queued(net: LocalNetwork, tmp_path: Path) -> None:
    """One download runs at a time: a second `fetch` waits its turn, and inbox says
    `queued` for it, not `downloading` with a figure that does not move."""
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    net.cli(bob, "prefs", "set", "auto-download", "off")
    net.cli(alice, "prefs", "set", "max-upload-rate", "1MiB/s")
    try:
        first, second = (net.cli(alice, "send", str(_file(tmp_path, f"{n}.bin", 4 * MiB)),
                                 "--to", bob.address).stdout.strip() for n in ("one", "two"))
        for mid in (first, second):
            net.wait_until(lambda m=mid: (e := net.inbox_entry(bob, m)) and
                           e["state"] == "offered", 60, "the offer at bob")
        net.cli(bob, "fetch", first[:8])
        net.wait_until(lambda: (e := net.inbox_entry(bob, first)) and e["progress"] > 0, 30,
                       "the first download's first chunk")
        net.cli(bob, "fetch", second[:8])
        waiting = net.inbox_entry(bob, second)
        res = _mine(net, bob, "inbox", env={"COLUMNS": "100"})
        net.wait_complete(bob, second, 60, "the second download")
    finally:
        net.cli(bob, "prefs", "set", "auto-download", "on")
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    assert waiting is not None and waiting["state"] == "downloading" and waiting["queued"]
    rows = {mid: [line for line in res.stdout.splitlines() if mid[:8] in line]
            for mid in (first, second)}
    assert "│ queued" in rows[second][0] and "downloading" not in rows[second][0], res.stdout
    assert "downloading" in rows[first][0], res.stdout
    done = net.inbox_entry(bob, first)
    assert done is not None and done["queued"] is False


@pytest.mark.slow
def test_an_auto_download_waiting_its_turn_says_queued(net: LocalNetwork,
                                                        tmp_path: Path) -> None:
    """A second message that auto-download takes waits while the first downloads: inbox
    says `queued`, not `offered`, which is what waits for `peerpost fetch`."""
    alice, bob = net.nodes["alice"], net.nodes["bob"]
    net.cli(alice, "prefs", "set", "max-upload-rate", "1MiB/s")
    try:
        first, second = (net.cli(alice, "send", str(_file(tmp_path, f"auto-{n}.bin", 6 * MiB)),
                                 "--to", bob.address).stdout.strip() for n in ("one", "two"))
        net.wait_until(lambda: (e := net.inbox_entry(bob, first)) and e["progress"] > 0, 30,
                       "the first download's first chunk")
        net.wait_until(lambda: net.inbox_entry(bob, second), 30, "the second offer at bob")
        waiting = net.inbox_entry(bob, second)
        res = _mine(net, bob, "inbox", env={"COLUMNS": "100"})
        net.wait_complete(bob, second, 60, "the second download")
    finally:
        net.cli(alice, "prefs", "set", "max-upload-rate", "none")
    assert waiting is not None and waiting["state"] == "offered" and waiting["queued"]
    row = [line for line in res.stdout.splitlines() if second[:8] in line]
    assert "│ queued" in row[0] and "offered" not in row[0], res.stdout


@pytest.mark.slow
def test_send_while_the_server_is_down(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab", server_args=[]) as net:
        net.start_server()
        alice, bob = net.add_node("alice"), net.add_node("bob")
        net.start_node(alice)
        assert net.server is not None
        net.server.stop()
        net.wait_until(lambda: not net.cli_json(alice, "info")["connected"], 30,
                       "alice to notice the server is gone")
        src = _file(tmp_path, "x.bin", 1024)
        t0 = time.monotonic()
        res = _mine(net, alice, "send", str(src), "--to", bob.address, "--json")
        took = time.monotonic() - t0
        assert res.returncode == 1
        err = json.loads(res.stdout)["error"]
        assert "the server is unreachable; nothing was sent" in err
        assert "`peerpost info` shows connected" in err
        assert took < 5
        assert net.cli_json(alice, "status") == []  # nothing half-sent left behind
