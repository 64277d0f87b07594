"""A lab of public hosts on one bridge, each link shaped with `tc tbf`, and the real
sender-to-recipients delivery on it (the real half of the fidelity comparison).

    with ShapedLab(recipients=5, up_bit=5_000_000, down_bit=20_000_000) as lab:
        times = deliver_real(lab, tmp_path / "net", file, co_recipients=True)

Topology (names prefixed per lab, as in `NatLab`): a bridge in `inet`; `server`
(198.18.0.10 and .11, unshaped: an ISP's well-connected server), `snd` (198.18.0.30) and
`r0`... (198.18.0.40 + i). No NAT anywhere: every node reaches every other directly.
Each shaped host sits behind its own modem, a namespace `m-<host>` that routes (IP
forwarding, proxy ARP both ways, its own address on `wan` the host's + 100), so the host
keeps its address and everyone reaches it at that address as before:

    snd eth0 -- lan [m-snd] wan --(tbf: uplink)-- p-snd [inet: br0] -- server, m-r0, ...
                                                  ^ tbf on p-snd: snd's downlink

Shaping (netem is not available here, so no added delay: the veths' own round trip is
about 0.05-0.1 ms): a host's uplink is a `tbf` on its modem's `wan` (egress towards the
bridge), its downlink a `tbf` on its bridge port in `inet` (egress towards the modem).
`tbf` counts whole frames, TCP/IP and Ethernet headers included; `burst` is 32 KB (a few
ms at these rates: bursts never beat the rate by much) and `latency` 200 ms bounds each
queue (at 5 Mbit/s about 125 KB, so TCP fills the link without losing much to drops).

Why a modem, and why it routes: a home's uplink queue is in its modem or router, not in
the sending host's own stack. TCP Small Queues limits how much of a socket's data may
sit in qdiscs and devices before the packet is freed or detached from the socket: about
max(2 packets, 1 ms at the socket's pacing rate). With the tbf on the host's own `eth0`
(kernel 6.18, BBR; a 10 MB send to five recipients, sourcing off), two of five flows
crawled at about 13 KB/s for 50 s (cwnd 8, 2-3 packets unacked, 75-110 KB not yet sent
in the socket, no retransmissions: each of its 2 packets waited ~200 ms behind the other
flows', so it never became cwnd-limited and never sped up) while the others took the
rest of the 5 Mbit/s, and those two recipients got their first byte after 37 and 56 s.
Crossing a veth into another namespace does not detach a packet from its socket, and
neither does a bridge: a modem that bridged at L2 still showed 2 x 2280 bytes charged to
a crawling socket (`ss -m` t4560) and a first byte after 67 s. IP receive does detach it
(`ip_rcv` drops the socket reference), so in the routing modem the uplink queue is
charged to no socket (t0 in every sample), every flow's in-flight data reaches its cwnd,
and the five first bytes came after 3-19 s.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from overlay.app.lab import NodeHandle
from sim.fidelity import summarize
from tests.natlab.lab import NatLab
from tests.natlab.nodes import LabNetwork

SERVER_ADDRS = ("198.18.0.10", "198.18.0.11")
BURST = "32kb"
QUEUE_LATENCY = "200ms"
MAX_RECIPIENTS = 50  # r49 is 198.18.0.89, its modem .189


def tc_missing() -> str | None:
    """Why links can't be shaped here, or None."""
    if shutil.which("tc") is None:
        return "missing tc: apt-get install -y iproute2"
    return None


class ShapedLab(NatLab):
    """Namespaces on one bridge; every host but the server has shaped up and down links."""

    def __init__(self, recipients: int, *, up_bit: int | None, down_bit: int | None,
                 log_dir: Path | None = None) -> None:
        if not 0 <= recipients <= MAX_RECIPIENTS:
            raise ValueError(f"recipients must be 0..{MAX_RECIPIENTS}, not {recipients}")
        super().__init__(log_dir=log_dir)
        self.recipients = [f"r{i}" for i in range(recipients)]
        shaped = ("snd", *self.recipients)
        self.hosts = ("inet", "server", *shaped, *(modem_of(h) for h in shaped))
        self.up_bit = up_bit
        self.down_bit = down_bit
        self._addrs = {"server": SERVER_ADDRS[0], "server2": SERVER_ADDRS[1],
                       "snd": "198.18.0.30"}
        self._addrs |= {r: f"198.18.0.{40 + i}" for i, r in enumerate(self.recipients)}
        # A modem's own address (its `wan`, for ARP) is its host's plus 100.
        self._addrs |= {modem_of(h): f"198.18.0.{int(self._addrs[h].rsplit('.', 1)[1]) + 100}"
                        for h in shaped}

    def addr_of(self, host: str) -> str:
        return self._addrs[host]

    @property
    def server_addrs(self) -> tuple[str, str]:
        return SERVER_ADDRS

    def _tbf(self, ns: str, dev: str, rate_bit: int) -> None:
        self._ip_tc(ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf",
                    "rate", f"{rate_bit}bit", "burst", BURST, "latency", QUEUE_LATENCY)

    def _ip_tc(self, ns: str, *args: str) -> None:
        self._cmd(["ip", "netns", "exec", self.ns(ns), "tc", *args])

    def _build(self) -> None:
        """The server, then the sender and every recipient each behind its own modem."""
        self._wire("server", "eth0", "srv", [f"{a}/24" for a in SERVER_ADDRS])
        for host in ("snd", *self.recipients):
            modem, port, addr = modem_of(host), f"p-{host}", self._addrs[host]
            self._wire(modem, "wan", port, [f"{self._addrs[modem]}/24"])
            self._ip("link", "add", "eth0", "type", "veth", "peer", "name", "lan",
                     "netns", self.ns(modem), ns=host)
            self._ip("link", "set", "lan", "up", ns=modem)
            self._ip("route", "add", f"{addr}/32", "dev", "lan", ns=modem)
            self._ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=host)
            self._ip("link", "set", "eth0", "up", ns=host)
            # A router that answers ARP for the other side: for the host's address on `wan`,
            # for everyone else's on `lan`; at once (a proxy reply waits up to 0.8 s by default).
            self._sysctl(modem, "net.ipv4.ip_forward=1")
            for dev in ("wan", "lan"):
                self._sysctl(modem, f"net.ipv4.conf.{dev}.proxy_arp=1")
                self._sysctl(modem, f"net.ipv4.neigh.{dev}.proxy_delay=0")
            if self.up_bit is not None:
                self._tbf(modem, "wan", self.up_bit)
            if self.down_bit is not None:
                self._tbf("inet", port, self.down_bit)


