"""The NAT model: the lab's hole-punching table and properties of mapping and filtering."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.network.nat import Filtering, Mapping, NatBehaviour, NatBox, webrtc_possible

FULL = NatBehaviour.full_cone()
PORT_RESTRICTED = NatBehaviour.port_restricted_cone()
SYMMETRIC = NatBehaviour.symmetric()
MASQUERADE = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)


@pytest.mark.parametrize(("a", "b", "works"), [
    (MASQUERADE, MASQUERADE, True),  # the NAT lab: EIM/EIM (plain MASQUERADE) works
    (FULL, SYMMETRIC, True),  # full cone / symmetric works
    (PORT_RESTRICTED, SYMMETRIC, False),  # port-restricted cone / symmetric fails
    (SYMMETRIC, SYMMETRIC, False),  # symmetric / symmetric needs the relay
    (None, SYMMETRIC, True),
    (None, None, True),
])
def test_webrtc_possible_matches_the_lab_table(a: NatBehaviour | None, b: NatBehaviour | None,
                                               works: bool) -> None:
    assert webrtc_possible(a, b) is works
    assert webrtc_possible(b, a) is works


behaviours = st.builds(NatBehaviour, st.sampled_from(Mapping), st.sampled_from(Filtering),
                       port_preservation=st.booleans(), random_ports=st.booleans())
maybe_nat = st.one_of(st.none(), behaviours)
endpoints = st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                      st.integers(1, 4))


def _box(b: NatBehaviour, seed: int = 0) -> NatBox:
    return NatBox("n", "10.9.9.9", b, random.Random(seed))


@settings(max_examples=150, deadline=None)
@given(behaviours, st.lists(st.tuples(st.integers(0, 2), endpoints), min_size=1, max_size=30))
def test_mappings_follow_the_mapping_behaviour(b: NatBehaviour,
                                               sends: list[tuple[int, tuple[str, int]]]) -> None:
    box = _box(b)
    ports: dict[tuple[int, tuple[str, int]], int] = {}
    for src, dst in sends:
        port = box.outbound("udp", (f"172.16.0.{src}", 5000), dst, 0.0)
        ports[(src, dst)] = port
        assert box.outbound("udp", (f"172.16.0.{src}", 5000), dst, 0.0) == port  # stable
    owners: dict[int, int] = {}
    for (src, dst), port in ports.items():
        assert owners.setdefault(port, src) == src  # never shared between two hosts
        for (src2, dst2), port2 in ports.items():
            if src2 != src:
                continue
            same_key = {Mapping.ENDPOINT_INDEPENDENT: True,
                        Mapping.ADDRESS_DEPENDENT: dst[0] == dst2[0],
                        Mapping.ADDRESS_AND_PORT_DEPENDENT: dst == dst2}[b.mapping]
            assert (port == port2) is same_key


@settings(max_examples=150, deadline=None)
@given(behaviours, st.lists(endpoints, min_size=1, max_size=6), endpoints)
def test_filtering_lets_in_exactly_what_it_should(b: NatBehaviour, sent_to: list[tuple[str, int]],
                                                  probe: tuple[str, int]) -> None:
    box = _box(b)
    inside = ("172.16.0.1", 5000)
    port = 0
    for dst in sent_to:
        port = box.outbound("udp", inside, dst, 0.0)
    # Probe the mapping made for the last destination.
    last = sent_to[-1]
    sent_on_port = [d for d in sent_to if box.outbound("udp", inside, d, 0.0) == port]
    expected = {Filtering.ENDPOINT_INDEPENDENT: True,
                Filtering.ADDRESS_DEPENDENT: probe[0] in {d[0] for d in sent_on_port},
                Filtering.ADDRESS_AND_PORT_DEPENDENT: probe in sent_on_port}[b.filtering]
    assert (box.inbound("udp", probe, port, 1.0) == inside) is expected
    assert box.inbound("udp", last, port, 1.0) == inside  # replies always get in
    assert box.inbound("tcp", probe, port, 1.0) is None  # no unsolicited TCP


@settings(max_examples=60, deadline=None)
@given(behaviours)
def test_mappings_expire_when_idle(b: NatBehaviour) -> None:
    box = _box(b)
    dst = ("10.0.0.1", 1)
    port = box.outbound("udp", ("172.16.0.1", 5000), dst, 0.0)
    assert box.inbound("udp", dst, port, b.udp_timeout - 1) == ("172.16.0.1", 5000)
    assert box.inbound("udp", dst, port, 2 * b.udp_timeout + 1) is None
    assert box.mapping_count() == 0


@settings(max_examples=200, deadline=None)
@given(maybe_nat, maybe_nat)
def test_webrtc_possible_is_symmetric(a: NatBehaviour | None, b: NatBehaviour | None) -> None:
    assert webrtc_possible(a, b) == webrtc_possible(b, a)


_MAP_ORDER = [Mapping.ADDRESS_AND_PORT_DEPENDENT, Mapping.ADDRESS_DEPENDENT,
              Mapping.ENDPOINT_INDEPENDENT]
_FILTER_ORDER = [Filtering.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_DEPENDENT,
                 Filtering.ENDPOINT_INDEPENDENT]


@settings(max_examples=200, deadline=None)
@given(behaviours, maybe_nat, st.booleans())
def test_a_more_permissive_nat_never_breaks_punching(a: NatBehaviour, b: NatBehaviour | None,
                                                     loosen_mapping: bool) -> None:
    if loosen_mapping:
        i = _MAP_ORDER.index(a.mapping)
        looser = NatBehaviour(_MAP_ORDER[min(i + 1, 2)], a.filtering, a.port_preservation,
                              a.random_ports)
    else:
        i = _FILTER_ORDER.index(a.filtering)
        looser = NatBehaviour(a.mapping, _FILTER_ORDER[min(i + 1, 2)], a.port_preservation,
                              a.random_ports)
    if webrtc_possible(a, b):
        assert webrtc_possible(looser, b)


@settings(max_examples=100, deadline=None)
@given(maybe_nat)
def test_a_public_host_or_a_full_cone_always_connects(b: NatBehaviour | None) -> None:
    assert webrtc_possible(None, b)
    assert webrtc_possible(FULL, b)


def test_the_network_answers_for_its_hosts() -> None:
    from sim.simulation import Simulation

    with Simulation(seed=1) as sim:
        shared = sim.add_nat("flat", SYMMETRIC)
        a = sim.add_host("a", nat=SYMMETRIC)
        b = sim.add_host("b", nat=SYMMETRIC)
        c = sim.add_host("c", nat=FULL)
        d, e = sim.add_host("d", nat=shared), sim.add_host("e", nat=shared)
        assert not sim.network.webrtc_possible(a, b)
        assert sim.network.webrtc_possible(a, c)
        assert sim.network.webrtc_possible(d, e)  # same LAN
