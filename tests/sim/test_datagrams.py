"""Simulated UDP: loss, capacity, NAT mappings seen by a STUN host, filtering, churn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sim.network.host import Host
from sim.network.nat import NatBehaviour
from sim.simulation import Simulation

Addr = tuple[str, int]


class Collect(asyncio.DatagramProtocol):
    """Remembers every datagram; a STUN-like server replies with the address it saw."""

    def __init__(self, reflect: bool = False) -> None:
        self.got: list[tuple[bytes, Addr]] = []
        self.reflect = reflect
        self.transport: Any = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.got.append((data, addr))
        self.arrived.set()
        if self.reflect:
            self.transport.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)


async def _bind(host: Host, port: int = 0, reflect: bool = False) -> Collect:
    async def bind() -> Collect:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: Collect(reflect),
                                                       local_addr=("0.0.0.0", port))
        return proto

    return await host.create_task(bind())


def test_loss_rate_is_close_to_the_configured_one() -> None:
    with Simulation(seed=11, loss=0.2) as sim:
        a, b = sim.add_host("a"), sim.add_host("b")

        async def main() -> int:
            rx = await _bind(b, 5000)
            tx = await _bind(a)
            for i in range(5000):
                tx.transport.sendto(i.to_bytes(4, "big"), (b.address, 5000))
            await asyncio.sleep(1)
            return len(rx.got)

        received = sim.run(main())
        assert received / 5000 == pytest.approx(0.8, abs=0.02)


def test_datagrams_queue_on_the_uplink_and_arrive_intact(sim: Simulation) -> None:
    a = sim.add_host("a", up=100_000)
    b = sim.add_host("b")

    async def main() -> tuple[list[bytes], float]:
        rx = await _bind(b, 5000)
        tx = await _bind(a)
        for i in range(100):
            tx.transport.sendto(bytes([i]) * 1000, (b.address, 5000))
        while len(rx.got) < 100:
            rx.arrived.clear()
            await rx.arrived.wait()
        return [d for d, _ in rx.got], sim.now

    data, done = sim.run(main())
    assert data == [bytes([i]) * 1000 for i in range(100)]
    assert done == pytest.approx(1.0 + 0.010, rel=1e-6)  # 100 kB at 100 kB/s, plus latency


@pytest.mark.parametrize(("behaviour", "same_port_for_both"), [
    (NatBehaviour.full_cone(), True),
    (NatBehaviour.port_restricted_cone(), True),
    (NatBehaviour.symmetric(), False),
])
def test_stun_hosts_see_the_mapping_behaviour(sim: Simulation, behaviour: NatBehaviour,
                                              same_port_for_both: bool) -> None:
    stun1, stun2 = sim.add_host("stun1"), sim.add_host("stun2")
    client = sim.add_host("client", nat=behaviour)

    async def main() -> tuple[str, str]:
        await _bind(stun1, 3478, reflect=True)
        await _bind(stun2, 3478, reflect=True)
        me = await _bind(client, 40000)
        me.transport.sendto(b"binding", (stun1.address, 3478))
        me.transport.sendto(b"binding", (stun2.address, 3478))
        await asyncio.sleep(1)
        replies = {addr[0]: data.decode() for data, addr in me.got}
        return replies[stun1.address], replies[stun2.address]

    seen1, seen2 = sim.run(main())
    assert client.nat is not None
    assert seen1.split(":")[0] == seen2.split(":")[0] == client.nat.address
    assert (seen1 == seen2) is same_port_for_both


@pytest.mark.parametrize(("behaviour", "from_other_port", "from_other_host"), [
    (NatBehaviour.full_cone(), True, True),
    (NatBehaviour.restricted_cone(), True, False),
    (NatBehaviour.port_restricted_cone(), False, False),
])
def test_filtering_decides_who_gets_in(sim: Simulation, behaviour: NatBehaviour,
                                       from_other_port: bool, from_other_host: bool) -> None:
    server, other = sim.add_host("server"), sim.add_host("other")
    client = sim.add_host("client", nat=behaviour)

    async def main() -> set[bytes]:
        s = await _bind(server, 3478, reflect=True)
        s2 = await _bind(server, 3479)
        o = await _bind(other, 3478)
        me = await _bind(client, 40000)
        me.transport.sendto(b"hello", (server.address, 3478))
        await asyncio.sleep(1)
        mapped = s.got[0][1]
        s.transport.sendto(b"same endpoint", mapped)
        s2.transport.sendto(b"other port", mapped)
        o.transport.sendto(b"other host", mapped)
        await asyncio.sleep(1)
        return {d for d, _ in me.got}

    got = sim.run(main())
    assert b"same endpoint" in got
    assert (b"other port" in got) is from_other_port
    assert (b"other host" in got) is from_other_host


def test_unsolicited_datagrams_to_a_nat_and_an_offline_host_vanish(sim: Simulation) -> None:
    home = sim.add_nat("home", NatBehaviour.full_cone())
    inside = sim.add_host("inside", nat=home)
    outside = sim.add_host("outside")

    async def main() -> tuple[int, int]:
        rx = await _bind(inside, 6000)
        rx_out = await _bind(outside, 6000)
        tx = await _bind(outside, 6001)
        tx.transport.sendto(b"knock", (home.address, 6000))
        tx.transport.sendto(b"knock", (inside.address, 6000))
        outside.go_offline()
        tx.transport.sendto(b"while offline", (outside.address, 6000))
        await asyncio.sleep(1)
        return len(rx.got), len(rx_out.got)

    assert sim.run(main()) == (0, 0)


class _Fragile(Collect):
    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if data == b"boom":
            raise ValueError("the protocol choked on a datagram")
        super().datagram_received(data, addr)


def test_a_protocol_that_raises_on_a_datagram_is_reported_and_the_run_goes_on() -> None:
    with Simulation(seed=3) as sim:
        a, b = sim.add_host("a"), sim.add_host("b")

        async def main() -> list[bytes]:
            async def bind() -> Collect:
                loop = asyncio.get_running_loop()
                _, proto = await loop.create_datagram_endpoint(
                    _Fragile, local_addr=("0.0.0.0", 5000))
                return proto

            rx = await b.create_task(bind())
            tx = await _bind(a)
            for data in (b"one", b"boom", b"two"):
                tx.transport.sendto(data, (b.address, 5000))
            await asyncio.sleep(1)
            return [d for d, _ in rx.got]

        assert sim.run(main()) == [b"one", b"two"]
        (error,) = sim.errors
        assert isinstance(error["exception"], ValueError)
        assert "Network._udp_arrive" in error["message"]
