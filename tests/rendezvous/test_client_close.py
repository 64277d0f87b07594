"""`RendezvousClient.aclose` cancelled while its reconnect task winds down: the caller's
cancel is raised once the client is closed (an `asyncio.timeout` around it then fires);
it was swallowed with the reconnect task's own cancel, and the caller went on as if the
close had simply returned."""

from __future__ import annotations

import asyncio

import pytest

from crypto.identity import DeviceIdentity
from rendezvous.client import RendezvousClient


async def test_a_cancel_of_the_caller_during_aclose_is_raised() -> None:
    client = RendezvousClient("127.0.0.1", 9, DeviceIdentity.from_seed(b"\x01" * 32),
                              "alice@a.test", reconnect=True)
    winding_down = asyncio.Event()

    async def supervise() -> None:  # a reconnect loop whose cleanup takes a moment
        try:
            await asyncio.sleep(3600)
        finally:
            winding_down.set()
            await asyncio.sleep(0.2)

    client._supervisor = asyncio.get_running_loop().create_task(supervise())
    await asyncio.sleep(0)
    closing = asyncio.create_task(client.aclose())
    await winding_down.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert client._supervisor.done()  # its cleanup was not cut short
    assert client._closed
