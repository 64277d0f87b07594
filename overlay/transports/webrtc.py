"""WebRTC data-channel transport: dial and accept data-channel `Stream`s, signalling over PIPE.

    async with WebRtcEndpoint(rendezvous_client, WebRtcSettings(stun=[(host, port)])) as rtc:
        # the node's push loop:  if isinstance(push, PipeMessage): rtc.feed(push)
        stream = await rtc.dial("bob@example.net", bob_device)   # -> Stream, path "webrtc"
        incoming = await rtc.accept()                             # -> Stream

Two halves. `WebRtcEndpoint` is the signalling: it PIPEs an offer to one device, waits for
that device's answer, answers offers that come in, and keeps the bounds, the accept backlog
and the counters. A `ChannelFactory` makes the channels the SDPs describe: `AiortcChannels`
here runs aiortc; the simulator has its own (sim.webrtc) and shares the signalling.

With aiortc the dialer makes an offer with every candidate gathered (host, and
server-reflexive from our own server's STUN: never a public default), and once the answer
is in the endpoint gives ICE, DTLS and SCTP `connect_timeout` seconds (aiortc alone would
take about 64 s to report failure). Both sides create the same pre-negotiated channel (id
0), which saves the DCEP open round trip. Every failure is a `WebRtcConnectError` (a
`StreamBroken`) whose text says which step failed, so the caller can fall back to the relay.

Incoming offers are bounded (`max_incoming` negotiating or waiting in the accept backlog);
beyond that, or when `accept_from` says no, the dialer gets a `Reject`, as it does at once
for an offer that does not decode (endpoint.py). Answers are taken only from the device
that was dialed. Bad payloads are dropped and counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    sdp,
)

from overlay.transports.endpoint import SignalledEndpoint
from overlay.transports.reachability import route_ip
from overlay.transports.signalling import (
    SIGNALS,
    Answer,
    Offer,
    PipeSender,
    Reject,
    Signal,
    SignalError,
    Unsupported,
    encode_signal,
)
from overlay.transports.stream import Stream, StreamBroken, StreamClosed
from overlay.transports.webrtc_stream import ChannelTuning, WebRtcStream
from rendezvous.messages import PipeMessage

log = logging.getLogger(__name__)

_CHANNEL_ID = 0
# ICE candidates of a peer's offer or answer that are considered: aiortc sends one host
# candidate per local address and one server-reflexive per IPv4 one, a handful on a home
# device; a hostile SDP may carry hundreds (an offer inflates to MAX_SDP), and each costs
# a route check here and connectivity checks in aioice, which caps neither. With our own
# few candidates, 32 keeps the pairs near the 100 RFC 8445 6.1.2.5 allows by default.
MAX_ICE_CANDIDATES = 32


class WebRtcConnectError(StreamBroken):
    """A WebRTC attempt failed; the text says at which step and why."""


class NoRoute(WebRtcConnectError):
    """None of the peer's candidates can be reached from this host: ICE cannot succeed
    (the endpoint declines the offer at once, with this text)."""


class UnusableDescription(WebRtcConnectError):
    """The peer's offer or answer SDP is not one a channel can be made from (the endpoint
    counts it as a bad signal and, for an offer, tells the dialer)."""


@dataclass(frozen=True, slots=True)
class WebRtcSettings:
    """Where STUN is, how long each step may take, how much may be pending."""

    stun: Sequence[tuple[str, int]] = ()
    answer_timeout: float = 30.0   # aiortc's ICE gives up ~60 s after the offer anyway
    connect_timeout: float = 10.0  # ICE + DTLS + SCTP after the answer
    max_dials: int = 32
    max_incoming: int = 16
    tuning: ChannelTuning = field(default_factory=ChannelTuning)

    def rtc_configuration(self) -> RTCConfiguration:
        """Always explicit: aiortc's default would query a public STUN host. A STUN server
        at an IPv6 literal is left out: aiortc 1.16 can't name one (its URI pattern takes
        no brackets, and "stun:[::1]:P" raised 'malformed uri' for every offer and answer,
        so a node whose server is on IPv6 never got WebRTC). ICE then offers its host
        candidates alone, which is what an IPv6 host without a NAT is reached at."""
        urls = [f"stun:{h}:{p}" for h, p in self.stun if ":" not in h]
        return RTCConfiguration(iceServers=[RTCIceServer(urls=urls)] if urls else [])


def cap_candidates(description: str, limit: int = MAX_ICE_CANDIDATES) -> tuple[str, int]:
    """`description` with at most `limit` ICE candidates ("a=candidate:" lines), and how
    many were left out. When there are more, the server-reflexive and relayed ones are kept
    first (aioice lists them after every host candidate, and they are what crosses a NAT),
    then host ones, each in the order given."""
    lines = description.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.startswith("a=candidate:")]
    if len(found) <= limit:
        return description, 0

    def is_host(line: str) -> bool:
        words = line.split()
        return "typ" in words[:-1] and words[words.index("typ") + 1] == "host"

    kept = set(([i for i in found if not is_host(lines[i])]
                + [i for i in found if is_host(lines[i])])[:limit])
    dropped = set(found) - kept
    return "".join(line for i, line in enumerate(lines) if i not in dropped), len(dropped)


def _check_offer(text: str) -> None:
    """Raise ValueError unless `text` offers what we answer: one SCTP data-channel section
    with ICE credentials and a DTLS fingerprint. aiortc itself accepts an SDP with no
    media at all and answers it with nothing to connect."""
    parsed = sdp.SessionDescription.parse(text)
    apps = [m for m in parsed.media if m.kind == "application"]
    if len(apps) != 1 or apps[0].sctp_port is None:
        raise ValueError("no data-channel section")
    media = apps[0]
    if (media.ice is None or not media.ice.usernameFragment
            or media.dtls is None or not media.dtls.fingerprints):
        raise ValueError("no ICE credentials or DTLS fingerprint")


async def unroutable(description: str) -> str | None:
    """Why ICE can't connect to the peer of `description` from this host: the kernel has a
    route to none of its candidates' addresses (a UDP socket connected to each, which sends
    nothing, as `route_ip` does). None when one has a route, a candidate is not an IP
    literal (an mDNS name), or there is no candidate to judge by.

    An IPv4-only node and an IPv6-only one meet so: the IPv4-only host's LAN may still
    have an IPv6 ULA, which aioice offers, so both sides hold IPv6 candidates and ICE
    checked pairs that could never work until `connect_timeout` (10 s) was out."""
    try:
        parsed = sdp.SessionDescription.parse(description)
    except (ValueError, KeyError, IndexError):
        return None  # `_check_offer` says what is wrong with it
    hosts = sorted({c.ip for m in parsed.media for c in m.ice_candidates})
    if not hosts:
        return None
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
        if await route_ip(host, 9) is not None:
            return None
    return (f"no route from this host to any of the offer's candidates ({', '.join(hosts)}): "
            "ICE cannot connect")


def _describe(pc: RTCPeerConnection) -> str:
    sctp = pc.sctp
    kinds: list[str] = []
    if sctp is not None:
        gatherer = sctp.transport.transport.iceGatherer
        kinds = sorted({c.type for c in gatherer.getLocalCandidates()})
    return (f"ICE {pc.iceConnectionState}, connection {pc.connectionState}, "
            f"local candidates: {', '.join(kinds) or 'none'}")


# --- the channel factory: what makes the channels the signalling negotiates ------------
class Negotiation(Protocol):
    """One side of one data channel being set up, from our SDP until the channel opens."""

    @property
    def sdp(self) -> str:
        """Our description for the peer: the offer (dialer) or the answer (answerer)."""
        ...

    async def complete(self, answer: str) -> None:
        """(Dialer only) take the peer's answer; `UnusableDescription` if it isn't one."""
        ...

    async def opened(self) -> Stream:
        """Wait for the channel to open and return its stream (the endpoint bounds the
        wait by `connect_timeout`); `StreamBroken` if it dies first."""
        ...

    def describe(self) -> str:
        """How far the connection got, for the message when it times out ("": nothing)."""
        ...

    async def aclose(self) -> None:
        """Release what the negotiation holds, except a stream `opened` returned."""
        ...


class ChannelFactory(Protocol):
    """Makes the data channels a `WebRtcEndpoint` signals for (aiortc or the simulator)."""

    async def start(self) -> None:
        """Ready to make channels (called by the endpoint's `start`)."""
        ...

    async def aclose(self) -> None:
        """No more channels (called first by the endpoint's `aclose`)."""
        ...

    async def offer(self, session: bytes, address: str, device: bytes) -> Negotiation:
        """Begin a channel to `device` of `address`: the negotiation's `sdp` is the offer."""
        ...

    async def answer(self, session: bytes, offer: str, address: str,
                     device: bytes) -> Negotiation:
        """Begin the channel `offer` asks for: the negotiation's `sdp` is the answer.
        `UnusableDescription` if the offer isn't one we answer, `NoRoute` if ICE can't
        reach any of its candidates from here."""
        ...


class _AiortcNegotiation:
    """A peer connection with the pre-negotiated channel and the stream over it."""

    def __init__(self, pc: RTCPeerConnection, stream: WebRtcStream) -> None:
        self._pc = pc
        self._stream = stream
        self._returned = False

    @property
    def sdp(self) -> str:
        return str(self._pc.localDescription.sdp)

    async def complete(self, answer: str) -> None:
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        except (ValueError, KeyError, IndexError) as exc:
            raise UnusableDescription(str(exc)) from None

    async def opened(self) -> Stream:
        await self._stream.wait_open()
        self._returned = True
        return self._stream

    def describe(self) -> str:
        return _describe(self._pc)

    async def aclose(self) -> None:
        if not self._returned:
            await self._stream.aclose()  # closes the peer connection too


class AiortcChannels:
    """The `ChannelFactory` of real WebRTC: aiortc peer connections."""

    def __init__(self, settings: WebRtcSettings) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Nothing to set up: each channel has its own peer connection."""

    async def aclose(self) -> None:
        """Nothing to release: each negotiation closes its own peer connection."""

    async def offer(self, session: bytes, address: str, device: bytes) -> Negotiation:
        s = self.settings
        pc = RTCPeerConnection(s.rtc_configuration())
        try:
            channel = pc.createDataChannel("peerpost", negotiated=True, id=_CHANNEL_ID)
            stream = WebRtcStream(pc, channel, s.tuning, remote_address=address,
                                  remote_device=device)
            await pc.setLocalDescription(await pc.createOffer())
        except BaseException:
            await pc.close()
            raise
        return _AiortcNegotiation(pc, stream)

    async def answer(self, session: bytes, offer: str, address: str,
                     device: bytes) -> Negotiation:
        s = self.settings
        if (why := await unroutable(offer)) is not None:
            raise NoRoute(why)
        pc = RTCPeerConnection(s.rtc_configuration())
        stream: WebRtcStream | None = None
        try:
            try:
                _check_offer(offer)
                await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            except (ValueError, KeyError, IndexError) as exc:
                raise UnusableDescription(str(exc)) from None
            channel = pc.createDataChannel("peerpost", negotiated=True, id=_CHANNEL_ID)
            stream = WebRtcStream(pc, channel, s.tuning, remote_address=address,
                                  remote_device=device)
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            await (stream.aclose() if stream is not None else pc.close())
            raise
        return _AiortcNegotiation(pc, stream)


# --- the signalling ------------------------------------------------------------------
class WebRtcEndpoint(SignalledEndpoint[Offer, Answer | Reject]):
    """Dials and accepts WebRTC streams for one device (see the module docstring).

    `channels` makes the channels (default: aiortc's); `rng`, when given, draws the dial
    session ids (a simulation's repeatable run), else they come from `os.urandom`.
    """

    NAME = "WebRTC"
    OFFER_TAG = Offer.TAG
    SIGNALS = SIGNALS
    WHAT = "signal"
    SIGNAL_ERROR = SignalError
    TASKS = "webrtc"
    TOO_MANY_DIALS = "too many WebRTC dials in progress"

    def __init__(self, pipe: PipeSender, settings: WebRtcSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None,
                 channels: ChannelFactory | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(pipe, accept_from=accept_from, tasks="webrtc", logger=log)
        self.settings: WebRtcSettings = settings or WebRtcSettings()
        self.channels: ChannelFactory = channels or AiortcChannels(self.settings)
        self._rng = rng

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Ready to dial and accept."""
        await self.channels.start()
        self._open_backlog()

    async def aclose(self) -> None:
        """Stop answering, cancel negotiations, close streams nobody accepted yet."""
        if self._closed:
            return
        self._closed = True
        await self.channels.aclose()
        await self._close_common()

    async def __aenter__(self) -> WebRtcEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- signalling in ---------------------------------------------------------------
    async def _reject(self, msg: PipeMessage, session: bytes, reason: str) -> None:
        await self._send(msg.sender, msg.sender_device, Reject(session, reason))

    async def _send(self, to: str, device: bytes, sig: Signal) -> None:
        try:
            await self._pipe.pipe(to, encode_signal(sig), device=device)
        except Exception as exc:  # a reject is a courtesy; the dialer times out
            log.info("could not send %s to %s: %s", sig.TAG, to, exc)

    def _capped(self, description: str, what: str, sender: str) -> str:
        """`description` with at most MAX_ICE_CANDIDATES candidates; the rest are counted
        and logged."""
        description, dropped = cap_candidates(description)
        if dropped:
            self.stats.candidates_dropped += dropped
            log.info("WebRTC %s from %s: %d ICE candidates over %d left out", what, sender,
                     dropped, MAX_ICE_CANDIDATES)
        return description

    async def _opened(self, negotiation: Negotiation, what: str) -> Stream:
        """The negotiation's stream once open; after `connect_timeout` a
        WebRtcConnectError saying `what` did not happen in time, and how far it got."""
        limit = self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                return await negotiation.opened()
        except TimeoutError:
            how = negotiation.describe()
            raise WebRtcConnectError(f"{what} within {limit} s" + (f" ({how})" if how else "")
                                     ) from None

    # --- accepting -------------------------------------------------------------------
    async def _answer(self, msg: PipeMessage, offer: Offer) -> None:
        negotiation: Negotiation | None = None
        stream: Stream | None = None
        handed = False
        try:
            try:
                negotiation = await self.channels.answer(
                    offer.session, self._capped(offer.sdp, "offer", msg.sender), msg.sender,
                    msg.sender_device)
            except UnusableDescription as exc:
                self.stats.bad_signals += 1
                await self._send(msg.sender, msg.sender_device,
                                 Reject(offer.session, "offer SDP not understood"))
                raise WebRtcConnectError(f"unusable offer: {exc}") from None
            except NoRoute as exc:
                await self._send(msg.sender, msg.sender_device, Reject(offer.session, str(exc)))
                raise
            await self._pipe.pipe(msg.sender, encode_signal(
                Answer(offer.session, negotiation.sdp)), device=msg.sender_device)
            stream = await self._opened(negotiation, "no connection")
            if not self._hand_over(stream):
                raise WebRtcConnectError("accept backlog full")
            handed = True
        except Exception as exc:  # one failed answer must not end the node
            self.stats.accept_failures += 1
            log.info("WebRTC from %s failed: %s", msg.sender, exc)
        finally:
            if stream is not None and not handed:
                await stream.aclose()
            if negotiation is not None:
                await negotiation.aclose()

    # --- dialing ---------------------------------------------------------------------
    async def dial(self, address: str, device: bytes, *, hold: float = 0) -> Stream:
        """A stream to `device` of `address`; WebRtcConnectError says why not.

        With `hold` > 0 the offer waits at the server up to that long for a device that is
        offline now (the seed's held request): it answers as soon as it comes online, and
        the transfer starts without a new request. Keep `hold` within `answer_timeout`.
        """
        if (busy := self._cannot_dial()) is not None:
            raise WebRtcConnectError(busy)
        s = self.settings
        session = self._rng.randbytes(16) if self._rng is not None else os.urandom(16)
        dial = self._dialling(session, address, device)
        negotiation: Negotiation | None = None
        ok = False
        try:
            negotiation = await self.channels.offer(session, address, device)
            try:
                await self._pipe.pipe(address, encode_signal(Offer(session, negotiation.sdp)),
                                      device=device, hold=hold)
            except Exception as exc:  # RendezvousError, SignalTooLarge, ...
                raise WebRtcConnectError(f"could not send the offer to {address}: {exc}"
                                         ) from None
            try:
                async with asyncio.timeout(s.answer_timeout):
                    reply = await dial.reply
            except TimeoutError:
                raise WebRtcConnectError(
                    f"{address} did not answer within {s.answer_timeout} s") from None
            if isinstance(reply, Reject | Unsupported):
                raise WebRtcConnectError(f"{address} declined: {reply.reason}")
            try:
                await negotiation.complete(self._capped(reply.sdp, "answer", address))
            except UnusableDescription as exc:
                self.stats.bad_signals += 1
                raise WebRtcConnectError(f"unusable answer from {address}: {exc}") from None
            stream = await self._opened(negotiation, f"no WebRTC connection to {address}")
            ok = True
            return stream
        except asyncio.CancelledError:
            if self._closed:
                raise StreamClosed("WebRTC endpoint closed during the dial") from None
            raise
        finally:
            self._dial_ended(session, ok)
            if negotiation is not None:
                await negotiation.aclose()
