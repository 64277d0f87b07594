"""`peerpost`: the command line of a peer node.

`init` and `node` work on the home folder directly; every other command talks to the running
daemon over its control socket (overlay.app.control) and fails with a clear message and exit
status 3 when the daemon is not running. Human output uses rich; `--json` gives machine
output where a listing is shown.

Everything a stranger chose (titles, notes, names, addresses, error text) goes to the
terminal through `_clean`: control characters (ESC, CR, BEL, bidi overrides...) are shown
as `\\xNN` escapes and rich markup is escaped, so a message can't rewrite the screen or
pose as our own output.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import io
import json
import sys
import time
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto.address import format_hostport, parse_hostport
from crypto.errors import DecodeError
from overlay.app.control_wire import (
    CLOSED_TEXT,
    KEEP_ON_TEXT,
    RESTART,
    ControlError,
    NodeNotRunning,
    NodeTooOld,
    shown_id,
)
from overlay.app.control_wire import call as control_call
from overlay.app.home import HomeError, NodeHome, default_home
from rendezvous.cliutil import (
    FORMATS,
    LEVELS,
    ArgumentParser,
    add_completion,
    add_version,
    completion_script,
    reader_may_leave,
)
from rendezvous.errors import AuthenticationError
from rendezvous.status import Status

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NO_HOME = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = """exit status:
  0    ok
  1    error (refused, not found, failed)
  2    usage error (a bad option or argument)
  3    the node is not running (start it with `peerpost node`)
  4    no peerpost home here (run `peerpost init`)
  130  interrupted (Ctrl-C)
with --json, an error is {"error": TEXT, "code": STATUS} on stdout"""
JSON_HELP = "machine-readable output on stdout (errors too: {\"error\": ..., \"code\": N})"
MiB = 1 << 20
WAIT_HELP = ("wait until every recipient has downloaded it, printing each change of "
             "state; exit 0 when all have it, 1 when one ended otherwise (failed, cancelled, "
             "the file changed); Ctrl-C stops the watching only")
# Between two `status` calls of `send --wait` / `status ID --wait`: receipts change a
# recipient's state a few times per message, so twice a second shows each change at once.
WATCH_EVERY = 0.5
PROGRESS_WAIT_MS = 200  # the longest `fetch --wait` lets the node hold a progress call


class CliError(Exception):
    """A message for the user and the exit status it goes with."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code

