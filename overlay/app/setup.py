"""`peerpost init`: make this device's identity and register its address.

The identity is generated in memory and registered with the rendezvous server (over TLS
1.3) first; the server's domain key, which it proves in that handshake, is pinned in the
config and its fingerprint printed (trust on first use, as ssh does). The
home folder is written only once the server has accepted it, so a refused registration
(address taken, bad invite, server down) leaves nothing half-made behind.
"""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console

from crypto.address import domain_of, normalize_address, parse_hostport
from crypto.errors import CryptoError, DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.vouch import Vouch, device_key_text, make_vouch, parse_device_key
from overlay.app.home import HomeError, NodeConfig, NodeHome
from rendezvous.domainkey import encode_key, fingerprint
from rendezvous.errors import RendezvousError

REGISTER_TIMEOUT = 15.0


async def register(host: str, port: int, identity: DeviceIdentity, address: str,
                   invite: str | None, *, tls: bool = True, vouch: bytes | None = None) -> bytes:
    """Authenticate once with `register` set; return the server's domain key, which it
    proved over this connection (trusted on first use: the caller pins it). Raises
    RendezvousError or OSError."""
    from rendezvous.client import RendezvousClient

    client = RendezvousClient(host, port, identity, address, register=True, invite=invite,
                              reconnect=False, request_timeout=REGISTER_TIMEOUT, tls=tls,
                              vouch=vouch)
    async with asyncio.timeout(REGISTER_TIMEOUT):
        await client.start()
    await client.aclose()
    if client.server_key is None:  # start() returns only with a key proved
        raise RendezvousError(0, "the server proved no domain key")
    return client.server_key


def init_home(home: NodeHome, args: argparse.Namespace, console: Console) -> int:
    if home.exists():
        raise HomeError(f"{home.root} already holds a peerpost node "
                        f"({home.load_config().address}); choose another --home")
    try:
        address = normalize_address(args.address)
        host, port = parse_hostport(args.server, what="--server")
        parse_hostport(args.listen, what="--listen")
    except (DecodeError, ValueError) as exc:
        raise HomeError(str(exc)) from None
    identity = _identity_for_init(home)
    vouch = _checked_vouch(getattr(args, "vouch", None), address, identity)
    try:
        server_key = asyncio.run(register(host, port, identity, address, args.invite,
                                          vouch=vouch))
    except RendezvousError as exc:
        raise HomeError(f"the server refused {address}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise HomeError(f"cannot reach the rendezvous server at {args.server}: "
                        f"{exc or 'timed out'}") from None
    home.create(NodeConfig(address=address, server=args.server, listen=args.listen,
                           download_dir=args.download_dir, server_key=encode_key(server_key)),
                identity)
    console.print(f"registered [bold]{address}[/] with {args.server} ({domain_of(address)})")
    console.print(f"server key: {fingerprint(server_key)} (pinned on first use; compare it "
                  "with what the server's operator publishes)")
    console.print(f"device fingerprint: {identity.public.fingerprint()}")
    console.print(f"home: {home.root}; start the node with `peerpost --home {home.root} node`")
    return 0


# --- another device of the same address ---------------------------------------------------
# A device joining an address that already has one is trusted by others only with a vouch
# from an existing device (or after each of them accepts it by hand):
#   new device:      peerpost devices key              -> prints KEY (made, not registered)
#   existing device: peerpost devices vouch KEY        -> prints VOUCH
#   new device:      peerpost init ... --invite T --vouch VOUCH


def _identity_for_init(home: NodeHome) -> DeviceIdentity:
    """The key `peerpost devices key` made in this home, else a fresh one."""
    if home.identity_path.exists():
        return home.load_identity()
    return DeviceIdentity.generate()


def _checked_vouch(text: str | None, address: str,
                   identity: DeviceIdentity) -> bytes | None:
    if not text:
        return None
    try:
        vouch = Vouch.from_text(text)
        vouch.verify(address, identity.public.verify_key)
    except CryptoError as exc:
        raise HomeError(f"--vouch is not a vouch for this device's key and {address} ({exc}); "
                        "run `peerpost devices key` here and vouch for the key it prints")\
            from None
    return vouch.to_bytes()


def device_key(home: NodeHome, console: Console) -> int:
    """`peerpost devices key`: this device's public key, made (0600) if the home has none."""
    if not home.identity_path.exists():
        home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        DeviceIdentity.generate().save(home.identity_path)
    identity = home.load_identity()
    print(device_key_text(identity.public.verify_key))  # one line, never wrapped
    if not home.exists():
        console.print("on a device already registered for the address, run "
                      "`peerpost devices vouch KEY`; then here `peerpost init ... --vouch VOUCH`",
                      markup=False, highlight=False)
    return 0


def vouch_device(home: NodeHome, key_text: str, console: Console) -> int:
    """`peerpost devices vouch KEY`: this (registered) device vouches for KEY as another
    device of its address; prints the vouch for the other device's `init --vouch`."""
    config = home.load_config()
    identity = home.load_identity()
    try:
        key = parse_device_key(key_text)
    except CryptoError as exc:
        raise HomeError(f"not a device key: {exc}") from None
    vouch = make_vouch(identity, config.address, key)
    print(vouch.to_text())  # one line, never wrapped
    console.print(f"vouched for {PublicIdentity(key).fingerprint()} as a device of "
                  f"{config.address}; compare that fingerprint with the new device's",
                  markup=False, highlight=False)
    return 0
