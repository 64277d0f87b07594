"""The addresses the punching rungs trade (the TCP punch and QUIC): candidates.

An offer or an answer names the sender's candidates: first the public address its server's
STUN saw, then its local address (for a peer behind the same NAT). Here is what both rungs
do with them:

- On the wire a candidate is an IP literal and a port (`candidate`), never a name: a peer
  must not make us resolve what it chose. It comes back in the text the kernel gives the
  source of a packet (inet_ntop's: an IPv6 one compressed and lowercase, an IPv4-mapped one
  as ::ffff:a.b.c.d), since the peer's probes and connections are matched on that text.
- Some addresses mean nothing to another host (`unroutable`): a link-local one, or any with a
  zone (`fe80::1%eth0`: the zone is an interface of the sender's, the address is on its link
  only), an unspecified one (0.0.0.0/8, ::; a connect to 0.0.0.0 reaches our own host),
  multicast, broadcast and IPv4's reserved block. A local candidate of that kind is dropped when the
  signal is decoded (`decode_candidates`), so the peer that sent it still gets through on
  its public one, and a node never sends one of its own (`own_candidates`). A public one
  of that kind makes the whole signal invalid (the locals are dialled only behind the same
  public address, which such a mapping can't tell), but for a link-local one without a
  zone: that is what STUN saw of a node on its server's link (a LAN with no DHCP, a server
  reached over fe80:: or 169.254/16), and it is kept as a same-link candidate (`targets`).
- What we dial (`targets`): the public candidate, and the locals only when we are behind the
  same public address; only those of our port's address family; a loopback one only
  when we are on loopback too (the same host), so a peer can't aim our packets into our
  own LAN or at our own host's services; and a link-local one only when our own public
  address is link-local too (our server is on our link, so the peer's may be ours) and it
  is IPv4 (169.254/16, which our routing table puts on a link). An IPv6 one would need
  a zone, an interface of ours, that our ports don't carry (a socket gives its local
  address without one), so it is not dialled and `nothing_to_dial` says why: a callee in
  its reject instead of an answer (`undialable`), a dialler in its error.
- A port is IPv4 or IPv6, as the address of our server's STUN is (a name is resolved
  first, `resolve`). A callee whose port could reach none of an offer's candidates says so
  at once, before it opens any socket (`no_common_family`), and a dialler says why an
  answer leaves nothing to dial (`nothing_to_dial`), naming the families.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from crypto.address import format_hostport, parse_hostport
from crypto.codec import Fields, item_str
from crypto.errors import DecodeError
from rendezvous.stun import Address

MAX_CANDIDATES = 4
FAMILY_NAME: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def family_of(host: str) -> int:
    """The address family of an IP literal (an IPv6 one has a colon)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def family_names(candidates: tuple[Address, ...]) -> str:
    """The address families of `candidates`, for an error: "IPv4", "IPv6" or both."""
    return " and ".join(sorted({FAMILY_NAME[family_of(c[0])] for c in candidates}))


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """`ip` as a socket names a packet's source (inet_ntop): Python 3.11's own text differs
    for an IPv4-mapped address (::ffff:7f00:1 where a socket says ::ffff:127.0.0.1)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is None:
        return socket.inet_ntop(socket.AF_INET6, ip.packed)
    return str(ip)


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parsed(text: str) -> tuple[IP, int]:
    """The IP address and usable port of a candidate from the wire (DecodeError if not)."""
    host, port = parse_hostport(text, what="candidate")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DecodeError(f"candidate {text!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise DecodeError(f"candidate {text!r} has no usable port")
    return ip, port


def candidate(text: str) -> Address:
    """A candidate from the wire: an IP literal and a usable port (DecodeError if not).
    The host comes back in its canonical text (see the module docstring)."""
    ip, port = _parsed(text)
    return _canonical(ip), port


def unroutable(host: str) -> str | None:
    """Why the IP literal `host` means nothing to a host elsewhere, or None."""
    return _unroutable(ipaddress.ip_address(host))


def _unroutable(ip: IP) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"has a zone (%{ip.scope_id}, an interface of the sender's)"
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if ip.is_link_local:
        return "is link-local (it means something on the sender's link only)"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip.packed[0] == 0):
        return "is unspecified (in 0.0.0.0/8, or ::): a connect takes it for its own host"
    if ip.is_multicast:
        return "is multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved:
        return "is reserved or broadcast"
    return None


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP literal `host`; an IPv4-mapped IPv6 one as its IPv4 address."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_loopback(host: str) -> bool:
    return _unmapped(host).is_loopback


def _on_link(host: str | IP) -> bool:
    """Whether `host` (an IP literal or one already parsed) is link-local without a zone:
    as STUN names a node on its link."""
    ip = ipaddress.ip_address(host) if isinstance(host, str) else host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        ip = ip.ipv4_mapped or ip
    return ip.is_link_local


def decode_candidates(f: Fields) -> tuple[Address, ...]:
    """A signal's candidates ("c"): the public one first, which must mean something here
    or on a link we may share, then the locals, of which those that mean nothing to
    another host are dropped (see the module docstring)."""
    texts = f.list("c", item_str(64), max_items=MAX_CANDIDATES) or ()
    if not texts:
        raise DecodeError("no candidates")
    # Each address is parsed once: ipaddress's parse was most of an offer's decode.
    (public, port), *local = (_parsed(t) for t in texts)
    if (why := _unroutable(public)) is not None and not _on_link(public):
        raise DecodeError(f"the public candidate {texts[0]!r} {why}")
    return (_canonical(public), port), *((_canonical(ip), p) for ip, p in local
                                         if _unroutable(ip) is None)


def own_candidates(mapped: Address, local: Address) -> tuple[Address, ...]:
    """What we offer or answer: the public address STUN saw, then our local address
    unless it means nothing to another host (a link-local one from the route to STUN)."""
    if unroutable(local[0]) is not None:
        return (mapped,)
    return tuple(dict.fromkeys((mapped, local)))


def targets(our_public: str, theirs: tuple[Address, ...], family: int) -> list[Address]:
    """What to dial of the peer's candidates from a port of `family` whose public address
    is `our_public` (the host STUN saw): see the module docstring."""
    public, *local = theirs
    out = [public]
    if public[0] == our_public:
        out += local
    here = _is_loopback(our_public)
    return [a for a in dict.fromkeys(out)
            if family_of(a[0]) == family and (here or not _is_loopback(a[0]))
            and (not _on_link(a[0]) or _same_link(our_public, a[0]))]


# Link-local IPv4 addresses no peer holds: the first and last /24 (RFC 3927 2.1: no host
# picks them) and the metadata service clouds answer at, which a peer must not aim us at.
_NOT_A_PEER = (ipaddress.ip_network("169.254.0.0/24"), ipaddress.ip_network("169.254.255.0/24"),
               ipaddress.ip_network("169.254.169.254/32"))


def _same_link(our_public: str, host: str) -> bool:
    """Whether we may reach the link-local `host` (see the module docstring)."""
    ip = _unmapped(host)
    return (_on_link(our_public) and ip.version == 4
            and not any(ip in net for net in _NOT_A_PEER))


def nothing_to_dial(theirs: tuple[Address, ...], family: int, port: str) -> str:
    """Why `targets` left nothing of `theirs` for our `port` ("UDP port", "TCP port")."""
    if all(family_of(c[0]) != family for c in theirs):
        return (f"the peer's candidates are {family_names(theirs)} only and our {port} is "
                f"{FAMILY_NAME[family]}: no address family in common")
    public = theirs[0]
    named = format_hostport(*public)
    if family_of(public[0]) != family:  # its locals are dialled behind our public address only
        return (f"the peer's public candidate {named} is {FAMILY_NAME[family_of(public[0])]} "
                f"and our {port} is {FAMILY_NAME[family]}")
    if _on_link(public[0]):
        if _unmapped(public[0]).version == 6:
            return (f"the peer's public candidate {named} is IPv6 link-local: dialling it "
                    f"needs a zone (an interface of ours), which our {port} does not carry")
        return (f"the peer's public candidate {named} is link-local, on its server's link, "
                "and ours is not: this node's server is not on a link with it")
    return (f"the peer's candidates ({', '.join(format_hostport(*c) for c in theirs)}) reach it "
            "from its own host only, and ours are not on loopback")


def undialable(our_public: str, theirs: tuple[Address, ...], family: int,
               port: str) -> str | None:
    """Why `targets` leaves nothing of `theirs` to dial from our `port` (`nothing_to_dial`),
    or None: a callee says so in its reject instead of answering an offer it can't use."""
    return None if targets(our_public, theirs, family) else nothing_to_dial(theirs, family,
                                                                           port)


async def resolve(server: Address) -> Address:
    """`server` with an IP literal for its host: a server given by name may have an IPv6
    address only, and our port must be of the family the server is reached over."""
    try:
        ipaddress.ip_address(server[0])
        return server
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(server[0], server[1],
                                                         type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{server[0]} has no address")
    return str(infos[0][4][0]), int(infos[0][4][1])


async def no_common_family(stun: Address | None, theirs: tuple[Address, ...],
                           port: str) -> str | None:
    """Why our `port` ("UDP port", "TCP port"), of the family of our server's `stun`,
    could reach none of an offer's candidates, or None (also when there is no STUN or it
    can't be resolved: opening the port says so)."""
    if stun is None:
        return None
    try:
        ours = family_of((await resolve(stun))[0])
    except OSError:
        return None
    if any(family_of(c[0]) == ours for c in theirs):
        return None
    return (f"the offer has {family_names(theirs)} candidates only and this node's {port} "
            f"would be {FAMILY_NAME[ours]}, as its server's STUN is")
