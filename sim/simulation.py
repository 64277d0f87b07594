"""`Simulation`: one seed, one virtual-time loop, one network, and a way to run code as hosts.

    with Simulation(seed=7) as sim:
        a = sim.add_host("a", up=1e6)
        b = sim.add_host("b", nat=NatBehaviour.symmetric())
        result = sim.run(main(), host=a)
        print(sim.now, sim.trace.digest())

All randomness of the engine comes from the seed: `sim.rng_for(purpose)` hands out an
independent `random.Random` per purpose, stable whatever else the scenario draws. While the
loop runs, what the real code asks the OS for (os.urandom, nacl.utils.random,
secrets.token_bytes) comes from the seed too (sim.entropy), so a run's trace hash is the
same in any process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import signal
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from sim.entropy import seeded
from sim.loop import SimDeadlock, SimLoop
from sim.network.host import Host
from sim.network.latency import LatencyModel
from sim.network.nat import NatBehaviour, NatBox
from sim.network.net import Network
from sim.trace import Trace

T = TypeVar("T")

log = logging.getLogger(__name__)

_MAX_ERRORS = 1000
GC_THRESHOLD = 100_000  # allocations between young collections (Python default: 700)


class Simulation:
    """A seeded simulation: loop, network, trace, and the errors its callbacks raised."""

    def __init__(self, seed: int = 0, *, latency: LatencyModel | None = None,
                 **network_options: Any) -> None:
        self.seed = seed
        self.trace = Trace()
        self.loop = SimLoop()
        self.network = Network(self.loop, rng=self.rng_for("network"), trace=self.trace,
                               latency=latency, **network_options)
        self.loop.attach(self.network)
        self.errors: list[dict[str, Any]] = []
        self._closing = False
        self._abandoned = False
        self.interrupted_at: float | None = None  # virtual time of a Ctrl-C
        # Told of each further simulation of the same run (sim.scenario.variant).
        self.on_variant: Callable[[Simulation], None] | None = None
        # What the real code draws from the OS (keys, ids, nonces) comes from the seed.
        self._entropy = self.rng_for("entropy")
        self.loop.set_exception_handler(self._on_error)

    def rng_for(self, purpose: str) -> random.Random:
        """A generator for `purpose`, derived from the seed alone."""
        return random.Random(f"peerpost-sim/{self.seed}/{purpose}")

    def _on_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self._abandoned:
            return  # interrupted: its tasks are dropped unfinished, and that is no error
        if self._closing and isinstance(context.get("exception"), asyncio.CancelledError):
            return  # 3.11's StreamReaderProtocol trips over handler tasks cancelled at close
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(context)
        log.warning("simulated callback failed: %s", context.get("message"),
                    exc_info=context.get("exception"))

    @property
    def now(self) -> float:
        """Virtual time in seconds."""
        return self.loop.time()

    def add_host(self, name: str, *, up: float | None = None, down: float | None = None,
                 nat: NatBox | NatBehaviour | None = None, loss: float = 0.0) -> Host:
        """Add a host (rates in bytes/s, None: unlimited)."""
        return self.network.add_host(name, up=up, down=down, nat=nat, loss=loss)

    def add_nat(self, name: str, behaviour: NatBehaviour) -> NatBox:
        """Add a NAT box that several hosts can sit behind."""
        return self.network.add_nat(name, behaviour)

    def run(self, coro: Coroutine[Any, Any, T], *, host: Host | None = None,
            timeout: float | None = None) -> T:
        """Run `coro` (as `host`, if given) until it returns; `timeout` is in virtual seconds.

        Raises SimDeadlock if it can never finish, TimeoutError on `timeout`.
        """
        if timeout is not None:
            coro = _bounded(coro, timeout)
        context = host.context.copy() if host is not None else None
        task = self.loop.create_task(coro, context=context)
        thresholds = gc.get_threshold()
        # A large run holds millions of long-lived objects (routing tables, records) and
        # allocates a few per message: with the default thresholds the collector rescans
        # them all every few thousand messages. Reference counting still frees nearly
        # everything; cycles are collected, just less often.
        gc.set_threshold(GC_THRESHOLD, 20, 50)
        # Ctrl-C stops the loop between two callbacks: a KeyboardInterrupt raised inside
        # one (in the node's or the server's code) leaves coroutines half run, and their
        # clean-up at close then fails noisily.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main else None
        try:
            with seeded(self._entropy):
                result: T = self.loop.run_until_complete(task)
            return result
        except SimDeadlock:
            task.cancel()
            raise
        finally:
            gc.set_threshold(*thresholds)
            if previous is not None:  # None: set outside Python, cannot be put back
                signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.loop.interrupted:  # a second Ctrl-C: a callback runs on and on
            raise KeyboardInterrupt
        self.loop.interrupted = True

    def close(self) -> None:
        """Cancel what still runs, let it unwind, and close the loop."""
        loop = self.loop
        if loop.is_closed():
            return
        self._closing = True
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        with seeded(self._entropy):
            if tasks:
                try:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                except SimDeadlock:
                    log.warning("tasks ignored cancellation at close")
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def abandon(self) -> None:
        """After a KeyboardInterrupt (Ctrl-C): close, reporting nothing more (hundreds of
        tasks cut short would each log it)."""
        self._abandoned = True
        self.interrupted_at = self.now  # the unwinding at close moves the clock on
        self.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.abandon()
        else:
            self.close()


async def _bounded(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    async with asyncio.timeout(seconds):
        return await coro