class _LazyConsole:
    """A rich Console made at its first use: importing rich, and tearing it down at exit,
    cost about 50 ms of every command, and `send` prints its id without it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._made: Console | None = None

    def get(self) -> Console:
        if self._made is None:
            from rich.console import Console

            self._made = Console(**self._options)
        return self._made

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


console: Any = _LazyConsole()
err_console: Any = _LazyConsole(stderr=True, soft_wrap=True)  # error text is never cut


def _rich(c: Any) -> Console:
    """The Console itself, for code that wants one (a test may have put a real one)."""
    return c.get() if isinstance(c, _LazyConsole) else c


def _quiet() -> Console:
    from rich.console import Console

    return Console(file=io.StringIO())


def _table(*args: Any, **kw: Any) -> Table:
    from rich.table import Table

    return Table(*args, **kw)


def _clean(value: object) -> str:
    """`value` as text safe for a terminal: control and format characters become visible
    escapes (`\x1b`, `\u202e`); see the module docstring."""
    out = []
    for c in str(value):
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def _m(value: object) -> str:
    """Outside text for a rich markup string: cleaned and markup-escaped."""
    from rich.markup import escape

    return escape(_clean(value))


def _t(value: object) -> Text:
    """Outside text for a table cell: cleaned, never read as markup."""
    from rich.text import Text

    return Text(_clean(value))


def _styled(text: str, style: str) -> Text:
    from rich.text import Text

    return Text(text, style=style)


def _default_home() -> str:
    return str(default_home())


def build_parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = ArgumentParser(
        prog="peerpost",
        description="Send large media like e-mail; the bytes move peer to peer.",
        epilog=EXIT_CODES,
    )
    add_version(p)
    home_help = ("the node's home folder (default: $PEERPOST_HOME, else ~/.peerpost where "
                 "it exists, else the platform's user data folder, ~/.local/share/peerpost)")
    p.add_argument("--home", default=None, help=home_help)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create this device's identity and register its address")
    s.add_argument("--address", required=True, help="NAME@DOMAIN")
    s.add_argument("--server", help="HOST:PORT of the domain's rendezvous server (default: "
                   "found in DNS, _peerpost._tcp.DOMAIN SRV, its key from _peerpost.DOMAIN TXT)")
    s.add_argument("--resolver", metavar="HOST:PORT",
                   help="name server to ask (default: $PEERPOST_RESOLVER, else the system's)")
    s.add_argument("--invite", help="invite token from the server's operator")
    s.add_argument("--listen", default="0.0.0.0:0",
                   help="HOST:PORT for direct transfers (default 0.0.0.0:0: any port, kept)")
    s.add_argument("--download-dir", default="",
                   help="where received files go (default: received/ in the home folder)")
    s.add_argument("--vouch", help="a vouch for this device's key from a device already "
                   "registered for the address (`peerpost devices vouch`)")

    s = sub.add_parser("devices", help="another device of your address: `key` on the new one,"
                       " `vouch KEY` on an existing one")
    s.add_argument("action", choices=["key", "vouch"],
                   help="key: print this device's key; vouch: vouch for another device's KEY")
    s.add_argument("key", nargs="?", help="the new device's key (for vouch)")

    s = sub.add_parser("node", help="run the peer daemon in the foreground (SIGTERM stops it)")
    s.add_argument("--max-upload-rate", type=_rate_arg, default=None, metavar="RATE",
                   help="cap what this node uploads (e.g. 500KiB/s, 1MB/s, or bytes per "
                        "second); `prefs set max-upload-rate` changes it while it runs")
    s.add_argument("--retry-base", type=float, default=None, metavar="SECONDS",
                   help="first retry delay when no source is reachable (default 5)")
    s.add_argument("--retry-max", type=float, default=None, metavar="SECONDS",
                   help="longest retry delay (default 300)")
    s.add_argument("--mismatch-retry", type=_seconds_arg, default=None, metavar="SECONDS",
                   help="first wait before trying again when something at the server's "
                        "address does not prove the pinned key; doubles up to ten times "
                        "that (default 30)")
    s.add_argument("--provider-refresh", type=float, default=None, metavar="SECONDS",
                   help="how often a download looks for new holders in the DHT (default 10)")
    s.add_argument("--no-co-recipients", action="store_true",
                   help="download from the sender alone, never from co-recipients the DHT "
                        "names as holders (default: from both)")
    s.add_argument("--no-quic", action="store_true",
                   help="no QUIC rung: a peer that a TCP punch can't reach gets WebRTC "
                        "instead, and QUIC offers are declined (default: the config's "
                        "`quic`, on)")
    s.add_argument("--inbox-max", type=int, default=None, metavar="N",
                   help="messages the inbox keeps before it refuses new ones (default 10000)")
    s.add_argument("--on-message", default=None, metavar="CMD",
                   help="run CMD (split like a shell would, run without one) when a message "
                        "arrives and when it completes; fields in PEERPOST_ID, PEERPOST_FROM,"
                        " PEERPOST_TITLE, PEERPOST_STATE, PEERPOST_PATH, PEERPOST_EVENT "
                        "(arrived or complete). `arrived` runs once per message, once its "
                        "sender's keys were looked up, before an automatic download starts;"
                        " none for a junk sender's. Each runs to its end once: one a stop "
                        "killed, or past 68 running or waiting, waits in node.db and runs "
                        "later (default: the config's on_message; '' for none)")
    s.add_argument("--web", default=None, metavar="HOST:PORT|off",
                   help="serve the web inbox here (default: the config's `web`, "
                        "127.0.0.1:8470, another free port if taken); off: none")
    s.add_argument("--metrics", type=_metrics_arg, default=None, metavar="HOST:PORT",
                   help="serve Prometheus /metrics and /healthz here over HTTP (port 0: any "
                        "free port, shown as metrics=HOST:PORT in the ready line)")
    s.add_argument("--log-level", default=None, choices=LEVELS,
                   help="log detail (default: info, debug with -v)")
    s.add_argument("--log-format", default="text", choices=FORMATS,
                   help="text: key=value lines; json: one JSON object per line (to stderr "
                        "and to node.log in the home folder)")

    s = sub.add_parser("web", help="open the web inbox of the running node in the browser")
    s.add_argument("--url", action="store_true",
                   help="print the login URL instead (its token works once, for 10 minutes)")
    s.add_argument("--sign-out", action="store_true",
                   help="sign every browser out of this home's web inbox (a sign-in lasts "
                        "until unused for 30 days, across restarts of the node)")

    s = sub.add_parser("send", help="send a file, a folder or several files to one or more "
                       "addresses as one message; prints the message id")
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="the file to send (it stays where it is; peers fetch from it); a "
                        "folder, or several paths, go as one archive that recipients get "
                        "unpacked as a folder; it is read from the files themselves (they "
                        "stay too: only a small map is written into the home folder)")
    s.add_argument("--to", required=True, action="append", metavar="ADDR[,ADDR...]",
                   help="recipients: repeat --to or separate addresses with commas")
    s.add_argument("--title", default=None, help="subject line (default: the file's name)")
    s.add_argument("--note", default="", help="a short text sent with it")
    s.add_argument("--wait", action="store_true", help=WAIT_HELP)

    s = sub.add_parser("inbox", help="list received messages, or prune old ones")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="include junk senders' messages")
    s.add_argument("--prune", action="store_true",
                   help="remove complete and failed messages older than --days (received "
                        "files stay unless --delete-file)")
    s.add_argument("--days", type=_days_arg, default=None, metavar="N",
                   help="with --prune: age in days of what goes (default 30; 0: all)")
    s.add_argument("--junk", action="store_true",
                   help="with --prune: also every junk sender's message, whatever its age")
    s.add_argument("--delete-file", action="store_true",
                   help="with --prune: also delete the received files")

    s = sub.add_parser("rm", help="remove a message from the inbox (stops its download)")
    s.add_argument("id", help="message id (hex, or a unique prefix)")
    s.add_argument("--delete-file", action="store_true",
                   help="also delete the received file (a partial download always goes)")

    s = sub.add_parser("cancel", help="withdraw a sent message (its file is no longer served"
                       "; recipients' downloads of it fail as withdrawn), or stop an inbox "
                       "message's download")
    s.add_argument("id", help="message id (hex, or a unique prefix)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("resend", help="send a sent message's file again, as it is now, to the"
                       " same recipients (a new message; prints its id)")
    s.add_argument("id", help="the sent message's id (hex, or a unique prefix)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("fetch", help="download a message (when auto-download is off)")
    s.add_argument("id", help="message id (hex, or a unique prefix)")
    s.add_argument("--wait", action="store_true", help="wait and show progress until done")

    s = sub.add_parser("status", help="the sender's view: who has downloaded what")
    s.add_argument("id", nargs="?", help="a sent message's id or prefix (default: all)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wait", action="store_true", help=WAIT_HELP + " (needs ID)")

    s = sub.add_parser("prefs", help="show or change preferences")
    s.add_argument("action", nargs="?", default="show",
                   choices=["show", "priority", "junk", "set"],
                   help="show | priority add|remove ADDR | junk add|remove ADDR | set KEY VALUE")
    s.add_argument("args", nargs="*", help="add|remove ADDR, or KEY VALUE for set: "
                   "auto-download on|off, auto-download-max SIZE|none, "
                   "retention keep|delete|archive, archive-dir DIR|none, "
                   "max-upload-rate RATE|none (none or 0: no cap)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("contacts", help="pinned keys and fingerprints (compare out of band)")
    s.add_argument("action", nargs="?", default="list", choices=["list", "accept"],
                   help="list the pinned keys, or accept the waiting keys of ADDRESS")
    s.add_argument("address", nargs="?", help="for accept: whose keys you compared")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("info", help="this node: address, fingerprint, connection, counters")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("backup", help="copy this node's identity, settings and records into "
                       "a new folder (the node may be running; received files are not copied)")
    s.add_argument("dest", metavar="DEST", help="a new or empty folder")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("restore", help="put a backup's identity, settings and records in "
                       "place (the node must be stopped)")
    s.add_argument("src", metavar="SRC", help="a folder `peerpost backup` made")
    s.add_argument("--force", action="store_true",
                   help="replace a home that holds another device's identity")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("demo", help="server, sender and three receivers on loopback")
    s.add_argument("--size-mib", type=float, default=None,
                   help="clip size in MiB (default: 23, a real WebM clip of about 14 s)")
    s.add_argument("--keep", action="store_true", help="keep the temporary folders")
    add_completion(sub, p.prog)
    for name, command in sub.choices.items():  # `peerpost inbox --home H` works too
        if name != "demo":
            command.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
    for command in sub.choices.values():  # every command answers --json, errors included
        for action in command._actions:
            if action.dest == "json":
                action.help = action.help or JSON_HELP
                break
        else:
            command.add_argument("--json", action="store_true", help=JSON_HELP)
        command.epilog = command.epilog or EXIT_CODES
    return p


@reader_may_leave
def main(argv: list[str] | None = None) -> int:
    argv = _glue_token_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    want_json = "--json" in argv
    parsed = _parse(parser, argv, want_json)
    if isinstance(parsed, int):
        return parsed
    args = parsed
    if args.command not in ("node", "demo"):
        # The interpreter's last act is a full garbage collection over every object the
        # command made (argparse's, rich's, asyncio's): `fetch --wait` ended 17 ms after
        # its last answer, 13 of them that scan. The process ends right after it, so at
        # exit those objects are frozen out of it; the daemon's exit keeps it.
        atexit.register(gc.freeze)
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    home = NodeHome(args.home or _default_home())
    _setup_logging(args, home)
    try:
        if args.command not in ("init", "demo", "restore") and not (
                args.command == "devices" and args.action == "key") and not home.exists():
            raise CliError(f"no peerpost home at {home.root}: run `peerpost init` first "
                           "(or give --home)", EXIT_NO_HOME)
        if args.command == "init":
            return _init(home, args)
        if args.command in ("backup", "restore"):
            return _backup_or_restore(home, args)
        if args.command == "devices":
            return _devices(home, args)
        if args.command == "node":
            home.load_config()  # no home folder: say so before taking its lock
            # The lock before the import, which takes about 0.9 s here: a command run
            # meanwhile said "not running (start it ...)" of a node already starting.
            with home.daemon_lock():
                from overlay.app.node import run_node

                return run_node(home, args)
        if args.command == "web":
            return cmd_web(home, args)
        if args.command == "demo":
            from overlay.app.demo import run_demo

            return run_demo(args, _rich(console))
        return _run(_COMMANDS[args.command](home, args))
    except CliError as exc:
        return _fail(args, str(exc), exc.code)
    except HomeError as exc:
        return _fail(args, str(exc), EXIT_ERROR)
    except NodeNotRunning as exc:
        return _fail(args, _starting(home) or str(exc), EXIT_NOT_RUNNING)
    except NodeTooOld as exc:
        return _fail(args, older_text(home, exc), EXIT_ERROR)
    except ControlError as exc:
        if str(exc) == CLOSED_TEXT and (stopped := _stopped_while_watching(args)):
            return _fail(args, stopped, EXIT_NOT_RUNNING)
        return _fail(args, str(exc), EXIT_ERROR)
    except AuthenticationError as exc:
        # `node` whose login is refused for good (the account deleted, the device revoked):
        # the server's reason, not a traceback, and the only way back.
        again = ("; this home can't log in again: ask the server's operator for an invite "
                 "and set this device up anew in another home (`peerpost --home NEW init "
                 "... --invite TOKEN`)") if exc.status == Status.UNAUTHORIZED else ""
        return _fail(args, f"the server refused this node's login: {exc}{again}", EXIT_ERROR)
    except KeyboardInterrupt:
        if watching := getattr(args, "watching_sent", None):
            return _fail(args, f"interrupted: the message {watching} stays sent "
                         f"(`peerpost status {watching} --wait` watches it again)",
                         EXIT_INTERRUPTED)
        if watching := getattr(args, "watching", None):
            return _fail(args, f"interrupted: the node goes on downloading {watching} "
                         f"(`peerpost fetch --wait {watching}` shows it again, "
                         f"`peerpost cancel {watching}` stops it)", EXIT_INTERRUPTED)
        return _fail(args, "interrupted", EXIT_INTERRUPTED)


def _stopped_while_watching(args: argparse.Namespace) -> str | None:
    """What a `--wait` says when the node stops under it (SIGTERM, a crash): what became of
    the download or the message, and how to watch again; None when nothing was watched."""
    if watching := getattr(args, "watching_sent", None):
        return (f"the node stopped while you watched {watching}: the message stays sent, "
                f"and `peerpost status {watching} --wait` watches it again once `peerpost "
                "node` runs")
    if watching := getattr(args, "watching", None):
        return (f"the node stopped while you watched {watching}: the download resumes from "
                f"its verified chunks once `peerpost node` runs again (`peerpost fetch "
                f"--wait {watching}` shows it)")
    return None


def older_text(home: NodeHome, exc: NodeTooOld) -> str:
    """What to say when the running node lacks a field, an operation or an argument this
    peerpost asks for (a node started before an upgrade): both versions, and to restart
    it. A node that says no version is older than the one that started saying it."""
    from rendezvous.cliutil import package_version

    try:
        node = control_call(home.control_path, "ping").get("version")
    except (ControlError, OSError):
        node = None
    mine = package_version()
    if node is None:
        which = f"{mine}; the node does not say its version"
    elif node != mine:
        which = f"{mine}; the node runs {node}"
    else:
        which = f"{mine}; the node says {node} too, but it was started before this one"
    return exc.text(f" ({_clean(which)})")


def _starting(home: NodeHome) -> str | None:
    """What to say when the control socket does not answer but a daemon holds the home's
    lock: it is starting, and it opens the socket only once logged in to its server, for
    which it waits as long as it has to. "Not running, start it" sent the user to a second
    `peerpost node`, which refuses ("already running"). None when no daemon holds it."""
    who = home.daemon_running()
    if who is None:
        return None
    text = (f"the peerpost node for {home.root}{who} does not answer yet: it answers once "
            "it has logged in to its server, and waits for that as long as it has to")
    waiting = home.login_wait()
    if waiting is None:
        return f"{text} ({home.log_path} says why it can't)"
    why, at = waiting
    left = max(0.0, at - time.time())
    return (f"{text}: {why}; next try at {time.strftime('%H:%M:%S', time.localtime(at))} "
            f"(in {left:.0f} s)")


# Options whose value is a pasted token. Tokens print as hex now, but an invite from a
# server of an earlier version, or a vouch made by an earlier client, is base64url, and one
# in 64 of those begins with "-", which argparse takes for an option.
_TOKEN_OPTIONS = ("--invite", "--vouch")


def _glue_token_values(argv: list[str]) -> list[str]:
    """`--invite -Xy...` as `--invite=-Xy...`. A value that begins with "--", or is a
    short option ("-v"), is left alone, so a forgotten token still fails as before."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg in _TOKEN_OPTIONS and nxt.startswith("-") and not nxt.startswith("--") \
                and len(nxt) > 2:
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str],
           want_json: bool) -> argparse.Namespace | int:
    """`argv` parsed; with --json a usage error is also the JSON error line on stdout."""
    if not want_json:
        return parser.parse_args(argv)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv)
    except SystemExit as exc:
        sys.stderr.write(said.getvalue())
        if exc.code in (0, None):
            return 0
        lines = said.getvalue().strip().splitlines() or ["usage error"]
        print(json.dumps({"error": lines[-1].partition(" error: ")[2] or lines[-1],
                          "code": EXIT_USAGE}))
        return EXIT_USAGE


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Say what went wrong: on stderr, and with --json as one JSON line on stdout."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "code": code}))
    err_console.print(f"[red]error:[/] {_m(message)}")
    return code


