"""First chunk after connect over a link with delay: the round trips a download's setup
costs before content moves.

`python -m benchmarks first_chunk [--delay-ms 25] [--runs 7] [--baseline DIR]`

netem is not built into this machine kind's kernel ("Specified qdisc kind is unknown"), so
the delay is `DelayLink`: a TCP proxy on 127.0.0.1 that hands every byte on `delay` seconds
after it came, in each direction (real sockets on both sides, a round trip of twice the
delay). Each run is a fresh process running the code under test (this tree, or `--baseline`
DIR by PYTHONPATH, runs alternating) with a holder (`TransferServer`) and a `Downloader` of
an 8 MiB content in 1 MiB chunks through the link, each of the three in a process of its
own. Reported: TCP connect returned → first chunk stored, in ms and in round trips, medians
over the runs, and what is left of it past the two round trips the protocol needs (the
handshake, then the OPEN flight and its first chunk): the part that is not network.

Each run's processes run this file by path (`python -P`), so only the standard library and
the tree under test's packages are imported there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 1 << 20
HERE = Path(__file__).resolve()


class DelayLink:
    """A TCP proxy on 127.0.0.1 to one target: every byte reaches the other end `delay`
    seconds after it came, in each direction, in order (a path whose round trip is
    `2 * delay`, without netem). Buffers without bound: for tests and benchmarks that move
    a few MiB.

    `turns` counts the client's flights: its first bytes, and each later piece that came
    after bytes of the target reached it (for a link that carries one connection).
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.turns = 0
        self._answered = True  # the client's first bytes start its first flight
        self._target: tuple[str, int] = ("127.0.0.1", 0)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Forward to `host:port`; returns the address to connect to instead."""
        self._target = (host, port)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        lhost, lport = self._server.sockets[0].getsockname()[:2]
        return lhost, lport

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        writers = [writer]
        try:
            t_reader, t_writer = await asyncio.open_connection(*self._target)
            writers.append(t_writer)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._carry(reader, t_writer, from_client=True))
                tg.create_task(self._carry(t_reader, writer, from_client=False))
        except* (OSError, asyncio.CancelledError):
            # A connection's end (or `aclose`) ends its task quietly: asyncio's server
            # logs a handler task that ends cancelled as an error.
            pass
        finally:
            for w in writers:
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     from_client: bool) -> None:
        """One direction: read as bytes come, write each piece `delay` after it came."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                if not from_client:
                    self._answered = True
                await writer.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(deliver())
            while True:
                data = await reader.read(1 << 16)
                if from_client and data and self._answered:
                    self.turns += 1
                    self._answered = False
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break

    async def aclose(self) -> None:
        """Stop listening and end every connection now (bytes still held are dropped)."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class TimedSource:
    """A downloader's source at `host:port` (a DelayLink) that notes when its TCP connect
    returned (`connected`) and, given the download's events (`on_event`), when the first
    chunk was stored (`first`), on the loop's clock."""

    def __init__(self, host: str, port: int, peer_id: bytes) -> None:
        from overlay.transports.ladder import Source
        from overlay.transports.tcp import connect_tcp

        self.connected = self.first = 0.0
        loop = asyncio.get_running_loop()

        async def connect() -> Any:
            stream = await connect_tcp(host, port, timeout=10)
            self.connected = loop.time()
            return stream

        self.source = Source("holder", connect, peer_id)

    def on_event(self, event: object) -> None:
        from overlay.transfer.downloader import ChunkStored

        if isinstance(event, ChunkStored) and not self.first:
            self.first = asyncio.get_running_loop().time()


