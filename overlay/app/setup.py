"""`peerpost init`: make this device's identity and register its address.

The identity is generated in memory and registered with the rendezvous server first; the
home folder is written only once the server has accepted it, so a refused registration
(address taken, bad invite, server down) leaves nothing half-made behind.
"""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console

from crypto.address import domain_of, normalize_address, parse_hostport
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.app.home import HomeError, NodeConfig, NodeHome

REGISTER_TIMEOUT = 15.0


async def register(host: str, port: int, identity: DeviceIdentity, address: str,
                   invite: str | None) -> None:
    """Authenticate once with `register` set; raises RendezvousError or OSError."""
    from rendezvous.client import RendezvousClient

    client = RendezvousClient(host, port, identity, address, register=True, invite=invite,
                              reconnect=False, request_timeout=REGISTER_TIMEOUT)
    async with asyncio.timeout(REGISTER_TIMEOUT):
        await client.start()
    await client.aclose()


def init_home(home: NodeHome, args: argparse.Namespace, console: Console) -> int:
    from rendezvous.client import RendezvousError

    if home.exists():
        raise HomeError(f"{home.root} already holds a peerpost node "
                        f"({home.load_config().address}); choose another --home")
    try:
        address = normalize_address(args.address)
        host, port = parse_hostport(args.server, what="--server")
        parse_hostport(args.listen, what="--listen")
    except (DecodeError, ValueError) as exc:
        raise HomeError(str(exc)) from None
    identity = DeviceIdentity.generate()
    try:
        asyncio.run(register(host, port, identity, address, args.invite))
    except RendezvousError as exc:
        raise HomeError(f"the server refused {address}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise HomeError(f"cannot reach the rendezvous server at {args.server}: "
                        f"{exc or 'timed out'}") from None
    home.create(NodeConfig(address=address, server=args.server, listen=args.listen,
                           download_dir=args.download_dir), identity)
    console.print(f"registered [bold]{address}[/] with {args.server} ({domain_of(address)})")
    console.print(f"device fingerprint: {identity.public.fingerprint()}")
    console.print(f"home: {home.root}; start the node with `peerpost --home {home.root} node`")
    return 0
