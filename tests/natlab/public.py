"""The public side of the NAT lab: a rendezvous server and STUN on each server address.

`python -m tests.natlab.public DATA_DIR ADDR [ADDR...]`: the rendezvous server listens on
the first address, STUN on every one (ports chosen by the kernel). Prints one line,
`ready <rendezvous port> <stun port per address...>`, then runs until SIGTERM.

`python -m tests.natlab.public --stun-only ADDR`: STUN alone (beside a real
`peerpost-rendezvous serve`, whose own STUN answers on one address only), `ready <port>`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.stun import serve_stun

DOMAIN = "example.net"


async def main(data: Path, addrs: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stuns = [await serve_stun(a, 0) for a in addrs]
    server = RendezvousServer(DOMAIN, SqliteStore(data / "rv.sqlite3"), open_registration=True)
    await server.start(addrs[0], 0)
    try:
        if server.address is None:
            raise RuntimeError("server did not bind")
        ports = " ".join(str(addr[1]) for _, addr in stuns)
        print(f"ready {server.address[1]} {ports}", flush=True)
        await stop.wait()
    finally:
        await server.aclose()
        for transport, _ in stuns:
            transport.close()


async def stun_only(addr: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    transport, bound = await serve_stun(addr, 0)
    try:
        print(f"ready {bound[1]}", flush=True)
        await stop.wait()
    finally:
        transport.close()


if __name__ == "__main__":
    if sys.argv[1] == "--stun-only":
        asyncio.run(stun_only(sys.argv[2]))
    else:
        asyncio.run(main(Path(sys.argv[1]), sys.argv[2:]))
