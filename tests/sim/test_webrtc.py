"""The simulated WebRTC transport: real signalling through the real rendezvous server, the
NAT model decides, the measured setup cost applies, and it passes the Stream suite."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.transports.stream import Stream
from overlay.transports.webrtc import WebRtcConnectError, WebRtcSettings
from rendezvous.client import RendezvousClient
from rendezvous.messages import PipeMessage
from sim.deploy import deploy_rendezvous
from sim.network.host import Host
from sim.network.latency import FixedLatency
from sim.network.nat import NatBehaviour
from sim.simulation import Simulation
from sim.webrtc import SETUP_COST, SETUP_ROUND_TRIPS, SimWebRtcEndpoint
from tests.overlay.streams import check_stream

ONE_WAY = 0.02


@contextlib.asynccontextmanager
async def _device(sim: Simulation, host: Host, address: str, server: tuple[str, int],
                  settings: WebRtcSettings) -> AsyncIterator[tuple[SimWebRtcEndpoint, bytes]]:
    """A rendezvous session and a WebRTC endpoint on `host`, PIPE pushes fed to it."""
    identity = DeviceIdentity.from_seed(sim.rng_for(address).randbytes(32))

    async def up() -> tuple[RendezvousClient, SimWebRtcEndpoint, asyncio.Task[None]]:
        client = RendezvousClient(server[0], server[1], identity, address, register=True)
        await client.start()
        rtc = SimWebRtcEndpoint(client, settings, rng=sim.rng_for(f"rtc/{address}"))
        await rtc.start()

        async def feed() -> None:
            async for push in client.pushes():
                if isinstance(push, PipeMessage):
                    rtc.feed(push)

        return client, rtc, asyncio.get_running_loop().create_task(feed())

    client, rtc, feeder = await host.create_task(up())
    try:
        yield rtc, identity.peer_id
    finally:
        async def down() -> None:
            await rtc.aclose()
            await client.aclose()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

        await host.create_task(down())


def _run(nat_a: NatBehaviour | None, nat_b: NatBehaviour | None,
         body: Callable[[Simulation, Host, Host, SimWebRtcEndpoint, SimWebRtcEndpoint, bytes],
                        Awaitable[Any]]) -> Any:
    settings = WebRtcSettings(connect_timeout=5.0)
    with Simulation(seed=4, latency=FixedLatency(ONE_WAY)) as sim:
        rv = sim.add_host("rv")
        a = sim.add_host("a", up=5e6, down=20e6, nat=nat_a)
        b = sim.add_host("b", up=5e6, down=20e6, nat=nat_b)

        async def main() -> Any:
            deployed = await deploy_rendezvous(sim, rv, "example.net")
            async with _device(sim, a, "a@example.net", deployed.address, settings) as (ra, _), \
                    _device(sim, b, "b@example.net", deployed.address, settings) as (rb, dev_b):
                result = await body(sim, a, b, ra, rb, dev_b)
            await rv.create_task(deployed.server.aclose())
            return result

        result = sim.run(main())
        assert not sim.errors, sim.errors[:3]
        return result


def test_webrtc_stream_conforms_between_cone_nats() -> None:
    async def body(sim: Simulation, a: Host, b: Host, ra: SimWebRtcEndpoint,
                   rb: SimWebRtcEndpoint, dev_b: bytes) -> None:
        async def make_pair() -> tuple[Stream, Stream]:
            dialed = await a.create_task(ra.dial("b@example.net", dev_b))
            return dialed, await b.create_task(rb.accept())

        await check_stream(make_pair)

    _run(NatBehaviour.port_restricted_cone(), NatBehaviour.port_restricted_cone(), body)


def test_setup_takes_the_measured_cost_plus_round_trips() -> None:
    async def body(sim: Simulation, a: Host, b: Host, ra: SimWebRtcEndpoint,
                   rb: SimWebRtcEndpoint, dev_b: bytes) -> tuple[float, str, bytes]:
        t0 = sim.now
        dialed = await a.create_task(ra.dial("b@example.net", dev_b))
        took = sim.now - t0
        accepted = await b.create_task(rb.accept())
        await a.create_task(dialed.send_all(b"hello"))
        got = await b.create_task(accepted.receive_some())
        for s, h in ((dialed, a), (accepted, b)):
            await h.create_task(s.aclose())
        return took, dialed.path, got

    took, path, got = _run(NatBehaviour.full_cone(), NatBehaviour.symmetric(), body)
    assert path == "webrtc" and got == b"hello"
    rtt = 2 * ONE_WAY
    # offer and answer each cross the server (2 one-way legs each), then the channel opens
    signalling = 2 * rtt
    low = signalling + SETUP_COST[0] + SETUP_ROUND_TRIPS * rtt
    high = signalling + SETUP_COST[1] + SETUP_ROUND_TRIPS * rtt + rtt
    assert low <= took <= high, (low, took, high)


def test_symmetric_to_symmetric_fails_at_our_timeout_with_a_reason() -> None:
    async def body(sim: Simulation, a: Host, b: Host, ra: SimWebRtcEndpoint,
                   rb: SimWebRtcEndpoint, dev_b: bytes) -> tuple[str, float]:
        t0 = sim.now
        with pytest.raises(WebRtcConnectError) as err:
            await a.create_task(ra.dial("b@example.net", dev_b))
        return str(err.value), sim.now - t0

    text, took = _run(NatBehaviour.symmetric(), NatBehaviour.symmetric(), body)
    assert "no WebRTC connection to b@example.net within 5.0 s" in text
    assert "endpoint_dependent" in text or "symmetric" in text or "dependent" in text
    assert 5.0 <= took < 5.5
