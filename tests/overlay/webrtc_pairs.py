"""Two WebRTC endpoints joined by an in-memory PIPE, for the WebRTC tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from crypto.identity import DeviceIdentity
from overlay.transports.signalling import MemoryPipe, PipeSender
from overlay.transports.stream import Stream
from overlay.transports.webrtc import ChannelFactory, WebRtcEndpoint, WebRtcSettings
from rendezvous.messages import PipeMessage

ALICE = "alice@example.net"
BOB = "bob@example.net"
ALICE_DEV = DeviceIdentity.from_seed(b"\x01" * 32).peer_id
BOB_DEV = DeviceIdentity.from_seed(b"\x02" * 32).peer_id


@dataclass
class Pair:
    hub: MemoryPipe
    alice: WebRtcEndpoint
    bob: WebRtcEndpoint

    async def make_pair(self) -> tuple[Stream, Stream]:
        """alice dials bob; returns (alice's stream, bob's accepted stream)."""
        a = await self.alice.dial(BOB, BOB_DEV)
        return a, await self.bob.accept()


Wrap = Callable[[PipeSender], PipeSender]


@asynccontextmanager
async def webrtc_pair(settings: WebRtcSettings | None = None, *,
                      alice_pipe: Wrap | None = None,
                      bob_pipe: Wrap | None = None,
                      bob_accept_from: Callable[[str, bytes], bool] | None = None,
                      channels: Callable[[WebRtcSettings], ChannelFactory] | None = None,
                      ) -> AsyncIterator[Pair]:
    """Endpoints for alice and bob (no STUN: host candidates only); `*_pipe` may tamper;
    `channels` replaces aiortc's channel factory on both sides."""
    hub = MemoryPipe()
    s = settings or WebRtcSettings()
    pa, pb = hub.sender(ALICE, ALICE_DEV), hub.sender(BOB, BOB_DEV)
    async with WebRtcEndpoint(alice_pipe(pa) if alice_pipe else pa, s,
                              channels=channels(s) if channels else None) as alice, \
            WebRtcEndpoint(bob_pipe(pb) if bob_pipe else pb, s, accept_from=bob_accept_from,
                           channels=channels(s) if channels else None) as bob:
        hub.attach(ALICE, ALICE_DEV, alice.feed)
        hub.attach(BOB, BOB_DEV, bob.feed)
        yield Pair(hub, alice, bob)


def pipe_message(payload: bytes, sender: str = BOB, device: bytes = BOB_DEV) -> PipeMessage:
    return PipeMessage(sender, device, payload)
