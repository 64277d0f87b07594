"""A virtual-time asyncio event loop whose sockets reach the simulated network.

`SimLoop` is an `asyncio.BaseEventLoop` whose `_run_once` never waits for I/O: when nothing
is ready it jumps the virtual clock to the next scheduled callback (trio's
`MockClock(autojump_threshold=0)` idea). `loop.time()` is that clock. So `sleep`,
`call_later`, `asyncio.timeout`, `wait_for` and TaskGroups run in virtual time, as fast as
the callbacks can be executed. Callbacks due at the same virtual time run in the order they
were scheduled.

If nothing is ready and nothing is scheduled while the main coroutine is still waiting,
no simulated time can ever pass again: that is a deadlock, and the loop raises
`SimDeadlock` listing what each host's tasks were waiting for.

`run_in_executor` (and so `asyncio.to_thread`) runs the function inline, at once, and costs
no virtual time. That keeps runs deterministic; CPU cost, where it matters, belongs in a
scenario's model rather than in wall-clock threads.

The socket methods (`create_connection`, `create_server`, `create_datagram_endpoint`,
`getaddrinfo`, `getnameinfo`) act for the host the calling code runs as (`sim.network.host`).
The raw `sock_*` calls (connect, accept, sendall, recv) and `create_connection(sock=)` take
the simulated host's own sockets (`sim.network.sockets.SimSocket`, which the TCP punch
gets through its `make_socket` seam), never kernel ones. Pipes, subprocesses, signals and
TLS are not simulated.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import socket
import weakref
from asyncio import events
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sim.network.host import CURRENT_HOST, Host, current_host
from sim.network.sockets import SimSocket

if TYPE_CHECKING:
    from sim.network.net import Network


_MIN_HEAP_TO_PURGE = 100


def _make_socket_node(path: str) -> None:
    if os.path.isdir(os.path.dirname(path) or "."):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


class SimDeadlock(RuntimeError):
    """Every task waits and nothing is scheduled. `waits` maps host name to what it awaited."""

    def __init__(self, now: float, waits: dict[str, list[str]]) -> None:
        lines = [f"deadlock at virtual time {now:.6f}s: every task waits, nothing is scheduled"]
        for host, items in waits.items():
            lines.append(f"  {host}:")
            lines.extend(f"    {item}" for item in items)
        super().__init__("\n".join(lines))
        self.now = now
        self.waits = waits


def _frame_text(obj: Any) -> str | None:
    frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
    if frame is None:
        return None
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})"


def describe_wait(task: asyncio.Task[Any]) -> str:
    """'task NAME: outer (file:line) > ... > innermost (file:line) awaiting FUTURE'."""
    chain: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(64):  # bounded walk down the await chain
        text = _frame_text(obj)
        if text is not None:
            chain.append(text)
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        if nxt is None:
            break
        obj = nxt
    waiter = getattr(task, "_fut_waiter", None)
    what = f" awaiting {waiter!r}" if waiter is not None else ""
    return f"task {task.get_name()}: {' > '.join(chain) or '?'}{what}"


class SimLoop(asyncio.BaseEventLoop):
    """asyncio loop with a virtual clock, acting on a `Network` (attach it before running)."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._now = start
        self._network: Network | None = None
        self._task_hosts: weakref.WeakKeyDictionary[asyncio.Task[Any], tuple[Host, int]] = (
            weakref.WeakKeyDictionary())
        self._timer_seq = itertools.count()
        # Set by a Ctrl-C (Simulation.run's SIGINT handler): the next iteration raises
        # KeyboardInterrupt between two callbacks, never inside one.
        self.interrupted = False

    def attach(self, network: Network) -> None:
        """Connect the loop's socket methods to `network`."""
        self._network = network

    @property
    def network(self) -> Network:
        """The simulated network; RuntimeError before attach()."""
        if self._network is None:
            raise RuntimeError("SimLoop has no network: call loop.attach(network)")
        return self._network

    # --- clock and scheduling ------------------------------------------------------------

    def time(self) -> float:
        """Virtual time, in seconds."""
        return self._now

    def call_at(self, when: float, callback: Callable[..., object],  # type: ignore[override]
                *args: Any, context: Any = None) -> asyncio.TimerHandle:
        """As asyncio's, but callbacks due at the same time run in the order scheduled."""
        if when is None:
            raise TypeError("when cannot be None")
        base: Any = self  # asyncio's private scheduling state is not in the type stubs
        base._check_closed()
        timer: Any = events.TimerHandle(when, callback, args, self, context)
        heapq.heappush(base._scheduled, (when, next(self._timer_seq), timer))
        timer._scheduled = True
        return timer  # type: ignore[no-any-return]

    def _run_once(self) -> None:
        """One iteration: jump the clock if idle, move due timers to ready, run ready.

        Replaces asyncio's version, whose selector wait becomes the clock jump. The heap holds
        (when, sequence, handle) tuples: compared in C, and first come first served at equal
        times (asyncio compares `when` only, and a heap is not stable); packets of one stream
        rely on that to stay in order, and determinism does too.
        """
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt
        base: Any = self  # asyncio's private scheduling state is not in the type stubs
        heap: list[tuple[float, int, Any]] = base._scheduled
        if len(heap) > _MIN_HEAP_TO_PURGE and base._timer_cancelled_count * 2 > len(heap):
            kept = []
            for entry in heap:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            heap[:] = kept
            base._timer_cancelled_count = 0
        else:
            while heap and heap[0][2]._cancelled:
                base._timer_cancelled_count -= 1
                heapq.heappop(heap)[2]._scheduled = False
        ready = base._ready
        if not ready and not base._stopping:
            if not heap:
                raise SimDeadlock(self._now, self.pending_waits())
            if heap[0][0] > self._now:
                self._now = heap[0][0]
        now = self._now
        while heap and heap[0][0] <= now:
            handle = heapq.heappop(heap)[2]
            handle._scheduled = False
            ready.append(handle)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()

    def _process_events(self, event_list: list[Any]) -> None:
        """No real I/O events ever happen."""

    def _write_to_self(self) -> None:
        """Nothing to wake: the loop never blocks."""

    def create_task(self, coro: Any, *, name: object = None,
                    context: Any = None) -> asyncio.Task[Any]:
        """As asyncio's, and remember which host the task runs as (for deadlock reports)."""
        task = super().create_task(coro, name=name, context=context)
        host = context.get(CURRENT_HOST) if context is not None else CURRENT_HOST.get(None)
        if host is not None:
            self._task_hosts[task] = (host, next(self._timer_seq))
        return task

    def tasks_of(self, host: Host) -> list[asyncio.Task[Any]]:
        """Unfinished tasks running as `host`, oldest first."""
        mine = [(seq, t) for t, (h, seq) in self._task_hosts.items() if h is host and not t.done()]
        return [t for _, t in sorted(mine, key=lambda x: x[0])]

    def pending_waits(self) -> dict[str, list[str]]:
        """What every unfinished task is waiting for, grouped by host name."""
        waits: dict[str, list[str]] = {}
        for task in asyncio.all_tasks(self):
            owner = self._task_hosts.get(task)
            label = owner[0].name if owner is not None else "(no host)"
            waits.setdefault(label, []).append(describe_wait(task))
        return dict(sorted(waits.items()))

    def run_in_executor(self, executor: Any, func: Callable[..., Any],  # type: ignore[override]
                        *args: Any) -> asyncio.Future[Any]:
        """Run `func` inline now; the result is ready without any virtual time passing."""
        base: Any = self
        base._check_closed()
        fut: asyncio.Future[Any] = self.create_future()
        try:
            result = func(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        return fut

    # --- name resolution -----------------------------------------------------------------

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:
        """Resolve names registered with the simulation and IPv4 literals."""
        if family not in (0, socket.AF_INET, socket.AF_UNSPEC):
            raise socket.gaierror(socket.EAI_FAMILY, "only IPv4 is simulated")
        address = self.network.resolve(host.decode() if isinstance(host, bytes) else host)
        number = 0 if port is None else int(port)
        kinds = [type] if type else [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        return [(socket.AF_INET, k, proto or (socket.IPPROTO_TCP if k == socket.SOCK_STREAM
                                             else socket.IPPROTO_UDP), "", (address, number))
                for k in kinds]

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        """Numeric only: (address, port)."""
        return (str(sockaddr[0]), str(sockaddr[1]))

    # --- sockets -------------------------------------------------------------------------

    async def create_connection(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
            port: Any = None, *, ssl: Any = None, sock: Any = None, local_addr: Any = None,
            **_ignored: Any) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """Connect as the current host to (host, port) on the simulated network."""
        if ssl:
            raise NotImplementedError("TLS is not simulated: connect without ssl=")
        if sock is not None:
            protocol = protocol_factory()
            return _sim_socket(sock).take_over(protocol), protocol
        me = current_host()
        if local_addr is not None:
            self.network.check_local(me, local_addr[0])
        infos = await self.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return await self.network.connect(me, protocol_factory, infos[0][4])

    async def create_server(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
            port: Any = None, *, ssl: Any = None, sock: Any = None, start_serving: bool = True,
            **_ignored: Any) -> asyncio.AbstractServer:
        """Listen as the current host; port 0 or None picks a free port."""
        if ssl:
            raise NotImplementedError("TLS is not simulated: serve without ssl=")
        if sock is not None:
            raise NotImplementedError("sock= is not simulated")
        me = current_host()
        if isinstance(host, list | tuple):
            host = host[0] if host else None
        return self.network.listen(me, protocol_factory, host, int(port or 0),
                                   serving=start_serving)

    async def create_unix_server(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], path: Any = None, *,
            ssl: Any = None, sock: Any = None, start_serving: bool = True,
            **_ignored: Any) -> asyncio.AbstractServer:
        """A Unix socket in the current host's own namespace (its control socket, say).

        The name lives in the host's namespace, not in the filesystem; but when the folder
        exists (a node's home), an empty file stands in for the socket node as bind(2) would
        make it, so code that chmods or unlinks the path works.
        """
        if ssl or sock is not None or path is None:
            raise NotImplementedError("only path= Unix servers without TLS are simulated")
        server = self.network.listen_unix(current_host(), protocol_factory, str(path),
                                          serving=start_serving)
        _make_socket_node(str(path))  # file I/O runs inline, like everything in virtual time
        return server

    async def create_unix_connection(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], path: Any = None, *,
            ssl: Any = None, sock: Any = None,
            **_ignored: Any) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """Connect to a Unix socket of the current host."""
        if ssl or sock is not None or path is None:
            raise NotImplementedError("only path= Unix connections without TLS are simulated")
        return await self.network.connect(current_host(), protocol_factory, ("127.0.0.1", 0),
                                          unix_path=str(path))

    async def create_datagram_endpoint(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], local_addr: Any = None,
            remote_addr: Any = None, *, sock: Any = None,
            **_ignored: Any) -> tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]:
        """Bind a UDP socket as the current host."""
        if sock is not None:
            raise NotImplementedError("sock= is not simulated")
        me = current_host()
        remote = self.network.endpoint(remote_addr) if remote_addr is not None else None
        return self.network.open_datagram(me, protocol_factory, local_addr, remote)

    async def sock_connect(self, sock: Any, address: Any) -> None:
        """Connect a simulated socket (from the port it is bound to)."""
        await _sim_socket(sock).connect(address)

    async def sock_accept(self, sock: Any) -> tuple[Any, Any]:
        """The next connection a listening simulated socket takes, and its peer."""
        return await _sim_socket(sock).accept()

    async def sock_sendall(self, sock: Any, data: Any) -> None:
        """Queue all of `data` on a connected simulated socket."""
        _sim_socket(sock).sendall(bytes(data))

    async def sock_recv(self, sock: Any, nbytes: int) -> bytes:
        """Up to `nbytes` from a connected simulated socket; b"" once the peer closed."""
        return await _sim_socket(sock).recv(nbytes)


def _sim_socket(sock: Any) -> SimSocket:
    if not isinstance(sock, SimSocket):
        raise NotImplementedError(
            f"kernel sockets are not simulated ({sock!r}): make it with the host's "
            "SimSocket (sim.network.sockets)")
    return sock
