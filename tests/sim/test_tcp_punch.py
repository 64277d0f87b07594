"""The TCP punch rung in the simulator: the real punch code over the NAT model.

The NAT lab (tests/natlab/test_punch_nat.py, test_nodes.py) is the reference: cone/cone
and full-cone/cone homes get the file over `tcp-punch`; full cone/symmetric falls back to
QUIC (tests/sim/test_quic.py); symmetric/symmetric goes through the relay. Here the
same pairs run with the real rendezvous server (STUN over TCP beside it) and real nodes on
simulated hosts, and the punch's own pieces (`query_tcp_mapping`, `simultaneous_open`)
over the simulated sockets.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from overlay.transports.punch import (
    PUNCH_BUDGET,
    Nomination,
    PunchPort,
    simultaneous_open,
)
from overlay.transports.stream import Stream
from rendezvous.stun import TcpMapping, query_tcp_mapping, serve_stun_tcp
from sim.network.host import Host
from sim.network.latency import FixedLatency
from sim.network.nat import Filtering, Mapping, NatBehaviour
from sim.network.sockets import SimSocket
from sim.simulation import Simulation
from sim.trace import EventKind
from tests.overlay.streams import check_stream
from tests.sim.delivery import SIZE, deliver

CONE = NatBehaviour.port_restricted_cone()  # the lab's EIM: masquerade
FULL = NatBehaviour.full_cone()
SYMMETRIC = NatBehaviour.symmetric()  # masquerade fully-random


def _maker(host: Host) -> Any:
    return lambda family, local: SimSocket.reusable(host, family, local)


async def _mapping(host: Host, stun: tuple[str, int]) -> TcpMapping:
    return await host.create_task(query_tcp_mapping(stun, make_socket=_maker(host)))


def test_stun_over_tcp_reports_the_mapping_the_nat_made(sim: Simulation) -> None:
    server = sim.add_host("server")
    cone = sim.add_host("cone", nat=CONE)
    sym = sim.add_host("sym", nat=SYMMETRIC)

    async def main() -> list[tuple[TcpMapping, Host]]:
        stun = await server.create_task(serve_stun_tcp("0.0.0.0", 3478))
        got = [(await _mapping(h, stun.address), h) for h in (cone, sym)]
        for m, _ in got:
            m.close()
        await server.create_task(stun.aclose())
        return got

    (c, cone_host), (s, sym_host) = sim.run(main())
    assert cone_host.nat is not None and sym_host.nat is not None
    # Masquerade keeps the local port; the symmetric box picks a random one.
    assert c.mapped == (cone_host.nat.address, c.local[1])
    assert c.local[0] == cone_host.address
    assert s.mapped[0] == sym_host.nat.address


def _open(sim: Simulation, a: NatBehaviour | None, b: NatBehaviour | None, *,
          nominate: bool = True) -> tuple[bytes, bytes] | None:
    """Both ends learn their mapping, swap candidates, and open at once, as the punch
    endpoints do after the PIPE exchange (a dials: it nominates; b answers: it awaits the
    nomination; neither without `nominate`, as with a peer of the earlier protocol), then
    each sends a line on the connection it kept: what a heard, what b heard (b"" at EOF);
    None if the punch ran out of time."""
    server = sim.add_host("server")
    ha, hb = sim.add_host("a", nat=a), sim.add_host("b", nat=b)
    roles = (Nomination.SEND, Nomination.AWAIT) if nominate else (Nomination.NONE,) * 2

    async def side(host: Host, mine: TcpMapping, theirs: TcpMapping, role: Nomination,
                   say: bytes) -> bytes:
        port = PunchPort.ready(mine, _maker(host))
        try:
            async with asyncio.timeout(PUNCH_BUDGET):
                stream = await simultaneous_open(port, (theirs.mapped, theirs.local),
                                                 nomination=role)
            await stream.send_all(say)
            try:  # over another connection than the peer kept: EOF, or nothing ever
                heard = await asyncio.wait_for(stream.receive_some(), PUNCH_BUDGET)
            except TimeoutError:
                heard = b"(nothing)"
            await stream.aclose()
            return heard
        finally:
            port.close()

    async def main() -> tuple[bytes, bytes] | None:
        stun = await server.create_task(serve_stun_tcp("0.0.0.0", 3478))
        ma, mb = await _mapping(ha, stun.address), await _mapping(hb, stun.address)
        try:
            heard_a, heard_b = await asyncio.gather(
                ha.create_task(side(ha, ma, mb, roles[0], b"from a")),
                hb.create_task(side(hb, mb, ma, roles[1], b"from b")))
        except TimeoutError:
            return None
        finally:
            await server.create_task(stun.aclose())
        return heard_a, heard_b

    return sim.run(main())


def _punch(sim: Simulation, a: NatBehaviour | None, b: NatBehaviour | None) -> bool:
    """`_open` with nomination: True if both ends got the connection, and then each
    end's bytes reached the other (both hold the same one)."""
    heard = _open(sim, a, b)
    if heard is None:
        return False
    assert heard == (b"from b", b"from a")
    return True


