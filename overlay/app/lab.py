"""A rendezvous server and peer nodes as real processes on loopback.

`peerpost demo`, the end-to-end tests and the benchmarks all need the same thing: start
`peerpost-rendezvous serve` and several `peerpost node` daemons, each in its own folder,
learn the ports they bound (every listener binds port 0 and prints what it got), drive them
through the `peerpost` CLI exactly as a person would, and stop or kill them. Nothing here is
a stand-in: these are the installed console scripts.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from crypto.address import format_hostport, parse_hostport
from overlay.app.control_wire import ControlError, NodeNotRunning
from overlay.app.control_wire import call as control_call
from overlay.app.home import NodeHome

# `serve` prints `listening HOST:PORT` (the mailbox) first, then `stun listening HOST:PORT`
# and the like for each service; HOST:PORT as parse_hostport reads it ([::1]:P on IPv6).
LISTENING = re.compile(r"^(?:(\w+) )?listening (\S+:\d+)$")
_READY = re.compile(r"^ready\b")


def listening(m: re.Match[str]) -> tuple[str, tuple[str, int]]:
    """The service a LISTENING line names ("" for the mailbox) and the address it has."""
    return m.group(1) or "", parse_hostport(m.group(2))


class LabError(Exception):
    """A process did not start, answer or finish as expected; the text says which and why."""


def _script(name: str) -> str:
    """The console script next to the running interpreter (the venv's), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} is not installed (run `make test` or `pip install -e .`)")
    return found


class _Lines:
    """Reads a child's stdout in a thread: lines go to a queue and to a log file."""

    def __init__(self, stream: IO[str], log_path: Path) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        self._log = log_path.open("a")
        self._t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._t.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._log.write(line)
            self._log.flush()
            self.q.put(line.rstrip("\n"))
        self.q.put(None)
        self._log.close()

    def drain(self, timeout: float) -> None:
        """Wait until every line the child wrote is in the log file (its stdout at EOF)."""
        self._t.join(timeout)

    def wait_for(self, pattern: re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{what}: no line matching {pattern.pattern!r} in {timeout:.0f} s")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise LabError(f"{what}: exited before printing {pattern.pattern!r}")
            m = pattern.search(line)
            if m:
                return m


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    lines: _Lines
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; a process that does not stop in time is killed and reported."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise LabError(f"{self.name} did not stop within {timeout} s of SIGTERM") from None
        # Its last lines (what it said on the way out) are read by a thread, which a loaded
        # machine may run after the exit: log() right after stop() missed them.
        self.lines.drain(5.0)
        return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive():
            self.popen.kill()
        self.popen.wait()
        self.lines.drain(5.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class NodeHandle:
    name: str
    address: str
    home: Path
    proc: Proc | None = None
    extra: list[str] = field(default_factory=list)


class LocalNetwork:
    """A rendezvous server plus nodes under one folder, torn down on exit."""

    def __init__(self, root: Path, *, domain: str = "example.net",
                 server_args: list[str] | None = None, tls: bool = True,
                 hold_port: bool = True) -> None:
        """`tls`: the server listens with TLS 1.3 (its self-signed certificate) as in
        service, and nodes pin its domain key at `init`; False adds `--plaintext`.
        `hold_port`: see `start_server`; False starts it the first time with
        `--listen 127.0.0.1:0` and nothing else (its services on any free UDP ports)."""
        self.root = Path(root)
        self.tls = tls
        self.root.mkdir(parents=True, exist_ok=True)
        self.domain = domain
        # A full deployment is the default of `serve`: STUN and the DHT bootstrap node
        # beside the mailbox (with --listen port 0, each on any free UDP port).
        self.server_args = server_args if server_args is not None else []
        self.server: Proc | None = None
        self.server_addr: tuple[str, int] | None = None
        self._port_hold: socket.socket | None = None
        self._hold_port = hold_port
        self.nodes: dict[str, NodeHandle] = {}
        self._spawned: list[Proc] = []  # every process started here, stopped by close()
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.pop("PEERPOST_HOME", None)

    # --- processes ---------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.root / f"{name}.log"
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env=self.env, cwd=self.root,
        )
        if popen.stdout is None:
            raise LabError(f"{name}: no stdout pipe")
        proc = Proc(name, popen, _Lines(popen.stdout, log_path), log_path)
        self._spawned.append(proc)
        return proc

    @property
    def data_dir(self) -> Path:
        return self.root / "server-data"

    def start_server(self, timeout: float = 30.0) -> tuple[str, int]:
        """Start (or restart, keeping its data) the rendezvous server; returns its address.

        A restart keeps the port the nodes know. Between a stop and the restart, another
        process's outgoing connection could be given that port as its ephemeral local
        port, and the restart would fail with "Address already in use". So the lab holds
        the port for its whole life: a socket bound to it with SO_REUSEADDR that never
        listens. Linux gives no bound port to an outgoing connection, and lets a server
        that also sets SO_REUSEADDR (asyncio's default) listen on it beside the hold."""
        want = self.server_addr or ("127.0.0.1", 0)  # a test may set the port beforehand
        if self._port_hold is not None and self._port_hold.getsockname()[:2] != want:
            self._release_port()
        if self._port_hold is None and self._hold_port:
            self._port_hold = socket.socket()
            self._port_hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._port_hold.bind(want)
            except OSError:  # taken for good: the server says so when it cannot listen
                self._release_port()
        host, port = self._port_hold.getsockname()[:2] if self._port_hold else want
        listen = format_hostport(host, port)
        # At a given port P, `serve` puts STUN at UDP P and the DHT at UDP P + 1; on a
        # machine full of test servers P + 1 may be taken, so let each pick a free port.
        services = [] if port == 0 else [f for name in ("--stun-port", "--dht-port")
                                         if name not in self.server_args for f in (name, "0")]
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain,
                "--listen", listen, "--data", str(self.data_dir), "--open-registration",
                *([] if self.tls else ["--plaintext"]), *services, *self.server_args]
        self.server = self._spawn("server", argv)
        m = self.server.lines.wait_for(LISTENING, timeout, "peerpost-rendezvous serve")
        self.server_addr = listening(m)[1]
        return self.server_addr

    def start_extra_server(self, name: str, data: Path,
                           timeout: float = 30.0) -> tuple[Proc, tuple[str, int]]:
        """Another `serve` of the domain on any free port, with its own `data` folder: its
        own domain key unless one was copied in (another instance of the domain, or
        something else answering where the nodes expect their server). Stopped by
        `close()`; returns it and the address it listens on."""
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain, "--listen",
                "127.0.0.1:0", "--data", str(data), "--open-registration",
                *([] if self.tls else ["--plaintext"])]
        proc = self._spawn(name, argv)
        m = proc.lines.wait_for(LISTENING, timeout, f"peerpost-rendezvous serve ({name})")
        return proc, listening(m)[1]

    @property
    def server_hostport(self) -> str:
        if self.server_addr is None:
            raise LabError("the server has not been started")
        return format_hostport(*self.server_addr)

    def cli(self, node: NodeHandle, *args: str, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `peerpost --home HOME ARGS...` and return its result."""
        argv = [_script("peerpost"), "--home", str(node.home), *args]
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise LabError(f"`peerpost {' '.join(args)}` for {node.name} exited "
                           f"{res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
        return res

    def cli_json(self, node: NodeHandle, *args: str) -> Any:
        return json.loads(self.cli(node, *args, "--json").stdout)

    def add_node(self, name: str, *, extra: list[str] | None = None,
                 listen: str = "127.0.0.1:0", resolver: str | None = None) -> NodeHandle:
        """Create a node's home with `peerpost init` (registers its address). With
        `resolver` (HOST:PORT of a name server) it finds its server in DNS through it,
        as `init --resolver` does, instead of being given the lab's server."""
        node = NodeHandle(name, f"{name}@{self.domain}", self.root / name, extra=extra or [])
        server = ["--resolver", resolver] if resolver else ["--server", self.server_hostport]
        self.cli(node, "init", "--address", node.address, *server, "--listen", listen)
        self.nodes[name] = node
        return node

    def start_node(self, node: NodeHandle, timeout: float = 30.0, *, ready: bool = True) -> None:
        """Start `peerpost node`; wait for its `ready` line unless `ready` is False."""
        # The web inbox on any free port: its default, 8470, may be a real node's.
        web = [] if any(a.startswith("--web") for a in node.extra) else ["--web", "127.0.0.1:0"]
        argv = [_script("peerpost"), "--home", str(node.home), "node", *web, *node.extra]
        node.proc = self._spawn(node.name, argv)
        if ready:
            node.proc.lines.wait_for(_READY, timeout, f"peerpost node ({node.name})")

    def start_nodes(self, *names: str) -> list[NodeHandle]:
        """`add_node` then `start_node` for each of `names`, in order."""
        nodes = [self.add_node(name) for name in names]
        for node in nodes:
            self.start_node(node)
        return nodes

    def stop_node(self, node: NodeHandle) -> None:
        if node.proc is not None:
            node.proc.stop()

    def kill_node(self, node: NodeHandle) -> None:
        if node.proc is not None:
            node.proc.kill()

    def wait_until(self, predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
        """Poll `predicate()` until it returns something truthy (the CLI is the only view)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise LabError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")

    def wait_complete(self, node: NodeHandle, message_id: str, timeout: float = 120.0,
                      what: str = "the download") -> dict[str, Any]:
        """`node`'s inbox entry of `message_id` once its state is complete."""
        def complete() -> dict[str, Any] | None:
            e = self.inbox_entry(node, message_id)
            return e if e and e["state"] == "complete" else None
        result: dict[str, Any] = self.wait_until(complete, timeout, what)
        return result

    def inbox_entry(self, node: NodeHandle, message_id: str) -> dict[str, Any] | None:
        """`node`'s inbox entry of `message_id` as `inbox --json` gives it, or None if its
        inbox has no such message. Asked by id on the control socket (as `fetch --wait`
        asks): `inbox` lists only the newest 1,000."""
        try:
            e = control_call(NodeHome(node.home).control_path, "progress", id=message_id)
        except NodeNotRunning as exc:
            raise LabError(f"{node.name}: {exc}") from None
        except ControlError as exc:
            if str(exc).startswith("no message ") or " is a message you sent " in str(exc):
                return None  # the node's answers for an id not in its inbox (ops.find)
            raise LabError(f"{node.name}'s inbox entry of {message_id}: {exc}") from None
        return dict(e) if e["id"] == message_id else None

    def close(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.alive():
                with contextlib.suppress(LabError):
                    node.proc.stop(timeout=10)
        if self.server is not None and self.server.alive():
            with contextlib.suppress(LabError):
                self.server.stop(timeout=10)
        for proc in self._spawned:  # what a test started itself (a second instance...)
            if proc.alive():
                with contextlib.suppress(LabError):
                    proc.stop(timeout=10)
        self._release_port()

    def _release_port(self) -> None:
        if self._port_hold is not None:
            self._port_hold.close()
            self._port_hold = None

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dir_size(path: Path) -> int:
    """Bytes in all files below `path` (the server's data folder, for the 'no media' check)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@contextlib.contextmanager
def local_network(root: Path, **kw: Any) -> Iterator[LocalNetwork]:
    net = LocalNetwork(root, **kw)
    try:
        yield net
    finally:
        net.close()
