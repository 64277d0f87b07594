"""End to end: `peerpost fetch` of a first contact's message that comes while the node is
still looking its sender up (the message `unverified` for that FINGER's round trip) waits
for the lookup and downloads the file, instead of refusing it as signed by a key the user
does not trust yet.

Real server and node processes on loopback (overlay.app.lab). That lookup takes a few
milliseconds; to fetch inside it on purpose, bob's node reaches its server through a TCP
relay the test runs, which passes bytes untouched (TLS stays end to end, the pinned domain
key is the server's) and holds what bob sends while alice's message comes in: the server's
push reaches bob, his FINGER of alice does not reach the server until the relay lets it
go, well within the client's 10 s request timeout."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from crypto.address import format_hostport
from overlay.app.lab import LocalNetwork, NodeHandle
from tests.overlay.test_e2e_cli import make_file, same_bytes

pytestmark = pytest.mark.slow

WAITING = re.compile(r"waiting up to \d+ s for the lookup of alice@example\.net under way")


class HoldingRelay:
    """A TCP relay on 127.0.0.1 (port 0) to `target`. `hold()` keeps what its clients send
    in the relay, in order, until `release()`; what the target sends them still flows."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.hostport = format_hostport(*self._listener.getsockname()[:2])
        self._open = threading.Event()
        self._open.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.release()
        for s in (self._listener, *self._sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            for src, dst, held in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, held), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, held: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if held:
                    self._open.wait()
                dst.sendall(data)
        for s in (src, dst):  # one side ended: both end, as a cut path does
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def through(node: NodeHandle, relay: HoldingRelay) -> None:
    """Point the node's configured server at the relay (its pinned key unchanged)."""
    path = node.home / "config.json"
    config = json.loads(path.read_text())
    config["server"] = relay.hostport
    path.write_text(json.dumps(config))


def test_a_fetch_during_a_first_contacts_lookup_waits_for_it_and_downloads(
        net: LocalNetwork, tmp_path: Path) -> None:
    alice = net.add_node("alice")
    bob = net.add_node("bob")
    assert net.server_addr is not None
    relay = HoldingRelay(net.server_addr)
    try:
        through(bob, relay)
        net.start_node(alice)
        net.start_node(bob)
        net.cli(bob, "prefs", "set", "auto-download", "off")  # the fetch starts it
        src = make_file(tmp_path / "clip.bin", 300_000, seed=5)

        relay.hold()  # from now bob's FINGER of alice waits in the relay
        mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()
        e = net.wait_until(lambda: net.inbox_entry(bob, mid), 30, "alice's message at bob")
        assert e["state"] == "unverified"  # a first contact: looked up before it is offered

        assert bob.proc is not None
        with ThreadPoolExecutor(2) as pool:
            fetching = pool.submit(net.cli, bob, "fetch", mid, "--wait", "--json",
                                   check=False)
            waiting = pool.submit(bob.proc.lines.wait_for, WAITING, 20,
                                  "bob's fetch waiting for alice's lookup")
            either: list[Future[Any]] = [fetching, waiting]
            wait(either, return_when=FIRST_COMPLETED)
            if fetching.done():
                res = fetching.result()
                pytest.fail(f"fetch answered during the lookup (exit {res.returncode}): "
                            f"{res.stderr or res.stdout}")
            waiting.result()  # the fetch came while alice's lookup was under way
            relay.release()
            res = fetching.result(timeout=120)
    finally:
        relay.close()
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["state"] == "complete" and same_bytes(src, Path(got["path"]))
