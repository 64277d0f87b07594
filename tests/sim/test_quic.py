"""QUIC in the simulator: the real `QuicStream` and qh3 over simulated UDP ports
(`overlay.transports.quic.loop_udp`), on virtual time."""

from __future__ import annotations

import asyncio
import socket

from overlay.transports.quic import loop_udp
from overlay.transports.quic_stream import (
    KEEPALIVE,
    QuicStream,
    ThrowawayCertificate,
    quic_configuration,
)
from sim.simulation import Simulation


def test_a_keepalive_due_while_the_peer_closes_ends_the_stream_quietly(
        sim: Simulation) -> None:
    # The peer's CONNECTION_CLOSE starts the connection's draining period, and qh3 reports
    # it (ConnectionTerminated) only once that is over: a PING due in between found the
    # connection closed and raised out of its timer callback ("connection is closed"), as
    # in nat-mix runs, where a downloader closed while its holder was still sending.
    ha, hb = sim.add_host("a"), sim.add_host("b")
    cert = ThrowawayCertificate.make()

    async def main() -> bytes:
        ta = await ha.create_task(loop_udp(asyncio.DatagramProtocol(), socket.AF_INET))
        tb = await hb.create_task(loop_udp(asyncio.DatagramProtocol(), socket.AF_INET))
        at_a = (ha.address, int(ta.get_extra_info("sockname")[1]))
        at_b = (hb.address, int(tb.get_extra_info("sockname")[1]))
        client, server = await asyncio.gather(
            ha.create_task(QuicStream.open(ta, at_b, quic_configuration(is_client=True),
                                           fingerprint=cert.fingerprint)),
            hb.create_task(QuicStream.open(tb, at_a, quic_configuration(
                is_client=False, certificate=cert))))
        await asyncio.sleep(KEEPALIVE - 0.1)  # the close lands 60 ms before the PING
        await hb.create_task(server.aclose())
        heard = await ha.create_task(client.receive_some())
        await asyncio.sleep(2 * KEEPALIVE)
        await ha.create_task(client.aclose())
        return heard

    assert sim.run(main()) == b""  # the peer's FIN; the sim fixture checks no callback failed