def _init(home: NodeHome, args: argparse.Namespace) -> int:
    from overlay.app.setup import init_home

    if not args.json:
        return init_home(home, args, _rich(console))
    rc = init_home(home, args, _quiet())
    config = home.load_config()
    print(json.dumps({"address": config.address, "server": config.server,
                      "server_key": config.server_key, "home": str(home.root),
                      "fingerprint": home.load_identity().public.fingerprint()}, indent=2))
    return rc


def _devices(home: NodeHome, args: argparse.Namespace) -> int:
    from overlay.app.setup import device_key, vouch_device

    if args.action == "vouch" and not args.key:
        raise CliError("usage: peerpost devices vouch KEY", EXIT_USAGE)
    if not args.json:
        # stdout is the one line to paste (KEY=$(peerpost devices key) works); the hint goes
        # to stderr, as `peerpost-rendezvous invite` prints its token.
        if args.action == "key":
            return device_key(home, _rich(err_console))
        return vouch_device(home, args.key, _rich(err_console))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if args.action == "key":
            rc = device_key(home, _quiet())
        else:
            rc = vouch_device(home, args.key, _quiet())
    print(json.dumps({args.action: out.getvalue().strip()}))
    return rc


def _backup_or_restore(home: NodeHome, args: argparse.Namespace) -> int:
    from overlay.app.backup import backup, restore

    if args.command == "backup":
        done = backup(home, Path(args.dest))
        text = (f"backed up {home.root} to {done['dest']}: {', '.join(done['files'])}; "
                "received files are not in it (back up your download folder as usual)")
    else:
        done = restore(home, Path(args.src), force=args.force)
        text = (f"restored {', '.join(done['files'])} into {done['home']} (device "
                f"{done['key']}); start the node again")
    print(json.dumps(done) if args.json else text)
    return 0


# Commands whose process only asks the node and prints its answer: nothing in them logs, so
# without -v they set up no logging, and never import it (5 ms of each one's start here).
UNLOGGED = ("send", "fetch", "inbox", "status")


def _setup_logging(args: argparse.Namespace, home: NodeHome) -> None:
    """Logs to stderr (key=value or JSON lines, as the server's); the daemon also
    writes them to node.log in its home, rotated at 10 MiB with 3 old files kept. A
    one-shot command (init, send, ...) says what it did on stdout and what went wrong as
    its error: its info lines (`init`'s event=client.connected) are noise there."""
    if args.command in UNLOGGED and not args.verbose:
        return
    from rendezvous.logfmt import configure

    quiet = "info" if args.command in ("node", "demo") else "warning"
    level = getattr(args, "log_level", None) or ("debug" if args.verbose else quiet)
    log_file = None
    if args.command == "node" and home.root.is_dir():
        log_file = home.log_path
    configure(level, getattr(args, "log_format", "text"), file=log_file)


