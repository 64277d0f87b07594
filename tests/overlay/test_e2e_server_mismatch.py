"""End to end: something else answers at a node's server address (a hotel's proxy, a server
moved without its data: here another real `serve` with its own domain key). The node never
logs in to it, says so in `info`, keeps trying, and is back by itself once its own server
answers there again, at start as after a reconnect; mail sent to it meanwhile arrives once.

The network in between is a TCP forwarder that passes bytes untouched (TLS stays end to
end) to whichever server it is pointed at, and cuts the open connections when pointed
elsewhere, as walking into another network does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle, Proc
from rendezvous.domainkey import DOMAIN_KEY_NAME, DomainKey, encode_key
from rendezvous.keyfile import write_secret_file

pytestmark = pytest.mark.slow

READY = re.compile(r"^ready\b")
METRICS = re.compile(r"^ready .* metrics=(\S+)$", re.M)
RETRY = ["--mismatch-retry", "0.3"]  # 0.3 s doubling to 3 s (30 s to 5 min in service)


class Switch:
    """A TCP forwarder on loopback to `target`; `route(other)` re-points it and cuts the
    connections open now."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Switch:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def route(self, target: tuple[str, int]) -> None:
        self._call(self._route(target))

    def _call(self, coro: Coroutine[Any, Any, int]) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _route(self, target: tuple[str, int]) -> int:
        self.target = target
        for w in list(self._writers):
            w.transport.abort()
        return 0

    async def _stop(self) -> int:
        if self._server is not None:
            self._server.close()
        await self._route(self.target)
        return 0

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)
        try:
            try:
                r2, w2 = await asyncio.open_connection(*self.target)
            except OSError:
                w.transport.abort()
                return
            self._writers.add(w2)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pipe(r, w2))
                tg.create_task(_pipe(r2, w))
            self._writers.discard(w2)
        finally:
            self._writers.discard(w)


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    w.transport.abort()  # one side ended: end both, as a cut path does


def _through(node: NodeHandle, switch: Switch) -> None:
    """Point the node's configured server at the switch (its pinned key unchanged)."""
    path = node.home / "config.json"
    config = json.loads(path.read_text())
    config["server"] = switch.hostport
    path.write_text(json.dumps(config))


def _key(data: Path) -> DomainKey:
    return DomainKey.from_json((data / DOMAIN_KEY_NAME).read_text())


def _impostor(net: LocalNetwork) -> tuple[Proc, tuple[str, int], DomainKey]:
    proc, addr = net.start_extra_server("impostor", net.root / "impostor-data")
    return proc, addr, _key(net.root / "impostor-data")


def _mismatch_warnings(node: NodeHandle) -> int:
    assert node.proc is not None
    return node.proc.log().count("presented another key") + node.proc.log().count(
        "event=client.server_identity")


def _send(net: LocalNetwork, sender: NodeHandle, to: NodeHandle, clip: Path) -> str:
    clip.write_bytes(os.urandom(300_000))
    return net.cli(sender, "send", str(clip), "--to", to.address).stdout.strip()


