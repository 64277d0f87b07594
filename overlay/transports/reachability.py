"""Am I reachable? The node's own addresses, and whether a NAT stands in front of it.

The outbound interface address is what the kernel picks to reach the rendezvous server
(a UDP socket "connected" to it sends nothing). The STUN server beside the rendezvous
server says which address it sees; if that differs, a NAT is in the way: the node then
says so in what it advertises, so peers start WebRTC at once instead of waiting for
direct TCP to time out, and it joins the DHT as a client (devices behind
NAT query and publish through reachable nodes, and don't serve).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from crypto.address import format_hostport
from rendezvous.stun import query_mapping

log = logging.getLogger("peerpost.reachability")

STUN_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Reachability:
    local_ip: str | None  # the interface address that routes to the server
    mapped: tuple[str, int] | None  # what the server's STUN sees (None: no STUN)
    nat: bool


async def route_ip(host: str, port: int) -> str | None:
    """The local address the kernel would use towards host:port (no packet is sent)."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                           remote_addr=(host, port))
    except OSError:
        return None
    try:
        sock = transport.get_extra_info("sockname")
        return str(sock[0]) if sock else None
    finally:
        transport.close()


async def probe(server_host: str, server_port: int, stun_port: int | None,
                listen_host: str) -> Reachability:
    """Find the outbound address and, with STUN, whether this node is behind NAT."""
    local = await route_ip(server_host, server_port)
    if stun_port is None:
        return Reachability(local, None, False)
    # A node listening on any address asks from any address of the server's family: from
    # 0.0.0.0 an IPv6 server's STUN was never asked ('socket family mismatch'), so a node
    # on [::] with a server on IPv6 knew neither its NAT nor the address the server sees.
    wildcard = listen_host in ("", "0.0.0.0", "::")
    bind = listen_host if not wildcard else "::" if ":" in (local or server_host) else "0.0.0.0"
    try:
        (mapped,) = await query_mapping([(server_host, stun_port)], local_addr=(bind, 0),
                                        timeout=STUN_TIMEOUT)
    except (TimeoutError, OSError, ValueError) as exc:
        log.info("STUN at %s did not answer (%s); assuming no NAT",
                 format_hostport(server_host, stun_port), exc)
        return Reachability(local, None, False)
    ours = local if wildcard else listen_host
    nat = mapped[0] != ours
    log.info("outbound address %s, the server sees %s: %s", ours, format_hostport(*mapped),
             "behind NAT" if nat else "directly reachable")
    return Reachability(local, (mapped[0], mapped[1]), nat)
