"""`peerpost init`: make this device's identity and register its address.

The identity is generated in memory and registered with the rendezvous server (over TLS
1.3) first. Without `--server` the server is found in DNS as MX is: the
`_peerpost._tcp.DOMAIN` SRV targets in RFC 2782 order, the next tried when one cannot be
reached, and the domain key comes from the `_peerpost.DOMAIN` TXT record; the server must
prove that very key in the handshake or init refuses. With `--server HOST:PORT` the key the
server proves is trusted on first use, as ssh does. Either way the key is pinned in the
config and its fingerprint printed, and `--resolver` too when given (the node asks that
name server when it looks for another server of its domain). The home folder is written
only once the server has accepted it, so a refused registration (address taken, bad
invite, server down) leaves nothing half-made behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl

from rich.console import Console

from crypto.address import domain_of, format_hostport, normalize_address, parse_hostport
from crypto.errors import CryptoError, DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.vouch import Vouch, device_key_text, make_vouch, parse_device_key
from overlay.app.config import NodeConfig
from overlay.app.home import HomeError, NodeHome
from rendezvous.dns import DnsResolver, DomainLookupError, DomainResolver, txt_name
from rendezvous.domainkey import encode_key, fingerprint
from rendezvous.errors import (
    ConnectionLostError,
    RemoteProtocolError,
    RendezvousError,
    error_text,
)
from rendezvous.framing import DEFAULT_MAX_FRAME, FrameDecoder
from rendezvous.keyfile import save_identity
from rendezvous.messages import Challenge, decode_server_message
from rendezvous.tls import client_context

REGISTER_TIMEOUT = 15.0
# A rendezvous server completes the TLS handshake and sends its CHALLENGE within
# milliseconds on loopback; anything still silent after this is not one (or is not there).
PROBE_TIMEOUT = 5.0


async def register(host: str, port: int, identity: DeviceIdentity, address: str,
                   invite: str | None, *, tls: bool = True, vouch: bytes | None = None,
                   server_key: bytes | None = None, domain: str | None = None) -> bytes:
    """Authenticate once with `register` set; return the server's domain key, which it
    proved over this connection: `server_key` if given (else ServerIdentityError), else
    whatever it proved (trusted on first use: the caller pins it). `domain`: the server
    must say it serves that domain. Raises RendezvousError or OSError."""
    from rendezvous.client import RendezvousClient

    client = RendezvousClient(host, port, identity, address, register=True, invite=invite,
                              reconnect=False, request_timeout=REGISTER_TIMEOUT, tls=tls,
                              vouch=vouch, server_key=server_key, domain=domain)
    async with asyncio.timeout(REGISTER_TIMEOUT):
        await client.start()
    await client.aclose()
    if client.server_key is None:  # start() returns only with a key proved
        raise RendezvousError(0, "the server proved no domain key")
    return client.server_key


def init_home(home: NodeHome, args: argparse.Namespace, console: Console,
              resolver: DomainResolver | None = None) -> int:
    """`resolver`: how the domain's server is found without --server (default: DNS)."""
    if home.exists():
        raise HomeError(f"{home.root} already holds a peerpost node "
                        f"({home.load_config().address}); choose another --home")
    server_arg: str | None = getattr(args, "server", None)
    try:
        address = normalize_address(args.address)
        target = parse_hostport(server_arg, what="--server") if server_arg else None
        parse_hostport(args.listen, what="--listen")
        if getattr(args, "resolver", None):
            parse_hostport(args.resolver, what="--resolver")
    except (DecodeError, ValueError) as exc:
        raise HomeError(str(exc)) from None
    domain = domain_of(address)
    home.check_creatable()
    if args.download_dir and os.path.exists(dl := os.path.expanduser(args.download_dir)) and (
            not os.path.isdir(dl)):  # every download would fail: "[Errno 17] File exists"
        raise HomeError(f"--download-dir {args.download_dir} is a file, not a folder")
    identity = _identity_for_init(home)
    vouch = _checked_vouch(getattr(args, "vouch", None), address, identity)
    if target is None:
        if resolver is None:
            try:
                resolver = DnsResolver(getattr(args, "resolver", None))
            except DomainLookupError as exc:
                raise HomeError(f"cannot look up {domain}: {exc}") from None
        server, server_key = asyncio.run(_register_found(resolver, identity, address,
                                                         args.invite, vouch))
        how = (f"the {txt_name(domain)} TXT record, proved by the server; "
               f"found through _peerpost._tcp.{domain} SRV")
    else:
        server = str(server_arg)
        asyncio.run(probe(*target))
        try:
            server_key = asyncio.run(register(*target, identity, address, args.invite,
                                              vouch=vouch))
        except RendezvousError as exc:
            raise HomeError(f"the server refused {address}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise HomeError(f"cannot reach the rendezvous server at {server}: "
                            f"{error_text(exc)}") from None
        how = "pinned on first use; compare it with what the server's operator publishes"
    home.create(NodeConfig(address=address, server=server, listen=args.listen,
                           # the node runs in a folder of its own: relative is this shell's
                           download_dir=args.download_dir and os.path.abspath(
                               os.path.expanduser(args.download_dir)),
                           server_key=encode_key(server_key),
                           resolver=getattr(args, "resolver", None) or "",
                           srv=target is None),
                identity)
    console.print(f"registered [bold]{address}[/] with {server} ({domain})")
    # Not folded at the console's width: the command and the key are copied from here.
    console.print(f"server key: {fingerprint(server_key)} ({how})", soft_wrap=True)
    console.print(f"device fingerprint: {identity.public.fingerprint()}")
    console.print(f"home: {home.root}; start the node with `peerpost --home {home.root} node`",
                  soft_wrap=True)
    return 0


