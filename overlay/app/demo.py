"""`peerpost demo`: the whole seed process on loopback, with the figures printed.

A rendezvous server (SQLite), a sender and three receivers, each a real process in a
temporary folder. The demo makes a real clip a browser plays (WebM: VP8 with an Opus or
Vorbis tone) with PyAV and sends it to all three while only the first is online, showing
its progress. The second comes online and fetches it; then the sender goes offline and the
third comes online, so every byte it gets comes from the co-recipients. The demo verifies
the three copies byte for byte, prints what moved where (the server held only location
messages and relayed no media), then the web inbox login URL of the first receiver, whose
node keeps running until Enter (or Ctrl-C) when stdin is a terminal. It exits 0 only if all
of that held.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from overlay.app.lab import LabError, LocalNetwork, NodeHandle, dir_size
from overlay.app.progress import MiBColumn, RateColumn, download_rate
from overlay.mail.describe import MediaInfo, describe_media, make_demo_clip
from rendezvous.stats import read_live_stats

MiB = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.blake2b()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def _size(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def clip_summary(info: MediaInfo) -> str:
    """`vp8 + opus, 640x360, 12.0 s`: only what the clip has (no `None` for no audio)."""
    parts = [" + ".join(c for c in (info.video_codec, info.audio_codec) if c) or "no codec"]
    if info.width and info.height:
        parts.append(f"{info.width}x{info.height}")
    if info.duration_ms:
        parts.append(f"{info.duration_ms / 1000:.1f} s")
    return ", ".join(parts)


def _wait_with_bar(net: LocalNetwork, node: NodeHandle, mid: str, size: int, console: Console,
                   timeout: float = 300.0) -> dict[str, Any]:
    with Progress(TextColumn(f"{node.name:>6}"), BarColumn(), MiBColumn(),
                  RateColumn(), TextColumn("{task.fields[state]}"),
                  console=console) as bar:
        task = bar.add_task(node.name, total=size, state="waiting")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = net.inbox_entry(node, mid)
            if e:
                bar.update(task, completed=int(e["progress"] * size), state=e["state"],
                           rate=download_rate(e) if e["state"] == "complete" else None)
                if e["state"] == "complete":
                    return e
                if e["state"] == "failed":
                    raise LabError(f"{node.name}: download failed: {e.get('error')}")
            time.sleep(0.1)
    raise LabError(f"{node.name} did not complete within {timeout:.0f} s")


def run_demo(args: argparse.Namespace, console: Console) -> int:
    """With `--json`, the story goes to stderr and stdout gets one JSON object: `ok`, the
    `checks`, each receiver's times and sources, and `error` when the demo failed."""
    as_json = bool(getattr(args, "json", False))
    # Piped or in CI, rich assumes 80 columns and would cut the tables' figures.
    if as_json:
        console = Console(stderr=True, width=None if console.is_terminal else 110)
    elif not console.is_terminal:
        console = Console(width=110)
    root = Path(tempfile.mkdtemp(prefix="peerpost-demo-"))
    report: dict[str, Any] = {"ok": False}

    def hang_up(signum: int, frame: object) -> None:
        # The terminal closed: stop as Ctrl-C does. The server takes SIGHUP as "reload"
        # and would outlive the demo, with the demo's folder.
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGHUP, hang_up)
    try:
        report = _demo(root, args, console)
    except LabError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        console.print(f"logs are in {root}")
        report = {"ok": False, "error": str(exc), "logs": str(root)}
        args.keep = True
    finally:
        signal.signal(signal.SIGHUP, before)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            console.print(f"kept {root}")
        if as_json:
            print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def wait_for_enter() -> None:
    """Wait until the user presses Enter (or stdin ends). A signal whose handler raises
    (the hangup's KeyboardInterrupt) ends the wait, also one caught just before it began.

    input() reads without looking at signals already caught: a hangup whose C handler ran
    after the interpreter's last check and before the read left it waiting for an Enter a
    closed terminal never sends (2 of 600 hangups sent as the prompt showed, at load 6-8,
    with print() then input()). The C handler also writes to the wakeup fd, which the
    select here watches beside stdin."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    before = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        while True:
            ready, _, _ = select.select([sys.stdin, wake_r], [], [])
            if sys.stdin in ready:
                sys.stdin.readline()
                return
            os.read(wake_r, 512)  # a signal whose handler returned: wait on
    finally:
        signal.set_wakeup_fd(before)
        os.close(wake_r)
        os.close(wake_w)


def _relayed_bytes(net: LocalNetwork, since: float) -> int:
    """The server's count of bytes it relayed between nodes, from the first stats.json it
    writes after `since` (every 2 s): the relay counts every byte it passes, and a server
    running no relay has no counter and passed none."""
    doc = net.wait_until(
        lambda: (d := read_live_stats(net.data_dir)) and d.get("updated_at", 0) > since and d,
        15, "the server's stats.json")
    return int(doc.get("relayed_bytes", 0))


def _peer_label(net: LocalNetwork, node: NodeHandle) -> str:
    label: str = net.cli_json(node, "info")["peer_id"][:16]
    return label


def _server_stats(net: LocalNetwork) -> dict[str, Any]:
    import subprocess
    import sys

    out = subprocess.run([str(Path(sys.executable).parent / "peerpost-rendezvous"), "stats",
                          "--data", str(net.data_dir), "--json"], capture_output=True,
                         text=True, check=True, timeout=60)
    stats: dict[str, Any] = json.loads(out.stdout)
    return stats


def _demo(root: Path, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    console.rule("peerpost demo")
    clip = root / "grandma-90th.webm"
    # About 23 MiB by default: big enough that the throughput figures mean something,
    # small enough that the demo takes seconds. (VP8 with this grain at 640x360 lands near
    # 14 Mbit/s when asked for 16, so bigger clips get longer rather than denser.)
    want = (args.size_mib or 23) * MiB
    seconds = max(2.0, want * 8 / 14e6)
    bitrate = int(want * 8 / seconds)
    with console.status("making a real WebM clip (VP8) with PyAV"):
        make_demo_clip(clip, seconds=seconds, bitrate=bitrate)
    info = describe_media(clip)
    size = clip.stat().st_size
    console.print(f"clip: {clip.name}, {_size(size)}, {clip_summary(info)}")

    with LocalNetwork(root / "lab") as net:
        net.start_server()
        console.print(f"rendezvous server for {net.domain} on {net.server_hostport} (SQLite in "
                      f"{net.data_dir.name}/)")
        alice, carol, dave = (net.add_node(n) for n in ("alice", "carol", "dave"))
        bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
        net.start_node(alice)
        net.start_node(bob)
        console.print(f"online: {alice.address} (sender), {bob.address}; "
                      f"offline: {carol.address}, {dave.address}")
        before = dir_size(net.data_dir)

        t0 = time.time()
        to = ",".join(n.address for n in (bob, carol, dave))
        mid = net.cli(alice, "send", str(clip), "--to", to,
                      "--title", "Grandma's 90th birthday", "--note", "the cake!").stdout.strip()
        t_send = time.time()
        console.print(f"sent message {mid} to {to} "
                      f"(`peerpost send` took {t_send - t0:.2f} s: it hashes the "
                      f"whole clip to name it)")
        queued = _server_stats(net)["bytes_stored"]
        got_bob = _wait_with_bar(net, bob, mid, size, console)

        console.print(f"{carol.address} comes online")
        t_carol_on = time.time()
        net.start_node(carol)
        got_carol = _wait_with_bar(net, carol, mid, size, console)

        console.rule("stage 2: the sender leaves; a late recipient gets it from the others")
        alice_id = _peer_label(net, alice)
        net.stop_node(alice)
        console.print(f"{alice.address} went offline; {dave.address} comes online")
        t_dave_on = time.time()
        net.start_node(dave)
        got_dave = _wait_with_bar(net, dave, mid, size, console)
        from_others = sum(s["bytes"] for s in got_dave["sources"] if s["peer"] != alice_id)
        grown = dir_size(net.data_dir) - before
        relayed = _relayed_bytes(net, time.time())

        digest = _digest(clip)
        checks = {
            f"{bob.name}'s copy is byte-identical": _digest(Path(got_bob["path"])) == digest,
            f"{carol.name}'s copy is byte-identical": _digest(Path(got_carol["path"])) == digest,
            f"{dave.name}'s copy is byte-identical, every byte from the co-recipients":
                _digest(Path(got_dave["path"])) == digest and from_others >= size,
            "the server held location messages only, never media (its data folder grew "
            "by less than 1 MiB)": grown < MiB,
            f"the server relayed no media (its relay counter: {relayed:,} bytes)": relayed == 0,
        }
        net.start_node(alice)  # back, to show the sender's view of the receipts
        status = net.wait_until(lambda: (st := net.cli_json(alice, "status")) and all(
            r["state"] == "downloaded" for r in st[0]["recipients"]) and st, 30,
            "receipts at the sender")

        names = {_peer_label(net, n): n.name for n in (bob, carol, dave)}
        names[alice_id] = alice.name
        table = Table(title="what happened (times from the message reaching the server, "
                            "or from coming online)")
        for col in ("receiver", "first byte", "complete", "throughput", "sources"):
            table.add_column(col, no_wrap=True)
        deposited = status[0]["created_at"]  # when the sender's node handed it to the server
        rows = ((bob, got_bob, deposited), (carol, got_carol, t_carol_on),
                (dave, got_dave, t_dave_on))
        receivers = []
        for node, got, start in rows:
            first = (got.get("first_byte_at") or start) - start
            done = (got.get("completed_at") or time.time()) - start
            rate = download_rate(got) or 0.0
            srcs = ", ".join(f"{names.get(s['peer'], s['peer'][:8])} via {s['path']} "
                             f"{100 * s['bytes'] / size:.0f}%"
                             for s in got["sources"] if s["bytes"])
            table.add_row(node.name, f"{first * 1000:.0f} ms", f"{done:.2f} s",
                          f"{rate / MiB:.0f} MiB/s", srcs or "-")
            receivers.append({
                "address": node.address, "first_byte_ms": round(first * 1000, 1),
                "complete_s": round(done, 3), "bytes_per_s": round(rate),
                "sources": [{"name": names.get(s["peer"], s["peer"]), "path": s["path"],
                             "bytes": s["bytes"]} for s in got["sources"] if s["bytes"]]})
        console.print(table)
        summary = Table(title="bytes")
        summary.add_column("what")
        summary.add_column("bytes", justify="right")
        summary.add_row("file size", f"{size:,}")
        summary.add_row("sealed location messages queued at the server", f"{queued:,}")
        summary.add_row("server data folder growth (SQLite pages, WAL)", f"{max(grown, 0):,}")
        summary.add_row("media bytes relayed by the server", f"{relayed:,}")
        summary.add_row("recipients done (sender's view)", ", ".join(
            f"{r['address']}: {r['state']}" for m in status for r in m["recipients"]))
        console.print(summary)
        for what, good in checks.items():
            console.print(("[green]✓[/] " if good else "[red]✗[/] ") + what)
        # The same one-time login link `peerpost web --url` prints for bob.
        web = net.cli(bob, "web", "--url").stdout.strip()
        console.print(f"web inbox of {bob.address} (plays the clip in the browser): {web}",
                      soft_wrap=True)
        if sys.stdin.isatty():
            console.print("the nodes keep running until you press Enter")
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                wait_for_enter()
        return {"ok": all(checks.values()), "message_id": mid, "size": size,
                "send_seconds": round(t_send - t0, 3), "receivers": receivers,
                "server_growth_bytes": max(grown, 0), "checks": checks}
