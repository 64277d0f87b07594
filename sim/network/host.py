"""A simulated host, and the context variable that says which host code runs as.

Code runs "as" a host: `host.create_task(coro)` starts the coroutine in a copy of the host's
`contextvars.Context`, where `CURRENT_HOST` is set. asyncio copies the context into every
task and callback created from there, so everything the coroutine starts runs as that host
too, and the loop's socket methods read `CURRENT_HOST` to know who is calling. The network
delivers into a host's protocols in the host's context.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sim.network.nat import NatBox
    from sim.network.net import Network
    from sim.network.transports import SimDatagramTransport, SimServer, SimStreamTransport

T = TypeVar("T")

CURRENT_HOST: contextvars.ContextVar[Host] = contextvars.ContextVar("peerpost_sim_host")

_EPHEMERAL = (49152, 65535)


class NoHostError(RuntimeError):
    """Network code was called outside any simulated host."""


def current_host() -> Host:
    """The host the calling code runs as; NoHostError when there is none."""
    host = CURRENT_HOST.get(None)
    if host is None:
        raise NoHostError(
            "this code is not running as a simulated host: start it with "
            "host.create_task(coro) or Simulation.run(coro, host=host)")
    return host


class Host:
    """A machine on the simulated network: address, link capacities, sockets, online flag."""

    def __init__(self, network: Network, index: int, name: str, address: str, *,
                 up: float | None, down: float | None, nat: NatBox | None,
                 loss: float) -> None:
        for what, rate in (("up", up), ("down", down)):
            if rate is not None and rate <= 0:
                raise ValueError(f"{what} rate must be > 0 bytes/s (or None for unlimited)")
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.network = network
        self.index = index
        self.name = name
        self.address = address
        self.up_rate = up
        self.down_rate = down
        self.nat = nat
        self.loss = loss
        self.online = True
        self.up_free_at = 0.0
        self.down_free_at = 0.0
        self.udp: dict[int, SimDatagramTransport] = {}
        self.listeners: dict[int | str, SimServer] = {}  # TCP port or Unix socket path
        self.streams: dict[SimStreamTransport, None] = {}
        self._next_port = _EPHEMERAL[0]
        self.context = contextvars.Context()
        self.context.run(CURRENT_HOST.set, self)

    def __repr__(self) -> str:
        where = f" behind {self.nat.name}" if self.nat else ""
        return f"Host({self.name!r}, {self.address}{where}{'' if self.online else ', offline'})"

    def create_task(self, coro: Coroutine[Any, Any, T], *,
                    name: str | None = None) -> asyncio.Task[T]:
        """Start `coro` as this host, on the simulation's loop."""
        return self.network.loop.create_task(coro, name=name, context=self.context.copy())

    def bind_port(self, proto: str, port: int) -> int:
        """Claim `port` (0: an ephemeral one) for `proto`; OSError if it is taken."""
        taken = self.udp if proto == "udp" else self.listeners
        if port:
            if not 0 < port < 65536:
                raise OSError(errno.EINVAL, f"bad port {port}")
            if port in taken:
                raise OSError(errno.EADDRINUSE, f"[{self.name}] address already in use: {port}")
            return port
        lo, hi = _EPHEMERAL
        for _ in range(hi - lo + 1):
            port = self._next_port
            self._next_port = lo + (port + 1 - lo) % (hi - lo + 1)
            if port not in taken:
                return port
        raise OSError(errno.EADDRINUSE, f"[{self.name}] no free ephemeral {proto} port")

    def power_off(self) -> None:
        """Switch off: go offline, cancel every task running as this host, close its sockets.

        Timers the host's code scheduled directly (`call_later`) are not tracked and still fire.
        """
        self.go_offline()
        for task in self.network.loop.tasks_of(self):
            task.cancel()
        for transport in list(self.udp.values()):
            transport.close()
        for server in list(self.listeners.values()):
            server.close()

    def go_offline(self) -> None:
        """Unplug: connections are reset (both ends notice), datagrams are dropped silently."""
        self.network.set_online(self, False)

    def go_online(self) -> None:
        """Plug back in; sockets still bound work again, old connections stay dead."""
        self.network.set_online(self, True)
