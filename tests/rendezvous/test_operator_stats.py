"""`peerpost-rendezvous stats` next to a real `serve`: besides sessions and the queue it
shows what the README's troubleshooting promises, the mail waiting for other domains and
the refusals (bad input here), so an operator does not need the metrics endpoint to learn
why mail to another domain does not leave."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from pathlib import Path

import pytest

from .conftest import ident, mid
from .test_operator import ok_json, rc, serve

pytestmark = pytest.mark.slow
ALICE, BOB = ident(81), ident(82)


async def test_stats_shows_the_outbound_queue_and_refusals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:  # a name server that
        mute.bind(("127.0.0.1", 0))                                 # never answers
        resolver = f"127.0.0.1:{mute.getsockname()[1]}"
        async with serve(data, "--open-registration", "--resolver", resolver,
                         "--stun-port", "off", "--dht-port", "off", expect=1) as srv:
            async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
                await a.send(mid(), [("bob@b.test", BOB.peer_id, b"sealed for bob")])
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx)
            writer.write(b"\xff")  # a frame cut short: bad input
            writer.close()
            await srv.wait_log("event=conn.bad_input")
            # stats.json is rewritten after each signal's handling: the second reread's
            # log line comes after the write that followed the first.
            for _ in range(2):
                mark = len(srv.log)
                srv.proc.send_signal(signal.SIGUSR1)
                await srv.wait_log("event=server.accounts_reread", after=mark)
            stats = await ok_json("stats", "--data", str(data))
    assert isinstance(stats, dict)
    assert (stats["outbound_queued"], stats["queued_envelopes"]) == (1, 0)
    assert stats["bad_input"] == 1 and stats["forwarded"] == 0
    assert {"sessions_refused", "links_refused_blocked", "links_in", "links_out", "bounced",
            "link_failures"} <= set(stats)
