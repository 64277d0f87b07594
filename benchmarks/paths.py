"""Transports on loopback, two processes: direct TCP, the WebRTC data channel, the relay;
and a TCP hole punch between two NATed homes of the NAT lab.

`python -m benchmarks paths [--mib 64] [--tcp-mib 512] [--quick] [--no-sweep] [--no-punch]
[--no-quic] [--only-quic] [--only-relay] [--loss PCT]`

The dialing process sends; a child process accepts and reads to EOF, like two nodes. For
WebRTC the offer and answer travel over the child's stdin/stdout (a stand-in for PIPE), with
no STUN server (host candidates). For the relay a third process is a real
`peerpost-rendezvous serve` with its caps off (`--relay-rate 0 --relay-daily 0`: with the
default 2 MB/s cap the relay measures the cap, not the code); the child keeps a control
session and accepts the RELAY-INVITE, the parent dials with `overlay.transports.relay.relay_dial`.
The relay runs twice: with `--plaintext` (the splice's own cost, which its target is about)
and with TLS 1.3 on both legs, as nodes reach a real server (what relaying costs its
operator).
Reported per transport:

- MB/s: bytes / (first byte sent .. the receiver's acknowledgement of EOF);
- setup: from starting the dial to the first byte from the peer (median of 5 dials);
- CPU seconds per GB, both processes together (sender + receiver), and for the relay the
  server's own CPU seconds per GB as a separate row;
- for WebRTC a sweep over message size and bufferedAmount high/low water, which is where
  `ChannelTuning`'s defaults come from, on uvloop and (default tuning) the plain asyncio loop.

For the TCP punch (`tcp-punch`, overlay.transports.punch) the NAT lab of tests/natlab
(network namespaces, two nftables NATs with endpoint-independent mapping) holds a STUN
over TCP on the public side and a sending and a receiving process in the two homes; their
PIPE is this process, carrying `sig` lines from one's stdout to the other's stdin. Setup
is from `dial` (STUN, offer, answer, simultaneous open) to the first byte from the peer.
QUIC (`quic`, overlay.transports.quic) and, to compare with it, WebRTC run the same way
between a full-cone and a symmetric NAT, the pair a TCP punch can't join, with a STUN over
UDP on the public side (QUIC: `--mib` x 8, as the TCP runs move far more than WebRTC's).
`--loss PCT` has the sender's NAT router drop PCT % of the UDP datagrams it forwards, each
way, for those two rows (`NatLab.lose_udp`; `--loss 0` only cuts UDP GSO bursts into
datagrams before the router, as the lossy runs need: the baseline to compare them with).
Measured (`--only-quic --mib 16`, three runs each, load average 1.1-1.8): quic 72-174 MB/s
at 0%, 15-16 at 1%, 6.2-7.2 at 3% (8-9, 18-20 and 28-30 CPU s/GB); WebRTC 12-23, 10-12 and
24-27 MB/s. Under 3% loss qh3's congestion window stays at 12-19 KB (srtt 1-2 ms, ~3,300
datagrams lost, 190-280 PTOs in 128 MiB), so QUIC is a quarter of WebRTC's rate there;
without the 1 ms timer floor the rate is the same at three times the CPU.
The lab needs root, `ip` and `nft`: elsewhere those rows are skipped and say why.

`--only-relay` runs direct TCP and the two relay rows alone. Measured (the relay row, 2 GiB,
`--only-relay --tcp-mib 2048` or the same runs alone; load average 2.5-7.5 from other
work): the copying splice gives 403-1596 MB/s (median 781) at 0.54 server CPU s/GB (0.41-
0.61), the two ends 0.60, 28-90% of direct TCP as the load swings. A kernel splice of the
plaintext legs (os.splice through a pipe; tried, then reverted), in 19 runs paired with
those, took the server to 0.70x the CPU per GB (0.37 s/GB; 0.28-0.30 with 1 MiB pipes) but
the MB/s to 0.91x (0.64-1.56x), the ends' CPU rising to 0.65: on loopback the three
processes share two cores, so a cheaper server alone does not reach the target.
TLS on both legs: 1.6-1.8 server CPU s/GB.

Targets: WebRTC >= 6 MB/s on uvloop, WebRTC setup < 300 ms, relay >= 50% of direct TCP,
TCP punch >= 300 MB/s, QUIC through the lab >= 3x WebRTC through the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.common import report
from crypto.address import format_hostport, parse_hostport
from crypto.identity import DeviceIdentity
from overlay.transports.punch import PunchEndpoint, PunchSettings
from overlay.transports.quic import QuicEndpoint, QuicSettings
from overlay.transports.relay import relay_accept, relay_dial
from overlay.transports.signalling import PipeSender
from overlay.transports.stream import Stream, StreamClosed
from overlay.transports.tcp import TcpStream, connect_tcp, serve_tcp
from overlay.transports.webrtc import WebRtcEndpoint, WebRtcSettings
from overlay.transports.webrtc_stream import ChannelTuning
from rendezvous.client import RendezvousClient
from rendezvous.messages import PipeMessage, RelayInvite

MiB = 1 << 20
KiB = 1024
_SETUPS = 5
_SENDER, _RECEIVER = ("sender@bench.example", b"\x01" * 20), ("receiver@bench.example",
                                                               b"\x02" * 20)
# Real keys for the relay, whose server checks who is who.
_SENDER_KEY, _RECEIVER_KEY = (DeviceIdentity.from_seed(b"\x01" * 32),
                              DeviceIdentity.from_seed(b"\x02" * 32))


class _LinePipe:
    """PIPE over a line stream: `sig <hex>` lines (our stdout or the child's stdin)."""

    def __init__(self, write: Any) -> None:
        self._write = write

    async def pipe(self, to: str, payload: bytes, *, device: bytes | None = None,
                   hold: float = 0) -> None:
        self._write(f"sig {payload.hex()}\n".encode())


LabEndpoint = WebRtcEndpoint | PunchEndpoint | QuicEndpoint


def _feed_line(line: bytes, rtc: LabEndpoint, sender: tuple[str, bytes]) -> bool:
    words = line.decode().split()
    if words[:1] == ["sig"] and len(words) == 2:
        rtc.feed(PipeMessage(sender[0], sender[1], bytes.fromhex(words[1])))
        return True
    return False


# --- the receiving child ---------------------------------------------------------------
async def _timed_send(s: Stream, size: int) -> tuple[int, float, float]:
    """`size` bytes (whole MiB blocks, after their count in 8 bytes) then EOF, until the
    receiver's "k": bytes sent, seconds, and this process's CPU seconds. The receiver stops
    at the count: over TLS (the relay's legs) there is no half-close to wait for."""
    block = bytes(range(256)) * (4 * KiB)  # 1 MiB
    size = -(-size // len(block)) * len(block)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await s.send_all(size.to_bytes(8, "big"))
    sent = 0
    while sent < size:
        await s.send_all(block)
        sent += len(block)
    await s.send_eof()
    assert await s.receive_some(1) == b"k"
    return sent, time.perf_counter() - t0, time.process_time() - cpu0


async def _send_nothing(s: Stream) -> None:
    """What a setup dial sends: a count of 0, then EOF, until the receiver's "k"."""
    await s.send_all(bytes(8))
    await s.send_eof()
    assert await s.receive_some(1) == b"k"


async def _serve_one(stream: Stream, out: Any) -> None:
    await stream.send_all(b"h")
    head = b""
    while len(head) < 8 and (chunk := await stream.receive_some(8 - len(head))):
        head += chunk
    want, n = int.from_bytes(head, "big") if len(head) == 8 else 0, 0
    cpu0 = time.process_time()
    while n < want and (chunk := await stream.receive_some(1 << 20)):
        n += len(chunk)
    cpu = time.process_time() - cpu0
    await stream.send_all(b"k")
    await stream.send_eof()
    out(f"result {n} {cpu:.4f}\n".encode())


async def _relay_child(relay_port: int, reader: asyncio.StreamReader, out: Any,
                       tls: bool) -> None:
    async with RendezvousClient("127.0.0.1", relay_port, _RECEIVER_KEY, _RECEIVER[0],
                                register=True, tls=tls) as rc, asyncio.TaskGroup() as tg:
        out(b"port 0\n")

        async def serve() -> None:
            async for push in rc.pushes():
                if isinstance(push, RelayInvite):
                    s = await relay_accept("127.0.0.1", relay_port, _RECEIVER_KEY,
                                           _RECEIVER[0], push, tls=tls,
                                           server_key=rc.server_key)
                    await _serve_one(s, out)
                    await s.aclose()
        server_task = tg.create_task(serve())
        await reader.read()  # until the parent closes our stdin
        server_task.cancel()


class _RelayServer:
    """A `peerpost-rendezvous serve` process with the relay caps off."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, data: Path, tls: bool) -> _RelayServer:
        """`tls` False: `--plaintext`, the splice's own cost; True: TLS 1.3 on both legs,
        as a node's relay connections run, and what an operator's server pays."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "serve", "--domain", "bench.example",
            "--listen", "127.0.0.1:0", "--data", str(data), "--open-registration",
            "--relay-rate", "0", "--relay-daily", "0", "--log-level", "warning",
            *(() if tls else ("--plaintext",)),
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"rendezvous server did not start: {line!r}")
        return cls(proc, parse_hostport(line.split()[1])[1])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def aclose(self) -> None:
        self.proc.terminate()
        await self.proc.wait()


# --- the TCP punch, QUIC and WebRTC through the NAT lab ---------------------------------
RUNGS = ("tcp-punch", "quic", "webrtc")


async def _punch_stun_child(host: str, out: Any, reader: asyncio.StreamReader,
                            rung: str) -> None:
    """STUN on the lab's public side: over TCP for the punch, over UDP for the others."""
    from rendezvous.stun import serve_stun, serve_stun_tcp

    if rung == "tcp-punch":
        stun = await serve_stun_tcp(host, 0)
        out(f"port {stun.address[1]}\n".encode())
        await reader.read()  # until the parent closes our stdin
        await stun.aclose()
        return
    transport, addr = await serve_stun(host, 0, rate=1000, burst=1000)
    out(f"port {addr[1]}\n".encode())
    await reader.read()
    transport.close()


def _lab_endpoint(rung: str, pipe: PipeSender, stun: tuple[str, int]) -> LabEndpoint:
    if rung == "quic":
        return QuicEndpoint(pipe, QuicSettings(stun))
    if rung == "webrtc":
        return WebRtcEndpoint(pipe, WebRtcSettings(stun=[stun]))
    return PunchEndpoint(pipe, PunchSettings(stun))


async def _punch_child(role: str, stun: tuple[str, int], size: int,
                       reader: asyncio.StreamReader, out: Any, rung: str) -> None:
    """The receiving ("punch-recv") or sending ("punch-send") home of a lab run of `rung`."""
    punch = _lab_endpoint(rung, _LinePipe(out), stun)
    await punch.start()
    peer = _SENDER if role == "punch-recv" else _RECEIVER

    async def feed() -> None:
        while line := await reader.readline():
            _feed_line(line, punch, peer)
        await punch.aclose()  # the parent is done with us

    async with asyncio.TaskGroup() as tg:
        feeder = tg.create_task(feed())
        if role == "punch-recv":
            out(b"port 0\n")
            while True:
                try:
                    s = await punch.accept()
                except StreamClosed:
                    return
                await _serve_one(s, out)
                await s.aclose()
        setups = []
        for _ in range(_SETUPS):
            t0 = time.perf_counter()
            s = await punch.dial(*_RECEIVER)
            assert await s.receive_some(1) == b"h"
            setups.append(time.perf_counter() - t0)
            await _send_nothing(s)
            await s.aclose()
        s = await punch.dial(*_RECEIVER)
        assert s.path == rung and await s.receive_some(1) == b"h"
        sent, seconds, cpu = await _timed_send(s, size)
        out(f"sent {sent} {seconds:.6f} {cpu:.4f} {statistics.median(setups):.6f} "
            f"{s.peer_address()}\n".encode())
        await s.aclose()
        await punch.aclose()
        feeder.cancel()


async def _punch_lab(size: int, rung: str = "tcp-punch",
                     loss: int | None = None) -> dict[str, Any]:
    """Run `rung` between the lab's two homes (endpoint-independent NATs for the punch, a
    full-cone sender and a symmetric receiver for QUIC and WebRTC); the sender's figures
    and the receiver's. `loss`: % of UDP datagrams the sender's router drops each way."""
    from tests.natlab.lab import NatLab, NatMode

    modes = (NatMode.EIM, NatMode.EIM) if rung == "tcp-punch" else (NatMode.FULL_CONE,
                                                                      NatMode.SYMMETRIC)
    with NatLab(*modes) as lab:
        if loss is not None:
            lab.lose_udp("r1", loss)
        def spawn(host: str, *args: str) -> Any:
            return asyncio.create_subprocess_exec(
                "ip", "netns", "exec", lab.ns(host), sys.executable, "-m", "benchmarks.paths",
                *args, "--rung", rung, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])

        server = lab.addr_of("server")
        stun_proc = await spawn("server", "--child", "punch-stun", "--stun", f"{server}:0")
        procs = [stun_proc]
        try:
            assert stun_proc.stdout is not None
            line = (await asyncio.wait_for(stun_proc.stdout.readline(), 30)).decode()
            stun = format_hostport(server, int(line.split()[1]))
            recv = await spawn("h2", "--child", "punch-recv", "--stun", stun)
            procs.append(recv)
            assert recv.stdout is not None and recv.stdin is not None
            await asyncio.wait_for(recv.stdout.readline(), 30)  # "port 0": ready
            send = await spawn("h1", "--child", "punch-send", "--stun", stun,
                               "--tcp-mib", str(size // MiB))
            procs.append(send)
            assert send.stdout is not None and send.stdin is not None
            results: list[tuple[int, float]] = []
            sent: list[str] = []

            async def pump(src: Any, dst: Any, keep: Any) -> None:
                while line := await src.readline():
                    if line.startswith(b"sig "):
                        dst.write(line)
                    else:
                        keep(line.decode().split())

            async with asyncio.timeout(300):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(pump(recv.stdout, send.stdin, lambda w: results.append(
                        (int(w[1]), float(w[2]))) if w[:1] == ["result"] else None))
                    await pump(send.stdout, recv.stdin, lambda w: sent.extend(w))
                    recv.stdin.close()
            if sent[:1] != ["sent"] or len(results) != _SETUPS + 1:
                raise RuntimeError(f"{rung} run failed: sender said {sent}, receiver "
                                   f"{results}")
            received, cpu_receiver = results[-1]
            if received != size:
                raise RuntimeError(f"{rung}: receiver got {received} of {size} bytes")
            seconds, cpu_sender, setup = float(sent[2]), float(sent[3]), float(sent[4])
            return {"mbps": size / seconds / 1e6, "setup_ms": setup * 1000,
                    "cpu_s_per_gb": (cpu_sender + cpu_receiver) / (size / 1e9),
                    "seconds": seconds, "peer": sent[5], "bytes": size,
                    "nat": "/".join(m.value for m in modes),
                    **({} if loss is None else {"loss_pct": loss,
                                                "udp_dropped": lab.udp_lost("r1")}),
                    "load": [round(x, 2) for x in os.getloadavg()]}
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    await p.wait()


async def _child(kind: str, tuning: ChannelTuning, relay_port: int = 0,
                 stun: tuple[str, int] | None = None, size: int = 0,
                 rung: str = "tcp-punch") -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    if kind == "punch-stun" and stun is not None:
        await _punch_stun_child(stun[0], out, reader, rung)
        return
    if kind in ("punch-send", "punch-recv") and stun is not None:
        await _punch_child(kind, stun, size, reader, out, rung)
        return
    if kind in ("relay", "relay-tls"):
        await _relay_child(relay_port, reader, out, kind == "relay-tls")
        return
    if kind == "tcp":
        async def handler(s: TcpStream) -> None:
            await _serve_one(s, out)
        server = await serve_tcp(handler)
        assert server.address is not None
        out(f"port {server.address[1]}\n".encode())
        await reader.read()  # until the parent closes our stdin
        await server.aclose()
        return
    async with WebRtcEndpoint(_LinePipe(out), WebRtcSettings(tuning=tuning)) as rtc, \
            asyncio.TaskGroup() as tg:
        out(b"port 0\n")

        async def serve() -> None:
            while True:
                s = await rtc.accept()
                await _serve_one(s, out)
                await s.aclose()
        server_task = tg.create_task(serve())
        while line := await reader.readline():
            _feed_line(line, rtc, _SENDER)
        server_task.cancel()


# --- the dialing parent ----------------------------------------------------------------
class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.results: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        self.port = 0
        self.rtc: WebRtcEndpoint | None = None
        self._ready = asyncio.Event()

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            words = line.decode().split()
            if words[:1] == ["port"]:
                self.port = int(words[1])
                self._ready.set()
            elif words[:1] == ["result"]:
                self.results.put_nowait((int(words[1]), float(words[2])))
            elif self.rtc is not None:
                _feed_line(line, self.rtc, _RECEIVER)

    def pipe(self) -> PipeSender:
        assert self.proc.stdin is not None
        return _LinePipe(self.proc.stdin.write)


async def _measure(kind: str, tuning: ChannelTuning, size: int, loop_name: str
                   ) -> dict[str, Any]:
    if kind not in ("relay", "relay-tls"):
        return await _measure_pair(kind, tuning, size, loop_name, None)
    with tempfile.TemporaryDirectory() as data:
        server = await _RelayServer.start(Path(data), kind == "relay-tls")
        try:
            return await _measure_pair(kind, tuning, size, loop_name, server)
        finally:
            await server.aclose()


async def _measure_pair(kind: str, tuning: ChannelTuning, size: int, loop_name: str,
                        relay: _RelayServer | None) -> dict[str, Any]:
    relay_port = relay.port if relay is not None else 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.paths", "--child", kind, "--loop", loop_name,
        "--tuning", json.dumps(asdict(tuning)), "--relay-port", str(relay_port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    child = _Child(proc)
    async with asyncio.TaskGroup() as tg:
        pump = tg.create_task(child.pump())
        await asyncio.wait_for(child._ready.wait(), 30)
        rtc = WebRtcEndpoint(child.pipe(), WebRtcSettings(tuning=tuning))
        child.rtc = rtc
        await rtc.start()
        control = None
        if relay is not None:  # the sender's account must exist, and a session is usual
            control = RendezvousClient("127.0.0.1", relay_port, _SENDER_KEY, _SENDER[0],
                                       register=True, tls=kind == "relay-tls")
            await control.start()

        async def dial() -> Stream:
            if kind == "tcp":
                return await connect_tcp("127.0.0.1", child.port)
            if control is not None:
                return await relay_dial("127.0.0.1", relay_port, _SENDER_KEY, _SENDER[0],
                                        _RECEIVER[0], _RECEIVER_KEY.peer_id, timeout=30,
                                        tls=control.tls, server_key=control.server_key)
            return await rtc.dial(*_RECEIVER)

        setups = []
        for _ in range(_SETUPS):
            t0 = time.perf_counter()
            s = await dial()
            assert await s.receive_some(1) == b"h"
            setups.append(time.perf_counter() - t0)
            await _send_nothing(s)
            await s.aclose()
            await child.results.get()

        s = await dial()
        assert await s.receive_some(1) == b"h"
        server_cpu0 = relay.cpu_seconds() if relay is not None else 0.0
        _, seconds, cpu_sender = await _timed_send(s, size)
        server_cpu = relay.cpu_seconds() - server_cpu0 if relay is not None else 0.0
        received, cpu_receiver = await child.results.get()
        await s.aclose()
        await rtc.aclose()
        if control is not None:
            await control.aclose()
        assert proc.stdin is not None
        proc.stdin.close()
        await proc.wait()
        pump.cancel()
    if received != size:
        raise RuntimeError(f"{kind}: receiver got {received} of {size} bytes")
    return {"mbps": size / seconds / 1e6, "setup_ms": statistics.median(setups) * 1000,
            "setup_all_ms": [round(x * 1000, 1) for x in setups],
            "cpu_s_per_gb": (cpu_sender + cpu_receiver) / (size / 1e9), "seconds": seconds,
            "server_cpu_s_per_gb": server_cpu / (size / 1e9)}


def _run(kind: str, tuning: ChannelTuning, size: int, loop_name: str) -> dict[str, Any]:
    runner = uvloop.run if loop_name == "uvloop" else asyncio.run
    return runner(_measure(kind, tuning, size, loop_name))


def _label(t: ChannelTuning) -> str:
    return (f"msg {t.message_size // KiB} KiB, high {t.high_water // KiB} KiB, "
            f"low {t.low_water // KiB} KiB")


def _punch_rows(size: int, meta: dict[str, Any]) -> list[dict[str, Any]]:
    from tests.natlab.lab import natlab_unavailable

    why = natlab_unavailable()
    if why is not None:
        meta["runs"].append({"kind": "tcp-punch", "skipped": why})
        return [{"metric": f"tcp-punch through two NATs (NAT lab): skipped, {why}",
                 "value": "skipped", "unit": ""}]
    punch = uvloop.run(_punch_lab(size))
    meta["runs"].append({"kind": "tcp-punch", "loop": "uvloop", "nat": "eim/eim", **punch})
    return [
        {"metric": "tcp-punch through two NATs (NAT lab), uvloop", "value": punch["mbps"],
         "unit": "MB/s", "target": ">= 300", "ok": punch["mbps"] >= 300},
        {"metric": "tcp-punch setup (dial → STUN → offer/answer → first byte)",
         "value": punch["setup_ms"], "unit": "ms"},
        {"metric": "tcp-punch CPU (both ends)", "value": punch["cpu_s_per_gb"],
         "unit": "s/GB"},
    ]


def _quic_rows(quic_size: int, rtc_size: int, meta: dict[str, Any],
               loss: int | None = None) -> list[dict[str, Any]]:
    """QUIC and WebRTC between a full-cone and a symmetric NAT (the pair the TCP punch
    can't join), side by side; with `loss` % of the UDP datagrams dropped each way."""
    from tests.natlab.lab import natlab_unavailable

    why = natlab_unavailable()
    if why is not None:
        meta["runs"].append({"kind": "quic", "skipped": why})
        return [{"metric": f"quic through a full-cone and a symmetric NAT: skipped, {why}",
                 "value": "skipped", "unit": ""}]
    quic = uvloop.run(_punch_lab(quic_size, "quic", loss))
    rtc = uvloop.run(_punch_lab(rtc_size, "webrtc", loss))
    meta["runs"] += [{"kind": "quic", "loop": "uvloop", **quic},
                     {"kind": "webrtc-lab", "loop": "uvloop", **rtc}]
    ratio = quic["mbps"] / rtc["mbps"]
    lossy = "" if loss is None else f", {loss}% UDP loss each way"
    return [
        {"metric": f"quic through a full-cone and a symmetric NAT (NAT lab{lossy}), uvloop",
         "value": quic["mbps"], "unit": "MB/s"},
        {"metric": f"WebRTC through the same pair (NAT lab{lossy}), uvloop",
         "value": rtc["mbps"], "unit": "MB/s"},
        {"metric": "quic / WebRTC through the pair", "value": ratio, "unit": "x",
         "target": ">= 3", "ok": ratio >= 3},
        {"metric": "quic setup (dial → STUN → offer/answer → probes → first byte)",
         "value": quic["setup_ms"], "unit": "ms"},
        {"metric": "WebRTC setup through the pair", "value": rtc["setup_ms"], "unit": "ms"},
        {"metric": "quic CPU (both ends)", "value": quic["cpu_s_per_gb"], "unit": "s/GB"},
        {"metric": "WebRTC CPU through the pair (both ends)", "value": rtc["cpu_s_per_gb"],
         "unit": "s/GB"},
    ]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks paths")
    ap.add_argument("--mib", type=int, default=64, help="MiB per WebRTC run")
    ap.add_argument("--tcp-mib", type=int, default=512, help="MiB for the TCP run")
    ap.add_argument("--quick", action="store_true", help="16 MiB WebRTC, 128 MiB TCP")
    ap.add_argument("--no-sweep", action="store_true", help="only the default tuning")
    ap.add_argument("--no-relay", action="store_true", help="skip the relay row")
    ap.add_argument("--only-relay", action="store_true",
                    help="only direct TCP and the relay rows (what the relay's target is about)")
    ap.add_argument("--no-punch", action="store_true", help="skip the TCP punch row")
    ap.add_argument("--only-punch", action="store_true", help="only the TCP punch row")
    ap.add_argument("--no-quic", action="store_true",
                    help="skip the QUIC and WebRTC rows through the NAT lab")
    ap.add_argument("--only-quic", action="store_true",
                    help="only the QUIC and WebRTC rows through the NAT lab")
    ap.add_argument("--loss", type=int, default=None, metavar="PCT",
                    help="the QUIC and WebRTC lab rows with PCT %% of UDP datagrams dropped "
                         "each way")
    ap.add_argument("--child", choices=["tcp", "webrtc", "relay", "relay-tls", "punch-stun",
                                        "punch-send", "punch-recv"], help=argparse.SUPPRESS)
    ap.add_argument("--stun", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rung", default="tcp-punch", choices=RUNGS, help=argparse.SUPPRESS)
    ap.add_argument("--relay-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--loop", default="uvloop", help=argparse.SUPPRESS)
    ap.add_argument("--tuning", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/out/paths.json)")
    args = ap.parse_args(argv)
    if args.child:
        tuning = ChannelTuning(**json.loads(args.tuning))
        stun = None
        if args.stun:
            stun = parse_hostport(args.stun, what="--stun")
        (uvloop.run if args.loop == "uvloop" else asyncio.run)(
            _child(args.child, tuning, args.relay_port, stun, args.tcp_mib * MiB, args.rung))
        return 0
    rtc_size = (16 if args.quick else args.mib) * MiB
    tcp_size = (128 if args.quick else args.tcp_mib) * MiB
    default = ChannelTuning()
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"webrtc_bytes": rtc_size, "tcp_bytes": tcp_size, "runs": []}
    if args.loss is not None and not 0 <= args.loss <= 100:
        ap.error(f"--loss is a percentage, 0-100, not {args.loss}")

    if args.only_quic:
        report("paths", _quic_rows(8 * rtc_size, rtc_size, meta, args.loss), out=args.out,
               meta=meta)
        return 0
    if not args.no_punch and not args.only_relay:
        rows += _punch_rows(tcp_size, meta)
    if args.only_punch:
        report("paths", rows, out=args.out, meta=meta)
        return 0
    tcp = _run("tcp", default, tcp_size, "uvloop")
    meta["runs"].append({"kind": "tcp", **tcp})
    rows += [
        {"metric": "direct TCP, uvloop", "value": tcp["mbps"], "unit": "MB/s"},
        {"metric": "direct TCP setup (connect → first byte)", "value": tcp["setup_ms"],
         "unit": "ms"},
        {"metric": "direct TCP CPU (both ends)", "value": tcp["cpu_s_per_gb"], "unit": "s/GB"},
    ]
    if not args.only_relay:
        rtc = _run("webrtc", default, rtc_size, "uvloop")
        rtc_asyncio = _run("webrtc", default, rtc_size, "asyncio")
        meta["runs"] += [{"kind": "webrtc", "loop": "uvloop", "tuning": asdict(default), **rtc},
                         {"kind": "webrtc", "loop": "asyncio", "tuning": asdict(default),
                          **rtc_asyncio}]
        rows += [
            {"metric": f"WebRTC, uvloop ({_label(default)})", "value": rtc["mbps"],
             "unit": "MB/s", "target": ">= 6", "ok": rtc["mbps"] >= 6},
            {"metric": "WebRTC, default asyncio loop", "value": rtc_asyncio["mbps"],
             "unit": "MB/s"},
            {"metric": "WebRTC setup (dial → first byte)", "value": rtc["setup_ms"],
             "unit": "ms", "target": "< 300", "ok": rtc["setup_ms"] < 300},
            {"metric": "WebRTC CPU (both ends)", "value": rtc["cpu_s_per_gb"], "unit": "s/GB"},
        ]
    if not args.no_quic and not args.only_relay:
        rows += _quic_rows(8 * rtc_size, rtc_size, meta, args.loss)
    if not args.no_relay:
        relay = _run("relay", default, tcp_size, "uvloop")
        meta["runs"].append({"kind": "relay", "loop": "uvloop", "caps": "off", **relay})
        share = relay["mbps"] / tcp["mbps"]
        rows += [
            {"metric": "relay via rendezvous server, caps off, plaintext, uvloop",
             "value": relay["mbps"],
             "unit": "MB/s"},
            {"metric": "relay / direct TCP", "value": share * 100, "unit": "%",
             "target": ">= 50", "ok": share >= 0.5},
            {"metric": "relay setup (dial → invite → accept → first byte)",
             "value": relay["setup_ms"], "unit": "ms"},
            {"metric": "relay CPU (both ends)", "value": relay["cpu_s_per_gb"], "unit": "s/GB"},
            {"metric": "relay CPU (server)", "value": relay["server_cpu_s_per_gb"],
             "unit": "s/GB"},
        ]
        tls = _run("relay-tls", default, tcp_size, "uvloop")
        meta["runs"].append({"kind": "relay-tls", "loop": "uvloop", "caps": "off", **tls})
        rows += [
            {"metric": "relay with TLS on both legs (as nodes run it), caps off, uvloop",
             "value": tls["mbps"], "unit": "MB/s"},
            {"metric": "relay with TLS: CPU (server)", "value": tls["server_cpu_s_per_gb"],
             "unit": "s/GB"},
            {"metric": "relay with TLS: CPU (both ends)", "value": tls["cpu_s_per_gb"],
             "unit": "s/GB"},
        ]
    if not args.no_sweep and not args.only_relay:
        sweep = [ChannelTuning(message_size=m) for m in (16 * KiB, 256 * KiB)] + [
            ChannelTuning(high_water=h, low_water=h // 4) for h in (256 * KiB, 4 * MiB)]
        for t in sweep:
            r = _run("webrtc", t, rtc_size, "uvloop")
            meta["runs"].append({"kind": "webrtc", "loop": "uvloop", "tuning": asdict(t), **r})
            rows.append({"metric": f"WebRTC sweep: {_label(t)}", "value": r["mbps"],
                         "unit": "MB/s"})
    report("paths", rows, out=args.out, meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