def _metrics_arg(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what="--metrics", default_host="127.0.0.1")
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(coro_or_code: Any) -> int:
    """A command's exit status. Commands make their requests on blocking sockets
    (control_call): importing asyncio took 35 ms of `inbox`'s start here. Only
    `fetch --wait` drawing its bar returns a coroutine to run."""
    if isinstance(coro_or_code, int):
        return coro_or_code
    import asyncio

    rc: int = asyncio.run(coro_or_code)
    return rc


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# --- commands ---------------------------------------------------------------------------


def cmd_send(home: NodeHome, args: argparse.Namespace) -> Any:
    # Checked here, before any daemon round trip, so the message names the user's input.
    paths = [Path(p).expanduser() for p in args.paths]
    for given, path in zip(args.paths, paths, strict=True):
        if path.exists() and not path.is_file() and not path.is_dir():
            raise CliError(f"{given} is not a regular file (a device, a pipe or a socket): "
                           "send a file or a folder")
        if not path.exists():
            raise CliError(f"no such file: {given}")
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise CliError("the same path is given twice", EXIT_USAGE)
    to = recipients(args.to)
    if args.title is not None and not args.title.strip():
        args.title = None  # as `--note ""` is no note: the title without --title
    if len(paths) == 1 and paths[0].is_file():
        return _send(home, paths[0].absolute(), to, args)
    return _send_folder(home, [p.absolute() for p in paths], to, args)


def _send_folder(home: NodeHome, paths: list[Path], to: list[str],
                 args: argparse.Namespace) -> int:
    """Map the folder (or the files) as one archive, and send that: only the map is
    written (in the home), and the node reads the archive's bytes through it from the
    files themselves. The map is the node's from the moment it is handed over; until
    then any failure or a Ctrl-C deletes it."""
    from overlay.content.interfaces import NotEnoughSpace
    from overlay.mail.folders import FolderError, given_name, plan_pack, summary, write_map

    _check_text(args)
    state = control_call(home.control_path, "ping")  # a node not running: say so first
    if "version" not in state:
        # A node that ignores `folder` (from before folders) would send the map itself as
        # a file, and one of the first folder sends took a .tar: only a node that says its
        # version (it came after both) is handed a map.
        raise NodeTooOld("send", "it does not say its version, and this peerpost sends a "
                         "folder only to a node that does")
    try:
        plan = plan_pack(paths)
    except FolderError as exc:
        raise CliError(str(exc)) from None
    out = err_console  # stdout is the message id alone (scripts read it)
    if plan.skipped:
        out.print(f"skipped {len(plan.skipped)} (not a regular file or a folder; nothing "
                  "inside the folder is followed out of it):", highlight=False)
        for sk in plan.skipped[:20]:
            out.print(f"  {_m(sk.path)}: {sk.why}", highlight=False, soft_wrap=True)
        if len(plan.skipped) > 20:
            out.print(f"  and {len(plan.skipped) - 20} more", highlight=False)
    for sk in plan.renamed:
        out.print(f"{_m(sk.path)}: {sk.why}", highlight=False, soft_wrap=True)
    try:
        archive, info = write_map(plan, home.store_dir)
    except (FolderError, NotEnoughSpace) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot map {plan.name}: {exc}") from None
    names = None if len(paths) == 1 else [given_name(p) for p in paths]
    title = args.title
    if title is None:
        from crypto.limits import MAX_TITLE

        title = summary(info, names)
        title = title if len(title) <= MAX_TITLE else title[:MAX_TITLE - 1] + "…"
    folder = {"name": info.name, "files": info.files, "folders": info.folders,
              "size": info.size}
    try:
        res = control_call(home.control_path, "send", path=str(archive), to=to, title=title,
                           note=args.note, folder=folder)
    except KeyboardInterrupt:
        # The node has the request and goes on with it (as with one file): the map is the
        # node's now. One that never reached it is swept at the node's next start.
        raise CliError(f"interrupted: the node may still send {plan.name} (`peerpost "
                       "status` shows it; `peerpost cancel ID` withdraws it)",
                       EXIT_INTERRUPTED) from None
    except BaseException:
        _forget_archive(home, archive)
        raise
    return _sent(home, res["id"], to, args)


def _forget_archive(home: NodeHome, archive: Path) -> None:
    """The send of the folder map `archive` failed or was interrupted: delete it (never
    the files it names) unless the node recorded a message naming it (it sent it, or
    keeps it for `peerpost resend`)."""
    try:
        sent = control_call(home.control_path, "status")
    except (ControlError, OSError):
        sent = []  # the node is gone: nothing of it names the archive
    if not any(m.get("path") == str(archive) for m in sent):
        archive.unlink(missing_ok=True)


def _check_text(args: argparse.Namespace) -> None:
    from crypto.limits import MAX_NOTE, MAX_TITLE

    for what, text, most in (("--title", args.title, MAX_TITLE), ("--note", args.note, MAX_NOTE)):
        if text is not None and len(text) > most:
            raise CliError(f"{what} takes at most {most} characters (this one has {len(text)})",
                           EXIT_USAGE)


