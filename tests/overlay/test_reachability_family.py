"""`probe` asks the server's STUN from the server's address family. A node listening on any
address ([::] or 0.0.0.0) asked from 0.0.0.0, so with a server on IPv6 the query failed
('socket family mismatch'), and the node knew neither whether a NAT stood in front nor the
address the server saw (`info` said it could not tell; a move went unnoticed)."""

from __future__ import annotations

import pytest

from overlay.transports.reachability import probe
from rendezvous.stun import serve_stun


@pytest.mark.parametrize("listen_host", ["::", "0.0.0.0", ""])
async def test_a_node_on_any_address_asks_an_ipv6_server_over_ipv6(listen_host: str) -> None:
    transport, (host, port) = await serve_stun("::1", 0)
    try:
        reach = await probe(host, port, port, listen_host)
    finally:
        transport.close()
    assert reach.local_ip == "::1"
    assert reach.mapped is not None and reach.mapped[0] == "::1"
    assert reach.nat is False


async def test_and_an_ipv4_server_over_ipv4() -> None:
    transport, (host, port) = await serve_stun("127.0.0.1", 0)
    try:
        reach = await probe(host, port, port, "::")
    finally:
        transport.close()
    assert reach.mapped is not None and reach.mapped[0] == "127.0.0.1"
    assert reach.nat is False
