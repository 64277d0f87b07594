"""A chaos soak of real delivery: random sends while nodes and the server are stopped,
killed (-9) and restarted, then a check that every message arrived once and intact.

`python -m benchmarks soak --minutes N --seed S [--nodes 5] [--harsh] [--root DIR]
[--domains 2]`

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

With `--domains 2`: mail between two domains, a.test and b.test, each with its own
server (a port fixed before DNS is written, reused by every restart) and `--nodes` nodes
(default 3 each, a0.. and b0..), made with `peerpost init --address NAME@DOMAIN` alone: one
dnsmasq serves what each server's `dns-records` prints (PEERPOST_RESOLVER names it; without
dnsmasq the soak says so and exits 2). Sends go within and across domains (often to both at
once); a server stop or kill -9 picks either server, and one in three keeps it down 8-25 s,
so that mail for it waits in the other server's outbound queue; a send that returns while
a recipient's server is down is followed, two times in five, by a stop or kill -9 of the
sender's own server, whose outbound queue then holds it; a server that comes back while
mail for it still waits in the other's queue (backed off) is, two times in five, stopped or
killed again within 3 s. Each server cut and start logs and counts what waited in the
outbound queues (read from the servers' SQLite stores). The end checks are the same (for
mail across domains the sender's `status` must end `downloaded` too), and no server may
have logged a bounce (the expiry is the default 5 days). A server that needs SIGKILL to
stop counts as a stop hang, as a node's does.

Nodes run with `--retry-base 1 --retry-max 10` (defaults 5 and 300) so that a download
whose sources were all down retries within seconds once they are back, and `--web off`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import OUT_DIR, report
from overlay.app.lab import LabError, LocalNetwork, NodeHandle
from rendezvous.sqlite_store import DB_NAME

KiB = 1 << 10
MiB = 1 << 20
MIN_SIZE, MAX_SIZE = 1 * KiB, 30 * MiB
SLOW_RATE = 4 * MiB  # --max-upload-rate of a slowed sender
DOMAINS = ("a.test", "b.test")  # --domains 2


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
    nets: dict[str, LocalNetwork]  # mail domain -> its server and nodes
    files: Path
    harsh: bool
    sent: list[Sent] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    # Sends whose own node was killed while they ran: the CLI could not say whether the
    # message went out. If the sender's outbox has it, it must be delivered like any other.
    uncertain: list[Sent] = field(default_factory=list)
    not_sent: set[str] = field(default_factory=set)  # outbox rows shown failed `not sent`
    down: dict[str, float] = field(default_factory=dict)  # node -> monotonic restart time
    server_down: dict[str, float] = field(default_factory=dict)  # domain -> restart time
    # domain -> when to cut its server again: it came up while mail for it waited elsewhere
    recut: dict[str, float] = field(default_factory=dict)
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

    # --- nodes and servers ---------------------------------------------------------------
    @property
    def multi(self) -> bool:
        return len(self.nets) > 1

    @property
    def nodes(self) -> dict[str, NodeHandle]:
        """Every node of every domain by name (names are unique: the address's local part)."""
        return {name: n for net in self.nets.values() for name, n in net.nodes.items()}

    def net_of(self, node: NodeHandle) -> LocalNetwork:
        return self.nets[domain_of(node.address)]

    def server_label(self, domain: str) -> str:
        return f"server {domain}" if self.multi else "server"

    def up(self) -> list[NodeHandle]:
        return [n for n in self.nodes.values() if n.name not in self.down]

    def start(self, node: NodeHandle) -> None:
        extra = ["--web", "off", "--retry-base", "1", "--retry-max", "10"]
        if self.rng.random() < 0.35:
            extra += ["--max-upload-rate", str(SLOW_RATE)]
        node.extra = extra
        try:
            # A node prints "ready" once logged in, so this runs only while the server is up.
            self.net_of(node).start_node(node, timeout=60)
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
            self.net_of(node).kill_node(node)
            self.count("node_kills")
        else:
            try:
                self.net_of(node).stop_node(node)
            except LabError as exc:
                self.log(f"STOP HUNG {node.name}: {exc}")
                self.count("stop_hangs")
            self.count("node_stops")
        delay = self.rng.uniform(0.5, 8.0)
        self.down[node.name] = time.monotonic() + delay
        self.log(f"{'kill -9' if kill else 'stop'} {node.name} ({why}); back in {delay:.1f} s")

    def server_restart(self, domain: str, *, kill: bool, pause: float) -> None:
        server = self.nets[domain].server
        assert server is not None
        note = self.queue_note(domain, "cut")
        if kill:
            server.kill()
            self.count("server_kills")
        else:
            try:
                server.stop()
            except LabError as exc:
                self.log(f"SERVER STOP HUNG: {exc}")
                self.count("stop_hangs")
            self.count("server_stops")
        if self.multi:
            self.count(f"server_{'kills' if kill else 'stops'} {domain}")
        self.log(f"{self.server_label(domain)} {'kill -9' if kill else 'stop'}; "
                 f"back in {pause:.1f} s{note}")
        self.server_down[domain] = time.monotonic() + pause

    def queue_note(self, domain: str, when: str) -> str:
        """With two domains: what waits in `domain`'s outbound queue and in the others'
        queues for `domain`, counted as `when` (cut, start) with mail queued."""
        if not self.multi:
            return ""
        mine, for_it = self.queued(domain)
        if mine:
            self.count(f"server_{when}_outbound_queued")
        if for_it:
            self.count(f"server_{when}_mail_queued_for_it")
        return f" (its outbound queue {mine}, queued for it elsewhere {for_it})"

    def queued(self, domain: str) -> tuple[int, int]:
        """(envelopes in `domain`'s outbound queue, envelopes for `domain` in the others')."""
        mine = sum(outbound_waiting(self.nets[domain].data_dir).values())
        for_it = sum(outbound_waiting(net.data_dir).get(domain, 0)
                     for d, net in self.nets.items() if d != domain)
        return mine, for_it

    def revive(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        for domain, when in sorted(self.server_down.items()):
            if everything or now >= when:
                note = self.queue_note(domain, "start")
                self.nets[domain].start_server(timeout=60)
                del self.server_down[domain]
                self.count("server_starts")
                self.log(f"{self.server_label(domain)} up{note}")
                # Mail for it still waits at the other server (its retry is backed off):
                # sometimes cut it again before that mail arrives.
                if self.multi and not everything and self.queued(domain)[1] \
                        and self.rng.random() < 0.4:
                    self.recut[domain] = now + self.rng.uniform(0.0, 3.0)
        for name, when in sorted(self.down.items()):
            node = self.nodes[name]
            if domain_of(node.address) in self.server_down:
                continue  # a node would wait for its login before it says ready
            if everything or now >= when:
                self.start(node)
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
        others = [n for n in self.nodes.values() if n is not sender]
        k = self.rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
        to = self.rng.sample(others, min(k, len(others)))
        path, size, digest, how = self.pick_file(sender)
        if during:
            how += f"+{during}"
        res = self.net_of(sender).cli(sender, "send", str(path), "--to",
                                      ",".join(n.address for n in to), "--json", check=False,
                                      timeout=180)
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
            if self.multi:
                self.count_cross(sender, to, during)
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

    def count_cross(self, sender: NodeHandle, to: list[NodeHandle], during: str) -> None:
        """Two domains: count a sent message's kind; one for a domain whose server is down
        waits in the sender's server's queue, which is then sometimes cut (stop, kill -9)."""
        home = domain_of(sender.address)
        domains = {domain_of(n.address) for n in to}
        if domains - {home}:
            self.count("sends_cross_domain")
        if len(domains) > 1:
            self.count("sends_to_both_domains")
        if domains & set(self.server_down) - {home}:
            self.count("sends_for_a_down_domain")
            if not during and home not in self.server_down and self.rng.random() < 0.4:
                self.server_restart(home, kill=self.rng.random() < 0.5,
                                    pause=self.rng.uniform(0.0, 6.0))

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
        return self.nodes[self.rng.choice(sorted(names))] if names else None

    # --- the run -------------------------------------------------------------------------
    def step(self) -> None:
        self.revive()
        for domain, when in sorted(self.recut.items()):
            if time.monotonic() >= when:
                del self.recut[domain]
                if domain not in self.server_down and self.queued(domain)[1]:
                    self.count("server_recuts")
                    self.server_restart(domain, kill=self.rng.random() < 0.7,
                                        pause=self.rng.uniform(0.0, 6.0))
        up = self.up()
        servers_up = [d for d in self.nets if d not in self.server_down]
        server_up = bool(servers_up)
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
            domain = servers_up[0]
            if self.multi:
                domain = self.rng.choice(servers_up)
                if self.rng.random() < 0.35:  # long enough for mail to queue for it
                    pause = self.rng.uniform(8.0, 25.0)
            if self.harsh and up and self.rng.random() < 0.5:
                self.send_while(self.rng.choice(up),
                                lambda: self.server_restart(domain, kill=kill, pause=pause),
                                "server-restart-during-send")
            else:
                self.server_restart(domain, kill=kill, pause=pause)
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
        for n in self.nodes.values():
            try:
                entries = self.net_of(n).cli_json(n, "inbox", "--all")
            except (LabError, json.JSONDecodeError, subprocess.TimeoutExpired):
                continue
            for e in entries:
                out.setdefault((n.name, e["id"]), []).append(e)
        return out

    def statuses(self) -> dict[tuple[str, str], Any]:
        """(sender, message id) -> that message's row in the sender's `status`."""
        out: dict[tuple[str, str], Any] = {}
        for n in self.nodes.values():
            try:
                rows = self.net_of(n).cli_json(n, "status")
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
        for domain, net in self.nets.items() if self.multi else ():
            for line in net.server.log().splitlines() if net.server else ():
                if "event=outbound.bounced" in line or "event=outbound.expired" in line:
                    fail(None, f"server {domain}", f"bounced: {line}")
        return failures

    def tail(self, name: str, lines: int = 25) -> str:
        node = self.nodes.get(name)
        domain = name.removeprefix("server ")
        if node is None and domain in self.nets:
            path = self.nets[domain].root / "server.log"
        elif node is None:
            return ""
        else:
            path = node.home / "node.log"
        if not path.exists():
            return "(no node.log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def outbound_waiting(data_dir: Path) -> dict[str, int]:
    """Envelopes waiting in a server's outbound queue, by destination domain (read from its
    SQLite store, read-only; empty if it cannot be read)."""
    db = data_dir / DB_NAME
    if not db.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as conn:
            return {str(d): int(n) for d, n in conn.execute(
                "SELECT domain, COUNT(*) FROM outbound WHERE state='queued' GROUP BY domain")}
    except sqlite3.Error:
        return {}


class Domains:
    """Two mail domains on loopback: a LocalNetwork (server, nodes) per domain, each
    server on a port fixed before DNS is written (a restart reuses it), and one dnsmasq
    serving what each one's `peerpost-rendezvous dns-records` prints; every process finds
    the other domain, and a node its own server at `init`, through it."""

    def __init__(self, root: Path, domains: list[str]) -> None:
        from tests.dnstest import _free_port, start_dnsmasq

        self.nets: dict[str, LocalNetwork] = {}
        zone: list[str] = []
        for d in domains:
            net = LocalNetwork(root / d, domain=d)
            net.server_addr = ("127.0.0.1", _free_port())  # start_server listens there
            zone += subprocess.run(
                [sys.executable, "-m", "rendezvous", "dns-records", "--data",
                 str(net.data_dir), "--domain", d, "--host", f"rv.{d}", "--port",
                 str(net.server_addr[1])],
                capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
            self.nets[d] = net
        self.dns = start_dnsmasq(zone, {f"rv.{d}": "127.0.0.1" for d in domains})
        for net in self.nets.values():
            net.env["PEERPOST_RESOLVER"] = self.dns.hostport

    def add_node(self, domain: str, name: str) -> NodeHandle:
        """`peerpost init --address NAME@DOMAIN`: the server and its key come from DNS."""
        net = self.nets[domain]
        node = NodeHandle(name, f"{name}@{domain}", net.root / name)
        net.cli(node, "init", "--address", node.address, "--listen", "127.0.0.1:0")
        net.nodes[name] = node
        return node

    def close(self) -> None:
        for net in self.nets.values():
            net.close()
        self.dns.stop()


def multi_rows(c: dict[str, int], domains: list[str]) -> list[dict[str, Any]]:
    """The report's rows that only two domains have."""
    rows: list[dict[str, Any]] = [
        {"metric": "sends with a recipient of the other domain",
         "value": c.get("sends_cross_domain", 0), "unit": "msgs"},
        {"metric": "sends to both domains at once", "value": c.get("sends_to_both_domains", 0),
         "unit": "msgs"},
        {"metric": "sends while a recipient's server was down",
         "value": c.get("sends_for_a_down_domain", 0), "unit": "msgs"},
    ]
    for d in domains:
        rows += [{"metric": f"server {d} kill -9", "value": c.get(f"server_kills {d}", 0),
                  "unit": ""},
                 {"metric": f"server {d} stops", "value": c.get(f"server_stops {d}", 0),
                  "unit": ""}]
    rows.append({"metric": "servers cut again just after a start, mail for them still "
                 "queued at the other", "value": c.get("server_recuts", 0), "unit": ""})
    for when in ("cut", "start"):
        rows += [{"metric": f"server {when}s with its outbound queue not empty",
                  "value": c.get(f"server_{when}_outbound_queued", 0), "unit": ""},
                 {"metric": f"server {when}s with mail queued for it at the other",
                  "value": c.get(f"server_{when}_mail_queued_for_it", 0), "unit": ""}]
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--domains", type=int, choices=(1, 2), default=1,
                   help="2: a.test and b.test, each with its server, found through dnsmasq")
    p.add_argument("--nodes", type=int,
                   help="nodes per domain (default 5 with one domain, 3 with two)")
    p.add_argument("--harsh", action="store_true",
                   help="more kills; kills and server restarts while a send runs")
    p.add_argument("--stall", type=float, default=120.0,
                   help="settling ends when nothing changed for this long (s)")
    p.add_argument("--cap", type=float, default=900.0, help="longest settling (s)")
    p.add_argument("--root", type=Path, help="keep the lab here (default: a temp dir, "
                   "removed when everything passed)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.nodes is None:
        a.nodes = 5 if a.domains == 1 else 3
    if a.domains > 1:
        from tests.dnstest import dnsmasq_missing

        if (why := dnsmasq_missing()) is not None:
            print(f"soak --domains {a.domains} needs a name server: {why}", file=sys.stderr)
            return 2

    name = "soak" if a.domains == 1 else f"soak{a.domains}"
    root = a.root or Path(tempfile.mkdtemp(prefix=f"{name}-{a.seed}-"))
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    print(f"soak: seed {a.seed}, {a.minutes} min, "
          + (f"{a.nodes} nodes" if a.domains == 1 else
             f"{a.domains} domains of {a.nodes} nodes each")
          + f", lab in {root}", flush=True)
    with contextlib.ExitStack() as stack:
        if a.domains == 1:
            net = stack.enter_context(LocalNetwork(root / "lab"))
            net.start_server()
            soak = Soak(rng, {net.domain: net}, files, a.harsh)
            for i in range(a.nodes):
                net.add_node(f"n{i}")
        else:
            world = Domains(root / "lab", list(DOMAINS[:a.domains]))
            stack.callback(world.close)
            soak = Soak(rng, world.nets, files, a.harsh)
            for d, dnet in world.nets.items():
                dnet.start_server()
                for i in range(a.nodes):
                    world.add_node(d, f"{d[0]}{i}")
        for n in list(soak.nodes.values()):
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
        *(multi_rows(c, list(soak.nets)) if soak.multi else []),
        {"metric": "settle", "value": c.get("settle_s", 0), "unit": "s"},
        {"metric": "failures", "value": len(failures), "unit": "", "target": 0,
         "ok": not failures},
        {"metric": "start failures / stop hangs",
         "value": c.get("start_failures", 0) + c.get("stop_hangs", 0), "unit": "",
         "target": 0, "ok": not (c.get("start_failures", 0) + c.get("stop_hangs", 0))},
    ]
    out = a.out or OUT_DIR / f"{name}-{a.seed}.json"
    report(name, rows, out=out, meta={
        "seed": a.seed, "minutes": a.minutes, "nodes": a.nodes, "harsh": a.harsh,
        **({"domains": list(soak.nets)} if soak.multi else {}),
        "root": str(root), "counts": c, "failures": failures, "refused": soak.refused,
        "messages": [{"id": s.id, "sender": s.sender, "to": s.to, "size": s.size,
                      "how": s.note, "at": round(s.at, 1)} for s in soak.sent]})
    ok = not failures and not c.get("start_failures") and not c.get("stop_hangs")
    if ok and a.root is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"lab kept in {root}")
    return 0 if ok else 1
