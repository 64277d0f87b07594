"""`python -m tests.natlab.v6_sources HOST PORT STUN_PORT DHT_PORT`: a client with a whole
IPv6 /64 (2001:db8:1:2::/64) takes a fresh source address for every session and request
against a rendezvous server at HOST (plaintext PORT, its STUN and DHT ports), then asks
once more from another /64 (2001:db8:1:3::/64). Run inside a namespace where both /64s are
local. Prints one JSON line:

    {"sessions": [[source, status, text], ...],     # one AUTHORIZATION per source, held
     "stun": [answered of the fresh sources, answered from the other /64, seconds],
     "dht": [the same for FIND_NODE]}

`seconds` is the time from the first fresh request sent to the last reply to one received
(CLOCK_MONOTONIC, the server's clock too): the server took every answered request within
it, so its token bucket refilled for no longer than that.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from overlay.dht.wire import FindNode, Request
from rendezvous.stun import binding_request
from tests.rendezvous.conftest import RawSession, ident

DOMAIN = "example.net"
ONE = "2001:db8:1:2"    # the client's /64
OTHER = "2001:db8:1:3"  # someone else's
STUN_FRESH = 100        # against a burst of 40 (serve's STUN: 20/s, burst 40)
DHT_FRESH = 300         # against a burst of 200 (overlay.dht.ratelimit: 50/s, burst 200)
WAIT = 1.5              # seconds for every reply to come


async def sessions(host: str, port: int, sources: list[str]) -> list[list[Any]]:
    """One AUTHORIZATION (registering a new account) from each source, all held open."""
    held: list[RawSession] = []
    out: list[list[Any]] = []
    try:
        for n, source in enumerate(sources, start=1):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            s = RawSession(reader, writer)
            held.append(s)
            await s.read()  # the challenge
            reply = await s.auth(ident(n), f"user{n}@{DOMAIN}", register=True)
            out.append([source, reply.status, reply.text])
    finally:
        for s in held:
            s.writer.close()
    return out


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answered = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answered.done():
            self.answered.set_result(asyncio.get_running_loop().time())


async def answered(to: tuple[str, int], sources: list[str],
                   request: Any) -> tuple[int, float]:
    """How many of `sources` (one UDP socket each, all opened before the first send) get
    a reply to the datagram `request()` makes, and the seconds from the first send to the
    last reply received (0 if none came)."""
    loop = asyncio.get_running_loop()
    ends = [await loop.create_datagram_endpoint(_Answers, local_addr=(s, 0))
            for s in sources]
    try:
        first = loop.time()
        for transport, _ in ends:
            transport.sendto(request(), to)
        done, _ = await asyncio.wait([p.answered for _, p in ends], timeout=WAIT)
        return len(done), max((f.result() - first for f in done), default=0.0)
    finally:
        for transport, _ in ends:
            transport.close()


def _fresh(n: int) -> list[str]:
    return [f"{ONE}:{os.urandom(8).hex(':', 2)}" for _ in range(n)]


async def main(host: str, port: int, stun_port: int, dht_port: int) -> dict[str, Any]:
    out: dict[str, Any] = {"sessions": await sessions(
        host, port, [f"{ONE}::a", f"{ONE}::b", f"{ONE}:0:1:2:c", f"{OTHER}::a"])}
    stun = (host, stun_port)
    fresh, seconds = await answered(stun, _fresh(STUN_FRESH), lambda: binding_request()[0])
    other, _ = await answered(stun, [f"{OTHER}::b"], lambda: binding_request()[0])
    out["stun"] = [fresh, other, seconds]

    def find_node() -> bytes:
        return Request(os.urandom(20), ident(99).public.verify_key, False,
                       FindNode(os.urandom(20))).encode()

    dht = (host, dht_port)
    fresh, seconds = await answered(dht, _fresh(DHT_FRESH), find_node)
    other, _ = await answered(dht, [f"{OTHER}::c"], find_node)
    out["dht"] = [fresh, other, seconds]
    return out


if __name__ == "__main__":
    host, *ports = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(host, *(int(p) for p in ports)))), flush=True)
