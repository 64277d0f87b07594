"""Extra UDP services a rendezvous server runs next to it: STUN and a DHT bootstrap node.

`RendezvousServer.add_service(name, service)` takes anything shaped like `ExtraService`
(a bound address, counters, `aclose()`); the server announces each one's port in every
CHALLENGE (`stun`, `dht`), merges its counters into `snapshot()` as `NAME_COUNTER`, and
closes it at shutdown.

STUN lives in this package (`rendezvous.stun`), so `StunService` wraps it here. The DHT
does not: it is the overlay's (`overlay.dht`), and imports flow crypto -> rendezvous ->
overlay, never upward. Of the ways to let `peerpost-rendezvous serve` start one (it does
by default, unless `--dht-port off`), this is the least bad we found:

- *not* a static `import overlay...` anywhere in this package;
- *not* an entry-point group declared in pyproject.toml (the cleanest in principle, but it
  needs the packaging metadata rebuilt before a checkout works, and it hides a plain
  dependency behind packaging magic);
- but a table `STARTERS` of service name -> "module:function", imported with `importlib`
  only when the operator asks for that service (`load_starter`). The rendezvous package
  still imports, tests and serves without the overlay package present; the one upward
  edge is a string in one table, in the composition layer, next to its reason. Any
  callable with the signature `ServiceStarter` fits: `overlay.dht.run_bootstrap_node`
  already does (its `DhtNode` has `address`, `stats()` and `aclose()`).

The DHT node needs a stable identity (its node id is its key's peer id): the server keeps
one in its data folder, `server-identity.json`, mode 0600 (`server_identity`).
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, cast

from crypto.identity import DeviceIdentity
from rendezvous.keyfile import load_identity, save_identity
from rendezvous.stun import StunServerProtocol, serve_stun, serve_stun_tcp

IDENTITY_NAME = "server-identity.json"

STARTERS: dict[str, str] = {
    # `serve`'s DHT bootstrap node (see the module docstring for why a string)
    "dht": "overlay.dht:run_bootstrap_node",
}


class ExtraService(Protocol):
    """What the server needs of a service it runs alongside."""

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        ...

    def stats(self) -> Mapping[str, int]:
        """Counters, merged into the server's snapshot under the service's name."""
        ...

    async def aclose(self) -> None:
        ...


ServiceStarter = Callable[[str, int, DeviceIdentity], Awaitable[ExtraService]]


class StunService:
    """`rendezvous.stun.serve_stun` as an `ExtraService`."""

    def __init__(self, transport: asyncio.DatagramTransport, address: tuple[str, int]) -> None:
        self._transport = transport
        self._address = address
        # Kept here: a closed transport may no longer know its protocol (uvloop).
        self._responder = cast(StunServerProtocol, transport.get_protocol()).responder

    @classmethod
    async def start(cls, host: str, port: int) -> StunService:
        """Answer STUN Binding requests on UDP host:port (0: any free port)."""
        transport, address = await serve_stun(host, port, sock=await bind_udp(host, port))
        return cls(transport, address)

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def stats(self) -> dict[str, int]:
        return asdict(self._responder.stats)

    async def aclose(self) -> None:
        self._transport.close()


async def bind_udp(host: str, port: int) -> socket.socket | None:
    """For a service on an IPv6 address: a UDP socket bound to it that takes IPv6 alone
    (IPV6_V6ONLY, which asyncio sets on its TCP listeners but not on UDP). Linux binds
    [::] for IPv4 too by default, so [::]:P could not be bound beside 0.0.0.0:P (`serve
    --listen` given twice), and an IPv4 client would be seen as ::ffff:a.b.c.d: STUN
    would answer it with an IPv6 address, and every IPv4 client share one /64's limits.

    None for any other host: the loop binds it (`local_addr`), as the simulator's loop
    must, whose hosts are IPv4 and whose sockets are not the kernel's."""
    if ":" not in host:
        return None
    # getaddrinfo gives the bind address with its scope id (fe80::1%eth0).
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


class BothFamilies:
    """One service on the server's IPv4 and IPv6 addresses (`serve --listen` given twice):
    the instances are announced as one (the first's port, which the second shares, as
    CHALLENGE gives one port a service) and counted as one. A DHT node per family, as
    BitTorrent's IPv4 and IPv6 DHTs are separate (BEP 32): a contact of one family means
    nothing to a node of the other; `bootstrap` hands each its own family's peers."""

    def __init__(self, first: ExtraService, second: ExtraService) -> None:
        self.members = (first, second)

    @property
    def address(self) -> tuple[str, int]:
        return self.members[0].address

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for member in self.members:
            for key, value in member.stats().items():
                out[key] = out.get(key, 0) + value
        return out

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Each member that can `bootstrap` joins the `addrs` of its own family."""
        size = 0
        for member in self.members:
            join = getattr(member, "bootstrap", None)
            v6 = ":" in member.address[0]
            mine = [a for a in addrs if (":" in a[0]) == v6]
            if callable(join) and mine:
                size += await join(mine)
        return size

    async def aclose(self) -> None:
        for member in self.members:
            await member.aclose()


async def start_stun_tcp(host: str, port: int) -> ExtraService:
    """STUN over TCP on host:port (0: any free port), the service "stun_tcp": the mapping a
    node's TCP hole punch dials from."""
    return await serve_stun_tcp(host, port)


def load_starter(name: str) -> ServiceStarter:
    """The starter registered for service `name`, imported now (LookupError if none)."""
    target = STARTERS.get(name)
    if target is None:
        raise LookupError(f"no service called {name!r}")
    module_name, _, attr = target.partition(":")
    try:
        starter = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"service {name!r} needs {target}, which is not available: "
                          f"{exc}") from None
    return cast(ServiceStarter, starter)


def server_identity(data_dir: Path) -> DeviceIdentity:
    """The server's own key (for its DHT node id), created on first use, kept 0600."""
    path = Path(data_dir) / IDENTITY_NAME
    if path.exists():
        return load_identity(path)
    identity = DeviceIdentity.generate()
    save_identity(identity, path)
    return identity