def _healthz(hostport: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{hostport}/healthz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _delivered_once(net: LocalNetwork, node: NodeHandle, mid: str, clip: Path) -> None:
    got = net.wait_complete(node, mid, 60)
    assert Path(got["path"]).read_bytes() == clip.read_bytes()
    assert [e["id"] for e in net.cli_json(node, "inbox", "--all")] == [mid]


def test_after_a_reconnect_the_node_waits_out_another_key_and_comes_back(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "net") as net:
        real = net.start_server()
        alice = net.add_node("alice", extra=[*RETRY, "--metrics", "127.0.0.1:0"])
        bob = net.add_node("bob")
        with Switch(real) as switch:
            _through(alice, switch)
            net.start_node(alice)
            net.start_node(bob)
            assert net.cli_json(alice, "info")["connected"]
            impostor, where, other = _impostor(net)
            switch.route(where)  # alice's session is cut; what answers now shows `other`

            mine = _key(net.data_dir)
            m = net.wait_until(lambda: net.cli_json(alice, "info").get("mismatch"), 30,
                               "info showing the key mismatch")
            assert m["server"] == switch.hostport
            assert (m["pinned"], m["presented"]) == (mine.fingerprint, other.fingerprint)
            info = net.cli(alice, "info").stdout
            shown = " ".join(info.replace("│", " ").split())
            assert (f"not logged in: the server at {switch.hostport} presented another key "
                    f"than the one pinned for it (pinned {mine.fingerprint}, presented "
                    f"{other.fingerprint}); trying again by itself, next in") in shown, info
            assert "login refused" not in shown
            assert alice.proc is not None
            health = _healthz(METRICS.findall(alice.proc.log())[0])
            assert health[0] == 503 and "not logged in: the server at" in health[1]
            assert f"presented {other.fingerprint}" in health[1]
            # It goes on trying (once per attempt in the log, a warning, no traceback).
            net.wait_until(lambda: _mismatch_warnings(alice) >= 3, 30, "three attempts")
            assert alice.proc is not None and "Traceback" not in alice.proc.log()
            mid = _send(net, bob, alice, tmp_path / "clip.bin")  # mail meanwhile
            # Never logged in there: not even an AUTHORIZATION reached it.
            assert alice.address not in impostor.log()

            switch.route(real)  # the real server answers at that address again
            net.wait_until(lambda: net.cli_json(alice, "info")["connected"], 30,
                           "alice logged in again by herself")
            assert net.cli_json(alice, "info")["mismatch"] is None
            _delivered_once(net, alice, mid, tmp_path / "clip.bin")
            assert alice.address not in impostor.log()


def test_at_start_the_node_waits_out_another_key_and_comes_back(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "net") as net:
        real = net.start_server()
        alice = net.add_node("alice", extra=RETRY)
        bob = net.add_node("bob")
        net.start_node(bob)
        impostor, where, other = _impostor(net)
        with Switch(where) as switch:  # alice starts in the hotel
            _through(alice, switch)
            net.start_node(alice, ready=False)
            mine = _key(net.data_dir)

            def waiting() -> str | None:
                res = net.cli(alice, "info", check=False)
                text = " ".join(res.stderr.split())
                return text if res.returncode == 3 and "next try at" in text else None

            text = net.wait_until(waiting, 30, "info saying why the node waits")
            assert (f"does not answer yet: it answers once it has logged in to its server, "
                    f"and waits for that as long as it has to: the server at "
                    f"{switch.hostport} presented another key than the one pinned for it "
                    f"(pinned {mine.fingerprint}, presented {other.fingerprint}): not logging "
                    f"in to it; next try at") in text, text
            net.wait_until(lambda: _mismatch_warnings(alice) >= 3, 30, "three attempts")
            assert alice.proc is not None and alice.proc.alive()
            mid = _send(net, bob, alice, tmp_path / "clip.bin")

            switch.route(real)
            alice.proc.lines.wait_for(READY, 30, "alice ready once her server answers")
            assert alice.address not in impostor.log()
            assert not (alice.home / "login-wait.json").exists()
            _delivered_once(net, alice, mid, tmp_path / "clip.bin")


def test_a_planned_key_change_is_taken_from_config_json_without_a_restart(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "net") as net:
        net.start_server()
        alice = net.add_node("alice", extra=RETRY)
        net.start_node(alice)
        assert net.server is not None
        net.server.stop()
        new = DomainKey.generate()  # the operator replaces the domain key
        write_secret_file(net.data_dir / DOMAIN_KEY_NAME, new.to_json())
        net.start_server()
        m = net.wait_until(lambda: net.cli_json(alice, "info").get("mismatch"), 30,
                           "info showing the key mismatch")
        assert m["presented"] == new.fingerprint
        # The user compares fingerprints with the operator, then pins the new key.
        path = alice.home / "config.json"
        config = json.loads(path.read_text())
        config["server_key"] = encode_key(new.public)
        path.write_text(json.dumps(config))
        net.wait_until(lambda: net.cli_json(alice, "info")["connected"], 30,
                       "alice logged in under the new key")
        assert alice.proc is not None and alice.proc.alive()
        pinned = f"pins a new key for the server: {new.fingerprint}"
        alice.proc.lines.wait_for(re.compile(re.escape(pinned)), 10, "alice's log")
        assert pinned in alice.proc.log()
