"""A chaos soak of real delivery: random sends while nodes and the server are stopped,
killed (-9) and restarted, then a check that every message arrived once and intact.

`python -m benchmarks soak --minutes N --seed S [--nodes 5] [--harsh] [--root DIR]`

One `peerpost-rendezvous serve` and `--nodes` `peerpost node` daemons (real processes on
loopback, `overlay.app.lab.LocalNetwork`). A `random.Random(seed)` picks every action:

- send: a file of 1 KiB to 30 MiB (log-uniform), to one recipient or several at once;
  sometimes the bytes of an earlier file again (the same file from its sender to someone
  else, or a copy from another sender);
- a node started with `--max-upload-rate` (some starts, so some sends are slow);
- stop (SIGTERM) or kill -9 a node, a sender or a receiver of a recent message (so most
  cuts land mid-transfer), and start it again a few seconds later;
- stop or kill -9 the server and start it again on the same data folder and port;
- with `--harsh`: more kills, kills while a `send` is running, server restarts while a
  send is running.

A send the CLI refused is counted with its error text (a clear refusal is what a user
should get while its node cannot reach the server); every send that returned an id must be
delivered. At the end every node and the server run, and the soak waits (while anything
still moves) for: each recipient's inbox entry complete, exactly one entry per (recipient,
message), the received bytes equal to the sent ones, and the sender's `status` showing
every recipient `downloaded`. Nothing else may turn up: no inbox entry or outbox row for a
send the CLI reported as failed. Each failure prints the message, the node, its state and
error, and the tail of that node's node.log.

Nodes run with `--retry-base 1 --retry-max 10` (defaults 5 and 300) so that a download
whose sources were all down retries within seconds once they are back, and `--web off`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import OUT_DIR, report
from overlay.app.lab import LabError, LocalNetwork, NodeHandle

KiB = 1 << 10
MiB = 1 << 20
MIN_SIZE, MAX_SIZE = 1 * KiB, 30 * MiB
SLOW_RATE = 4 * MiB  # --max-upload-rate of a slowed sender


@dataclass
class Sent:
    id: str
    sender: str
    to: list[str]
    path: Path
    size: int
    digest: str
    at: float
    note: str  # how it was sent (fresh, same-file, copy, during-kill...)


@dataclass
class Soak:
    rng: random.Random
    net: LocalNetwork
    files: Path
    harsh: bool
    sent: list[Sent] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    # Sends whose own node was killed while they ran: the CLI could not say whether the
    # message went out. If the sender's outbox has it, it must be delivered like any other.
    uncertain: list[Sent] = field(default_factory=list)
    not_sent: set[str] = field(default_factory=set)  # outbox rows shown failed `not sent`
    down: dict[str, float] = field(default_factory=dict)  # node -> monotonic restart time
    server_down_until: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    made: list[tuple[Path, int, str]] = field(default_factory=list)  # (path, size, digest)
    t0: float = field(default_factory=time.monotonic)

    def log(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:8.1f}s {text}"
        self.events.append(line)
        print(line, flush=True)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # --- nodes and server ----------------------------------------------------------------
    def up(self) -> list[NodeHandle]:
        return [n for n in self.net.nodes.values() if n.name not in self.down]

    def start(self, node: NodeHandle) -> None:
        extra = ["--web", "off", "--retry-base", "1", "--retry-max", "10"]
        if self.rng.random() < 0.35:
            extra += ["--max-upload-rate", str(SLOW_RATE)]
        node.extra = extra
        try:
            # A node prints "ready" once logged in, so this runs only while the server is up.
            self.net.start_node(node, timeout=60)
        except LabError as exc:
            # Counted and reported; the node is tried again later.
            if node.proc is not None:
                node.proc.kill()
            self.log(f"START FAILED {node.name}: {exc}; {self.tail(node.name, 5)}")
            self.count("start_failures")
            self.down[node.name] = time.monotonic() + 2
            return
        self.down.pop(node.name, None)
        self.count("node_starts")

    def take_down(self, node: NodeHandle, *, kill: bool, why: str) -> None:
        if kill:
            self.net.kill_node(node)
            self.count("node_kills")
        else:
            try:
                self.net.stop_node(node)
            except LabError as exc:
                self.log(f"STOP HUNG {node.name}: {exc}")
                self.count("stop_hangs")
            self.count("node_stops")
        delay = self.rng.uniform(0.5, 8.0)
        self.down[node.name] = time.monotonic() + delay
        self.log(f"{'kill -9' if kill else 'stop'} {node.name} ({why}); back in {delay:.1f} s")

    def server_restart(self, *, kill: bool, pause: float) -> None:
        assert self.net.server is not None
        if kill:
            self.net.server.kill()
            self.count("server_kills")
        else:
            try:
                self.net.server.stop()
            except LabError as exc:
                self.log(f"SERVER STOP HUNG: {exc}")
                self.count("stop_hangs")
            self.count("server_stops")
        self.log(f"server {'kill -9' if kill else 'stop'}; back in {pause:.1f} s")
        self.server_down_until = time.monotonic() + pause

    def revive(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        if self.server_down_until is not None and (everything or now >= self.server_down_until):
            self.net.start_server(timeout=60)
            self.server_down_until = None
            self.count("server_starts")
            self.log("server up")
        if self.server_down_until is not None:
            return  # a node would wait for its login before it says ready
        for name, when in sorted(self.down.items()):
            if everything or now >= when:
                self.start(self.net.nodes[name])
                if name not in self.down:
                    self.log(f"{name} up")

    # --- files and sends -----------------------------------------------------------------
    def new_file(self) -> tuple[Path, int, str]:
        size = int(math.exp(self.rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))
        path = self.files / f"f{len(self.made):04d}.bin"
        d = hashlib.blake2b()
        with path.open("wb") as f:
            left = size
            while left:
                block = self.rng.randbytes(min(MiB, left))
                f.write(block)
                d.update(block)
                left -= len(block)
        made = (path, size, d.hexdigest())
        self.made.append(made)
        return made

    def pick_file(self, sender: NodeHandle) -> tuple[Path, int, str, str]:
        r = self.rng.random()
        own = [s for s in self.sent if s.sender == sender.name]
        if own and r < 0.15:  # the same file again, from the same sender, to others
            s = self.rng.choice(own)
            return s.path, s.size, s.digest, "same-file"
        if self.made and r < 0.3:  # the same bytes from a new path (another sender's copy)
            path, size, digest = self.rng.choice(self.made)
            copy = self.files / f"{path.stem}-{sender.name}-{len(self.sent)}.bin"
            shutil.copyfile(path, copy)
            return copy, size, digest, "copy"
        path, size, digest = self.new_file()
        return path, size, digest, "fresh"

    def send(self, sender: NodeHandle, during: str = "") -> None:
        others = [n for n in self.net.nodes.values() if n is not sender]
        k = self.rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
        to = self.rng.sample(others, min(k, len(others)))
        path, size, digest, how = self.pick_file(sender)
        if during:
            how += f"+{during}"
        res = self.net.cli(sender, "send", str(path), "--to", ",".join(n.address for n in to),
                           "--json", check=False, timeout=180)
        self.count("send_attempts")
        try:
            doc = json.loads(res.stdout)
        except json.JSONDecodeError:
            doc = {"error": (res.stderr or res.stdout).strip()[-300:]}
        if res.returncode == 0 and "id" in doc:
            self.sent.append(Sent(doc["id"], sender.name, [n.name for n in to], path, size,
                                  digest, time.monotonic() - self.t0, how))
            self.count("sends")
            self.count("bytes_sent", size * len(to))
            self.log(f"send {doc['id'][:12]} {sender.name} -> {','.join(n.name for n in to)} "
                     f"{size:,} B ({how})")
        elif "sender-killed" in how:
            self.uncertain.append(Sent("", sender.name, [n.name for n in to], path, size,
                                       digest, time.monotonic() - self.t0, how))
            self.count("sends_cut")
            self.log(f"send CUT {sender.name} -> {','.join(n.name for n in to)} "
                     f"({how}): exit {res.returncode} {doc.get('error')}")
        else:
            # A refusal may still have left an outbox row (the SEND was cut): adopt() looks.
            self.uncertain.append(Sent("", sender.name, [n.name for n in to], path, size,
                                       digest, time.monotonic() - self.t0, how + "+refused"))
            self.refused.append({"sender": sender.name, "to": [n.name for n in to],
                                 "code": res.returncode, "error": doc.get("error"),
                                 "how": how, "at": time.monotonic() - self.t0})
            self.count("sends_refused")
            self.log(f"send REFUSED {sender.name} -> {','.join(n.name for n in to)} "
                     f"({how}): exit {res.returncode} {doc.get('error')}")

    def send_while(self, sender: NodeHandle, cut: Any, what: str) -> None:
        """Run a send and, while it runs, `cut()` (a kill or a server restart)."""
        t = threading.Thread(target=self.send, args=(sender, what), daemon=True)
        t.start()
        time.sleep(self.rng.uniform(0.0, 0.4))
        cut()
        t.join(200)

    def recent_party(self) -> NodeHandle | None:
        """A sender or recipient of one of the last few messages: likely mid-transfer."""
        recent = [s for s in self.sent[-6:]]
        names = {n for s in recent for n in (s.sender, *s.to)} - set(self.down)
        return self.net.nodes[self.rng.choice(sorted(names))] if names else None

    # --- the run -------------------------------------------------------------------------
    def step(self) -> None:
        self.revive()
        up = self.up()
        server_up = self.server_down_until is None
        r = self.rng.random()
        kill_w = 0.30 if self.harsh else 0.18
        if r < 0.55 and up:
            self.send(self.rng.choice(up))
        elif r < 0.55 + kill_w and len(up) > 2:
            victim = self.recent_party() if self.rng.random() < 0.75 else None
            victim = victim or self.rng.choice(up)
            if self.harsh and self.rng.random() < 0.15:
                self.send_while(victim, lambda: self.take_down(victim, kill=True,
                                                               why="during its own send"),
                                "sender-killed-during-send")
            elif self.harsh and self.rng.random() < 0.3 and len(up) > 2:
                sender = self.rng.choice([n for n in up if n is not victim])
                self.send_while(sender, lambda: self.take_down(victim, kill=True,
                                                               why="during a send"),
                                "kill-during-send")
            else:
                self.take_down(victim, kill=self.rng.random() < 0.6, why="mid-transfer"
                               if victim.name in {n for s in self.sent[-6:] for n in
                                                  (s.sender, *s.to)} else "random")
        elif r < 0.55 + kill_w + (0.06 if self.harsh else 0.03) and server_up:
            kill = self.rng.random() < 0.5
            pause = self.rng.uniform(0.0, 6.0)
            if self.harsh and up and self.rng.random() < 0.5:
                self.send_while(self.rng.choice(up),
                                lambda: self.server_restart(kill=kill, pause=pause),
                                "server-restart-during-send")
            else:
                self.server_restart(kill=kill, pause=pause)
        else:
            time.sleep(self.rng.uniform(0.2, 3.0 if not self.harsh else 1.5))

    def settle(self, stall: float, cap: float) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Start everything, then wait while anything moves: until every (recipient,
        message) is complete and every sender shows every recipient downloaded, or
        nothing changed for `stall` seconds, or `cap` seconds passed."""
        self.revive(everything=True)
        for _ in range(10):  # a start that failed is retried
            if not self.down:
                break
            time.sleep(2)
            self.revive(everything=True)
        self.log("settling: everything up")
        self.adopt()
        start = last_change = time.monotonic()
        seen: Any = None
        while True:
            inbox = self.inboxes()
            status = self.statuses()
            state = self.snapshot(inbox, status)
            done = all(v == ("complete", "downloaded") for v in state.values())
            now = time.monotonic()
            if state != seen:
                seen, last_change = state, now
            if done or now - last_change > stall or now - start > cap:
                waiting = sum(v != ("complete", "downloaded") for v in state.values())
                self.log(f"settled in {now - start:.0f} s; {waiting} not done")
                self.counts["settle_s"] = int(now - start)
                return {k: v for k, v in inbox.items()}
            time.sleep(2)

    def adopt(self) -> None:
        """Sends whose CLI gave no id (cut by their node's kill, or refused) but that the
        sender's outbox holds: with every recipient failed `not sent: ...` that is a clear
        state (counted); otherwise the message went out and must be delivered."""
        known = {s.id for s in self.sent}
        status = self.statuses()
        for (who, mid), row in sorted(status.items()):
            if mid in known:
                continue
            to = sorted(r["address"].split("@")[0] for r in row["recipients"])
            for u in self.uncertain:
                if (u.id == mid or not u.id) and u.sender == who and str(u.path) == row["path"] \
                        and sorted(u.to) == to:
                    u.id = mid
                    if all(r["state"] == "failed" and (r["reason"] or "").startswith(
                            "not sent") for r in row["recipients"]):
                        if mid not in self.not_sent:
                            self.not_sent.add(mid)
                            self.count("sends_not_sent_shown")
                            self.log(f"{mid[:12]} ({u.note}): {who}'s status shows it "
                                     "not sent")
                    else:
                        self.not_sent.discard(mid)
                        self.sent.append(u)
                        self.count("sends_cut_but_sent")
                        self.log(f"adopted {mid[:12]} ({u.note}): {who}'s outbox has it")
                    break

    def inboxes(self) -> dict[tuple[str, str], Any]:
        """(recipient, message id) -> the list of that node's inbox entries with that id."""
        out: dict[tuple[str, str], Any] = {}
        for n in self.net.nodes.values():
            try:
                entries = self.net.cli_json(n, "inbox", "--all")
            except (LabError, json.JSONDecodeError, subprocess.TimeoutExpired):
                continue
            for e in entries:
                out.setdefault((n.name, e["id"]), []).append(e)
        return out

    def statuses(self) -> dict[tuple[str, str], Any]:
        """(sender, message id) -> that message's row in the sender's `status`."""
        out: dict[tuple[str, str], Any] = {}
        for n in self.net.nodes.values():
            try:
                rows = self.net.cli_json(n, "status")
            except (LabError, json.JSONDecodeError, subprocess.TimeoutExpired):
                continue
            for m in rows:
                out[(n.name, m["id"])] = m
        return out

    def snapshot(self, inbox: dict[tuple[str, str], Any],
                 status: dict[tuple[str, str], Any]) -> dict[tuple[str, str], tuple[Any, ...]]:
        state: dict[tuple[str, str], tuple[Any, ...]] = {}
        for s in self.sent:
            row = status.get((s.sender, s.id))
            rstate = {r["address"].split("@")[0]: r["state"] for r in row["recipients"]} \
                if row else {}
            for who in s.to:
                es = inbox.get((who, s.id)) or []
                prog = tuple((e["state"], e["progress"]) for e in es)
                st = es[0]["state"] if len(es) == 1 else f"{len(es)} entries"
                state[(who, s.id)] = (st, rstate.get(who)) if st == "complete" and \
                    rstate.get(who) == "downloaded" else (st, rstate.get(who), prog)
        return state

    def check(self, inbox: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
        status = self.statuses()
        failures: list[dict[str, Any]] = []
        digests: dict[str, str] = {}

        def digest(p: str) -> str:
            if p not in digests:
                d = hashlib.blake2b()
                with open(p, "rb") as f:
                    while chunk := f.read(MiB):
                        d.update(chunk)
                digests[p] = d.hexdigest()
            return digests[p]

        def fail(s: Sent | None, node: str, what: str, entry: Any = None) -> None:
            failures.append({"id": s.id if s else None, "node": node, "what": what,
                             "sender": s.sender if s else None, "size": s.size if s else None,
                             "how": s.note if s else None, "sent_at": s.at if s else None,
                             "state": entry.get("state") if isinstance(entry, dict) else None,
                             "error": entry.get("error") if isinstance(entry, dict) else None,
                             "entry": entry})

        ids = {s.id for s in self.sent} | self.not_sent
        for s in self.sent:
            for who in s.to:
                es = inbox.get((who, s.id)) or []
                if len(es) != 1:
                    fail(s, who, f"{len(es)} inbox entries (want exactly 1)",
                         es[0] if es else None)
                    continue
                e = es[0]
                if e["state"] != "complete":
                    fail(s, who, f"not complete: {e['state']} {e['progress']:.0%}", e)
                    continue
                if e["size"] != s.size:
                    fail(s, who, f"size {e['size']} != sent {s.size}", e)
                if not e["path"] or not Path(e["path"]).exists():
                    fail(s, who, f"received file missing: {e['path']}", e)
                elif digest(e["path"]) != s.digest:
                    fail(s, who, "received bytes differ from the sent file", e)
            row = status.get((s.sender, s.id))
            if row is None:
                fail(s, s.sender, "not in the sender's status")
                continue
            for r in row["recipients"]:
                if r["state"] != "downloaded":
                    fail(s, s.sender, f"status shows {r['address']} {r['state']} "
                         f"({r.get('shown')}, {r.get('reason')})", r)
            got = sorted(r["address"].split("@")[0] for r in row["recipients"])
            if got != sorted(s.to):
                fail(s, s.sender, f"status lists recipients {got}, sent to {sorted(s.to)}")
        for (who, mid), es in inbox.items():
            if mid not in ids:
                fail(None, who, f"inbox entry {mid} for no send that returned an id", es[0])
        for (who, mid), row in status.items():
            if mid not in ids:
                fail(None, who, f"outbox row {mid} for no send that returned an id", row)
        return failures

    def tail(self, name: str, lines: int = 25) -> str:
        node = self.net.nodes.get(name)
        if node is None:
            return ""
        path = node.home / "node.log"
        if not path.exists():
            return "(no node.log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--harsh", action="store_true",
                   help="more kills; kills and server restarts while a send runs")
    p.add_argument("--stall", type=float, default=120.0,
                   help="settling ends when nothing changed for this long (s)")
    p.add_argument("--cap", type=float, default=900.0, help="longest settling (s)")
    p.add_argument("--root", type=Path, help="keep the lab here (default: a temp dir, "
                   "removed when everything passed)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    root = a.root or Path(tempfile.mkdtemp(prefix=f"soak-{a.seed}-"))
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    print(f"soak: seed {a.seed}, {a.minutes} min, {a.nodes} nodes, lab in {root}", flush=True)
    with LocalNetwork(root / "lab") as net:
        net.start_server()
        soak = Soak(rng, net, files, a.harsh)
        for i in range(a.nodes):
            net.add_node(f"n{i}")
        for n in list(net.nodes.values()):
            soak.start(n)
        end = time.monotonic() + a.minutes * 60
        while time.monotonic() < end:
            soak.step()
        run_s = time.monotonic() - soak.t0
        inbox = soak.settle(a.stall, a.cap)
        before = soak.counts.get("sends_cut_but_sent", 0)
        soak.adopt()  # a `not sent` row whose SEND the server had taken after all
        if soak.counts.get("sends_cut_but_sent", 0) > before:
            inbox = soak.settle(a.stall, a.cap)
        failures = soak.check(inbox)
        for f in failures:
            print(f"\nFAIL {f['id']} at {f['node']}: {f['what']} (sender {f['sender']}, "
                  f"{f['size']} B, {f['how']}, sent at {f['sent_at']}); "
                  f"state {f['state']} error {f['error']}")
            f["log_tail"] = soak.tail(f["node"])
            print(f["log_tail"])
        # Saved on every run: the events that led here.
        (root / "events.log").write_text("\n".join(soak.events) + "\n")

    c = soak.counts
    deliveries = sum(len(s.to) for s in soak.sent)
    rows: list[dict[str, Any]] = [
        {"metric": "run", "value": round(run_s, 1), "unit": "s"},
        {"metric": "messages sent", "value": c.get("sends", 0), "unit": "msgs"},
        {"metric": "deliveries (recipient, message)", "value": deliveries, "unit": ""},
        {"metric": "bytes to deliver", "value": c.get("bytes_sent", 0), "unit": "B"},
        {"metric": "sends refused (clear error)", "value": c.get("sends_refused", 0),
         "unit": "sends"},
        {"metric": "sends cut by their node's kill -9", "value": c.get("sends_cut", 0),
         "unit": "sends"},
        {"metric": "cut or refused sends in the outbox (must deliver)",
         "value": c.get("sends_cut_but_sent", 0), "unit": "sends"},
        {"metric": "sends shown `not sent` in status", "value": c.get("sends_not_sent_shown", 0),
         "unit": "sends"},
        {"metric": "node kill -9", "value": c.get("node_kills", 0), "unit": ""},
        {"metric": "node stops", "value": c.get("node_stops", 0), "unit": ""},
        {"metric": "node starts", "value": c.get("node_starts", 0), "unit": ""},
        {"metric": "server kill -9", "value": c.get("server_kills", 0), "unit": ""},
        {"metric": "server stops", "value": c.get("server_stops", 0), "unit": ""},
        {"metric": "settle", "value": c.get("settle_s", 0), "unit": "s"},
        {"metric": "failures", "value": len(failures), "unit": "", "target": 0,
         "ok": not failures},
        {"metric": "start failures / stop hangs",
         "value": c.get("start_failures", 0) + c.get("stop_hangs", 0), "unit": "",
         "target": 0, "ok": not (c.get("start_failures", 0) + c.get("stop_hangs", 0))},
    ]
    out = a.out or OUT_DIR / f"soak-{a.seed}.json"
    report("soak", rows, out=out, meta={
        "seed": a.seed, "minutes": a.minutes, "nodes": a.nodes, "harsh": a.harsh,
        "root": str(root), "counts": c, "failures": failures, "refused": soak.refused,
        "messages": [{"id": s.id, "sender": s.sender, "to": s.to, "size": s.size,
                      "how": s.note, "at": round(s.at, 1)} for s in soak.sent]})
    ok = not failures and not c.get("start_failures") and not c.get("stop_hangs")
    if ok and a.root is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"lab kept in {root}")
    return 0 if ok else 1
