"""The QUIC rung in the simulator: the real `QuicEndpoint` and qh3 over simulated UDP ports.

The NAT lab (tests/natlab/test_quic_nat.py) is the reference: a full-cone/symmetric pair,
which the TCP punch can't join, gets the file over `quic` in both orders, and with QUIC
turned off at either end over WebRTC. Here the same pairs run with the real rendezvous
server (STUN on UDP beside it) and real nodes on simulated hosts; QUIC's ports come from
the loop (`overlay.transports.quic.loop_udp`), its clock is virtual, and the NAT model maps
and filters its probes and packets.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from overlay.app.node import NodeOptions
from overlay.transports.ladder import PUNCH_HEAD_START, WEBRTC_DELAY
from overlay.transports.quic import QUIC_BUDGET, loop_udp
from overlay.transports.quic_stream import (
    KEEPALIVE,
    QuicStream,
    ThrowawayCertificate,
    quic_configuration,
)
from sim.network.nat import NatBehaviour, webrtc_possible
from sim.simulation import Simulation
from tests.sim.delivery import SIZE, deliver

FULL = NatBehaviour.full_cone()
SYMMETRIC = NatBehaviour.symmetric()  # masquerade fully-random
PAIRS = [pytest.param(FULL, SYMMETRIC, id="fullcone-sender-symmetric-receiver"),
         pytest.param(SYMMETRIC, FULL, id="symmetric-sender-fullcone-receiver")]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_a_pair_the_tcp_punch_cannot_join_delivers_over_quic(
        tmp_path: Path, a: NatBehaviour, b: NatBehaviour) -> None:
    got = deliver(tmp_path, a, b)
    assert got.same
    assert set(got.paths) == {"quic"} and got.paths["quic"] >= SIZE, got.paths
    # QUIC starts after the punch's head start, and needs less than its budget.
    assert got.took < WEBRTC_DELAY + PUNCH_HEAD_START + QUIC_BUDGET, got.took


_NATED = {"fullcone": FULL, "cone": NatBehaviour.port_restricted_cone(), "symmetric": SYMMETRIC}


@pytest.mark.parametrize(("a", "b"), [pytest.param(_NATED[x], _NATED[y], id=f"{x}-{y}")
                                      for x in _NATED for y in _NATED])
def test_without_the_punch_quic_joins_the_nated_pairs_ice_joins(
        tmp_path: Path, a: NatBehaviour, b: NatBehaviour) -> None:
    # QUIC's probes learn the peer's address as ICE's checks do (peer-reflexive), so it
    # joins the pairs the NAT model's ICE run joins (EIM/EIM, full cone/symmetric: what
    # aiortc joined in the NAT lab, where QUIC joins full cone/symmetric too) and the
    # others go on to the relay (WebRTC can't join them either).
    got = deliver(tmp_path, a, b, punch=False)
    assert got.same
    assert set(got.paths) == ({"quic"} if webrtc_possible(a, b) else {"relay"}), got.paths


@pytest.mark.parametrize("off", ["alice", "bob"])
@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_with_quic_off_at_either_end_the_pair_still_delivers_over_webrtc(
        tmp_path: Path, a: NatBehaviour, b: NatBehaviour, off: str) -> None:
    no_quic = NodeOptions(quic=False)
    got = deliver(tmp_path, a, b, alice_options=no_quic if off == "alice" else None,
                  bob_options=no_quic if off == "bob" else None)
    assert got.same
    assert set(got.paths) == {"webrtc"}, got.paths


def test_a_quic_delivery_under_loss_gives_the_same_trace_for_the_same_seed(
        tmp_path: Path) -> None:
    # qh3 draws connection ids, TLS randoms and GREASE through os.urandom, which the run
    # seeds (sim.entropy); what its Rust core draws itself (key shares) changes bytes, not
    # the sizes of datagrams, and the throwaway certificate's Ed25519 signatures are
    # always 64 bytes (an ECDSA one's size varied: two runs' traces differed).
    first = deliver(tmp_path / "one", FULL, SYMMETRIC, loss=0.02)
    again = deliver(tmp_path / "two", FULL, SYMMETRIC, loss=0.02)
    assert first.same and set(first.paths) == {"quic"}
    assert again.digest == first.digest and again.took == first.took
    other = deliver(tmp_path / "three", FULL, SYMMETRIC, loss=0.02, seed=2)
    assert other.same and other.digest != first.digest



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