def modem_of(host: str) -> str:
    """The lab host name of `host`'s modem (the namespace holding its uplink queue)."""
    return f"m-{host}"


def deliver_real(lab: ShapedLab, root: Path, path: Path, *, co_recipients: bool,
                 timeout: float = 600.0) -> list[dict[str, float]]:
    """Real server and `peerpost node`s in the lab; the sender sends `path` to every
    recipient at once. Each recipient's completion time after `peerpost send` returned,
    from its inbox's `completed_at` (the node's own wall clock), in recipient order."""
    net = LabNetwork(lab, root)
    try:
        net.start_server()
        extra = [] if co_recipients else ["--no-co-recipients"]
        marks = root / "marks"
        marks.mkdir(parents=True, exist_ok=True)
        sender = net.add_node("sender", "snd", extra=extra)
        nodes: list[NodeHandle] = []
        for r in lab.recipients:
            mark = marks / r
            # The hook is how the test learns of completion without polling the CLI (each
            # `peerpost inbox` is a Python start-up: CPU the nodes would lose).
            hook = f"/bin/sh -c 'echo $PEERPOST_STATE >> {mark}'"
            nodes.append(net.add_node(r, r, extra=[*extra, "--on-message", hook]))
        for n in (sender, *nodes):
            net.start_node(n)
        res = net.cli(sender, "send", str(path), "--to", ",".join(n.address for n in nodes))
        t0 = time.time()
        mid = next(w for w in res.stdout.split() if len(w) == 32 and
                   all(c in "0123456789abcdef" for c in w))

        def all_done() -> bool:
            return all("complete" in ((marks / r).read_text() if (marks / r).exists()
                                      else "") for r in lab.recipients)

        net.wait_until(all_done, timeout, "every recipient to complete", interval=0.2)
        label = str(net.cli_json(sender, "info")["peer_id"])[:16]
        out = []
        for n in nodes:
            entry = net.inbox_entry(n, mid)
            if entry is None or entry.get("completed_at") is None:
                raise AssertionError(f"{n.name}: no completed entry: {entry}")
            out.append(summarize(entry, label, t0))
        return out
    finally:
        net.close()


def lab_unavailable() -> str | None:
    """Why the shaped lab can't run here (not root, no namespaces, no tc), or None."""
    from tests.natlab.lab import natlab_unavailable

    return natlab_unavailable() or tc_missing()


def compare(recipients: int, size: int, *, up_bit: int, down_bit: int | None,
            modes: tuple[str, ...], root: Path, seed: int = 1,
            sim_seeds: int = 1) -> dict[str, dict[str, Any]]:
    """Per mode ("off"/"on": co-recipient sourcing): each recipient's completion time on
    the real shaped network, in the simulator with the same rates (wire headers charged),
    and in the simulator counting payload only (its default); "detail" holds the real and
    simulated first-byte times and bytes by source; "sim_by_seed" the simulated times for
    seeds seed, seed + 1, ... (`sim_seeds` of them: the simulated run is one sample of
    when each co-recipient is found, and each seed draws other keys and timings)."""
    from sim.fidelity import FidelitySetup, simulate
    from sim.scenarios.family_video import write_clip

    root.mkdir(parents=True, exist_ok=True)
    path = root / "file.bin"
    write_clip(path, size, f"{seed}/fidelity")
    setup = FidelitySetup(recipients=recipients, size=size, up=up_bit / 8,
                          down=None if down_bit is None else down_bit / 8, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        co = mode == "on"
        with ShapedLab(recipients, up_bit=up_bit, down_bit=down_bit,
                       log_dir=root / f"lab-{mode}") as lab:
            real = deliver_real(lab, root / f"net-{mode}", path, co_recipients=co)
        sim = simulate(setup, co_recipients=co)
        bare = simulate(replace(setup, headers=False), co_recipients=co)
        others = [simulate(replace(setup, seed=seed + i), co_recipients=co)
                  for i in range(1, sim_seeds)]
        out[mode] = {"real": [r["seconds"] for r in real], "sim": [r["seconds"] for r in sim],
                     "sim_payload_only": [r["seconds"] for r in bare],
                     "sim_by_seed": [[r["seconds"] for r in run] for run in (sim, *others)],
                     "detail": {"real": real, "sim": sim}}
    return out


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank, as the simulator's summaries take it (p50 of five
    values is the third, p90 the fifth)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