async def probe(host: str, port: int) -> bytes:
    """The key of the server's CHALLENGE, or HomeError saying what answers at HOST:PORT
    instead: nothing (refused, no TCP answer), or something that is no rendezvous server
    (no TLS, or no CHALLENGE within PROBE_TIMEOUT)."""
    where = format_hostport(host, port)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except TimeoutError:
        raise HomeError(f"nothing answers at {where} (no TCP answer within "
                        f"{PROBE_TIMEOUT:g} s): check --server HOST:PORT") from None
    except socket.gaierror as exc:  # errno -2 etc., which os.strerror calls "unknown error"
        raise HomeError(f"cannot resolve {host} ({exc.strerror or exc}): check the host "
                        "name in --server HOST:PORT") from None
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc) or "unreachable"
        raise HomeError(f"nothing answers at {where} ({why}): check --server HOST:PORT "
                        "and that the server is running") from None
    try:
        return await _challenge_key(host, port, PROBE_TIMEOUT)
    except ssl.SSLError as exc:
        raise HomeError(f"{where} is not a peerpost rendezvous server (the TLS handshake "
                        f"failed: {exc.reason or exc})") from None
    except TimeoutError:
        raise HomeError(f"{where} is not a peerpost rendezvous server (no CHALLENGE within "
                        f"{PROBE_TIMEOUT:g} s)") from None
    except ConnectionResetError:
        # The server's STUN-over-TCP port (the one beside --listen's) resets a TLS hello.
        raise HomeError(f"{where} is not a peerpost rendezvous server (it reset the "
                        "connection at the TLS handshake): check the port in --server "
                        "HOST:PORT, the one `peerpost-rendezvous serve` prints as "
                        "`listening HOST:PORT`") from None
    except (ConnectionLostError, RemoteProtocolError, DecodeError, EOFError, OSError) as exc:
        raise HomeError(f"{where} is not a peerpost rendezvous server "
                        f"({error_text(exc)})") from None


async def _challenge_key(host: str, port: int, within: float = REGISTER_TIMEOUT) -> bytes:
    """The domain key the server names in its CHALLENGE (nothing is sent; not yet proved)."""
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context())
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    msg = decode_server_message(frame, DEFAULT_MAX_FRAME)
                    if isinstance(msg, Challenge):
                        return msg.key
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    raise ConnectionLostError("the server closed the connection before its CHALLENGE")


def _wrong_key(where: str, seen: bytes | None, domain: str, published: bytes) -> HomeError:
    shown = fingerprint(seen) if seen is not None else "none"
    return HomeError(f"refusing the server at {where}: it shows the key {shown}, but "
                     f"{txt_name(domain)} TXT publishes {fingerprint(published)} for {domain} "
                     "(someone is in the way, or the domain's records are stale)")


async def _register_found(resolver: DomainResolver, identity: DeviceIdentity, address: str,
                          invite: str | None, vouch: bytes | None) -> tuple[str, bytes]:
    """Register with the first server of the address's domain that answers, in the order
    the domain publishes; it must prove the domain's published key. Returns its HOST:PORT
    and that key."""
    from rendezvous.client_core import ServerIdentityError

    domain = domain_of(address)
    try:
        records = await resolver.resolve(domain)
    except DomainLookupError as exc:
        raise HomeError(f"cannot find the server of {domain}: {exc}; if its operator gave "
                        "you the server's address, give it as --server HOST:PORT") from None
    failures: list[str] = []
    for host, port in records.servers:
        where = format_hostport(host, port)
        try:
            # The key the CHALLENGE names is checked before anything is sent, so a server
            # with another key never gets the registration; the handshake then proves it.
            named = await _challenge_key(host, port)
            if named != records.key:
                raise _wrong_key(where, named, domain, records.key)
            key = await register(host, port, identity, address, invite, vouch=vouch,
                                 server_key=records.key, domain=domain)
        except ServerIdentityError as exc:
            raise _wrong_key(where, exc.seen, domain, records.key) from None
        except (OSError, TimeoutError, ConnectionLostError, RemoteProtocolError) as exc:
            failures.append(f"{where}: {error_text(exc)}")
            continue
        except RendezvousError as exc:
            raise HomeError(f"the server at {where} refused {address}: {exc}") from None
        return where, key
    raise HomeError(f"cannot reach any server of {domain} (_peerpost._tcp.{domain} SRV): "
                    + "; ".join(failures))


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
        home.check_creatable()
        home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_identity(DeviceIdentity.generate(), home.identity_path)
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