def recipients(values: list[str]) -> list[str]:
    """The addresses of every --to (repeated, or comma-separated), in order, once each."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            addr = part.strip()
            if not addr:
                continue
            if ";" in addr or addr.count("@") > 1:
                raise CliError(f"--to {value!r}: separate addresses with commas "
                               "(or repeat --to)", EXIT_USAGE)
            if addr not in out:
                out.append(addr)
    if not out:
        raise CliError("--to needs at least one address", EXIT_USAGE)
    from crypto.limits import MAX_SEND_TO

    if len(out) > MAX_SEND_TO:
        raise CliError(f"--to names {len(out)} addresses; a message goes to at most "
                       f"{MAX_SEND_TO}: send it to them in several", EXIT_USAGE)
    return out


def _send(home: NodeHome, path: Path, to: list[str], args: argparse.Namespace) -> int:
    from crypto.limits import MAX_TITLE

    _check_text(args)
    title = args.title
    if title is None:  # the file's name, shortened to fit when it is longer than a title
        title = path.name if len(path.name) <= MAX_TITLE else path.name[:MAX_TITLE - 1] + "…"
    res = control_call(home.control_path, "send", path=str(path), to=to, title=title,
                       note=args.note)
    return _sent(home, res["id"], to, args)


def _sent(home: NodeHome, mid: str, to: list[str], args: argparse.Namespace) -> int:
    if args.wait:
        if not args.json:
            print(mid, flush=True)
        return _watch_sent(home, mid, args)
    if args.json:
        print(json.dumps({"id": mid, "to": to}))
    else:
        print(mid)
    return 0


# A recipient's `shown` state after which nothing more happens to it: "bounced: reason" is
# a recipient at another domain whose mail the sender's server gave up on.
SENT_FINAL = ("downloaded", "declined", "failed", "cancelled", "source changed", "bounced")


def _watch_sent(home: NodeHome, mid: str, args: argparse.Namespace) -> int:
    """Until every recipient of sent message `mid` is in a final state: a line per change
    (`14:02:11 bob@example.net: downloading`), then what ended otherwise as the error.
    `status` calls on a blocking socket, no event loop: this may run for days."""
    args.watching_sent = mid[:SHORT_ID]  # from here a Ctrl-C stops the watching only
    seen: dict[str, str] = {}
    while True:
        items = control_call(home.control_path, "status", id=mid)
        if not items:
            raise CliError(f"sent message {mid[:SHORT_ID]} is gone from the outbox")
        m = items[0]
        for r in m["recipients"]:
            shown = str(r.get("shown") or r["state"])
            if seen.get(r["address"]) != shown:
                seen[r["address"]] = shown
                if not args.json:
                    when = _when(r.get("updated_at") or time.time())[11:]
                    reason = f" ({r['reason']})" if r.get("reason") and shown == "failed" else ""
                    console.print(f"{when} {_m(r['address'])}: {_m(shown + reason)}",
                                  soft_wrap=True, highlight=False)
        if all(state.startswith(SENT_FINAL) for state in seen.values()):
            break
        time.sleep(WATCH_EVERY)
    # By `state`: "downloaded (1 more device to fetch)" is a recipient who has it.
    short = {r["address"]: seen[r["address"]] for r in m["recipients"]
             if r["state"] != "downloaded"}
    if short:  # with --json, this error is the one object on stdout
        raise CliError(f"{len(seen) - len(short)} of {len(seen)} recipients have it; "
                       + ", ".join(f"{a}: {s}" for a, s in short.items()))
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        console.print(f"every recipient has {_m(m['title'])}", highlight=False)
    return 0


# The inbox in 80 columns: the id column shows SHORT_ID hex digits (enough for `fetch`,
# `rm` and `status`, which take a unique prefix), the title folds, and each received file's
# path is its own line under the table, never cut.
SHORT_ID = 8


def _prune_only(args: argparse.Namespace) -> None:
    """Refuse the `inbox` flags that mean something only with --prune: a listing ignored
    them and nothing said so. The message gives the command that does what they ask."""
    if args.prune:
        return
    given = [(typed, does) for typed, does in (
        (f"--days {args.days}" if args.days is not None else "", "removes what is older"),
        ("--junk" if args.junk else "", "also removes every junk sender's message"),
        ("--delete-file" if args.delete_file else "", "also deletes the received files"),
    ) if typed]
    if given:
        names = " and ".join(typed.split()[0] for typed, _ in given)
        command = "peerpost inbox --prune " + " ".join(typed for typed, _ in given)
        raise CliError(f"{names} {'goes' if len(given) == 1 else 'go'} with --prune: "
                       f"`{command}` " + " and ".join(does for _, does in given), EXIT_USAGE)


def cmd_inbox(home: NodeHome, args: argparse.Namespace) -> int:
    _prune_only(args)
    if args.prune:
        days = 30 if args.days is None else args.days
        res = control_call(home.control_path, "prune", days=days, junk=bool(args.junk),
                           delete_file=bool(args.delete_file))
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for r in res["removed"]:
            _print_removed(r)
        console.print(f"{len(res['removed'])} removed; {_inbox_line(res['inbox'])}")
        return 0
    entries = control_call(home.control_path, "inbox", include_junk=bool(args.all))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    t = _table(title=f"inbox of {_m(home.root)}", expand=False)
    # 80 columns: 16 of borders and padding, 8 id, 9 size, state up to 16; `from` (20 to
    # 24, a whole common address) and `title` share the rest and fold. A min_width on
    # `state` made rich lay the table out one column too wide and crop it, and so did a
    # title left to rich beside a folded state ("downloading 50% via tcp") and a long
    # title: it gets what the other columns leave, as in `status`.
    t.add_column("id", no_wrap=True, min_width=SHORT_ID)
    longest = max((len(_clean(e["from"])) for e in entries), default=4)
    t.add_column("from", overflow="fold", min_width=min(longest, 20), max_width=24)
    size_width = max((len(_size(e["size"])) for e in entries), default=4)
    state_width = min(max((len(_entry_state(e)) for e in entries), default=5), 16)
    rest = int(console.width) - 16 - SHORT_ID - size_width - min(longest, 24) - state_width
    t.add_column("title", overflow="fold", max_width=max(rest, 8))
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("state", overflow="fold", max_width=16)
    notes: list[str] = []
    for e in entries:
        short = e["id"][:SHORT_ID]
        t.add_row(_t(short), _t(e["from"]), _t(e["title"]), _size(e["size"]),
                  _t(_entry_state(e)))
        if e["state"] == "complete" and e.get("path"):
            notes.append(f"{_m(short)}  {_m(e['path'])}")
        elif e["state"] == "failed" and e.get("error"):
            notes.append(f"{_m(short)}  [red]failed:[/] {_m(e['error'])}")
        elif e["state"] == "unverified":
            notes.append(f"{_m(short)}  signed by a key you don't trust yet: "
                         "`peerpost contacts`")
        if e.get("note"):  # the sender's `send --note`, its lines kept, each cleaned
            lines = str(e["note"]).splitlines() or [""]
            indent = "\n" + " " * (SHORT_ID + len("  note: "))
            notes.append(f"{_m(short)}  note: " + indent.join(_m(ln) for ln in lines))
    state = control_call(home.control_path, "ping")
    hidden = 0 if args.all else int(state.get("inbox", {}).get("junk", 0))
    if entries:
        console.print(t)
    else:
        console.print("no messages")
    if hidden:
        console.print(f"{hidden} message{'s' if hidden != 1 else ''} from junk senders "
                      "hidden: `peerpost inbox --all` shows them")
    if cut := _cut_text(state.get("inbox", {}), len(entries), hidden):
        console.print(f"{cut}; `peerpost inbox --prune` removes old ones, `peerpost fetch "
                      "ID` and `rm ID` find any", soft_wrap=True, highlight=False)
    if notes:
        console.print("files and notes (`peerpost fetch ID` takes the short id):")
        for line in notes:
            console.print(line, soft_wrap=True, highlight=False)
    if state.get("inbox", {}).get("full"):
        err_console.print(f"[bold red]inbox full:[/] {_inbox_line(state['inbox'])}")
    return 0


def _entry_state(e: dict[str, Any]) -> str:
    """A short state: `downloading 40% tcp`, `retrying 14:02:11`, `queued 26%`, ..."""
    state = _shown_state(e)
    if state in ("downloading", "retrying", "offered", "queued") and e["progress"]:
        state += f" {e['progress'] * 100:.0f}%"
    if e["state"] == "retrying" and e.get("next_attempt"):
        state += f" next {_when(e['next_attempt'])[11:]}"
    paths = sorted({str(s.get("path", "?")) for s in e["sources"]})
    if paths and state.startswith(("downloading", "retrying")):
        state += f" via {'/'.join(paths)}"
    if e.get("junk"):
        state += " (junk)"
    return state


def _shown_state(e: dict[str, Any]) -> str:
    """The inbox state, but `queued` for one whose download starts by itself once
    another ends: fetched, paused, or offered to auto-download (a node from before
    `queued` never says so). `offered` alone waits for `peerpost fetch`."""
    return "queued" if e.get("queued") else str(e["state"])


def _cut_text(s: dict[str, Any], shown: int, hidden: int = 0) -> str:
    """"the 1,000 newest of 1,500 messages shown" when a listing (`inbox`, `status`) holds
    the most the node lists (`s`: its `ping` part, `listed`) and there are more; else ""
    (and from a node that does not say how many it lists)."""
    most = s.get("listed")
    total = int(s.get("messages", 0)) - hidden
    if most is None or shown < int(most) or total <= shown:
        return ""
    return f"the {shown:,} newest of {total:,} messages shown"


def _inbox_line(s: dict[str, Any]) -> str:
    line = f"{s['messages']} of {s['max']} messages"
    if s.get("full"):
        line += (f"; FULL: new mail is refused ({s.get('refused', 0)} so far), free room "
                 "with `peerpost inbox --prune` or `peerpost rm ID`")
    return line


def _message_id(text: str) -> str:
    if not text.strip():
        raise CliError("give a message id (see `peerpost inbox`)", EXIT_USAGE)
    return text.strip()


def _print_removed(removed: dict[str, Any], *, told: bool = False) -> None:
    """What `rm`/`inbox --prune` did with one message, for 80 columns: the title folds on
    the first line; what became of its file and, with `told`, what its sender hears, each
    on a line of its own (rich broke `(deleted` from its path, and a told line of a
    17-character address and its reason was 81 columns). A path is never broken, so that
    it can be copied: a long one goes past the edge and the terminal wraps it."""
    console.print(f"removed {removed['id'][:12]} {_m(removed['title'])}")
    if removed.get("deleted_file"):
        console.print(f"deleted {_m(removed['deleted_file'])}", highlight=False,
                      soft_wrap=True)
    elif removed.get("kept_file"):
        console.print(_m(removed["kept_file"]), highlight=False, soft_wrap=True)
    if told and removed.get("sender_told"):
        console.print(told_text(removed), highlight=False)


def cmd_rm(home: NodeHome, args: argparse.Namespace) -> int:
    res = control_call(home.control_path, "rm", id=_message_id(args.id),
                       delete_file=bool(args.delete_file))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for r in res["removed"]:
        _print_removed(r, told=True)
    return 0


def told_text(removed: dict[str, Any]) -> str:
    """What `rm` says its sender hears: that you will not download it, or, when a download
    that failed for good queued the decline earlier, that with its reason (already told,
    if it went)."""
    who, earlier = _m(removed["sender_told"]), removed.get("told_earlier")
    if not earlier:
        return f"{who} is told you will not download it"
    why = _m(earlier["reason"])
    if earlier["sent"]:
        return f"{who} was already told you will not download it ({why})"
    return f"{who} is told you will not download it ({why})"


def cmd_fetch(home: NodeHome, args: argparse.Namespace) -> Any:
    entry = control_call(home.control_path, "fetch", id=_message_id(args.id))
    if (told := entry.get("declined")) and told["sent"] and entry["state"] != "complete":
        (err_console if args.json else console).print(
            f"{_m(entry['from'])} was told you would not download it ({_m(told['reason'])}) "
            "and may have stopped serving it: this try fails if no one else has it",
            soft_wrap=True, highlight=False)
    if not args.wait or entry["state"] == "complete":
        return _fetched(entry, args)
    args.watching = entry["id"][:SHORT_ID]  # from here a Ctrl-C stops the watching only
    if args.json and not sys.stderr.isatty():
        return _wait_unseen(home, entry, args)
    return _wait_with_bar(home, entry, args)


def _wait_unseen(home: NodeHome, entry: dict[str, Any], args: argparse.Namespace) -> int:
    """`fetch --wait --json` with no terminal to draw a bar on: the same progress calls on
    blocking sockets, without the event loop and rich (their imports and the bar's refresh
    thread took the command from 0.07 to 0.13-0.15 CPU s during a 1 GiB download here,
    taken from that download when it runs on the same machine)."""
    seen = None
    while True:
        asked = time.monotonic()
        e = control_call(home.control_path, "progress", id=entry["id"],
                         wait_ms=PROGRESS_WAIT_MS)
        if e["state"] in ("complete", "failed"):
            break
        now = (e["state"], e["progress"])
        time.sleep(_unchanged_pause(asked, now, seen))
        seen = now
    return _waited(e, args)


async def _wait_with_bar(home: NodeHome, entry: dict[str, Any],
                         args: argparse.Namespace) -> int:
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from overlay.app.control import ControlClient
    from overlay.app.progress import MiBColumn, RateColumn, download_rate

    async with ControlClient(home.control_path) as c:
        start = int(entry["progress"] * entry["size"])

        bar_console = _rich(err_console if args.json else console)
        with Progress(TextColumn("{task.description}"), BarColumn(), MiBColumn(),
                      RateColumn(), TimeRemainingColumn(), console=bar_console) as bar:
            task = bar.add_task(_m(entry["title"][:40] or entry["id"][:12]), total=entry["size"],
                                completed=start, resumed_from=start)
            seen = None
            while True:
                asked = time.monotonic()
                # The node answers when the state or progress changes, else after
                # wait_ms: the end of the download is seen at once, the bar moves.
                e = await c.call("progress", id=entry["id"], wait_ms=PROGRESS_WAIT_MS)
                # A download resumed by this wait had its first byte in an earlier run:
                # its first-byte-to-complete rate would count the pause.
                done = e["state"] == "complete" and not start
                bar.update(task, completed=int(e["progress"] * e["size"]),
                           description=f"{_m(e['title'][:30])} \\[{_shown_state(e)}]",
                           rate=download_rate(e) if done else None)
                if e["state"] in ("complete", "failed"):
                    break
                now = (e["state"], e["progress"])
                await asyncio.sleep(_unchanged_pause(asked, now, seen))
                seen = now
    return _waited(e, args)


def _waited(e: dict[str, Any], args: argparse.Namespace) -> int:
    if e["state"] == "failed":
        raise CliError(f"failed: {e.get('error')}")
    return _fetched(e, args)


def _unchanged_pause(asked: float, now: tuple[str, float], seen: tuple[str, float] | None
                     ) -> float:
    """Seconds to wait before asking again: a node from before wait_ms answers at once
    with nothing new."""
    return max(0.0, asked + PROGRESS_WAIT_MS / 1000 - time.monotonic()) if now == seen else 0.0


def _fetched(e: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(e, indent=2))
    elif e["state"] == "complete":
        console.print(f"complete: {_m(e['path'])}", soft_wrap=True, highlight=False)
    else:
        console.print(f"fetching {e['id'][:SHORT_ID]} ({_m(e['title'])}): {e['state']}; "
                      f"`peerpost fetch --wait {e['id'][:SHORT_ID]}` shows its progress",
                      soft_wrap=True)
    return 0


def cmd_status(home: NodeHome, args: argparse.Namespace) -> Any:
    want = args.id.strip() if args.id is not None else None
    if want is not None and not want:
        raise CliError("give a sent message's id (see `peerpost status`)", EXIT_USAGE)
    if not args.wait:
        return _status_table(home, args, want)
    if not want:
        raise CliError("status --wait watches one message: give its id (`peerpost status` "
                       "lists them)", EXIT_USAGE)
    items = control_call(home.control_path, "status", id=want)
    if not items:
        raise CliError(f"no sent message matches {want} (`peerpost status` lists them)")
    if len(items) > 1:
        raise CliError(f"{want} matches {len(items)} sent messages: give more of the id",
                       EXIT_USAGE)
    return _watch_sent(home, items[0]["id"], args)


def _status_table(home: NodeHome, args: argparse.Namespace, want: str | None) -> int:
    items = control_call(home.control_path, "status", id=want)
    if want and not items:
        raise CliError(f"no sent message matches {want} (`peerpost status` lists them)")
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    # In 80 columns: each address whole (up to 24 characters a line), the id as short as
    # the inbox's, the time under the date; title and state fold into what is left. rich
    # crops a table whose folding columns can't shrink enough, so they get a max_width.
    width = int(console.width)
    longest = max((len(_clean(r["address"])) for m in items for r in m["recipients"]),
                  default=9)
    narrow = width < 120
    size_width = max((len(_size(m["size"])) for m in items), default=4)
    fixed = 19 + SHORT_ID + size_width + (10 if narrow else 19)  # borders, id, size, updated
    rec = max(9, min(longest, 24, width - fixed - 16))
    spare = max(width - fixed - rec, 12)
    # Each word of a state whole ("downloading", "unreachable"); the title folds instead.
    word = max((len(w) for m in items for r in m["recipients"]
                for w in _clean(r.get("shown") or r["state"]).split()), default=10)
    state_width = min(spare - 6, max(10, min(word, 16), spare // 2))
    t = _table(title="sent messages", expand=False)
    t.add_column("id", no_wrap=True, min_width=SHORT_ID)
    t.add_column("title", overflow="fold", max_width=spare - state_width)
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("recipient", overflow="fold", min_width=rec, max_width=24)
    t.add_column("state", overflow="fold", max_width=state_width)
    t.add_column("updated", no_wrap=True)
    for m in items:
        for i, r in enumerate(m["recipients"]):
            when = _when(r.get("updated_at"))
            t.add_row(m["id"][:SHORT_ID] if i == 0 else "", _t(m["title"]) if i == 0 else "",
                      _size(m["size"]) if i == 0 else "", _t(r["address"]),
                      _t(r.get("shown") or r["state"]),
                      when.replace(" ", "\n") if narrow else when)
        if m.get("retention_done"):
            t.add_row("", "", "", "", f"[dim]{_m(retained_text(m))}[/]", "")
        if m.get("source_changed") and m.get("folder"):
            # `resend` refuses a folder: the map names the files as they were.
            t.add_row("", "", "", "", "[yellow]a file of the folder changed after sending: "
                      "send the folder again with `peerpost send`[/]", "")
        elif m.get("source_changed"):
            t.add_row("", "", "", "", "[yellow]the file changed after sending: "
                      f"`peerpost resend {m['id'][:SHORT_ID]}` sends it as it is now[/]", "")
    console.print(t)
    if not want and (cut := _cut_text(control_call(home.control_path, "ping").get("outbox", {}),
                                      len(items))):
        console.print(f"{cut}; `peerpost status ID` finds any", soft_wrap=True,
                      highlight=False)
    if any(r.get("owed") for m in items for r in m["recipients"]):
        console.print(f"[yellow]{KEEP_ON_TEXT}[/]", soft_wrap=True, highlight=False)
    return 0


# What the sender's retention preference did with its copy once everyone had it.
RETAINED = {"keep": "copy kept", "delete": "copy deleted", "archive": "copy archived",
            "map": "folder kept (its map deleted)"}


def retained_text(m: dict[str, Any]) -> str:
    """The line under a sent message nobody will fetch any more: what became of the copy.
    When every recipient declined it the preference did not apply: the file is kept."""
    states = {r["state"] for r in m["recipients"]}
    if "downloaded" not in states:
        what = "folder is kept (its map deleted)" if m.get("folder") else "file is kept"
        return f"nobody will download it; your {what}, no longer served"
    copy = RETAINED.get(m["retention_done"], str(m["retention_done"]))
    return f"everyone has it{' or declined it' if 'declined' in states else ''}; {copy}"


def cmd_cancel(home: NodeHome, args: argparse.Namespace) -> int:
    """A sent message's id: withdraw it; else an inbox message's: stop its download."""
    try:
        res = control_call(home.control_path, "withdraw", id=args.id)
    except NodeNotRunning:
        raise
    except ControlError as exc:
        if not str(exc).startswith("no sent message"):
            raise
        try:
            entry = control_call(home.control_path, "cancel", id=args.id)
        except ControlError as inbox_exc:
            if not str(inbox_exc).startswith("no message"):
                raise
            # Neither list has it: say that both were looked in, not the inbox alone.
            raise CliError(f"{shown_id(args.id)} is in neither `peerpost status` nor "
                           "`peerpost inbox`") from None
        if args.json:
            print(json.dumps(entry, indent=2))
            return 0
        # In 80 columns the title folds on its own line, and what happens next has one.
        console.print(f"stopped {entry['id'][:12]} {_m(entry['title'])}")
        console.print(_m(entry["error"]), highlight=False)
        return 0
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    who = ", ".join(res["cancelled"]) or "nobody (everyone has it already)"
    console.print(f"withdrew {res['id'][:12]} {_m(res['title'])}")
    console.print(f"no longer served; cancelled for {_m(who)}", highlight=False)
    unqueued = res.get("unqueued")
    if unqueued is None:
        console.print("the server could not be asked to take back queued copies:\n"
                      "whoever fetches one is told it was withdrawn")
    elif unqueued:
        console.print(f"{unqueued} queued cop{'y' if unqueued == 1 else 'ies'} taken back "
                      "from the server")
    return 0


def cmd_resend(home: NodeHome, args: argparse.Namespace) -> int:
    res = control_call(home.control_path, "resend", id=args.id)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(res["id"])
    return 0


def cmd_prefs(home: NodeHome, args: argparse.Namespace) -> int:
    if args.action in ("priority", "junk"):
        if len(args.args) != 2 or args.args[0] not in ("add", "remove"):
            raise CliError(f"usage: peerpost prefs {args.action} add|remove ADDRESS",
                           EXIT_USAGE)
        control_call(home.control_path, "prefs_list", list=args.action, action=args.args[0],
                     address=args.args[1])
    elif args.action == "set":
        if len(args.args) != 2:
            raise CliError("usage: peerpost prefs set KEY VALUE  (keys: auto-download on|off,"
                           " auto-download-max SIZE|none (e.g. 500MB, 2GB, 1GiB; default"
                           " 2GiB; larger messages wait for `peerpost fetch`),"
                           " retention keep|delete|archive, archive-dir DIR|none,"
                           " max-upload-rate RATE|none (e.g. 500KiB/s, 1MB/s; none or 0:"
                           " no cap; applies at once))", EXIT_USAGE)
        _check_pref_key(args.args[0])
        key, value = args.args
        if key.replace("_", "-") == "archive-dir":
            value = _shell_path(value)
        try:
            control_call(home.control_path, "prefs_set", key=key, value=value)
        except ControlError as exc:
            # This peerpost knows the name (_check_pref_key): a node that does not is older.
            if str(exc).startswith("unknown preference"):
                raise NodeTooOld("prefs_set", f"it does not know the preference {key}") from None
            raise
    prefs = control_call(home.control_path, "prefs")
    if args.json:
        print(json.dumps(prefs, indent=2))
        return 0
    t = _table(title="preferences")
    t.add_column("preference")
    t.add_column("value")
    for k, v in prefs.items():  # the names `prefs set` takes
        shown = _pref_text(k, v)
        if k == "archive_dir" and v is None:  # where `archive` retention moves files now
            shown += f" ({home.root / 'archive'})"
        t.add_row(_t(k.replace("_", "-")), _t(shown))
    console.print(t)
    return 0


def _shell_path(value: str) -> str:
    """A folder for the node, which runs in a folder of its own: a relative path means this
    shell's ("none" and "" unset it)."""
    return value if value in ("", "none") else str(Path(value).expanduser().absolute())


