"""Tier (c) with real processes: the CLI server survives kill -9 without losing or
repeating an acknowledged envelope, shuts down cleanly on SIGTERM, and its `invite` and
`stats` commands work next to it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient
from rendezvous.errors import ConnectionLostError
from rendezvous.messages import Deliver

from .conftest import DOMAIN, ident, mid

pytestmark = pytest.mark.slow
ALICE, BOB, CAROL = ident(1), ident(2), ident(3)


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log


@asynccontextmanager
async def serve(data: Path, *extra: str) -> AsyncIterator[ServerProcess]:
    log = data.parent / f"{data.name}-server.log"
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN,
            "--listen", "127.0.0.1:0", "--data", str(data), *extra,
            stdout=asyncio.subprocess.PIPE, stderr=err)
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("listening "):
            raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
        port = int(line.split()[1].rsplit(":", 1)[1])
        yield ServerProcess(proc, port, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed: {err.decode()}")
    return out.decode()


def rc(port: int, who: DeviceIdentity, address: str, **kw: Any) -> RendezvousClient:
    return RendezvousClient("127.0.0.1", port, who, address, request_timeout=10.0,
                            tls=True, **kw)


async def delivered(client: RendezvousClient, n: int) -> list[Deliver]:
    """The first `n` DELIVER pushes `client` gets (other pushes skipped), within 30 s."""
    pushes = client.pushes()
    got: list[Deliver] = []
    async with asyncio.timeout(30):
        while len(got) < n:
            p = await anext(pushes)
            if isinstance(p, Deliver):
                got.append(p)
    return got


async def test_kill_9_loses_and_repeats_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = [mid() for _ in range(200)]
    async with serve(data, "--open-registration") as srv:
        async with rc(srv.port, BOB, "bob@example.net", register=True):
            pass  # Bob exists, then goes offline
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            await asyncio.gather(*(a.send(m, [("bob@example.net", BOB.peer_id, m * 4)])
                                   for m in ids))
            srv.proc.kill()  # SIGKILL right after the last ack
            assert await srv.proc.wait() == -signal.SIGKILL
    async with serve(data, "--open-registration") as srv:
        async with rc(srv.port, BOB, "bob@example.net") as b:
            got: list[bytes] = []
            for p in await delivered(b, 200):
                assert p.envelope.blob == p.envelope.message_id * 4
                assert p.envelope.sender == "alice@example.net"
                got.append(p.envelope.message_id)
            assert sorted(got) == sorted(ids)  # all 200, each exactly once
            assert len(await b.list()) == 200
            await asyncio.gather(*(b.remove(m) for m in got))
        async with rc(srv.port, BOB, "bob@example.net") as b:
            assert await b.list() == []
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await anext(b.pushes())


async def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    async with serve(tmp_path / "data", "--open-registration") as srv:
        async with rc(srv.port, ALICE, "alice@example.net", register=True,
                      reconnect=False) as a:
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(srv.proc.wait(), 20) == 0
            with pytest.raises(ConnectionLostError):  # the server closed the session
                await a.finger("alice@example.net")
            assert not a.connected
        log = srv.log.read_text()
        assert "event=server.stopping reason=signal" in log
        assert "event=server.closed" in log
        assert "Traceback" not in log


async def test_invite_and_stats_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data, "--stats-interval", "0.1") as srv:
        bob_token = (await cli("invite", "bob@example.net", "--data", str(data))).strip()
        alice_token = (await cli("invite", "Alice@Example.net", "--data", str(data))).strip()
        assert len(bob_token) >= 20 and bob_token != alice_token
        with pytest.raises(Exception, match="needs an invite"):
            await rc(srv.port, CAROL, "carol@example.net", register=True).start()
        async with rc(srv.port, BOB, "bob@example.net", register=True, invite=bob_token):
            pass
        async with rc(srv.port, ALICE, "alice@example.net", register=True,
                      invite=alice_token) as a:
            for _ in range(3):
                await a.send(mid(), [("bob@example.net", BOB.peer_id, b"x" * 100)])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:  # the stats file is rewritten every 0.1 s
                doc = json.loads(await cli("stats", "--data", str(data), "--json"))
                if doc["online_sessions"] == 1 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert doc["server_running"] is True
            assert (doc["accounts"], doc["online_sessions"]) == (2, 1)
            assert (doc["queued_envelopes"], doc["bytes_stored"]) == (3, 300)
        text = await cli("stats", "--data", str(data))
        assert "queued envelopes: 3" in text and "accounts: 2" in text
    doc = json.loads(await cli("stats", "--data", str(data), "--json"))
    assert doc["server_running"] is False and doc["online_sessions"] == 0
