"""The node's own TCP transport (overlay.transports.tcp) passes the Stream conformance
suite in the sim."""

from __future__ import annotations

import asyncio
import time

from overlay.transports.tcp import TcpServer, TcpStream, connect_tcp
from sim.network.latency import FixedLatency
from sim.simulation import Simulation
from tests.overlay.streams import check_stream


def test_overlay_tcp_conforms_on_the_simulated_network() -> None:
    wall = time.perf_counter()
    with Simulation(seed=2, latency=FixedLatency(0.025)) as sim:
        a = sim.add_host("a", up=50e6, down=50e6)
        b = sim.add_host("b", up=50e6, down=50e6)

        async def main() -> None:
            accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
            done = asyncio.Event()

            async def handler(stream: TcpStream) -> None:
                await accepted.put(stream)
                await done.wait()  # the suite closes the stream; the server must not

            server = TcpServer(handler)
            _, port = await b.create_task(server.start("0.0.0.0", 0))

            async def make_pair() -> tuple[TcpStream, TcpStream]:
                client = await a.create_task(connect_tcp(b.address, port))
                return client, await accepted.get()

            try:
                await check_stream(make_pair)
            finally:
                done.set()
                await b.create_task(server.aclose())

        sim.run(main())
        assert not sim.errors, sim.errors[:3]
        assert sim.now > 1.0  # the 48 MB backpressure check really took link time
    assert time.perf_counter() - wall < 60