@pytest.mark.parametrize(("a", "b", "works"), [
    pytest.param(CONE, CONE, True, id="cone-cone"),
    pytest.param(FULL, CONE, True, id="fullcone-cone"),
    pytest.param(None, CONE, True, id="public-cone"),
    pytest.param(FULL, SYMMETRIC, False, id="fullcone-symmetric"),
    pytest.param(CONE, SYMMETRIC, False, id="cone-symmetric"),
    pytest.param(SYMMETRIC, SYMMETRIC, False, id="symmetric-symmetric"),
])
def test_a_simultaneous_open_joins_the_pairs_the_lab_joins(
        sim: Simulation, a: NatBehaviour | None, b: NatBehaviour | None, works: bool) -> None:
    assert _punch(sim, a, b) is works


def test_a_nat_that_admits_any_syn_on_a_mapping_lets_a_symmetric_peer_in(
        sim: Simulation) -> None:
    # Filtering decides, not the preset's name: an endpoint-independent TCP filter takes
    # the symmetric side's SYN from its new port into the listener on the punched port.
    open_tcp = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT)
    assert _punch(sim, open_tcp, SYMMETRIC) is True


_KINDS: list[NatBehaviour | None] = [None] + [
    NatBehaviour(m, Filtering.ENDPOINT_INDEPENDENT, tcp_filtering=f,
                 port_preservation=m is Mapping.ENDPOINT_INDEPENDENT,
                 random_ports=m is not Mapping.ENDPOINT_INDEPENDENT)
    for m in Mapping for f in Filtering]


def _kind(n: NatBehaviour | None) -> str:
    return "public" if n is None else f"{n.mapping.value}/{n.filtering_of('tcp').value}"


def _admits(x: NatBehaviour | None, y: NatBehaviour | None) -> bool:
    """Does x's side take y's SYN on the mapping STUN saw (or on its own address)? y's SYN
    comes from x's candidate address, from the port STUN saw only if y maps EIM; a non-EIM
    box's STUN mapping has sent to the server alone."""
    if x is None:
        return True
    f = x.filtering_of("tcp")
    if f is Filtering.ENDPOINT_INDEPENDENT:
        return True
    if x.mapping is not Mapping.ENDPOINT_INDEPENDENT:
        return False
    return f is Filtering.ADDRESS_DEPENDENT or y is None or (
        y.mapping is Mapping.ENDPOINT_INDEPENDENT)


@pytest.mark.parametrize(("a", "b"), [
    pytest.param(a, b, id=f"{_kind(a)}-{_kind(b)}") for a in _KINDS for b in _KINDS])
def test_the_punch_joins_a_pair_when_either_nat_admits_the_others_syn(
        sim: Simulation, a: NatBehaviour | None, b: NatBehaviour | None) -> None:
    assert _punch(sim, a, b) is (_admits(a, b) or _admits(b, a))


# A new public port per destination, and any SYN let in on a mapping.
CROSSING = NatBehaviour(Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ENDPOINT_INDEPENDENT,
                        port_preservation=False, random_ports=True)


@pytest.mark.parametrize("nominate", [True, False], ids=["nominated", "earlier-protocol"])
def test_two_connections_at_each_end_and_both_keep_the_one_the_dialer_nominates(
        sim: Simulation, nominate: bool) -> None:
    # Each end's connect leaves from a port STUN did not see and lands on the other's
    # listener: two connections, each end holding both (one made, one taken).
    heard = _open(sim, CROSSING, CROSSING, nominate=nominate)
    assert sim.trace.count(EventKind.TCP_ACCEPT) == 2 + 2  # the STUN queries, the punch's
    if nominate:  # the answerer kept the connection the dialer wrote the marker on
        assert heard == (b"from b", b"from a")
    else:  # each kept its first and closed the other's: each heard only the EOF
        assert heard == (b"", b"")


