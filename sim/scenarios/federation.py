"""federation: mail across mail domains, one domain's server down for a while.

`domains` domains, each with its real rendezvous server on its own host, linked as in
production: each server finds the others through a resolver (a `StaticResolver` holding
what DNS would publish: the server's address and its domain key) and forwards foreign
mail over authenticated server links from its durable outbound queue
(rendezvous/federation.py). Each domain has topology.hosts users, each the real `Node` on
its own host. Every user sends workload.messages files of workload.size_mb MB (random
bytes), each to workload.recipients distinct random users of the other domains, at times
workload.send draws (sorted per user); the recipients' nodes download them from the
sender, sealed, hashed and verified as at home.

The users have exchanged keys before (each sender FINGERs its recipients once and pins
their keys, as after an earlier message), so a sender whose recipient's server is out of
reach still seals for the pinned keys and the message waits at the sender's server.

With churn.server_outage, domain `domain` (0-based) has its server stopped (`aclose`, as
on SIGTERM) at `at_s` for `for_s` seconds, then started again on the same host and
port with the same SQLite file: its queues, the outbound queue included, come back, and
its users' nodes reconnect with their backoff. A user of that domain whose send falls in
the outage sends once its node is connected again (`planned_at_s` < `send_at_s`).

Measured per message and recipient (one CSV row): from the send (the user's `send`:
FINGER through the servers, sealing, SEND; `acked_at_s` is when the sender's server
acknowledged it) to the location message in the recipient's inbox, and to the file
complete there; that the recipient's inbox holds each message exactly once, no other; and
that the bytes are equal.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.deploy import EPOCH, Deployed, SimNode, deploy_rendezvous, domain_records
from sim.plots import Plot
from sim.scenario import (
    Peers,
    Progress,
    ScenarioResult,
    ScenarioSpec,
    draw,
    draw_int,
    times,
)
from sim.scenarios.dht_lookup import percentile
from sim.scenarios.family_video import MB, file_digest, write_clip
from sim.simulation import Simulation
from sim.trace import EventKind

MIB = 1 << 20
COLUMNS = ["message", "sender", "recipient", "mib", "planned_at_s", "send_at_s", "acked_at_s",
           "location_at_s", "complete_at_s", "location_delay_s", "complete_delay_s",
           "to_downed_while_down", "from_downed_deferred", "copies_in_inbox", "bytes_equal"]
WAIT_LIMIT_S = 6 * 3600.0  # virtual: every message is delivered well within this


@dataclass(frozen=True, slots=True)
class Params:
    """What a federation run reads from its scenario's sections."""

    domains: int
    users_per_domain: int
    recipients: int
    messages: dict[str, Any]
    size: dict[str, Any]
    send: dict[str, Any]
    down_domain: int = -1
    down_at_s: float = 0.0
    down_for_s: float = 0.0

    @classmethod
    def from_spec(cls, spec: ScenarioSpec) -> Params:
        """topology.domains, hosts (users per domain); workload.messages, recipients,
        size_mb, send;
        churn.server_outage."""
        w = spec.doc["workload"]
        outage = spec.doc["churn"].get("server_outage") or {"domain": -1, "at_s": 0.0,
                                                            "for_s": 0.0}
        return cls(domains=spec.doc["topology"]["domains"],
                   users_per_domain=spec.doc["topology"]["hosts"],
                   recipients=w["recipients"],
                   messages=w.get("messages") or {"dist": "uniform", "low": 1, "high": 3},
                   size=w.get("size_mb") or {"dist": "uniform", "low": 1.0, "high": 4.0},
                   send=w["send"], down_domain=outage["domain"], down_at_s=outage["at_s"],
                   down_for_s=outage["for_s"])


def domain_name(i: int) -> str:
    return f"{chr(ord('a') + i)}.example"


