"""Bytes on the wire: with `WIRE_HEADERS` a link carries each stream segment's TCP/IP and
Ethernet headers (66 bytes per 1448 of payload) and each datagram's 42, as a link shaped
by `tc tbf` counts them; by default only the payload."""

from __future__ import annotations

import asyncio

import pytest

from sim.network.latency import FixedLatency
from sim.network.net import WIRE_HEADERS
from sim.simulation import Simulation

SIZE = 1448 * 1000
RATE = 1_000_000.0


def _upload_time(**network: int) -> float:
    with Simulation(seed=1, latency=FixedLatency(0.0), **network) as sim:
        a, b = sim.add_host("a", up=RATE), sim.add_host("b")
        done = asyncio.Event()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(SIZE)
            done.set()
            writer.close()

        async def serve() -> int:
            server = await asyncio.start_server(sink, None, 7)
            return int(server.sockets[0].getsockname()[1])

        async def send(port: int) -> float:
            _, writer = await asyncio.open_connection("b", port)
            t0 = asyncio.get_running_loop().time()
            writer.write(bytes(SIZE))
            await done.wait()
            writer.close()
            return asyncio.get_running_loop().time() - t0

        async def main() -> float:
            port = await b.create_task(serve())
            return await a.create_task(send(port))

        return sim.run(main())


def test_a_stream_pays_one_header_per_mss_only_when_asked() -> None:
    assert _upload_time() == pytest.approx(SIZE / RATE, rel=1e-3)
    assert _upload_time(**WIRE_HEADERS) == pytest.approx(1000 * (1448 + 66) / RATE, rel=1e-3)


def test_a_datagram_pays_its_header_on_the_uplink() -> None:
    with Simulation(seed=1, latency=FixedLatency(0.0), **WIRE_HEADERS) as sim:
        a, b = sim.add_host("a", up=RATE), sim.add_host("b")
        got: list[float] = []

        class Sink(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.append(asyncio.get_running_loop().time())

        async def main() -> None:
            loop = asyncio.get_running_loop()
            await b.create_task(loop.create_datagram_endpoint(Sink, local_addr=("0.0.0.0", 9)))

            async def send() -> None:
                tr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                            remote_addr=("b", 9))
                tr.sendto(bytes(958))
                await asyncio.sleep(1)

            await a.create_task(send())

        sim.run(main())
        assert got == [pytest.approx((958 + 42) / RATE)]