async def _serve(size: int, tmp: Path) -> None:
    """The holder's process: serve `tmp/clip.bin` until stdin closes. Prints one JSON line:
    its port and what a handle would give."""
    from crypto.identity import DeviceIdentity
    from overlay.content.catalog import ContentStore
    from overlay.transfer.server import TransferServer

    store = ContentStore(tmp / "holder")
    content = await store.add_local_file(tmp / "clip.bin", chunk_size=MiB, key=b"k" * 32,
                                         capability=b"c" * 32)
    server = TransferServer(DeviceIdentity.from_seed(b"h" * 32), store)
    try:
        _, port = await server.start("127.0.0.1", 0)
        print(json.dumps({"port": port, "peer_id": server.identity.peer_id.hex(),
                          "content_id": content.content_id.hex(), "size": content.size,
                          "chunk_size": content.chunk_size, "key": content.key.hex(),
                          "capability": content.capability.hex(),
                          "scheme": int(content.scheme)}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await server.aclose()


async def _link(delay: float, port: int) -> None:
    """The link's process: a DelayLink to 127.0.0.1:`port` until stdin closes. Prints its
    own port."""
    link = DelayLink(delay)
    try:
        print(json.dumps({"port": (await link.start("127.0.0.1", port))[1]}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await link.aclose()


async def _child(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """This file run by path with `args` in a process of its own (the same tree); returns
    it and the JSON line it printed once ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", str(HERE), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        raise SystemExit(f"{args[0]} ended before it was ready")
    ready: dict[str, Any] = json.loads(line)
    return proc, ready


async def _one_run(delay: float, size: int, tmp: Path) -> dict[str, float]:
    """One holder, one downloader through a DelayLink, each in a process of its own (as on
    three machines: neither side's work holds up the other's loop or the link's): connect
    → first chunk stored, measured in the downloader's."""
    from crypto.identity import DeviceIdentity
    from overlay.content.catalog import ContentStore
    from overlay.transfer.downloader import Downloader

    loop = asyncio.get_running_loop()
    src = tmp / "clip.bin"
    src.write_bytes(random.Random(1).randbytes(size))
    procs: list[asyncio.subprocess.Process] = []
    try:
        holder, h = await _child("--serve", "--size", str(size), "--tmp", str(tmp))
        procs.append(holder)
        link, lk = await _child("--link", "--delay", str(delay), "--port", str(h["port"]))
        procs.append(link)
        partial = ContentStore(tmp / "recv").open_partial(
            bytes.fromhex(h["content_id"]), h["size"], h["chunk_size"], bytes.fromhex(h["key"]),
            bytes.fromhex(h["capability"]), tmp / "inbox", "clip.bin", scheme=h["scheme"])
        timed = TimedSource("127.0.0.1", lk["port"], bytes.fromhex(h["peer_id"]))
        path = await Downloader(partial, [timed.source], DeviceIdentity.from_seed(b"r" * 32),
                                on_event=timed.on_event).run()
        done = loop.time()
        if path.read_bytes() != src.read_bytes():
            raise SystemExit("the downloaded file differs")
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
    first = timed.first - timed.connected
    return {"first_ms": first * 1000, "round_trips": first / (2 * delay),
            "total_ms": (done - timed.connected) * 1000}


def _spawn(tree: Path, delay: float, size: int) -> dict[str, float]:
    from benchmarks.common import tree_first

    env = dict(os.environ, PYTHONPATH=tree_first(tree))
    with tempfile.TemporaryDirectory(prefix="peerpost-rtt-") as tmp:
        done = subprocess.run(
            [sys.executable, "-P", str(HERE), "--one", "--delay",
             str(delay), "--size", str(size), "--tmp", tmp],
            env=env, cwd=tmp, capture_output=True, text=True, check=False, timeout=300)
    if done.returncode:
        raise SystemExit(f"a run under {tree} failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks first_chunk")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one way, each direction")
    ap.add_argument("--runs", type=int, default=7, help="runs of each code")
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of older code to run alternately with this one")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--link", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--delay", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(_one_run(args.delay, args.size, args.tmp))))
        return 0
    if args.serve:
        asyncio.run(_serve(args.size, args.tmp))
        return 0
    if args.link:
        asyncio.run(_link(args.delay, args.port))
        return 0
    from benchmarks.common import report
    from benchmarks.transfer import compile_tree

    here = Path(__file__).resolve().parents[1]
    trees: list[tuple[str, Path]] = [("new", here)]
    if args.baseline is not None:
        trees = [("old", args.baseline.resolve()), ("new", here)]
    for _, tree in trees:
        compile_tree(tree)
    delay, size = args.delay_ms / 1000, args.mib * MiB
    load_before = os.getloadavg()[0]
    runs: list[tuple[str, dict[str, float]]] = []
    for i in range(args.runs):
        for code, tree in trees if i % 2 == 0 else trees[::-1]:
            runs.append((code, _spawn(tree, delay, size)))
    load_after = os.getloadavg()[0]

    def med(code: str, key: str) -> float:
        return statistics.median(r[key] for c, r in runs if c == code)

    rows: list[dict[str, Any]] = []
    for code, _ in trees:
        rows += [
            {"metric": f"{code}: connect → first chunk stored (median of {args.runs})",
             "value": med(code, "first_ms"), "unit": "ms"},
            {"metric": f"{code}: the same in round trips of {2 * args.delay_ms:.0f} ms",
             "value": med(code, "round_trips"), "unit": "RTT"},
            {"metric": f"{code}: not network (first chunk - the 2 round trips: handshake, "
                       "then OPEN with the first GETs)",
             "value": med(code, "first_ms") - 4 * args.delay_ms, "unit": "ms"},
            {"metric": f"{code}: connect → complete ({args.mib} MiB)",
             "value": med(code, "total_ms"), "unit": "ms"},
            {"metric": f"{code}: each run, first chunk",
             "value": " ".join(f"{r['first_ms']:.0f}" for c, r in runs if c == code),
             "unit": "ms"},
        ]
    rows.append({"metric": "load average (1 min) before / after",
                 "value": f"{load_before:.2f} / {load_after:.2f}",
                 "unit": f"{os.cpu_count()} CPUs"})
    report("first_chunk", rows, out=args.out,
           meta={"delay_ms": args.delay_ms, "bytes": size,
                 "baseline": str(args.baseline or ""),
                 "runs": [{"code": c, **r} for c, r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
