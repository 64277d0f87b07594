"""Simulated TCP: latency, capacity, backpressure, refusal, NAT, resets, churn."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sim.network.host import Host
from sim.network.latency import FixedLatency
from sim.network.nat import NatBehaviour
from sim.simulation import Simulation

MB = 1_000_000


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _serve_echo(host: Host, port: int = 0) -> int:
    async def start() -> int:
        server = await asyncio.start_server(_echo, None, port)
        return int(server.sockets[0].getsockname()[1])

    return await host.create_task(start())


def test_echo_round_trip_is_two_latencies_and_bytes_are_equal() -> None:
    with Simulation(seed=1, latency=FixedLatency(0.040)) as sim:
        a, b = sim.add_host("a"), sim.add_host("b")

        async def client(port: int) -> tuple[bytes, float, float, tuple[str, int]]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            reader, writer = await asyncio.open_connection("b", port)
            t1 = loop.time()
            payload = bytes(range(256)) * 40
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            t2 = loop.time()
            peer = writer.get_extra_info("peername")
            writer.close()
            await writer.wait_closed()
            return echoed, t1 - t0, t2 - t1, peer

        async def main() -> tuple[bytes, float, float, tuple[str, int]]:
            port = await _serve_echo(b, 7)
            return await a.create_task(client(port))

        echoed, connect, rtt, peer = sim.run(main())
        assert echoed == bytes(range(256)) * 40
        assert connect == pytest.approx(0.080, abs=1e-3)
        assert rtt == pytest.approx(0.080, abs=1e-3)
        assert peer == (b.address, 7)
        assert not sim.errors


def test_ten_megabytes_over_one_megabyte_per_second_take_ten_seconds(sim: Simulation) -> None:
    a = sim.add_host("a", up=1 * MB)
    b = sim.add_host("b", down=100 * MB)
    payload = bytes(10 * MB)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = await reader.read(-1)
        writer.write(len(got).to_bytes(8, "big"))
        writer.close()

    async def send(port: int) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(b.address, port)
        t0 = loop.time()
        writer.write(payload)
        writer.write_eof()
        count = int.from_bytes(await reader.readexactly(8), "big")
        return count, loop.time() - t0

    async def main() -> tuple[int, float]:
        server = await b.create_task(asyncio.start_server(sink, None, 0))
        return await a.create_task(send(server.sockets[0].getsockname()[1]))

    count, elapsed = sim.run(main())
    assert count == 10 * MB
    assert elapsed == pytest.approx(10.0, rel=0.02)


def test_drain_keeps_the_senders_buffer_bounded(sim: Simulation) -> None:
    a = sim.add_host("a", up=2 * MB)
    b = sim.add_host("b", down=1 * MB)  # the receiver is the bottleneck
    chunk = b"x" * 32768
    sizes: list[int] = []

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            await asyncio.sleep(0.01)  # a slow consumer: pauses reading
        writer.write(str(total).encode())
        writer.close()

    async def send(port: int) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(b.address, port)
        transport = writer.transport
        t0 = loop.time()
        for _ in range(200):
            writer.write(chunk)
            await writer.drain()
            sizes.append(transport.get_write_buffer_size())
        writer.write_eof()
        total = int(await reader.read())
        return total, loop.time() - t0

    async def main() -> tuple[int, float]:
        server = await b.create_task(asyncio.start_server(slow_sink, None, 0))
        return await a.create_task(send(server.sockets[0].getsockname()[1]))

    total, elapsed = sim.run(main())
    assert total == 200 * len(chunk)
    high = 64 * 1024
    assert max(sizes) <= high + len(chunk)
    assert elapsed >= 200 * len(chunk) / (1 * MB) * 0.99  # bounded by the receiver


def test_two_flows_share_the_uplink(sim: Simulation) -> None:
    a = sim.add_host("a", up=1 * MB)
    b, c = sim.add_host("b"), sim.add_host("c")

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.write(b"k")
        writer.close()

    async def send(dst: Host, port: int) -> float:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(dst.address, port)
        writer.write(bytes(2 * MB))
        writer.write_eof()
        await reader.read()
        return loop.time()

    async def main() -> list[float]:
        pb = await b.create_task(_listen(sink))
        pc = await c.create_task(_listen(sink))
        return list(await asyncio.gather(a.create_task(send(b, pb)), a.create_task(send(c, pc))))

    done = sim.run(main())
    # Fair sharing: both finish near 4 s, not one at 2 s and the other at 4 s.
    assert all(t == pytest.approx(4.0, rel=0.05) for t in done), done


async def _listen(cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                 Awaitable[None]]) -> int:
    server = await asyncio.start_server(cb, None, 0)
    return int(server.sockets[0].getsockname()[1])


def test_connecting_to_a_closed_port_is_refused_after_a_round_trip(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionRefusedError, match="Connect call failed"):
            await asyncio.open_connection(b.address, 9)
        return loop.time() - t0

    assert sim.run(main(), host=a) == pytest.approx(0.020, abs=1e-4)


def test_inbound_tcp_to_a_natted_host_fails_unless_forwarded(sim: Simulation) -> None:
    home = sim.add_nat("home", NatBehaviour.port_restricted_cone())
    pvr = sim.add_host("pvr", nat=home)
    outside = sim.add_host("outside")

    async def main() -> tuple[str, bytes]:
        port = await _serve_echo(pvr, 8000)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await outside.create_task(asyncio.open_connection(home.address, 8000))
            first = "connected"
        except TimeoutError:
            first = f"timeout after {loop.time() - t0:.0f}s"
        with pytest.raises(TimeoutError):  # the private address is not routable either
            await outside.create_task(asyncio.open_connection(pvr.address, port))
        home.forward("tcp", 8080, (pvr.address, port))

        async def through_forward() -> bytes:
            reader, writer = await asyncio.open_connection(home.address, 8080)
            writer.write(b"ping")
            data = await reader.readexactly(4)
            writer.close()
            return data

        return first, await outside.create_task(through_forward())

    first, echoed = sim.run(main())
    assert first == "timeout after 127s"
    assert echoed == b"ping"


def test_natted_host_reaches_a_public_server_and_shows_its_public_address(
        sim: Simulation) -> None:
    home = sim.add_nat("home", NatBehaviour.symmetric())
    laptop = sim.add_host("laptop", nat=home)
    server_host = sim.add_host("server")
    seen: list[tuple[str, int]] = []

    async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername"))
        writer.write(b"hi")
        writer.close()

    async def main() -> bytes:
        port = await server_host.create_task(_listen(who))

        async def dial() -> bytes:
            reader, _ = await asyncio.open_connection("server", port)
            return await reader.read()

        return await laptop.create_task(dial())

    assert sim.run(main()) == b"hi"
    assert seen[0][0] == home.address


def test_abort_and_host_going_offline_reset_the_peer(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")
    errors: list[str] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except ConnectionResetError as exc:
            errors.append(f"server saw {exc}")

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection(b.address, port)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(1)
        a.go_offline()
        try:
            await reader.read()
        except ConnectionError as exc:
            errors.append(f"client saw {type(exc).__name__}")

    async def main() -> None:
        port = await b.create_task(_listen(hold))
        await a.create_task(client(port))
        await asyncio.sleep(1)

    sim.run(main())
    assert sorted(errors) == ["client saw ConnectionAbortedError",
                              "server saw Connection reset by peer"]


def test_offline_host_cannot_be_reached_and_comes_back(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")

    async def main() -> bytes:
        port = await _serve_echo(b)
        b.go_offline()
        with pytest.raises(TimeoutError):
            await a.create_task(asyncio.open_connection(b.address, port))
        b.go_online()

        async def talk() -> bytes:
            reader, writer = await asyncio.open_connection(b.address, port)
            writer.write(b"back")
            return await reader.readexactly(4)

        return await a.create_task(talk())

    assert sim.run(main()) == b"back"


def test_half_close_and_orderly_close(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")

    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's write_eof
        writer.write(data.upper())
        writer.close()
        await writer.wait_closed()

    async def client(port: int) -> tuple[bytes, bool]:
        reader, writer = await asyncio.open_connection(b.address, port)
        for word in (b"one ", b"two ", b"three"):
            writer.write(word)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        return reply, reader.at_eof()

    async def main() -> tuple[bytes, bool]:
        port = await b.create_task(_listen(upper))
        return await a.create_task(client(port))

    assert sim.run(main()) == (b"ONE TWO THREE", True)


def test_unix_sockets_are_private_to_their_host(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")

    async def serve() -> None:
        await asyncio.start_unix_server(_echo, path="/home/node/control.sock")

    async def talk() -> bytes:
        reader, writer = await asyncio.open_unix_connection("/home/node/control.sock")
        writer.write(b"status")
        return await reader.readexactly(6)

    async def main() -> bytes:
        await a.create_task(serve())
        with pytest.raises(ConnectionRefusedError):
            await b.create_task(talk())
        return await a.create_task(talk())

    assert sim.run(main()) == b"status"


def test_power_off_cancels_the_hosts_tasks_and_frees_its_ports(sim: Simulation) -> None:
    a, b = sim.add_host("a"), sim.add_host("b")
    cancelled: list[str] = []

    async def daemon() -> None:
        try:
            await asyncio.sleep(1e9)
        except asyncio.CancelledError:
            cancelled.append("daemon")
            raise

    async def main() -> bytes:
        await _serve_echo(b, 7000)
        b.create_task(daemon())
        await asyncio.sleep(1)
        b.power_off()
        await asyncio.sleep(1)
        b.go_online()
        await _serve_echo(b, 7000)  # the port is free again after a reboot

        async def talk() -> bytes:
            reader, writer = await asyncio.open_connection(b.address, 7000)
            writer.write(b"again")
            return await reader.readexactly(5)

        return await a.create_task(talk())

    assert sim.run(main()) == b"again"
    assert cancelled == ["daemon"]


def test_a_connect_given_up_halfway_resets_the_accepted_side() -> None:
    with Simulation(seed=4, latency=FixedLatency(1.0)) as sim:
        a, b = sim.add_host("a"), sim.add_host("b")
        outcome: list[str] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()
                outcome.append("eof")
            except ConnectionResetError:
                outcome.append(f"reset at {sim.now:.1f}")

        async def impatient(port: int) -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.open_connection(b.address, port), 1.5)

        async def main() -> None:
            port = await b.create_task(_listen(handler))
            await a.create_task(impatient(port))
            await asyncio.sleep(5)

        sim.run(main())
        assert outcome == ["reset at 3.0"]
        assert not sim.errors
