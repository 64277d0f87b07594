"""`serve --metrics`, `--log-format json`, `--log-level` and sd_notify readiness, on a real
`peerpost-rendezvous serve` process: what an operator's Prometheus, log shipper and
systemd see."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient

from .conftest import DOMAIN, ident, mid

pytestmark = pytest.mark.slow
ALICE, BOB = ident(1), ident(2)


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, lines: dict[str, tuple[str, int]],
                 log: Path) -> None:
        self.proc = proc
        self.lines = lines
        self.log = log

    @property
    def port(self) -> int:
        return self.lines["listening"][1]

    def url(self, path: str) -> str:
        host, port = self.lines["metrics"]
        return f"http://{host}:{port}{path}"


@asynccontextmanager
async def serve(data: Path, *extra: str, env: dict[str, str] | None = None,
                want: tuple[str, ...] = ("listening", "metrics")) -> AsyncIterator[Served]:
    log = data.parent / f"{data.name}-server.log"
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN,
            "--listen", "127.0.0.1:0", "--data", str(data), "--open-registration",
            "--dht-port", "0", "--metrics", "127.0.0.1:0", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=err, env=env)
    lines: dict[str, tuple[str, int]] = {}
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        while not all(w in lines for w in want):
            raw = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not raw:
                raise AssertionError(f"server exited:\n{log.read_text()}")
            words = raw.split()
            if len(words) >= 2 and words[-2] == "listening":
                host, port = words[-1].rsplit(":", 1)
                lines[words[0]] = (host, int(port))
        yield Served(proc, lines, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted labels: value} of every sample (suffixes kept)."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(got: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
          **labels: str) -> float:
    return got.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def rc(port: int, who: DeviceIdentity, address: str) -> RendezvousClient:
    return RendezvousClient("127.0.0.1", port, who, address, request_timeout=10.0,
                            tls=True, register=True)


async def test_metrics_count_a_sent_message_and_healthz(tmp_path: Path) -> None:
    async with serve(tmp_path / "data") as srv:
        status, body = await asyncio.to_thread(fetch, srv.url("/healthz"))
        assert status == 200 and body.startswith(f"serving {DOMAIN} on 127.0.0.1:{srv.port}")
        _, text = await asyncio.to_thread(fetch, srv.url("/metrics"))
        before = samples(text)
        families = {f.name for f in text_string_to_metric_families(text)}
        p = "peerpost_rendezvous_"
        for name in ("sessions", "connections", "queue_depth", "messages_in", "messages_out",
                     "request_seconds", "send_ack_seconds", "relay_bytes", "dht_events",
                     "refusals", "outbound_queue_depth", "federation_forwarded",
                     "federation_bounced", "replies"):
            assert p + name in families, name
        assert value(before, p + "messages_in_total") == 0

        async with rc(srv.port, BOB, "bob@example.net") as bob, \
                rc(srv.port, ALICE, "alice@example.net") as alice:
            pushes = bob.pushes()
            m = mid()
            await alice.send(m, [("bob@example.net", BOB.peer_id, b"hello")])
            async with asyncio.timeout(10):
                await anext(pushes)
            _, text = await asyncio.to_thread(fetch, srv.url("/metrics"))
        got = samples(text)
        assert value(got, p + "messages_in_total") == 1
        assert value(got, p + "messages_out_total") == 1
        assert value(got, p + "sessions") == 2
        assert value(got, p + "send_ack_seconds_count") == 1
        assert value(got, p + "request_seconds_count", verb="SEND") == 1
        assert value(got, p + "replies_total", verb="SEND", status="200") == 1
        assert value(got, p + "refusals_total", reason="bad_input") == 0
        assert any(k.startswith(p + "dht_events") for k in got)

        srv.proc.terminate()
        assert await asyncio.wait_for(srv.proc.wait(), 20) == 0


async def test_json_logs_and_bad_log_level(tmp_path: Path) -> None:
    async with serve(tmp_path / "data", "--log-format", "json", "--log-level", "debug") as srv:
        srv.proc.terminate()
        assert await asyncio.wait_for(srv.proc.wait(), 20) == 0
    docs = [json.loads(line) for line in srv.log.read_text().splitlines() if line.strip()]
    assert docs and all({"ts", "level", "logger", "event"} <= d.keys() for d in docs)
    listening = [d for d in docs if d["event"] == "server.listening"]
    assert listening and listening[0]["port"] == srv.port and listening[0]["level"] == "info"
    assert any(d["event"] == "server.closed" for d in docs)

    res = subprocess.run([sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN,
                          "--data", str(tmp_path / "d2"), "--log-level", "loud"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--log-level" in res.stderr and "invalid choice: 'loud'" in res.stderr


async def test_ready_and_stopping_reach_notify_socket(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@peerpost-test-{tmp_path.name}"
    sock.bind("\0" + name[1:])
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    env = {**os.environ, "NOTIFY_SOCKET": name}
    try:
        async with serve(tmp_path / "data", env=env) as srv:
            got = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode()
            assert "READY=1" in got.splitlines()
            srv.proc.terminate()
            got = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode()
            assert "STOPPING=1" in got.splitlines()
            assert await asyncio.wait_for(srv.proc.wait(), 20) == 0
    finally:
        sock.close()


async def test_queue_depths_on_a_postgresql_store(tmp_path: Path, pg_url: str) -> None:
    # They were read from the SQLite file only: on PostgreSQL /metrics had neither gauge.
    async with serve(tmp_path / "data", "--store", pg_url) as srv:
        async with rc(srv.port, BOB, "bob@example.net"), \
                rc(srv.port, ALICE, "alice@example.net") as alice:
            pass
        async with rc(srv.port, ALICE, "alice@example.net") as alice:
            for _ in range(3):  # bob is offline: they wait in his queue
                m = mid()
                await alice.send(m, [("bob@example.net", BOB.peer_id, b"hello")])
        _, text = await asyncio.to_thread(fetch, srv.url("/metrics"))
        got = samples(text)
        p = "peerpost_rendezvous_"
        assert value(got, p + "queue_depth") == 3
        assert value(got, p + "outbound_queue_depth") == 0
        srv.proc.terminate()
        assert await asyncio.wait_for(srv.proc.wait(), 20) == 0
