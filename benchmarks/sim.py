"""Simulator speed: simulated messages handled per wall-clock second.

Workloads (all on the virtual-time loop, real asyncio protocols):
- udp-relay: hosts pass datagrams to random peers (one delivery = one message), with
  latency from coordinates, finite uplinks and downlinks;
- udp-relay-plain: the same with unlimited links and fixed latency (the cheapest path);
- tcp-stream: pairs of hosts stream 64 KiB segments through asyncio streams with drain();
- kademlia: the unmodified `kademlia` package, N nodes bootstrap then run gets.
Target: >= 50,000 simulated messages per wall-clock second (issue 6).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import random
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report
from sim.latency import CoordinateLatency, FixedLatency
from sim.simulation import Simulation

TARGET = 50_000


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, rng: random.Random, peers: list[tuple[str, int]]) -> None:
        self.rng = rng
        self.peers = peers
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        hops = data[0]
        if hops:
            self.transport.sendto(bytes([hops - 1]) + data[1:], self.rng.choice(self.peers))


def udp_relay(hosts: int, tokens: int, hops: int, *, plain: bool) -> tuple[int, float, float]:
    """(messages, wall seconds, virtual seconds)."""
    latency = FixedLatency(0.02) if plain else CoordinateLatency(random.Random(1), jitter=0.002)
    with Simulation(seed=1, latency=latency) as sim:
        rng = sim.rng_for("bench")
        rate = None if plain else 1e6
        members = [sim.add_host(f"h{i}", up=rate, down=rate) for i in range(hosts)]
        peers = [(h.address, 9000) for h in members]

        async def bind(h: Any) -> None:
            loop = asyncio.get_running_loop()
            await loop.create_datagram_endpoint(lambda: _Relay(rng, peers),
                                                local_addr=("0.0.0.0", 9000))

        async def main() -> None:
            for h in members:
                await h.create_task(bind(h))
            for i in range(tokens):
                h = members[i % hosts]
                h.udp[9000].sendto(bytes([hops]) + b"x" * 100, rng.choice(peers))
            await asyncio.sleep(3600)

        t0 = time.perf_counter()
        sim.run(main())
        return sim.trace.messages, time.perf_counter() - t0, sim.now


def tcp_stream(pairs: int, megabytes: int) -> tuple[int, float, float]:
    """(segments delivered, wall seconds, virtual seconds)."""
    with Simulation(seed=1, latency=FixedLatency(0.02)) as sim:
        payload = bytes(64 * 1024)

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(1 << 20):
                pass
            writer.close()

        async def send(dst: str, port: int) -> None:
            _, writer = await asyncio.open_connection(dst, port)
            for _ in range(megabytes * 16):
                writer.write(payload)
                await writer.drain()
            writer.close()

        async def main() -> None:
            jobs = []
            for i in range(pairs):
                a = sim.add_host(f"a{i}", up=10e6)
                b = sim.add_host(f"b{i}", down=10e6)
                server = await b.create_task(asyncio.start_server(sink, None, 0))
                jobs.append(a.create_task(send(b.address, server.sockets[0].getsockname()[1])))
            await asyncio.gather(*jobs)

        t0 = time.perf_counter()
        sim.run(main())
        return sim.trace.messages, time.perf_counter() - t0, sim.now


def kademlia_lookups(nodes: int, gets: int) -> tuple[int, float, float, int, float]:
    """(messages, wall s, virtual s, successful gets, bootstrap wall s)."""
    from kademlia.network import Server

    logging.getLogger("kademlia").setLevel(logging.ERROR)
    logging.getLogger("rpcudp").setLevel(logging.ERROR)
    with Simulation(seed=1, latency=CoordinateLatency(random.Random(2))) as sim:
        rng = sim.rng_for("kademlia")
        hosts = [sim.add_host(f"n{i}") for i in range(nodes)]
        servers: list[Server] = []
        found = 0

        async def start(i: int) -> Server:
            s = Server(node_id=hashlib.sha1(rng.randbytes(20)).digest())
            await s.listen(8468)
            if i:
                seed = hosts[rng.randrange(i)]
                await s.bootstrap([(seed.address, 8468)])
            return s

        async def main() -> float:
            nonlocal found
            t0 = time.perf_counter()
            for i, h in enumerate(hosts):
                servers.append(await h.create_task(start(i)))
            boot = time.perf_counter() - t0
            await hosts[0].create_task(servers[0].set("k", "v"))
            for _ in range(gets):
                i = rng.randrange(nodes)
                found += await hosts[i].create_task(servers[i].get("k")) == "v"
            for s in servers:
                s.stop()
            return boot

        t0 = time.perf_counter()
        boot = sim.run(main())
        return sim.trace.messages, time.perf_counter() - t0, sim.now, found, boot


def main(argv: list[str]) -> int:
    """Run the workloads and report messages per wall-clock second."""
    p = argparse.ArgumentParser(prog="python -m benchmarks sim", description=__doc__)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--hops", type=int, default=100)
    p.add_argument("--kademlia-nodes", type=int, default=500)
    p.add_argument("--kademlia-gets", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for name, (msgs, wall, virtual) in (
            ("udp-relay", udp_relay(args.hosts, args.tokens, args.hops, plain=False)),
            ("udp-relay-plain", udp_relay(args.hosts, args.tokens, args.hops, plain=True)),
            ("tcp-stream", tcp_stream(4, 64))):
        rows.append({"metric": f"{name}: messages", "value": msgs, "unit": "msgs"})
        rows.append({"metric": f"{name}: virtual time", "value": virtual, "unit": "s"})
        rows.append({"metric": f"{name}: rate", "value": msgs / wall, "unit": "msgs/wall s",
                     "target": f">= {TARGET:,}" if name.startswith("udp") else "",
                     "ok": msgs / wall >= TARGET if name.startswith("udp") else None})
    msgs, wall, virtual, found, boot = kademlia_lookups(args.kademlia_nodes, args.kademlia_gets)
    n = args.kademlia_nodes
    rows += [
        {"metric": f"kademlia {n} nodes: bootstrap wall", "value": boot, "unit": "s"},
        {"metric": f"kademlia {n} nodes: gets found", "value": found,
         "unit": f"of {args.kademlia_gets}"},
        {"metric": f"kademlia {n} nodes: virtual time", "value": virtual, "unit": "s"},
        {"metric": f"kademlia {n} nodes: rate", "value": msgs / wall, "unit": "msgs/wall s"},
        {"metric": "peak RSS", "value": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         "unit": "MiB"},
    ]
    report("sim", rows, out=args.out, meta=vars(args) | {"out": str(args.out)})
    return 0 if all(r.get("ok") is not False for r in rows) else 1