def _check_pref_key(key: str) -> None:
    """A misspelt name is a usage error that names the right one, before the daemon is
    asked."""
    from overlay.mail.prefs import unknown_pref  # sqlite3 and the records: only here

    if (error := unknown_pref(key)) is not None:
        raise CliError(error, EXIT_USAGE)


def _pref_text(key: str, value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if key == "max_upload_rate" and isinstance(value, int):
        return f"{_size_as_set(value)}/s ({_bits(value)})"
    if key == "auto_download_max" and isinstance(value, int):
        return _size_as_set(value)
    return str(value)


def _bits(rate: int) -> str:
    """Bytes/s as a line speed: "500kb" is 500 kB/s, which a reader thinking of a line in
    kbit/s should see is 4 Mbit/s."""
    bits = rate * 8
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= div:
            return f"{bits / div:.3g} {unit}"
    return f"{bits} bit/s"


def _size_as_set(n: int) -> str:
    """A size in the unit it was likely given in: `prefs set auto-download-max 2GB` showed
    "1.9 GiB", which reads as something other than what was asked. The largest unit,
    binary or decimal, that divides it; else as `_size` shows sizes."""
    for power, (binary, decimal) in ((4, ("TiB", "TB")), (3, ("GiB", "GB")),
                                     (2, ("MiB", "MB")), (1, ("KiB", "kB"))):
        for base, unit in ((1024, binary), (1000, decimal)):
            if n >= base**power and n % base**power == 0:
                return f"{n // base**power}.0 {unit}"  # as `_size` writes sizes
    return _size(n)


def _days_arg(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if days < 0:
        raise argparse.ArgumentTypeError("give 0 or more days (0: whatever its age)")
    return days


def _seconds_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < 86400:
        raise argparse.ArgumentTypeError("give seconds above 0 and under a day")
    return seconds


def _rate_arg(text: str) -> float:
    from overlay.mail.prefs import parse_rate

    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rate is None:
        raise argparse.ArgumentTypeError("give a rate such as 1MB/s (no cap: leave it out)")
    return float(rate)


def cmd_contacts(home: NodeHome, args: argparse.Namespace) -> int:
    if args.action == "accept":
        if not args.address:
            raise CliError("usage: peerpost contacts accept ADDRESS", EXIT_USAGE)
        control_call(home.control_path, "contacts_accept", address=args.address)
    contacts = control_call(home.control_path, "contacts")
    if args.json:
        print(json.dumps(contacts, indent=2))
        return 0
    t = _table(title="contacts (compare fingerprints out of band)")
    for col in ("address", "fingerprints", "first seen", "note"):
        t.add_column(col)
    for c in contacts:
        fps, notes = contact_cells(c)
        t.add_row(_t(c["address"]), "\n".join(fps), _when(c.get("first_seen")),
                  "\n".join(notes))
    console.print(t)
    alerts = {a for c in contacts for a in c["alerts"]}
    if "key_changed" in alerts:
        err_console.print("[bold red]warning:[/] a contact's key has changed")
    if "unvouched" in alerts:
        err_console.print("[bold yellow]warning:[/] a contact has a device key nobody vouched "
                          "for; its messages are held `unverified`")
    if "listed_again" in alerts:
        err_console.print("[bold yellow]warning:[/] a contact's server lists again a key it "
                          "had stopped listing; its messages are held `unverified`")
    return 0


# How `contacts` shows a key in each state of `contacts --json`'s `keys` (operations).
_KEY_LINES = {"pinned": "{fp}", "pending": "{fp} (pending)", "unvouched": "{fp} (unvouched)",
              "listed_again": "{fp} (retired {at}, listed again: not trusted until you "
                              "accept it)",
              "retired": "{fp} (retired {at}: its server no longer lists it)"}
# The note for each of its `alerts`, in the words of the warning printed below the table.
_ALERT_NOTES = {
    "key_changed": "[bold red]KEY CHANGED: verify, then `peerpost contacts accept`[/]",
    "unvouched": "[bold yellow]NEW DEVICE KEY no trusted device vouched for: verify, then "
                 "`peerpost contacts accept`[/]",
    "listed_again": "[bold yellow]A KEY YOU TRUSTED, RETIRED, IS LISTED AGAIN (its server "
                    "lost it for a while, or it was put back, or someone has that device): "
                    "ask them, then `peerpost contacts accept`[/]"}


def contact_cells(c: dict[str, Any]) -> tuple[list[str], list[str]]:
    """`contacts`' fingerprint lines and notes for one contact (as `contacts --json` has
    it). A retired key its server lists again is shown once, as that: it was trusted, and
    `contacts accept` is the way back (or the way in for whoever holds a revoked device).
    The last note is when its server last confirmed the keys (none: never asked yet)."""
    fps = [_KEY_LINES[k["state"]].format(fp=_clean(k["fingerprint"]), at=_when(k["retired_at"]))
           for k in c["keys"]]
    notes = [_ALERT_NOTES[a] for a in c["alerts"]]
    if c["keys_confirmed_at"] is not None:
        notes.append(f"keys confirmed {_when(c['keys_confirmed_at'])}")
    return fps, notes


def _reach_line(reach: dict[str, Any]) -> Text:
    """`info`'s network row: whether a NAT stands in front, from the server's STUN."""
    if reach["nat"] is None:
        return _t("unknown: the server runs no STUN, or it did not answer")
    where = "behind a NAT" if reach["nat"] else "directly reachable"
    return _t(f"{where}: the server sees this node as {reach['seen_as']}")


def _node_version(info: dict[str, Any]) -> Text:
    """`info`'s version row: the node's, or, from a node that does not say it (started
    before it did), that it is older than this peerpost."""
    if (version := info.get("version")) is not None:
        return _t(version)
    from rendezvous.cliutil import package_version

    return _styled(f"not said: the node is older than this peerpost ({package_version()}); "
                   f"{RESTART}", "yellow")


def cmd_info(home: NodeHome, args: argparse.Namespace) -> int:
    info = control_call(home.control_path, "ping")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t = _table(title="this node", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("address", _t(info["address"]))
    t.add_row("fingerprint", _t(info["fingerprint"]))
    t.add_row("version", _node_version(info))
    if info.get("refused"):
        t.add_row("rendezvous", _styled(f"login refused: {info['refused']}", "red"))
    elif m := info.get("mismatch"):
        t.add_row("rendezvous", _styled(f"not logged in: {m['text']}; trying again by "
                                        f"itself, next in {m['next_try_in']:.0f} s", "red"))
    else:
        t.add_row("rendezvous", "connected" if info["connected"] else "[red]not connected[/]")
    listen = info["listen"]
    t.add_row("direct transfers", _t(format_hostport(*listen) if listen else ""))
    if (reach := info.get("reach")) is not None:
        t.add_row("network", _reach_line(reach))
        t.add_row("paths to peers", _t(", ".join(reach["paths"])))
    if "inbox" in info:
        full = info["inbox"].get("full")
        t.add_row("inbox", _styled(_inbox_line(info["inbox"]), "bold red" if full else ""))
    if info["counters"]:
        # Events, not the inbox now: "unverified 1" (a message held once its sender was
        # looked up) stays after `contacts accept` or a later lookup moved it on.
        t.add_section()
        t.add_row("[dim]since the node started[/]", "")
    for k, v in sorted(info["counters"].items()):
        t.add_row(_t(k), _t(v))
    console.print(t)
    return 0


def cmd_web(home: NodeHome, args: argparse.Namespace) -> int:
    """`peerpost web`: a one-time login URL for the running node's web inbox."""
    from overlay.app.web.auth import issue_login_token, sign_out_all
    from overlay.app.web.server import login_url, web_url

    if args.sign_out:
        ended = sign_out_all(home.root)
        if args.json:
            print(json.dumps({"signed_out": ended}))
        else:
            print("signed out: every browser must sign in again with `peerpost web`"
                  if ended else "no browser was signed in")
        return 0
    base = web_url(home.root)
    if base is None:
        raise CliError(f"no web inbox is running for {home.root}: start "
                       f"`peerpost --home {home.root} node` (without `--web off`)",
                       EXIT_NOT_RUNNING)
    url = login_url(base, issue_login_token(home.root, time.time()))
    if args.json:
        print(json.dumps({"url": url}))
        return 0
    if args.url:
        print(url)
        return 0
    import webbrowser

    if not webbrowser.open(url):
        print(url)
    return 0


_COMMANDS = {
    "info": cmd_info,
    "send": cmd_send,
    "inbox": cmd_inbox,
    "rm": cmd_rm,
    "fetch": cmd_fetch,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "resend": cmd_resend,
    "prefs": cmd_prefs,
    "contacts": cmd_contacts,
}


if __name__ == "__main__":
    sys.exit(main())
