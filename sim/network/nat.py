"""NAT boxes: mapping and filtering behaviour (RFC 4787 terms) and the hole-punching outcome.

A `NatBox` translates a private endpoint to a port on its public address when a host behind
it sends (`outbound`), and decides whether a packet arriving at a public port gets in
(`inbound`):

- mapping: endpoint-independent (EIM: one public port per private endpoint, whatever the
  destination), address-dependent (ADM: one per destination address) or address-and-port-
  dependent (APDM, "symmetric": one per destination endpoint);
- filtering: endpoint-independent (EIF: anyone may send to a mapped port), address-dependent
  (ADF: only addresses the private endpoint has sent to) or address-and-port-dependent (APDF:
  only exact endpoints it has sent to).

Linux MASQUERADE is EIM with port preservation and APDF (conntrack only lets replies in), so
it is `port_restricted_cone()`; MASQUERADE `--random-fully` is `symmetric()`.

TCP is mapped by the same mapping behaviour and filtered by `tcp_filtering` (RFC 5382 treats
TCP filtering on its own; by default the box's `filtering`). An inbound SYN gets in through a
port forward, or on a live mapping its filtering admits: an address-and-port-dependent box
lets in only a SYN from an endpoint the mapping has sent to, so two hosts behind endpoint-
independent mappings that dial each other's public mapping from the port STUN over TCP saw
meet in a TCP simultaneous open (overlay.transports.punch), and a symmetric box, which gives
the dial another port than STUN saw, never does. `full_cone()` filters TCP address-and-
port-dependently: the NAT lab's full cone (tests/natlab) is a DNAT of inbound UDP only, and
TCP passes its conntrack as masquerade's does. So a TCP punch joins the pairs it joins in
the lab: cone/cone and full cone/cone, never a symmetric box.

`webrtc_possible(a, b)` runs ICE-style connectivity checks (RFC 8445: server-reflexive
candidates from a STUN server on the public side, checks sent by both sides in rounds,
peer-reflexive candidates learnt from checks that arrive) through two fresh boxes and says
whether any check got its response back. It agrees with what real NATs built from network
namespaces and nftables did with aiortc: EIM/EIM and full cone/symmetric punch through,
port-restricted/symmetric and symmetric/symmetric don't.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

Addr = tuple[str, int]

_EPHEMERAL_LO = 1024
_PORTS = 65536


class Mapping(enum.Enum):
    """How a NAT picks the public port for an outgoing flow (RFC 4787 section 4.1)."""

    ENDPOINT_INDEPENDENT = "eim"
    ADDRESS_DEPENDENT = "adm"
    ADDRESS_AND_PORT_DEPENDENT = "apdm"


class Filtering(enum.Enum):
    """Which inbound packets a NAT lets through to a mapped port (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "eif"
    ADDRESS_DEPENDENT = "adf"
    ADDRESS_AND_PORT_DEPENDENT = "apdf"


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    """What kind of NAT a box is; the classic cone names are the class methods."""

    mapping: Mapping
    filtering: Filtering
    port_preservation: bool = True
    random_ports: bool = False
    udp_timeout: float = 120.0
    tcp_timeout: float = 7440.0  # RFC 5382 REQ-5
    tcp_filtering: Filtering | None = None  # None: as `filtering`

    @classmethod
    def full_cone(cls) -> NatBehaviour:
        """EIM + EIF for UDP: once mapped, anyone can reach the port. TCP is APDF, as in
        the NAT lab, whose full cone DNATs inbound UDP only."""
        return cls(Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT,
                   tcp_filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)

    @classmethod
    def restricted_cone(cls) -> NatBehaviour:
        """EIM + ADF."""
        return cls(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT)

    @classmethod
    def port_restricted_cone(cls) -> NatBehaviour:
        """EIM + APDF: Linux MASQUERADE."""
        return cls(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)

    @classmethod
    def symmetric(cls) -> NatBehaviour:
        """APDM + APDF with random ports: MASQUERADE --random-fully."""
        return cls(Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT,
                   port_preservation=False, random_ports=True)

    def timeout(self, proto: str) -> float:
        """Idle time after which a mapping of `proto` ("udp"/"tcp") is forgotten."""
        return self.tcp_timeout if proto == "tcp" else self.udp_timeout

    def filtering_of(self, proto: str) -> Filtering:
        """Which inbound packets of `proto` ("udp"/"tcp") reach a mapped port."""
        if proto == "tcp" and self.tcp_filtering is not None:
            return self.tcp_filtering
        return self.filtering


@dataclass(slots=True)
class _Binding:
    proto: str
    internal: Addr
    port: int
    key: tuple[object, ...]
    last_used: float
    addresses: set[str] = field(default_factory=set)
    endpoints: set[Addr] = field(default_factory=set)


class NatBox:
    """One NAT router with a public address; hosts behind it have private addresses."""

    def __init__(self, name: str, address: str, behaviour: NatBehaviour,
                 rng: random.Random) -> None:
        self.name = name
        self.address = address
        self.behaviour = behaviour
        self._rng = rng
        self._maps: dict[tuple[object, ...], _Binding] = {}
        self._by_port: dict[tuple[str, int], _Binding] = {}
        self._forwards: dict[tuple[str, int], Addr] = {}
        self._next_port = 20000

    def __repr__(self) -> str:
        b = self.behaviour
        return f"NatBox({self.name!r}, {self.address}, {b.mapping.value}/{b.filtering.value})"

    def forward(self, proto: str, public_port: int, internal: Addr) -> None:
        """Add a static port forward: `public_port` on this box goes to `internal`."""
        self._forwards[(proto, public_port)] = internal

    def _key(self, proto: str, internal: Addr, dst: Addr) -> tuple[object, ...]:
        m = self.behaviour.mapping
        if m is Mapping.ENDPOINT_INDEPENDENT:
            return (proto, internal)
        if m is Mapping.ADDRESS_DEPENDENT:
            return (proto, internal, dst[0])
        return (proto, internal, dst)

    def _expired(self, b: _Binding, now: float) -> bool:
        return now - b.last_used > self.behaviour.timeout(b.proto)

    def _drop(self, b: _Binding) -> None:
        del self._maps[b.key]
        del self._by_port[(b.proto, b.port)]

    def _port_free(self, proto: str, port: int) -> bool:
        return (proto, port) not in self._by_port and (proto, port) not in self._forwards

    def _allocate(self, proto: str, wanted: int) -> int:
        b = self.behaviour
        if b.port_preservation and wanted >= _EPHEMERAL_LO and self._port_free(proto, wanted):
            return wanted
        for _ in range(_PORTS):
            if b.random_ports:
                port = self._rng.randrange(_EPHEMERAL_LO, _PORTS)
            else:
                port = self._next_port
                self._next_port = _EPHEMERAL_LO + (self._next_port + 1 - _EPHEMERAL_LO) % (
                    _PORTS - _EPHEMERAL_LO)
            if self._port_free(proto, port):
                return port
        raise OSError(f"NAT {self.name}: no free public {proto} port")

    def outbound(self, proto: str, internal: Addr, dst: Addr, now: float) -> int:
        """A host behind the box sends from `internal` to `dst`: return the public port used."""
        key = self._key(proto, internal, dst)
        b = self._maps.get(key)
        if b is not None and self._expired(b, now):
            self._drop(b)
            b = None
        if b is None:
            port = self._allocate(proto, internal[1])
            b = _Binding(proto, internal, port, key, now)
            self._maps[key] = b
            self._by_port[(proto, port)] = b
        b.last_used = now
        b.addresses.add(dst[0])
        b.endpoints.add(dst)
        return b.port

    def inbound(self, proto: str, src: Addr, public_port: int, now: float) -> Addr | None:
        """A packet from `src` reaches `public_port`: the private endpoint it goes to, or None.

        For TCP this is a SYN (established connections don't come through here at all): it
        gets in through a port forward, or on a mapping whose TCP filtering admits `src`.
        """
        fwd = self._forwards.get((proto, public_port))
        if fwd is not None:
            return fwd
        b = self._by_port.get((proto, public_port))
        if b is None:
            return None
        if self._expired(b, now):
            self._drop(b)
            return None
        f = self.behaviour.filtering_of(proto)
        if f is Filtering.ADDRESS_DEPENDENT and src[0] not in b.addresses:
            return None
        if f is Filtering.ADDRESS_AND_PORT_DEPENDENT and src not in b.endpoints:
            return None
        return b.internal

    def peek(self, proto: str, public_port: int) -> Addr | None:
        """Where `public_port` leads, ignoring filtering and expiry (for routing estimates)."""
        fwd = self._forwards.get((proto, public_port))
        if fwd is not None:
            return fwd
        b = self._by_port.get((proto, public_port))
        return None if b is None else b.internal

    def mapping_count(self) -> int:
        """Number of live and not yet collected mappings (bounded by the port space)."""
        return len(self._maps)


class IceAgent:
    """One ICE agent: a private endpoint, optionally behind a box."""

    def __init__(self, internal: Addr, box: NatBox | None) -> None:
        self.internal = internal
        self.box = box
        self.remote: dict[Addr, None] = {}  # candidates to check, in the order learnt

    def public_address(self) -> str:
        return self.internal[0] if self.box is None else self.box.address

    def send(self, dst: Addr, now: float) -> Addr:
        """Source address the packet carries once it leaves this side."""
        if self.box is None:
            return self.internal
        return (self.box.address, self.box.outbound("udp", self.internal, dst, now))

    def accepts(self, src: Addr, dst: Addr, now: float) -> bool:
        """Does a packet from `src` to public `dst` reach this side's endpoint?"""
        if self.box is None:
            return dst == self.internal
        if dst[0] != self.box.address:
            return False
        return self.box.inbound("udp", src, dst[1], now) == self.internal


def _check(a: IceAgent, b: IceAgent, dst: Addr, now: float) -> bool:
    """`a` sends a connectivity check to `dst`; True when its response comes back."""
    src = a.send(dst, now)
    if not b.accepts(src, dst, now):
        return False
    b.remote.setdefault(src, None)  # peer-reflexive candidate (RFC 8445 section 7.3.1.3)
    reply_src = b.send(src, now)
    return a.accepts(reply_src, src, now)


def ice_connectivity(a: IceAgent, b: IceAgent, stun: Addr, *, rounds: int = 4) -> bool:
    """Run STUN then `rounds` of checks from both sides; True if any pair succeeded."""
    now = 0.0
    a_srflx = (a.public_address(), a.send(stun, now)[1])
    b_srflx = (b.public_address(), b.send(stun, now)[1])
    a.remote[b_srflx] = None
    b.remote[a_srflx] = None
    for _ in range(rounds):
        now += 0.05
        for me, other in ((a, b), (b, a)):
            for dst in list(me.remote):
                if _check(me, other, dst, now):
                    return True
    return False


def webrtc_possible(nat_a: NatBehaviour | None, nat_b: NatBehaviour | None) -> bool:
    """Would two hosts behind these NATs (None: public) open a WebRTC path without a relay?

    Models aiortc with a STUN server on the public side, as in the NAT lab (tests/natlab).
    """
    rng = random.Random(0x1CE)
    box_a = None if nat_a is None else NatBox("a", "10.255.0.1", nat_a, rng)
    box_b = None if nat_b is None else NatBox("b", "10.255.0.2", nat_b, rng)
    a = IceAgent(("192.168.1.2" if box_a else "10.255.1.2", 40000), box_a)
    b = IceAgent(("192.168.2.2" if box_b else "10.255.1.3", 40000), box_b)
    return ice_connectivity(a, b, ("10.255.9.9", 3478))
