"""Where a content can be fetched from, and how to reach each place.

For now a holder is reached by direct TCP to the addresses it advertises. The sender's
are taken fresh from FINGER (its port may have changed since the message was sent) and
from the hints in the handle. DHT providers (co-recipients) and the WebRTC and relay
rungs of the connection ladder plug in here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from crypto.location import LocationMessage
from overlay.fetch import Source
from overlay.home import parse_hostport
from overlay.stream import Stream, StreamBroken
from overlay.tcp import connect_tcp

log = logging.getLogger("peerpost.sources")

MAX_ADDRESSES_PER_HOLDER = 8
CONNECT_TIMEOUT = 5.0


def tcp_dialer(addresses: Sequence[str]) -> Callable[[], Awaitable[Stream]]:
    """Try each advertised HOST:PORT in turn; the first that answers wins."""
    addrs = list(dict.fromkeys(addresses))[:MAX_ADDRESSES_PER_HOLDER]

    async def dial() -> Stream:
        errors: list[str] = []
        for a in addrs:
            try:
                host, port = parse_hostport(a)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            try:
                return await connect_tcp(host, port, timeout=CONNECT_TIMEOUT)
            except StreamBroken as exc:
                errors.append(str(exc))
        raise StreamBroken("; ".join(errors) or "no address to try")

    return dial


def holder_source(peer_id: bytes, addresses: Sequence[str]) -> Source:
    """A Source for one holder, checked in the handshake against `peer_id`."""
    return Source(label=peer_id.hex()[:16], connect=tcp_dialer(addresses), peer_id=peer_id)


def sender_addresses(msg: LocationMessage, fingered: Sequence[str]) -> list[str]:
    """The sender's addresses: what FINGER says now first, then the handle's hints."""
    hints = msg.handle.sender.addresses if msg.handle.sender else ()
    return [*fingered, *hints]
