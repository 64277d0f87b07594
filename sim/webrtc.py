"""A simulated WebRTC data-channel transport with `WebRtcEndpoint`'s dial/accept shape.

    async with SimWebRtcEndpoint(rendezvous_client) as rtc:   # as overlay.transports.webrtc
        # the node's push loop:  if isinstance(push, PipeMessage): rtc.feed(push)
        stream = await rtc.dial("bob@example.net", bob_device)   # -> Stream, path "webrtc"
        incoming = await rtc.accept()

What is real: the signalling. Offer, Answer and Reject are `overlay.transports.signalling`
messages sent with the same `pipe()` call (through the real rendezvous server when given a
`RendezvousClient`), checked and bounded the same way. What is modelled: ICE, DTLS and SCTP
are not run (aiortc's pure-Python stack would cost wall time the simulation can't afford).
Instead, once the answer is in, the channel opens if the NAT model says hole punching works
between the two hosts (`Network.webrtc_possible`, which agrees with the NAT lab), after the
measured setup cost (40-80 ms of processing on loopback, NOTES.md) plus three round trips
(an ICE check, the two flights of the DTLS handshake; the channel is pre-negotiated, so no
DCEP round trip). If it can't open, the dial fails with `WebRtcConnectError` after
`connect_timeout`, as the real endpoint does. The bytes then flow as a simulated stream
between the two hosts (their link rates and latency apply; NATs are past by then).

The SDPs are tiny stand-ins naming the simulated host ("a=x-sim-host:NAME").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from overlay.transports.signalling import Answer, Offer, PipeSender, Reject, encode_signal
from overlay.transports.stream import StreamClosed
from overlay.transports.tcp import StreamProtocol, TcpStream
from overlay.transports.webrtc import WebRtcConnectError, WebRtcEndpoint, WebRtcSettings, _Dial
from rendezvous.messages import PipeMessage
from sim.network.host import Host, current_host
from sim.network.net import Network

log = logging.getLogger(__name__)

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
    """Dials and accepts simulated WebRTC streams for one device on one simulated host.

    The signalling half (feed, offers, rejects, the accept backlog, closing) is
    `WebRtcEndpoint`'s own; only answering and dialing are replaced.
    """

    def __init__(self, pipe: PipeSender, settings: WebRtcSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None,
                 rng: random.Random | None = None,
                 setup_cost: tuple[float, float] = SETUP_COST) -> None:
        super().__init__(pipe, settings, accept_from=accept_from)
        self.setup_cost = setup_cost
        self._rng = rng or random.Random(0)
        self._opening: dict[bytes, asyncio.Future[SimWebRtcStream]] = {}
        self._host: Host | None = None
        self._net: Network | None = None

    async def start(self) -> None:
        """Ready to dial and accept, as the host the caller runs as."""
        self._host = current_host()
        self._net = self._host.network
        self._net.webrtc_endpoints[self._host] = self
        await super().start()

    async def aclose(self) -> None:
        """Stop answering, cancel negotiations, close streams nobody accepted yet."""
        if self._net is not None and self._host is not None:
            self._net.webrtc_endpoints.pop(self._host, None)
        await super().aclose()

    # --- accepting -------------------------------------------------------------------
    async def _answer(self, msg: PipeMessage, offer: Offer) -> None:
        """Answer with our simulated host; hand the stream over once the dialer opens it."""
        host, net = self._where()
        opened: asyncio.Future[SimWebRtcStream] = asyncio.get_running_loop().create_future()
        self._opening[offer.session] = opened
        handed = False
        try:
            if _host_of(net, offer.sdp) is None:
                self.stats.bad_signals += 1
                await self._send(msg.sender, msg.sender_device,
                                 Reject(offer.session, "offer SDP not understood"))
                raise WebRtcConnectError("unusable offer: no simulated host in the SDP")
            await self._pipe.pipe(msg.sender, encode_signal(Answer(offer.session, _sdp(host))),
                                  device=msg.sender_device)
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    stream = await opened
            except TimeoutError:
                raise WebRtcConnectError(
                    f"no connection within {self.settings.connect_timeout} s") from None
            if self._backlog is None or self._backlog.full():
                await stream.aclose()
                raise WebRtcConnectError("accept backlog full")
            self._backlog.put_nowait(stream)  # type: ignore[arg-type]  # a Stream too
            self.stats.accepted += 1
            handed = True
        except Exception as exc:  # one failed answer must not end the node
            self.stats.accept_failures += 1
            log.info("WebRTC from %s failed: %s", msg.sender, exc)
        finally:
            self._incoming -= 1
            self._opening.pop(offer.session, None)
            if not handed and opened.done() and not opened.cancelled():
                await opened.result().aclose()

    # --- dialing ---------------------------------------------------------------------
    async def dial(self, address: str, device: bytes,  # type: ignore[override]
                   *, hold: float = 0) -> SimWebRtcStream:
        """A stream to `device` of `address`; WebRtcConnectError says why not."""
        if self._closed or self._backlog is None:
            raise StreamClosed("WebRTC endpoint is not running")
        s = self.settings
        if len(self._dials) >= s.max_dials:
            raise WebRtcConnectError("too many WebRTC dials in progress")
        host, net = self._where()
        self.stats.dials += 1
        session = self._rng.randbytes(16)
        dial = _Dial(address, device, asyncio.get_running_loop().create_future())
        self._dials[session] = dial
        ok = False
        try:
            try:
                await self._pipe.pipe(address, encode_signal(Offer(session, _sdp(host))),
                                      device=device, hold=hold)
            except Exception as exc:
                raise WebRtcConnectError(f"could not send the offer to {address}: {exc}"
                                         ) from None
            try:
                async with asyncio.timeout(s.answer_timeout):
                    answer = await dial.reply
            except TimeoutError:
                raise WebRtcConnectError(
                    f"{address} did not answer within {s.answer_timeout} s") from None
            if isinstance(answer, Reject):
                raise WebRtcConnectError(f"{address} declined: {answer.reason}")
            peer = _host_of(net, answer.sdp)
            if peer is None:
                self.stats.bad_signals += 1
                raise WebRtcConnectError(f"unusable answer from {address}")
            stream = await self._connect(host, peer, session, address)
            ok = True
            return stream
        except asyncio.CancelledError:
            if self._closed:
                raise StreamClosed("WebRTC endpoint closed during the dial") from None
            raise
        finally:
            self._dials.pop(session, None)
            if not ok:
                self.stats.dial_failures += 1

    async def _connect(self, host: Host, peer: Host, session: bytes,
                       address: str) -> SimWebRtcStream:
        """ICE, DTLS and SCTP as the model has them: open after the setup time, or never."""
        net = self._where()[1]
        s = self.settings
        rtt = net.latency(host, peer) + net.latency(peer, host)
        setup = self._rng.uniform(*self.setup_cost) + SETUP_ROUND_TRIPS * rtt
        possible = net.webrtc_possible(host, peer)
        if not possible or setup >= s.connect_timeout:
            await asyncio.sleep(s.connect_timeout)
            raise WebRtcConnectError(
                f"no WebRTC connection to {address} within {s.connect_timeout} s (ICE found "
                f"no working candidate pair: {_nat_text(host)} to {_nat_text(peer)})")
        await asyncio.sleep(setup)
        remote = net.webrtc_endpoints.get(peer)
        opening = remote._opening.get(session) if remote is not None else None
        if opening is None or opening.done() or not (host.online and peer.online):
            raise WebRtcConnectError(f"{address} went away while the channel was opening")
        mine = StreamProtocol()
        theirs = StreamProtocol()
        net.pair_streams(host, peer, mine, theirs)
        opening.set_result(SimWebRtcStream(theirs))
        return SimWebRtcStream(mine)

    def _where(self) -> tuple[Host, Network]:
        if self._host is None or self._net is None:
            raise StreamClosed("endpoint not started")
        return self._host, self._net


def _nat_text(host: Host) -> str:
    if host.nat is None:
        return f"{host.name} (public)"
    b = host.nat.behaviour
    return (f"{host.name} behind {b.mapping.name.lower()} mapping, "
            f"{b.filtering.name.lower()} filtering")
