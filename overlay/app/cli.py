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
import asyncio
import json
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from overlay.app.control import ControlClient, ControlError, NodeNotRunning
from overlay.app.home import HomeError, NodeHome, default_home

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error text is never cut mid-sentence


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
    return escape(_clean(value))


def _t(value: object) -> Text:
    """Outside text for a table cell: cleaned, never read as markup."""
    return Text(_clean(value))


def _default_home() -> str:
    return str(default_home())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peerpost",
        description="Send large media like e-mail; the bytes move peer to peer.",
    )
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
    s.add_argument("--download-dir", default="", help="where received files go")
    s.add_argument("--vouch", help="a vouch for this device's key from a device already "
                   "registered for the address (`peerpost devices vouch`)")

    s = sub.add_parser("devices", help="another device of your address: `key` on the new one,"
                       " `vouch KEY` on an existing one")
    s.add_argument("action", choices=["key", "vouch"])
    s.add_argument("key", nargs="?", help="the new device's key (for vouch)")

    s = sub.add_parser("node", help="run the peer daemon in the foreground (SIGTERM stops it)")
    s.add_argument("--max-upload-rate", type=float, default=None, metavar="BYTES_PER_S",
                   help="cap what this node uploads (bytes per second)")
    s.add_argument("--retry-base", type=float, default=None, metavar="SECONDS",
                   help="first retry delay when no source is reachable (default 5)")
    s.add_argument("--retry-max", type=float, default=None, metavar="SECONDS",
                   help="longest retry delay (default 300)")
    s.add_argument("--provider-refresh", type=float, default=None, metavar="SECONDS",
                   help="how often a download looks for new holders in the DHT (default 10)")
    s.add_argument("--inbox-max", type=int, default=None, metavar="N",
                   help="messages the inbox keeps before it refuses new ones (default 10000)")
    s.add_argument("--web", default=None, metavar="HOST:PORT|off",
                   help="serve the web inbox here (default: the config's `web`, "
                        "127.0.0.1:8470, another free port if taken); off: none")

    s = sub.add_parser("web", help="open the web inbox of the running node in the browser")
    s.add_argument("--url", action="store_true",
                   help="print the login URL instead (its token works once, for 10 minutes)")

    s = sub.add_parser("send", help="send a file to one or more addresses; prints the message id")
    s.add_argument("file")
    s.add_argument("--to", required=True, help="ADDR[,ADDR...]")
    s.add_argument("--title", default=None)
    s.add_argument("--note", default="")

    s = sub.add_parser("inbox", help="list received messages, or prune old ones")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="include junk senders' messages")
    s.add_argument("--prune", action="store_true",
                   help="remove complete and failed messages older than --days (received "
                        "files stay unless --delete-file)")
    s.add_argument("--days", type=int, default=30, metavar="N",
                   help="with --prune: age in days of what goes (default 30; 0: all)")
    s.add_argument("--junk", action="store_true",
                   help="with --prune: also every junk sender's message, whatever its age")
    s.add_argument("--delete-file", action="store_true",
                   help="with --prune: also delete the received files")

    s = sub.add_parser("rm", help="remove a message from the inbox (stops its download)")
    s.add_argument("id", help="message id (hex, or a unique prefix)")
    s.add_argument("--delete-file", action="store_true",
                   help="also delete the received file (a partial download always goes)")

    s = sub.add_parser("fetch", help="download a message (when auto-download is off)")
    s.add_argument("id", help="message id (hex, or a unique prefix)")
    s.add_argument("--wait", action="store_true", help="wait and show progress until done")

    s = sub.add_parser("status", help="the sender's view: who has downloaded what")
    s.add_argument("id", nargs="?")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("prefs", help="show or change preferences")
    s.add_argument("action", nargs="?", default="show",
                   choices=["show", "priority", "junk", "set"],
                   help="show | priority add|remove ADDR | junk add|remove ADDR | set KEY VALUE")
    s.add_argument("args", nargs="*")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("contacts", help="pinned keys and fingerprints (compare out of band)")
    s.add_argument("action", nargs="?", default="list", choices=["list", "accept"])
    s.add_argument("address", nargs="?")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("info", help="this node: address, fingerprint, connection, counters")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("demo", help="server, sender and two receivers on loopback")
    s.add_argument("--size-mib", type=float, default=None,
                   help="clip size (default: a short real clip of a few MiB)")
    s.add_argument("--keep", action="store_true", help="keep the temporary folders")
    for name, command in sub.choices.items():  # `peerpost inbox --home H` works too
        if name != "demo":
            command.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = NodeHome(args.home or _default_home())
    _setup_logging(args.verbose)
    try:
        if args.command == "init":
            from overlay.app.setup import init_home

            return init_home(home, args, console)
        if args.command == "devices":
            from overlay.app.setup import device_key, vouch_device

            if args.action == "key":
                return device_key(home, console)
            if not args.key:
                err_console.print("usage: peerpost devices vouch KEY")
                return EXIT_USAGE
            return vouch_device(home, args.key, console)
        if args.command == "node":
            from overlay.app.node import run_node

            return run_node(home, args)
        if args.command == "web":
            return cmd_web(home, args)
        if args.command == "demo":
            from overlay.app.demo import run_demo

            return run_demo(args, console)
        return _run(_COMMANDS[args.command](home, args))
    except HomeError as exc:
        err_console.print(f"[red]error:[/] {_m(exc)}")
        return EXIT_ERROR
    except NodeNotRunning as exc:
        err_console.print(f"[red]error:[/] {_m(exc)}")
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        err_console.print(f"[red]error:[/] {_m(exc)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _run(coro_or_code: Any) -> int:
    if isinstance(coro_or_code, int):
        return coro_or_code
    rc: int = asyncio.run(coro_or_code)
    return rc


async def _call(home: NodeHome, op: str, **args: Any) -> Any:
    async with ControlClient(home.control_path) as c:
        return await c.call(op, **args)


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
    path = Path(args.file).expanduser()
    if not path.is_file():
        err_console.print(f"[red]error:[/] no such file: {_m(args.file)}")
        return EXIT_ERROR
    to = [a.strip() for a in args.to.split(",") if a.strip()]
    if not to:
        err_console.print("[red]error:[/] --to needs at least one address")
        return EXIT_USAGE
    return _send(home, path.absolute(), to, args)


async def _send(home: NodeHome, path: Path, to: list[str], args: argparse.Namespace) -> int:
    res = await _call(home, "send", path=str(path), to=to,
                      title=args.title if args.title is not None else path.name, note=args.note)
    print(res["id"])
    return 0


async def cmd_inbox(home: NodeHome, args: argparse.Namespace) -> int:
    if args.prune:
        res = await _call(home, "prune", days=args.days, junk=bool(args.junk),
                          delete_file=bool(args.delete_file))
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for r in res["removed"]:
            gone = f" (deleted {_m(r['deleted_file'])})" if r.get("deleted_file") else ""
            console.print(f"removed {r['id'][:12]} {_m(r['title'])}{gone}")
        console.print(f"{len(res['removed'])} removed; {_inbox_line(res['inbox'])}")
        return 0
    entries = await _call(home, "inbox", include_junk=bool(args.all))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    t = Table(title=f"inbox of {_m(home.root)}")
    for col in ("id", "from", "title", "size", "state", "progress", "sources"):
        t.add_column(col)
    for e in entries:
        state = e["state"]
        if state == "retrying" and e.get("next_attempt"):
            state += f" (next {_when(e['next_attempt'])[11:]})"
        if state == "failed" and e.get("error"):
            state += f": {e['error']}"
        if e.get("junk"):
            state += " [junk]"
        if state == "unverified":
            state += " (signed by a key you don't trust yet: `peerpost contacts`)"
        srcs = ", ".join(f"{s.get('peer', '?')[:8]}/{s.get('path', '?')}" for s in e["sources"])
        t.add_row(_t(e["id"][:12]), _t(e["from"]), _t(e["title"]), _size(e["size"]), _t(state),
                  f"{e['progress'] * 100:.0f}%", _t(srcs))
    console.print(t)
    state = await _call(home, "ping")
    if state.get("inbox", {}).get("full"):
        err_console.print(f"[bold red]inbox full:[/] {_inbox_line(state['inbox'])}")
    return 0


def _inbox_line(s: dict[str, Any]) -> str:
    line = f"{s['messages']} of {s['max']} messages"
    if s.get("full"):
        line += (f"; FULL: new mail is refused ({s.get('refused', 0)} so far), free room "
                 "with `peerpost inbox --prune` or `peerpost rm ID`")
    return line


async def cmd_rm(home: NodeHome, args: argparse.Namespace) -> int:
    res = await _call(home, "rm", id=args.id, delete_file=bool(args.delete_file))
    for r in res["removed"]:
        gone = f" (deleted {_m(r['deleted_file'])})" if r.get("deleted_file") else ""
        console.print(f"removed {r['id'][:12]} {_m(r['title'])}{gone}")
    return 0


async def cmd_fetch(home: NodeHome, args: argparse.Namespace) -> int:
    entry = await _call(home, "fetch", id=args.id)
    if not args.wait:
        console.print(f"fetching {entry['id']} ({_m(entry['title'])}): {entry['state']}")
        return 0
    async with ControlClient(home.control_path) as c:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task(_m(entry["title"][:40] or entry["id"][:12]), total=entry["size"])
            while True:
                e = await c.call("progress", id=entry["id"])
                bar.update(task, completed=int(e["progress"] * e["size"]),
                           description=f"{_m(e['title'][:30])} \\[{e['state']}]")
                if e["state"] in ("complete", "failed"):
                    break
                await asyncio.sleep(0.2)
    if e["state"] == "failed":
        err_console.print(f"[red]failed:[/] {_m(e.get('error'))}")
        return EXIT_ERROR
    console.print(f"complete: {_m(e['path'])}")
    return 0


async def cmd_status(home: NodeHome, args: argparse.Namespace) -> int:
    items = await _call(home, "status", id=args.id)
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    t = Table(title="sent messages")
    for col in ("id", "title", "size", "recipient", "state", "updated"):
        t.add_column(col)
    for m in items:
        for i, r in enumerate(m["recipients"]):
            t.add_row(m["id"][:12] if i == 0 else "", _t(m["title"]) if i == 0 else "",
                      _size(m["size"]) if i == 0 else "", _t(r["address"]),
                      _t(r.get("shown") or r["state"]),
                      _when(r.get("updated_at")))
        if m.get("retention_done"):
            t.add_row("", "", "", "", f"[dim]{_m(m['retention_done'])}[/]", "")
    console.print(t)
    return 0


async def cmd_prefs(home: NodeHome, args: argparse.Namespace) -> int:
    if args.action in ("priority", "junk"):
        if len(args.args) != 2 or args.args[0] not in ("add", "remove"):
            err_console.print(f"usage: peerpost prefs {args.action} add|remove ADDRESS",
                              markup=False)
            return EXIT_USAGE
        await _call(home, "prefs_list", list=args.action, action=args.args[0],
                    address=args.args[1])
    elif args.action == "set":
        if len(args.args) != 2:
            err_console.print("usage: peerpost prefs set KEY VALUE  (keys: auto-download on|off,"
                              " auto-download-max SIZE|none (e.g. 500MB, 2GB, 1GiB; default"
                              " 2GiB; larger messages wait for `peerpost fetch`),"
                              " retention keep|delete|archive, archive-dir DIR,"
                              " max-upload-rate BYTES_PER_S|none)", markup=False)
            return EXIT_USAGE
        await _call(home, "prefs_set", key=args.args[0], value=args.args[1])
    prefs = await _call(home, "prefs")
    if args.json:
        print(json.dumps(prefs, indent=2))
        return 0
    t = Table(title="preferences")
    t.add_column("preference")
    t.add_column("value")
    for k, v in prefs.items():
        t.add_row(_t(k), _t(", ".join(v) if isinstance(v, list) else str(v)))
    console.print(t)
    return 0


async def cmd_contacts(home: NodeHome, args: argparse.Namespace) -> int:
    if args.action == "accept":
        if not args.address:
            err_console.print("usage: peerpost contacts accept ADDRESS")
            return EXIT_USAGE
        await _call(home, "contacts_accept", address=args.address)
    contacts = await _call(home, "contacts")
    if args.json:
        print(json.dumps(contacts, indent=2))
        return 0
    t = Table(title="contacts (compare fingerprints out of band)")
    for col in ("address", "fingerprints", "first seen", "note"):
        t.add_column(col)
    for c in contacts:
        note = "[bold red]KEY CHANGED: verify, then `peerpost contacts accept`[/]" \
            if c.get("changed") else ""
        fps = [_clean(f) for f in c["fingerprints"]]
        fps += [f"{_clean(f)} (pending)" for f in c.get("pending", ())]
        fps += [f"{_clean(f)} (unvouched)" for f in c.get("unvouched", ())]
        if c.get("unvouched"):
            note = (note + "\n" if note else "") + "[bold yellow]NEW DEVICE KEY no trusted " \
                "device vouched for: verify, then `peerpost contacts accept`[/]"
        t.add_row(_t(c["address"]), "\n".join(fps), _when(c.get("first_seen")), note)
    console.print(t)
    if any(c.get("changed") for c in contacts):
        err_console.print("[bold red]warning:[/] a contact's key has changed")
    if any(c.get("unvouched") for c in contacts):
        err_console.print("[bold yellow]warning:[/] a contact has a device key nobody vouched "
                          "for; its messages are held `unverified`")
    return 0


async def cmd_info(home: NodeHome, args: argparse.Namespace) -> int:
    info = await _call(home, "ping")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t = Table(title="this node", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("address", _t(info["address"]))
    t.add_row("fingerprint", _t(info["fingerprint"]))
    t.add_row("rendezvous", "connected" if info["connected"] else "[red]not connected[/]")
    t.add_row("direct transfers", _t(":".join(str(x) for x in info["listen"])))
    if "inbox" in info:
        full = info["inbox"].get("full")
        t.add_row("inbox", Text(_inbox_line(info["inbox"]), style="bold red" if full else ""))
    for k, v in sorted(info["counters"].items()):
        t.add_row(_t(k), _t(v))
    console.print(t)
    return 0


def cmd_web(home: NodeHome, args: argparse.Namespace) -> int:
    """`peerpost web`: a one-time login URL for the running node's web inbox."""
    from overlay.app.web.auth import issue_login_token
    from overlay.app.web.server import login_url, web_url

    base = web_url(home.root)
    if base is None:
        err_console.print("[red]error:[/] no web inbox is running for this home: start "
                          "`peerpost node` (without `--web off`)")
        return EXIT_NOT_RUNNING
    url = login_url(base, issue_login_token(home.root, time.time()))
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
    "prefs": cmd_prefs,
    "contacts": cmd_contacts,
}


if __name__ == "__main__":
    sys.exit(main())
