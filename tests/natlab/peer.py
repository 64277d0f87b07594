"""A NATed host of the lab: probe its NAT, or move bytes over WebRTC (or another signalled
rung, `--rung tcp-punch` or `--rung quic`, STUN over TCP or UDP at `--stun`) through it.

    python -m tests.natlab.peer probe IP:PORT IP:PORT
        one UDP socket asks both STUN servers; prints {"mapped": [[ip, port], [ip, port]]}
    python -m tests.natlab.peer answer --rv IP:PORT --stun IP:PORT --seed N --address A
        logs in, prints "ready", accepts one stream, reads it to EOF, sends back the
        SHA-256 of what arrived; prints {"ok": true, "received": n, "sha256": hex}
    python -m tests.natlab.peer dial --rv ... --stun ... --seed N --address A \
            --to B --to-seed M --bytes N
        dials B's device, sends N seeded random bytes and EOF, reads the digest back;
        prints {"ok": true, "sent": n, "sha256": hex, "peer_sha256": hex, "setup_s": s}
        or {"ok": false, "error": "..."} (exit 1)

Both run uvloop, as a node does, with the transport's own ICE timeout (`--timeout`; the
punch's and QUIC's budget).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvloop

from crypto.address import parse_hostport
from crypto.identity import DeviceIdentity
from overlay.transports.punch import PunchEndpoint, PunchSettings
from overlay.transports.quic import QuicEndpoint, QuicSettings
from overlay.transports.stream import Stream, StreamError
from overlay.transports.webrtc import WebRtcEndpoint, WebRtcSettings
from rendezvous.client import RendezvousClient
from rendezvous.messages import PipeMessage
from rendezvous.stun import query_mapping


def _identity(seed: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([seed]) * 32)


def _emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


Rung = PunchEndpoint | QuicEndpoint | WebRtcEndpoint


async def _feed(client: RendezvousClient, rtc: Rung) -> None:
    async for push in client.pushes():
        if isinstance(push, PipeMessage):
            rtc.feed(push)


async def _read_all(stream: Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(1 << 20):
        out += chunk
    return bytes(out)


async def probe(servers: list[str]) -> int:
    mapped = await query_mapping([parse_hostport(s) for s in servers])
    _emit({"mapped": [list(m) for m in mapped]})
    return 0


@contextlib.asynccontextmanager
async def _rung(client: RendezvousClient, args: argparse.Namespace) -> AsyncIterator[Rung]:
    rtc = _endpoint(client, args)
    await rtc.start()
    try:
        yield rtc
    finally:
        await rtc.aclose()


def _endpoint(client: RendezvousClient, args: argparse.Namespace) -> Rung:
    stun = parse_hostport(args.stun)
    if args.rung == "tcp-punch":
        return PunchEndpoint(client, PunchSettings(stun=stun, budget=args.timeout))
    if args.rung == "quic":
        return QuicEndpoint(client, QuicSettings(stun=stun, budget=args.timeout))
    return WebRtcEndpoint(client, WebRtcSettings(stun=[stun], connect_timeout=args.timeout))


async def session(args: argparse.Namespace) -> int:
    rv_host, rv_port = parse_hostport(args.rv)
    me = _identity(args.seed)
    loop = asyncio.get_running_loop()
    async with RendezvousClient(rv_host, rv_port, me, args.address, register=True) as client, \
            _rung(client, args) as rtc, asyncio.TaskGroup() as tg:
        feeder = tg.create_task(_feed(client, rtc))
        try:
            if args.role == "answer":
                print("ready", flush=True)
                stream = await rtc.accept()
                got = await _read_all(stream)
                digest = hashlib.sha256(got).hexdigest()
                peer = stream.peer_address()
                await stream.send_all(digest.encode())
                await stream.send_eof()
                await stream.aclose()
                _emit({"ok": True, "received": len(got), "sha256": digest, "peer": peer})
            else:
                data = random.Random(args.seed).randbytes(args.bytes)
                started = loop.time()
                stream = await rtc.dial(args.to, _identity(args.to_seed).peer_id)
                setup = loop.time() - started
                await stream.send_all(data)
                await stream.send_eof()
                back = (await _read_all(stream)).decode()
                peer = stream.peer_address()
                await stream.aclose()
                _emit({"ok": True, "sent": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "peer_sha256": back, "setup_s": round(setup, 3), "peer": peer})
        except (StreamError, TimeoutError) as exc:
            _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return 1
        finally:
            feeder.cancel()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tests.natlab.peer")
    sub = p.add_subparsers(dest="role", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("servers", nargs=2)
    for role in ("answer", "dial"):
        s = sub.add_parser(role)
        s.add_argument("--rv", required=True)
        s.add_argument("--stun", required=True)
        s.add_argument("--seed", type=int, required=True)
        s.add_argument("--address", required=True)
        s.add_argument("--timeout", type=float, default=10.0)
        s.add_argument("--rung", choices=("webrtc", "tcp-punch", "quic"), default="webrtc")
        if role == "dial":
            s.add_argument("--to", required=True)
            s.add_argument("--to-seed", type=int, required=True)
            s.add_argument("--bytes", type=int, default=1 << 20)
    args = p.parse_args(argv)
    if args.role == "probe":
        return uvloop.run(probe(args.servers))
    return uvloop.run(session(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
