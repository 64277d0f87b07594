"""Two PIPE-signalled endpoints (TCP punch, QUIC) wired back to back through a MemoryPipe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from overlay.transports.signalling import MemoryPipe

ALICE, BOB = ("alice@x.net", b"a" * 20), ("bob@x.net", b"b" * 20)


@asynccontextmanager
async def wired(hub: MemoryPipe, alice: Any, bob: Any) -> AsyncIterator[tuple[Any, Any]]:
    """`alice` and `bob` (made with `hub.sender(*ALICE)` and `hub.sender(*BOB)`) fed by
    `hub`, started, and closed after use."""
    hub.attach(*ALICE, alice.feed)
    hub.attach(*BOB, bob.feed)
    await alice.start()
    await bob.start()
    try:
        yield alice, bob
    finally:
        await alice.aclose()
        await bob.aclose()
