"""A simulated WebRTC data-channel transport: the real endpoint with simulated channels.

    async with SimWebRtcEndpoint(rendezvous_client) as rtc:   # as overlay.transports.webrtc
        # the node's push loop:  if isinstance(push, PipeMessage): rtc.feed(push)
        stream = await rtc.dial("bob@example.net", bob_device)   # -> Stream, path "webrtc"
        incoming = await rtc.accept()

What is real: the signalling, which is `WebRtcEndpoint` itself. Offer, Answer and Reject are
`overlay.transports.signalling` messages sent with the same `pipe()` call (through the real
rendezvous server when given a `RendezvousClient`), checked and bounded the same way. What
is modelled, by `SimChannels` (the endpoint's `ChannelFactory` here): ICE, DTLS and SCTP
are not run (aiortc's pure-Python stack would cost wall time the simulation can't afford).
Instead, once the answer is in, the channel opens if the NAT model says hole punching works
between the two hosts (`Network.webrtc_possible`, which agrees with the NAT lab), after the
measured setup cost (40-80 ms of processing for aiortc on loopback) plus three round trips
(an ICE check, the two flights of the DTLS handshake; the channel is pre-negotiated, so no
DCEP round trip). If it can't open, the dial fails with `WebRtcConnectError` after
`connect_timeout`, as the real endpoint does. The bytes then flow as a simulated stream
between the two hosts (their link rates and latency apply; NATs are past by then).

The SDPs are tiny stand-ins naming the simulated host ("a=x-sim-host:NAME").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from overlay.transports.signalling import PipeSender
from overlay.transports.stream import Stream, StreamClosed
from overlay.transports.tcp import StreamProtocol, TcpStream
from overlay.transports.webrtc import (
    Negotiation,
    UnusableDescription,
    WebRtcConnectError,
    WebRtcEndpoint,
    WebRtcSettings,
)
from sim.network.host import Host, current_host
from sim.network.net import Network

SETUP_COST = (0.040, 0.080)  # seconds of ICE/DTLS/SCTP processing, measured on loopback
SETUP_ROUND_TRIPS = 3
_SDP_HOST = "a=x-sim-host:"


class SimWebRtcStream(TcpStream):
    """A data channel in the simulation: a simulated stream that says it is WebRTC."""

    path = "webrtc"


def _sdp(host: Host) -> str:
    return f"v=0\r\no=- 0 0 IN IP4 {host.address}\r\ns=peerpost-sim\r\n{_SDP_HOST}{host.name}\r\n"


def _host_of(net: Network, sdp: str) -> Host | None:
    for line in sdp.splitlines():
        if line.startswith(_SDP_HOST):
            return net.by_name.get(line[len(_SDP_HOST):])
    return None


class SimWebRtcEndpoint(WebRtcEndpoint):
    """`WebRtcEndpoint` with `SimChannels`, for one device on the simulated host that
    starts it; `SimWebRtcEndpoint(pipe, settings)` fits `NodeOptions.webrtc_endpoint`."""

    def __init__(self, pipe: PipeSender, settings: WebRtcSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None,
                 rng: random.Random | None = None,
                 setup_cost: tuple[float, float] = SETUP_COST) -> None:
        settings = settings or WebRtcSettings()
        rng = rng or random.Random(0)
        super().__init__(pipe, settings, accept_from=accept_from, rng=rng,
                         channels=SimChannels(settings, rng, setup_cost))


class SimChannels:
    """The `ChannelFactory` of the simulation: channels that open when the NAT model lets
    them, after the measured setup time, as simulated streams between the two hosts."""

    def __init__(self, settings: WebRtcSettings, rng: random.Random,
                 setup_cost: tuple[float, float] = SETUP_COST) -> None:
        self.settings = settings
        self.setup_cost = setup_cost
        self._rng = rng
        self._opening: dict[bytes, asyncio.Future[SimWebRtcStream]] = {}
        self._host: Host | None = None
        self._net: Network | None = None

    async def start(self) -> None:
        """Serve as the host the caller runs as."""
        self._host = current_host()
        self._net = self._host.network
        self._net.webrtc_endpoints[self._host] = self

    async def aclose(self) -> None:
        """Dials to this host find nobody from now on."""
        if self._net is not None and self._host is not None:
            self._net.webrtc_endpoints.pop(self._host, None)

    async def offer(self, session: bytes, address: str, device: bytes) -> Negotiation:
        host, net = self._where()
        return _SimDial(self, host, net, session, address)

    async def answer(self, session: bytes, offer: str, address: str,
                     device: bytes) -> Negotiation:
        """Answer with our simulated host; the dialer hands the stream over once it opens."""
        host, net = self._where()
        if _host_of(net, offer) is None:
            raise UnusableDescription("no simulated host in the SDP")
        opened: asyncio.Future[SimWebRtcStream] = asyncio.get_running_loop().create_future()
        self._opening[session] = opened
        return _SimAnswer(self, host, session, opened)

    async def _connect(self, host: Host, peer: Host, session: bytes,
                       address: str) -> SimWebRtcStream:
        """ICE, DTLS and SCTP as the model has them: open after the setup time, or never
        (the endpoint's `connect_timeout` ends the wait)."""
        net = self._where()[1]
        rtt = net.latency(host, peer) + net.latency(peer, host)
        setup = self._rng.uniform(*self.setup_cost) + SETUP_ROUND_TRIPS * rtt
        if not net.webrtc_possible(host, peer) or setup >= self.settings.connect_timeout:
            await asyncio.get_running_loop().create_future()  # never opens
        await asyncio.sleep(setup)
        remote = net.webrtc_endpoints.get(peer)
        opening = remote._opening.get(session) if isinstance(remote, SimChannels) else None
        if opening is None or opening.done() or not (host.online and peer.online):
            raise WebRtcConnectError(f"{address} went away while the channel was opening")
        mine, theirs = StreamProtocol(), StreamProtocol()
        net.pair_streams(host, peer, mine, theirs)
        opening.set_result(SimWebRtcStream(theirs))
        return SimWebRtcStream(mine)

    def _where(self) -> tuple[Host, Network]:
        if self._host is None or self._net is None:
            raise StreamClosed("endpoint not started")
        return self._host, self._net


class _SimDial:
    """The dialer's side: the offer names our host, the answer the peer's."""

    def __init__(self, channels: SimChannels, host: Host, net: Network, session: bytes,
                 address: str) -> None:
        self._channels = channels
        self._host = host
        self._net = net
        self._session = session
        self._address = address
        self._peer: Host | None = None

    @property
    def sdp(self) -> str:
        return _sdp(self._host)

    async def complete(self, answer: str) -> None:
        self._peer = _host_of(self._net, answer)
        if self._peer is None:
            raise UnusableDescription("no simulated host in the SDP")

    async def opened(self) -> Stream:
        if self._peer is None:
            raise WebRtcConnectError("no answer to open a channel with")
        return await self._channels._connect(self._host, self._peer, self._session,
                                             self._address)

    def describe(self) -> str:
        if self._peer is None:
            return ""
        return (f"ICE found no working candidate pair: {_nat_text(self._host)} to "
                f"{_nat_text(self._peer)}")

    async def aclose(self) -> None:
        """Nothing held: the stream exists only once `opened` returns it."""


class _SimAnswer:
    """The answerer's side: waits for the dialer to open the channel to it."""

    def __init__(self, channels: SimChannels, host: Host, session: bytes,
                 opened: asyncio.Future[SimWebRtcStream]) -> None:
        self._channels = channels
        self._host = host
        self._session = session
        self._opened = opened
        self._returned = False

    @property
    def sdp(self) -> str:
        return _sdp(self._host)

    async def complete(self, answer: str) -> None:
        raise WebRtcConnectError("the answering side takes no answer")

    async def opened(self) -> Stream:
        stream = await self._opened
        self._returned = True
        return stream

    def describe(self) -> str:
        return ""

    async def aclose(self) -> None:
        self._channels._opening.pop(self._session, None)
        if self._returned or not self._opened.done() or self._opened.cancelled():
            return
        await self._opened.result().aclose()


def _nat_text(host: Host) -> str:
    if host.nat is None:
        return f"{host.name} (public)"
    b = host.nat.behaviour
    return (f"{host.name} behind {b.mapping.name.lower()} mapping, "
            f"{b.filtering.name.lower()} filtering")