@dataclass(slots=True)
class Planned:
    """One message of the plan, and what happened to it."""

    n: int
    sender: int      # index into the users
    recipients: tuple[int, ...]
    size: int
    at: float        # planned send time (virtual s)
    path: Path | None = None
    mid: bytes | None = None
    called_at: float | None = None  # the user pressed send
    sent_at: float | None = None    # the sender's server acknowledged the SEND
    error: str | None = None


class _Outage:
    """The downed domain's server: stopped at `down_at_s`, started again `down_for_s` later."""

    def __init__(self) -> None:
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.up = asyncio.Event()
        self.up.set()


def _plan(sim: Simulation, p: Params) -> list[Planned]:
    rng = sim.rng_for("federation/plan")
    users = p.domains * p.users_per_domain
    plan: list[Planned] = []
    for u in range(users):
        mine = u // p.users_per_domain
        others = [v for v in range(users) if v // p.users_per_domain != mine]
        count = draw_int(p.messages, rng)
        for at in sorted(times(p.send, count, rng)):
            to = ((rng.choice(others),) if p.recipients == 1
                  else tuple(rng.sample(others, p.recipients)))
            plan.append(Planned(len(plan), u, to, max(1, int(draw(p.size, rng) * MB)), at))
    return plan


def run(sim: Simulation, spec: ScenarioSpec, progress: Progress | None) -> ScenarioResult:
    """Run the plan; rows per message, summary, plots."""
    from rendezvous.dns import StaticResolver

    p = Params.from_spec(spec)
    names = [domain_name(i) for i in range(p.domains)]
    server_hosts = [sim.add_host(f"rv-{d}") for d in names]  # well-connected servers
    peers = Peers(sim, spec, p.domains * p.users_per_domain)
    user_hosts = [peers.add(f"{d.partition('.')[0]}{i}", nat=False)
                  for d in names for i in range(p.users_per_domain)]
    resolver = StaticResolver({d: domain_records(d, h, sim) for d, h in zip(names, server_hosts,
                                                                              strict=True)})
    plan = _plan(sim, p)
    outage = _Outage()
    total = len(plan)
    done = [0]

    def domain_of_user(u: int) -> int:
        return u // p.users_per_domain

    async def main(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        servers: list[Deployed] = []
        for i, (d, h) in enumerate(zip(names, server_hosts, strict=True)):
            servers.append(await deploy_rendezvous(
                sim, h, d, resolver=resolver,
                store_path=root / f"{d}.sqlite3" if i == p.down_domain else None))
        nodes = [SimNode(sim, h, root / h.name,
                         f"{h.name}@{names[domain_of_user(u)]}",
                         servers[domain_of_user(u)].address)
                 for u, h in enumerate(user_hosts)]
        for n in nodes:
            await n.init()
        for n in nodes:
            await n.start()
        files = root / "files"
        files.mkdir()
        for m in plan:
            m.path = files / f"m{m.n}.bin"
            write_clip(m.path, m.size, f"{sim.seed}/federation/{m.n}")
        await _exchange_keys(nodes, plan)
        t0 = sim.now
        counters: dict[str, Any] = {}

        async def outage_task() -> None:
            if p.down_domain < 0:
                return
            await asyncio.sleep(p.down_at_s)
            host = server_hosts[p.down_domain]
            outage.up.clear()
            outage.down_at = sim.now - t0
            await host.create_task(servers[p.down_domain].server.aclose())
            await asyncio.sleep(p.down_for_s)
            servers[p.down_domain] = await deploy_rendezvous(
                sim, host, names[p.down_domain], resolver=resolver,
                store_path=root / f"{names[p.down_domain]}.sqlite3", run=1)
            outage.up_at = sim.now - t0
            outage.up.set()

        async def send(m: Planned) -> None:
            await asyncio.sleep(m.at)
            node = nodes[m.sender]
            if domain_of_user(m.sender) == p.down_domain:
                await outage.up.wait()
            assert node.node is not None and m.path is not None
            running = node.node
            await running.rendezvous.wait_connected()
            m.called_at = sim.now - t0
            try:
                sent = await node.host.create_task(running.send(
                    m.path, [nodes[r].address for r in m.recipients], f"m{m.n}", ""))
            except Exception as exc:  # a SendError: the row says so
                m.error = str(exc)
                return
            m.mid = bytes.fromhex(sent["id"])
            m.sent_at = sim.now - t0

        async with asyncio.TaskGroup() as tg:
            tg.create_task(outage_task())
            for m in plan:
                tg.create_task(send(m))

        rows: list[dict[str, Any]] = []
        digests = {m.n: file_digest(m.path) for m in plan if m.path is not None}

        async def receive(r: int) -> None:
            mine = [m for m in plan if r in m.recipients and m.mid is not None]
            want = {m.mid for m in mine}
            from overlay.mail.inbox_state import InboxState

            def complete(entries: list[Any]) -> bool:
                return want <= {e.id for e in entries if e.state is InboxState.COMPLETE}

            entries = await nodes[r].wait_inbox(complete, every=1.0)
            by_id: dict[bytes, list[Any]] = {}
            for e in entries:
                by_id.setdefault(e.id, []).append(e)
            for m in mine:
                assert m.mid is not None and m.sent_at is not None
                (e, *_) = by_id[m.mid]
                loc, fin = e.received_at - EPOCH - t0, (e.completed_at or 0) - EPOCH - t0
                down = (outage.down_at is not None and outage.up_at is not None
                        and domain_of_user(r) == p.down_domain
                        and outage.down_at <= m.sent_at < outage.up_at)
                rows.append(_row(m, r, nodes, loc, fin, len(by_id[m.mid]), down,
                                 (m.called_at or 0) - m.at > 1.0,
                                 file_digest(Path(str(e.path))) == digests[m.n]))
                done[0] += 1
                if progress is not None:
                    progress(done[0], total)
            counters[nodes[r].address] = sorted(
                e.title for e in entries if e.id not in want)  # anything unexpected

        async with asyncio.timeout(WAIT_LIMIT_S):
            await asyncio.gather(*(receive(r) for r in range(len(nodes))))
        stray = {a: t for a, t in counters.items() if t}
        fed = {names[i]: {k: v for k, v in s.server.snapshot().items()
                          if k in ("fed_forwarded", "fed_link_failures", "links_accepted")}
               for i, s in enumerate(servers)}
        for n in nodes:
            await n.stop()
        for s in servers:
            await s.host.create_task(s.server.aclose())
        failed = [f"m{m.n}: {m.error}" for m in plan if m.error is not None]
        return rows, {"stray": stray, "federation": fed, "failed": failed}

    with tempfile.TemporaryDirectory(prefix="peerpost-sim-") as tmp:
        rows, extra = sim.run(main(Path(tmp)))
    rows.sort(key=lambda r: int(r["message"][1:]))
    return ScenarioResult(COLUMNS, rows, _summary(p, plan, rows, extra, outage, sim),
                          _plots(p, rows))


async def _exchange_keys(nodes: list[SimNode], plan: list[Planned]) -> None:
    """Each sender FINGERs its recipients once and pins their device keys."""
    pairs = sorted({(m.sender, r) for m in plan for r in m.recipients})
    for s, r in pairs:
        node = nodes[s].node
        assert node is not None
        addr = nodes[r].address
        info = await nodes[s].host.create_task(node.rendezvous.finger(addr))
        node.contacts.pin_keys(addr, [d.verify_key for d in info.devices], node.wall())


def _row(m: Planned, r: int, nodes: list[SimNode], loc: float, fin: float, copies: int,
         to_downed: bool, deferred: bool, equal: bool) -> dict[str, Any]:
    assert m.sent_at is not None
    return {"message": f"m{m.n}", "sender": nodes[m.sender].address,
            "recipient": nodes[r].address, "mib": round(m.size / MIB, 3),
            "planned_at_s": round(m.at, 3), "send_at_s": round(m.called_at or 0, 3),
            "acked_at_s": round(m.sent_at, 3),
            "location_at_s": round(loc, 3), "complete_at_s": round(fin, 3),
            "location_delay_s": round(loc - (m.called_at or 0), 3),
            "complete_delay_s": round(fin - (m.called_at or 0), 3),
            "to_downed_while_down": to_downed, "from_downed_deferred": deferred,
            "copies_in_inbox": copies, "bytes_equal": equal}


def _summary(p: Params, plan: list[Planned], rows: list[dict[str, Any]],
             extra: dict[str, Any], outage: _Outage, sim: Simulation) -> dict[str, Any]:
    loc = [r["location_delay_s"] for r in rows]
    fin = [r["complete_delay_s"] for r in rows]
    downed = [r for r in rows if r["to_downed_while_down"]]
    normal = [r["location_delay_s"] for r in rows if not r["to_downed_while_down"]]
    deliveries = sum(len(m.recipients) for m in plan)
    summary: dict[str, Any] = {
        "domains": p.domains, "users": p.domains * p.users_per_domain,
        "messages": len(plan), "recipients per message": p.recipients,
        "MiB sent": round(sum(m.size for m in plan) / MIB, 1),
        "send failures": len(extra["failed"]),
        "delivered": f"{len(rows)}/{deliveries}",
        "delivered exactly once": (len(rows) == deliveries
                                   and all(r["copies_in_inbox"] == 1 for r in rows)
                                   and not extra["stray"]),
        "all bytes equal": all(r["bytes_equal"] for r in rows),
        "outage": (f"{domain_name(p.down_domain)} down {outage.down_at:.0f}-"
                   f"{outage.up_at:.0f} s" if outage.down_at is not None
                   and outage.up_at is not None else "none"),
        "sent to the downed domain while down": len(downed),
        "their location messages after the restart": all(
            outage.up_at is not None and r["location_at_s"] >= outage.up_at for r in downed),
        "deferred sends of the downed domain": sum(r["from_downed_deferred"] for r in rows),
        "location delay p50 s": round(percentile(loc, 0.5), 2),
        "location delay p90 s": round(percentile(loc, 0.9), 2),
        "location delay max s": round(max(loc, default=float("nan")), 2),
        "location delay p90 s (domains up)": round(percentile(normal, 0.9), 2),
        "location delay p50 s (to downed, while down)": round(
            percentile([r["location_delay_s"] for r in downed], 0.5), 1),
        "file complete delay p50 s": round(percentile(fin, 0.5), 2),
        "file complete delay p90 s": round(percentile(fin, 0.9), 2),
        "file complete delay max s": round(max(fin, default=float("nan")), 2),
        "envelopes forwarded per server (mail and receipts; since last start)": ", ".join(
            f"{d} {v.get('fed_forwarded', 0)}" for d, v in extra["federation"].items()),
        "hosts_run": "the real rendezvous server per domain (linked through a resolver), "
                     "the real Node per user",
        "tcp segments": sim.trace.count(EventKind.TCP_DATA)}
    if extra["failed"]:
        summary["first failure"] = extra["failed"][0]
    return summary


def _plots(p: Params, rows: list[dict[str, Any]]) -> list[Plot]:
    return [Plot(
        "delivery-delay-cdf", "cdf",
        f"Cross-domain mail, {p.domains} domains x {p.users_per_domain} users"
        + (f", {domain_name(p.down_domain)} down {p.down_for_s:g} s"
           if p.down_domain >= 0 else ""),
        "delay after the send (s, virtual)", "fraction of messages",
        {"send -> location message": [max(r["location_delay_s"], 1e-3) for r in rows],
         "send -> file complete": [max(r["complete_delay_s"], 1e-3) for r in rows],
         "to the downed domain while down: location": [
             max(r["location_delay_s"], 1e-3) for r in rows if r["to_downed_while_down"]]},
        logx=True)]
