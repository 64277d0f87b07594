"""A home uplink too slow for a chunk per send timeout still delivers at the link's pace.

The simulator runs the real node code: 3 MB in 1 MiB chunks from a 400 kbit/s uplink to
four recipients at once. Four upload slots of 12.5 KB/s take 84 s per chunk, longer than
the sender's 60 s send timeout; a send that keeps moving must not be cut, or the uplink
carries the same chunk again (one timeout per chunk: 364-604 s for this delivery)."""

from __future__ import annotations

from crypto.content import MAX_SEAL_OVERHEAD
from sim.fidelity import FidelitySetup, simulate
from sim.network.net import WIRE_HEADERS


def test_a_slow_uplink_delivers_every_chunk_once_at_the_links_pace() -> None:
    setup = FidelitySetup(recipients=4, size=3_000_000, up=50_000.0, down=2_500_000.0)
    got = simulate(setup, co_recipients=False)
    mss = WIRE_HEADERS["mss"]
    on_the_wire = setup.recipients * setup.size * (mss + WIRE_HEADERS["tcp_header"]) / mss
    assert setup.up is not None
    link_seconds = on_the_wire / setup.up  # 251 s
    assert max(r["seconds"] for r in got) < 1.05 * link_seconds
    # Each recipient took each of the 3 sealed chunks (a nonce and a tag more) once.
    sealed = setup.size + 3 * MAX_SEAL_OVERHEAD
    assert [round(r["from_sender_mb"] * 1e6) for r in got] == [sealed] * 4