def test_a_punched_stream_conforms_on_the_simulated_network() -> None:
    # The connection the simultaneous open makes, handed to the node's TCP protocol through
    # loop.create_connection(sock=...) (on the answering end after the nomination was read
    # from it), behaves as every other transport's stream.
    with Simulation(seed=2, latency=FixedLatency(0.025)) as sim:
        server = sim.add_host("server")
        ha = sim.add_host("a", up=50e6, down=50e6, nat=CONE)
        hb = sim.add_host("b", up=50e6, down=50e6, nat=FULL)

        async def side(host: Host, mine: TcpMapping, theirs: TcpMapping,
                       role: Nomination) -> Stream:
            port = PunchPort.ready(mine, _maker(host))
            try:
                return await simultaneous_open(port, (theirs.mapped, theirs.local),
                                               nomination=role)
            finally:
                port.close()

        async def main() -> None:
            stun = await server.create_task(serve_stun_tcp("0.0.0.0", 3478))

            async def make_pair() -> tuple[Stream, Stream]:
                ma, mb = await _mapping(ha, stun.address), await _mapping(hb, stun.address)
                x, y = await asyncio.gather(
                    ha.create_task(side(ha, ma, mb, Nomination.SEND)),
                    hb.create_task(side(hb, mb, ma, Nomination.AWAIT)))
                return x, y

            try:
                await check_stream(make_pair)
            finally:
                await server.create_task(stun.aclose())

        sim.run(main())
        assert not sim.errors, sim.errors[:3]
        assert sim.now > 1.0  # the 48 MB backpressure check really took link time


def _late_answer(sim: Simulation) -> int:
    """a dials b's mapping before b listens (refused, retried after a jittered delay);
    b joins 0.2 s later. The number of refusals."""
    server = sim.add_host("server")
    ha, hb = sim.add_host("a"), sim.add_host("b")

    async def side(host: Host, mine: TcpMapping, theirs: TcpMapping, after: float) -> None:
        await asyncio.sleep(after)
        port = PunchPort.ready(mine, _maker(host))
        try:
            async with asyncio.timeout(PUNCH_BUDGET):
                stream = await simultaneous_open(port, (theirs.mapped, theirs.local),
                                                 rng=sim.rng_for(f"punch/{host.name}"))
            await stream.aclose()
        finally:
            port.close()

    async def main() -> None:
        stun = await server.create_task(serve_stun_tcp("0.0.0.0", 3478))
        ma, mb = await _mapping(ha, stun.address), await _mapping(hb, stun.address)
        await asyncio.gather(ha.create_task(side(ha, ma, mb, 0.0)),
                             hb.create_task(side(hb, mb, ma, 0.2)))
        await server.create_task(stun.aclose())

    sim.run(main())
    return sim.trace.count(EventKind.TCP_REFUSED)


def test_the_punch_retries_draw_their_jitter_from_the_run_not_the_process() -> None:
    digests = []
    for process_seed in (1, 2):
        random.seed(process_seed)  # what another process's `random` module would hold
        with Simulation(seed=1, latency=FixedLatency(0.01)) as sim:
            assert _late_answer(sim) >= 2  # refused, retried with jitter, refused again
            assert not sim.errors, sim.errors[:3]
            digests.append(sim.trace.digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize(("a", "b"), [
    pytest.param(CONE, CONE, id="cone-cone"),
    pytest.param(FULL, CONE, id="fullcone-sender-cone-receiver"),
])
def test_cone_nats_deliver_over_a_tcp_punch(tmp_path: Path, a: NatBehaviour,
                                           b: NatBehaviour) -> None:
    got = deliver(tmp_path, a, b)
    assert got.same
    assert set(got.paths) == {"tcp-punch"} and got.paths["tcp-punch"] >= SIZE, got.paths


def test_two_symmetric_nats_deliver_through_the_relay(tmp_path: Path) -> None:
    got = deliver(tmp_path, SYMMETRIC, SYMMETRIC)
    assert got.same
    assert set(got.paths) == {"relay"}, got.paths
