"""Put the real rendezvous server and real peer nodes on simulated hosts.

    server = await deploy_rendezvous(sim, server_host, "example.net")
    alice = SimNode(sim, host_a, tmp / "alice", "alice@example.net", server)
    await alice.init()          # registers the address with the server, writes the home
    await alice.start()         # `peerpost node`, running as host_a
    await alice.node.send(path, ["bob@example.net"], "title", "")
    await alice.stop()

The server listens in plaintext (the simulated network has no TLS); nodes still pin its
domain key, which signs each handshake. It runs STUN beside it, as `serve` does: on UDP,
the `rendezvous.stun` responder `serve` runs, so each node's start-up `probe`
(overlay.transports.reachability) sees its public mapping through the NAT model and learns
whether it is behind a NAT (it then says so to peers and joins the DHT as a client); and over
TCP, so the nodes' ladder has its TCP punch rung: the real `overlay.transports.punch` code,
over the host's simulated sockets (`sim.network.sockets`) and the NAT model's TCP mapping
and filtering. The QUIC rung is the real `overlay.transports.quic` with qh3, its UDP ports
made by the loop (`loop_udp`, on the host's simulated network), so a pair the punch can't
join (full cone/symmetric) gets `quic` as a real pair does; WebRTC is `sim.webrtc`'s model.

Nothing here stands in for project code: `RendezvousServer` is the one `peerpost-rendezvous
serve` runs (its store is `SqliteStore(":memory:", inline=True)`: same SQL, no writer
thread, see rendezvous.sqlite_store), and `Node` is the daemon `peerpost node` runs, with
its SQLite node.db, content store and received files in a real folder. The wall clocks
they are given are virtual (`EPOCH` + the loop's time), so stored times, expiries and
receipts follow the simulation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.network.host import Host
from sim.simulation import Simulation

if TYPE_CHECKING:
    from overlay.app.node import Node, NodeOptions
    from overlay.mail.inbox import InboxEntry
    from rendezvous.server import RendezvousServer

EPOCH = 1.7e9  # virtual wall clock at virtual time 0 (records carry wall-clock expiries)
RENDEZVOUS_PORT = 4500
STUN_PORT = RENDEZVOUS_PORT  # UDP: `serve` puts STUN at the listen port's number
STUN_TCP_PORT = RENDEZVOUS_PORT + 1  # where `serve` puts it when STUN shares the listen port


def virtual_wall(sim: Simulation) -> Callable[[], float]:
    """A wall clock that follows virtual time."""
    loop = sim.loop
    return lambda: EPOCH + loop.time()


@dataclass(frozen=True, slots=True)
class Deployed:
    """A started rendezvous server, the host it runs on and the address nodes dial."""

    server: RendezvousServer
    host: Host
    address: tuple[str, int]


async def deploy_rendezvous(sim: Simulation, host: Host, domain: str, *,
                            port: int = RENDEZVOUS_PORT, limits: Any = None,
                            dht_port: int | None = None, resolver: Any = None,
                            store_path: Path | None = None, run: int = 0,
                            stun_port: int | None = STUN_PORT,
                            stun_tcp_port: int | None = STUN_TCP_PORT) -> Deployed:
    """Start a `RendezvousServer` (open registration, in-memory store) as `host`.

    `dht_port`: also run the DHT bootstrap node `--dht-port` runs (an `overlay.dht.DhtNode`
    with the server's own identity, its clock and randomness from the simulation), which
    nodes learn of in the CHALLENGE and join through: co-recipients find each other.

    `stun_port`: the UDP STUN service (`StunService`, as `serve` runs it) a node's
    reachability probe asks at start; None runs none, and every node then assumes it is
    reachable directly, as a real node does when its server's STUN does not answer.

    `stun_tcp_port`: the STUN over TCP service nodes learn their TCP mapping from (the
    punch rung needs it); None runs none, and the ladder has no punch rung.

    Federation: `resolver` (a `rendezvous.dns.StaticResolver` of the deployed servers,
    see `domain_records`) lets the server link to other domains' servers; without it the
    server keeps its default. `store_path`: an SQLite file instead of memory, so a server
    stopped with `aclose()` and deployed again on the same host (`run` counts the starts:
    fresh nonces) has its queues back, the outbound queue included. The domain key
    follows the host's name, so every run of a host proves the same key.
    """
    from crypto.identity import DeviceIdentity
    from overlay.dht import DhtNode
    from rendezvous.limits import Limits
    from rendezvous.server import RendezvousServer
    from rendezvous.sqlite_store import SqliteStore

    extra: dict[str, Any] = {} if resolver is None else {"resolver": resolver}
    server = RendezvousServer(domain, SqliteStore(store_path or ":memory:", inline=True),
                              open_registration=True, limits=limits or Limits(),
                              clock=virtual_wall(sim),
                              new_nonce=_nonces(sim, f"nonce/{host.name}"
                                                + (f"/{run}" if run else "")),
                              domain_key=domain_key_for(sim, host),
                              rng=sim.rng_for(f"federation/{host.name}"
                                              + (f"/{run}" if run else "")), **extra)
    _, bound = await host.create_task(server.start("0.0.0.0", port))
    if dht_port is not None:
        identity = DeviceIdentity.from_seed(sim.rng_for(f"dht-id/{host.name}").randbytes(32))
        dht = DhtNode(identity, wall=virtual_wall(sim), rng=sim.rng_for(f"dht/{host.name}"))
        await host.create_task(dht.listen("0.0.0.0", dht_port))
        server.add_service("dht", dht)
    if stun_port is not None:
        from rendezvous.services import StunService

        server.add_service("stun", await host.create_task(StunService.start("0.0.0.0",
                                                                            stun_port)))
    if stun_tcp_port is not None:
        from rendezvous.services import start_stun_tcp

        stun = await host.create_task(start_stun_tcp("0.0.0.0", stun_tcp_port))
        server.add_service("stun_tcp", stun)
    return Deployed(server, host, (host.address, bound))


def domain_key_for(sim: Simulation, host: Host) -> Any:
    """The domain key a server deployed on `host` proves (a `DomainKey`, same every run)."""
    from rendezvous.domainkey import DomainKey

    return DomainKey.from_seed(sim.rng_for(f"domain-key/{host.name}").randbytes(32))


def domain_records(domain: str, host: Host, sim: Simulation, *,
                   port: int = RENDEZVOUS_PORT) -> Any:
    """The `DomainRecords` DNS would publish for a server deployed on `host`: its address
    and the public half of `domain_key_for(sim, host)`; known before the server starts."""
    from rendezvous.dns import DomainRecords

    return DomainRecords(domain, ((host.address, port),), domain_key_for(sim, host).public)


def _nonces(sim: Simulation, purpose: str) -> Callable[[], bytes]:
    from rendezvous.messages import NONCE_LEN

    rng = sim.rng_for(purpose)
    return lambda: rng.randbytes(NONCE_LEN)


class SimNode:
    """One real `Node` daemon on a simulated host; start() and stop() it like a process."""

    def __init__(self, sim: Simulation, host: Host, root: Path, address: str,
                 server: tuple[str, int], *,
                 options: NodeOptions | None = None) -> None:
        self.sim = sim
        self.host = host
        self.root = Path(root)
        self.address = address
        self.server = server
        self.options = options
        self.node: Node | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self.node is not None

    async def init(self) -> None:
        """`peerpost init`: register the address (as this host), then write the home."""
        from crypto.address import format_hostport
        from crypto.identity import DeviceIdentity
        from overlay.app.config import NodeConfig
        from overlay.app.home import NodeHome
        from overlay.app.setup import register
        from rendezvous.domainkey import encode_key

        seed = self.sim.rng_for(f"identity/{self.address}").randbytes(32)
        identity = DeviceIdentity.from_seed(seed)
        host, port = self.server
        key = await self.host.create_task(register(host, port, identity, self.address, None,
                                                   tls=False))
        NodeHome(self.root).create(
            NodeConfig(address=self.address, server=format_hostport(host, port),
                       listen=format_hostport(self.host.address, 0), server_key=encode_key(key),
                       plaintext=True, web="off"), identity)

    async def start(self) -> Node:
        """`peerpost node`: run the daemon as this host until stop()."""
        if self._task is not None:
            raise RuntimeError(f"{self.address} is already running")
        started: asyncio.Future[Node] = self.sim.loop.create_future()
        self._stop = asyncio.Event()
        self._task = self.host.create_task(self._run(started, self._stop),
                                           name=f"node {self.address}")
        self.node = await started
        return self.node

    def _node_options(self) -> NodeOptions:
        """The node's options, with the simulated WebRTC rung instead of aiortc, and the
        TCP punch's sockets and QUIC's UDP ports on this host's simulated network instead
        of the kernel's."""
        from dataclasses import replace

        from overlay.app.node import NodeOptions
        from overlay.transports.quic import loop_udp
        from sim.network.sockets import SimSocket
        from sim.webrtc import SimWebRtcEndpoint

        rng = self.sim.rng_for(f"webrtc/{self.address}")
        host = self.host

        def punch_socket(family: int, local: tuple[str, int]) -> Any:
            return SimSocket.reusable(host, family, local)

        return replace(self.options or NodeOptions(),
                       webrtc_endpoint=lambda pipe, settings: SimWebRtcEndpoint(
                           pipe, settings, rng=rng),
                       punch_socket=punch_socket,
                       quic_udp=loop_udp,
                       # A simulated host never sleeps; the real one's suspend must not
                       # reach into a run (overlay.transports.wake).
                       asleep=lambda: 0.0)

    async def _run(self, started: asyncio.Future[Node], stop: asyncio.Event) -> None:
        from overlay.app.home import NodeHome
        from overlay.app.node import Node

        try:
            async with Node(NodeHome(self.root), options=self._node_options(),
                            wall=virtual_wall(self.sim),
                            rng=self.sim.rng_for(f"node/{self.address}")) as node:
                started.set_result(node)
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def stop(self) -> None:
        """SIGTERM: close the node cleanly."""
        task, self._task = self._task, None
        self.node = None
        if task is None or self._stop is None:
            return
        self._stop.set()
        await task

    async def kill(self) -> None:
        """The host loses power: every task of the host is cancelled, connections reset."""
        task, self._task = self._task, None
        self.node = None
        self.host.power_off()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def inbox(self) -> list[InboxEntry]:
        """The inbox as `peerpost inbox` lists it."""
        if self.node is None:
            raise RuntimeError(f"{self.address} is not running")
        return self.node.inbox.list()

    async def wait_inbox(self, done: Callable[[list[InboxEntry]], bool], *,
                         every: float = 0.25) -> list[InboxEntry]:
        """Check the inbox every `every` virtual seconds until `done(entries)`.

        Polling in virtual time costs no wall time; the node offers no completion event.
        Bound it with `asyncio.timeout`.
        """
        while True:
            entries = self.inbox()
            if done(entries):
                return entries
            await asyncio.sleep(every)

