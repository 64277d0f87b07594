"""`python -m tests.natlab.providers HOST:DHT_PORT CONTENT_ID_HEX`: the provider records the
DHT holds for a content, as a fresh DHT client joined through the server's bootstrap node
sees them, one JSON line {"providers": [{"peer": hex, "addresses": [...]}, ...]}. Run
inside a lab namespace."""

from __future__ import annotations

import asyncio
import json
import sys

from crypto.address import parse_hostport
from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode


async def providers(bootstrap: tuple[str, int], content_id: bytes) -> list[dict[str, object]]:
    dht = DhtNode(DeviceIdentity.generate(), client_only=True)
    try:
        await dht.listen("0.0.0.0", 0)
        async with asyncio.timeout(10):
            await dht.bootstrap([bootstrap])
            found = await dht.find_providers(content_id)
    finally:
        await dht.aclose()
    return [{"peer": r.peer_id.hex(), "addresses": list(r.addresses)} for r in found]


def main() -> None:
    where, cid = sys.argv[1:3]
    host, port = parse_hostport(where, what="DHT")
    out = {"providers": asyncio.run(providers((host, port), bytes.fromhex(cid)))}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
