"""Churn: session distributions and hosts taken down and up on schedule."""

from __future__ import annotations

import asyncio
import random
import statistics

import pytest

from sim.churn import HOUR, Churn, Exponential, Fixed, LogNormal, ipfs_sessions
from sim.simulation import Simulation


def test_ipfs_sessions_are_heavy_tailed_as_measured() -> None:
    rng = random.Random(1)
    draws = [ipfs_sessions().sample(rng) for _ in range(20_000)]
    below_8h = sum(d < 8 * HOUR for d in draws) / len(draws)
    above_24h = sum(d > 24 * HOUR for d in draws) / len(draws)
    assert below_8h == pytest.approx(0.876, abs=0.01)
    assert above_24h == pytest.approx(0.025, abs=0.005)
    assert statistics.mean(draws) > 1.5 * statistics.median(draws)  # heavy right tail


def test_other_distributions_have_their_means() -> None:
    rng = random.Random(2)
    assert statistics.mean(Exponential(600).sample(rng) for _ in range(20_000)) == (
        pytest.approx(600, rel=0.05))
    assert statistics.median(LogNormal(6.0, 1.0).sample(rng) for _ in range(20_000)) == (
        pytest.approx(403.4, rel=0.05))


def test_churn_flips_hosts_and_their_peers_notice(sim: Simulation) -> None:
    server = sim.add_host("server")
    peers = [sim.add_host(f"p{i}") for i in range(5)]
    changes: list[tuple[float, str, bool]] = []
    resets = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal resets
        try:
            await reader.read()
        except ConnectionResetError:
            resets += 1

    async def dial(port: int) -> None:
        reader, _ = await asyncio.open_connection(server.address, port)
        try:
            await reader.read()
        except ConnectionError:
            pass

    async def main() -> None:
        srv = await server.create_task(asyncio.start_server(hold, None, 0))
        port = srv.sockets[0].getsockname()[1]
        for p in peers:
            p.create_task(dial(port))
        await asyncio.sleep(1)
        churn = Churn(peers, sessions=Fixed(100), downtimes=Fixed(50), rng=sim.rng_for("churn"),
                      on_change=lambda h, up: changes.append((sim.now, h.name, up)))
        churn.start()
        await asyncio.sleep(260)
        churn.stop()
        await asyncio.sleep(1000)

    sim.run(main())
    assert resets == 5
    p0 = [(round(t), up) for t, name, up in changes if name == "p0"]
    assert p0 == [(101, False), (151, True), (251, False)]
    assert all(not p.online for p in peers)
