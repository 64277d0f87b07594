"""Two `serve` processes of one domain on one real PostgreSQL: a message from a device on
one instance to a device online on the other is pushed at once; after kill -9 of an
instance its devices reconnect to the other and every acknowledged message arrives once;
a PIPE-held offer survives the death of the instance that took it, and that instance's
sessions stop looking online when its lease ends; `stats` and `/metrics` show both
instances and the domain's totals."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient
from rendezvous.domainkey import load_or_create
from rendezvous.messages import Deliver, PipeMessage

from .conftest import DOMAIN, eventually, ident, mid

pytestmark = pytest.mark.slow
ALICE, BOB, CAROL, DAVE, ERIN = ident(1), ident(2), ident(3), ident(4), ident(5)


class Instance:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.metrics_port = 0

    async def kill(self) -> None:
        self.proc.kill()
        assert await self.proc.wait() == -signal.SIGKILL


async def start_instance(stack: AsyncExitStack, data: Path, url: str,
                         *extra: str) -> Instance:
    log = data.parent / f"{data.name}.log"
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rendezvous", "serve", "--domain", DOMAIN,
            "--listen", "127.0.0.1:0", "--data", str(data), "--store", url,
            "--open-registration", "--stun-port", "off", "--dht-port", "off",
            "--instance-heartbeat", "0.5", "--stats-interval", "0.2", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=err)

    async def stop() -> None:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    stack.push_async_callback(stop)
    if proc.stdout is None:
        raise AssertionError("no stdout pipe")
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("listening "):
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
    inst = Instance(proc, int(line.split()[1].rsplit(":", 1)[1]), log)
    if "--metrics" in extra:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("metrics listening "), line
        inst.metrics_port = int(line.split()[2].rsplit(":", 1)[1])
    return inst


@pytest.fixture
async def domain(tmp_path: Path, pg_url: str) -> AsyncIterator[Callable[..., Awaitable[
        Instance]]]:
    """Start instances of DOMAIN on one database, each with its own --data folder and the
    one domain key."""
    key_dir = tmp_path / "key"
    key_dir.mkdir(mode=0o700)
    load_or_create(key_dir)
    async with AsyncExitStack() as stack:
        async def start(name: str, *extra: str) -> Instance:
            data = tmp_path / name
            data.mkdir(mode=0o700)
            shutil.copy2(key_dir / "domain_key.json", data / "domain_key.json")
            return await start_instance(stack, data, pg_url, *extra)
        yield start


def client(inst: Instance, who: DeviceIdentity, address: str, *,
           others: list[Instance] | None = None, **kw: Any) -> RendezvousClient:
    alternates = None
    if others is not None:
        servers = [("127.0.0.1", o.port) for o in others]

        async def alternates_() -> list[tuple[str, int]]:
            return servers
        alternates = alternates_
    return RendezvousClient("127.0.0.1", inst.port, who, address, request_timeout=10.0,
                            tls=True, register=True, alternates=alternates, **kw)


async def next_deliver(pushes: AsyncIterator[object]) -> Deliver:
    while True:
        push = await anext(pushes)
        if isinstance(push, Deliver):
            return push


async def test_push_across_instances_within_100ms(
        domain: Callable[[str], Awaitable[Instance]]) -> None:
    one, two = await domain("one"), await domain("two")
    async with client(one, ALICE, "alice@example.net") as alice, \
            client(two, BOB, "bob@example.net") as bob:
        pushes = bob.pushes()
        latencies: list[float] = []
        for _ in range(20):
            m = mid()
            t0 = time.perf_counter()
            await alice.send(m, [("bob@example.net", BOB.peer_id, m)])
            got = await asyncio.wait_for(next_deliver(pushes), 10)
            latencies.append(time.perf_counter() - t0)
            assert got.envelope.message_id == m and got.envelope.blob == m
            await bob.remove(m)
        ms = sorted(1000 * x for x in latencies)
        print(f"SEND on instance 1 to push on instance 2: median {statistics.median(ms):.1f}"
              f" ms, max {ms[-1]:.1f} ms over {len(ms)}")
        # Loopback takes a few ms; the margin is for a loaded 2-core machine.
        assert statistics.median(ms) < 100
        assert ms[-1] < 1000
        # Presence is shared: alice (who has mailed bob) sees him online from instance 1.
        (dev,) = (await alice.finger("bob@example.net")).devices
        assert dev.online


async def test_kill_9_devices_fail_over_and_every_message_arrives_once(
        domain: Callable[[str], Awaitable[Instance]], tmp_path: Path) -> None:
    one, two = await domain("one"), await domain("two")
    recipients = [(BOB, "bob@example.net"), (CAROL, "carol@example.net")]
    got: Counter[bytes] = Counter()
    sent: list[bytes] = []
    removed: set[bytes] = set()
    async with AsyncExitStack() as stack:
        alice = await stack.enter_async_context(client(one, ALICE, "alice@example.net"))
        devices = [await stack.enter_async_context(client(two, who, addr, others=[one]))
                   for who, addr in recipients]
        half, done = asyncio.Event(), asyncio.Event()

        async def receive(rc: RendezvousClient) -> None:
            pushes = rc.pushes()
            while True:
                push = await next_deliver(pushes)
                got[push.envelope.message_id] += 1
                await rc.remove(push.envelope.message_id)
                removed.add(push.envelope.message_id)
                # Counted once removed: a push whose REMOVE the kill cut off comes again
                # in the next session, by design (the client dedupes by message id).
                if len(removed) >= 100:
                    half.set()
                if len(removed) >= 200:
                    done.set()

        async def send_round(n: int) -> None:
            ids = [mid() for _ in range(n)]
            sent.extend(ids)
            await asyncio.gather(*(alice.send(m, [(recipients[i % 2][1],
                                                   recipients[i % 2][0].peer_id, m)])
                                   for i, m in enumerate(ids)))

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(receive(rc)) for rc in devices]
            await send_round(100)  # pushed from instance 1 to the sessions on instance 2
            await asyncio.wait_for(half.wait(), 20)
            await two.kill()
            await send_round(100)  # acknowledged while bob and carol are reconnecting
            async with asyncio.timeout(30):
                await done.wait()
            await asyncio.sleep(0.5)  # a repeated push would show here
            for t in tasks:
                t.cancel()
        assert all(rc.port == one.port and rc.failovers == 1 for rc in devices)
        assert sorted(got) == sorted(sent) and set(got.values()) == {1}
        for rc in devices:
            assert await rc.list() == []


async def test_held_pipe_offer_survives_its_instance(
        domain: Callable[..., Awaitable[Instance]]) -> None:
    one, two = await domain("one", "--finger-open"), await domain("two", "--finger-open")
    async with client(one, DAVE, "dave@example.net"):
        pass  # dave exists, then goes offline
    async with client(two, CAROL, "carol@example.net", reconnect=False) as carol, \
            client(one, ERIN, "erin@example.net") as erin:
        await carol.pipe("dave@example.net", b"offer: v=0 ...", hold=60)
        (dev,) = (await erin.finger("carol@example.net")).devices
        assert dev.online  # seen from instance 1
        await two.kill()  # carol's session dies with it, unannounced
        async with client(one, DAVE, "dave@example.net") as dave:
            pushes = dave.pushes()
            push = await asyncio.wait_for(anext(pushes), 10)
            assert isinstance(push, PipeMessage)
            assert (push.sender, push.payload) == ("carol@example.net", b"offer: v=0 ...")
        # The dead instance's lease (3 heartbeats of 0.5 s) ends: carol is offline.
        async def offline() -> None:
            (dev,) = (await erin.finger("carol@example.net")).devices
            assert not dev.online, "carol still online after her instance's lease ended"
        await eventually(offline)


async def test_stats_and_metrics_show_each_instance_and_the_domain(
        domain: Callable[..., Awaitable[Instance]], pg_url: str, tmp_path: Path) -> None:
    one, two = await domain("one", "--metrics", "127.0.0.1:0"), await domain("two")
    async with client(one, ALICE, "alice@example.net") as alice, \
            client(two, BOB, "bob@example.net") as bob:
        pushes = bob.pushes()
        m = mid()
        await alice.send(m, [("bob@example.net", BOB.peer_id, m)])
        await asyncio.wait_for(next_deliver(pushes), 10)
        # Both renew their lease with their figures (every 0.5 s), and instance 1 reads
        # the domain's back.
        await eventually(lambda: _shown(one, two, pg_url, tmp_path / "one"))


async def _shown(one: Instance, two: Instance, pg_url: str, data: Path) -> None:
    """`stats --json` and instance 1's /metrics show each instance and the domain."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", "stats", "--data", str(data),
        "--store", pg_url, "--json", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    url = f"http://127.0.0.1:{one.metrics_port}/metrics"
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    doc = json.loads(out)
    by_port = {i["address"]: i for i in doc["instances"]}
    first, second = by_port[f"127.0.0.1:{one.port}"], by_port[f"127.0.0.1:{two.port}"]
    assert first["alive"] and second["alive"]
    assert (first["sessions"], second["sessions"]) == (1, 1)
    assert (first["devices"], second["devices"]) == (1, 1)
    assert first["sends"] == 1 and second["pushed_remote"] == 1
    assert doc["domain"]["instances_alive"] == 2
    assert doc["domain"]["online_sessions"] == 2
    p = "peerpost_rendezvous_"
    assert f'{p}instance{{address="127.0.0.1:{one.port}",instance_id="{first["id"]}"}} 1.0' \
        in metrics, metrics
    assert f'{p}domain_instances{{state="alive"}} 2.0' in metrics
    for inst in (first, second):
        assert f'{p}domain_sessions{{instance_id="{inst["id"]}"}} 1.0' in metrics
