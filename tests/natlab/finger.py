"""`python -m tests.natlab.finger HOME ADDRESS`: what the server's FINGER shows of ADDRESS,
asked with the identity of the node at HOME (one that is not running), as one JSON line
{"devices": [{"online": bool, "advertise": {...}}, ...]}. Run inside a lab namespace."""

from __future__ import annotations

import asyncio
import json
import sys

from crypto.address import parse_hostport
from overlay.app.home import NodeHome
from rendezvous.client import RendezvousClient


async def finger(home: NodeHome, address: str) -> dict[str, object]:
    config = home.load_config()
    host, port = parse_hostport(config.server, what="server")
    async with RendezvousClient(host, port, home.load_identity(), config.address,
                                reconnect=False, tls=not config.plaintext,
                                server_key=config.pinned_key()) as rc:
        found = await rc.finger(address)
    return {"devices": [{"online": d.online, "advertise": d.advertise}
                        for d in found.devices]}


def main() -> None:
    home, address = sys.argv[1:3]
    print(json.dumps(asyncio.run(finger(NodeHome(home), address))), flush=True)


if __name__ == "__main__":
    main()
