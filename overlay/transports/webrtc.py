"""WebRTC data-channel transport: dial and accept `WebRtcStream`s, signalling over PIPE.

    async with WebRtcEndpoint(rendezvous_client, WebRtcSettings(stun=[(host, port)])) as rtc:
        # the node's push loop:  if isinstance(push, PipeMessage): rtc.feed(push)
        stream = await rtc.dial("bob@example.net", bob_device)   # -> Stream, path "webrtc"
        incoming = await rtc.accept()                             # -> Stream

The dialer makes an offer with every candidate gathered (host, and server-reflexive from
our own server's STUN: never a public default), PIPEs it to one device, waits for that
device's answer, then gives ICE, DTLS and SCTP `connect_timeout` seconds (aiortc alone would
take about 64 s to report failure). Both sides create the same pre-negotiated channel (id 0),
which saves the DCEP open round trip. Every failure is a `WebRtcConnectError` (a
`StreamBroken`) whose text says which step failed, so the caller can fall back to the relay.

Incoming offers are bounded (`max_incoming` negotiating or waiting in the accept backlog);
beyond that, or when `accept_from` says no, the dialer gets a `Reject`. Answers are taken
only from the device that was dialed. Bad payloads are dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    sdp,
)

from overlay.transports.signalling import (
    Answer,
    Offer,
    PipeSender,
    Reject,
    Signal,
    SignalError,
    decode_signal,
    encode_signal,
    signal_tag,
)
from overlay.transports.stream import StreamBroken, StreamClosed
from overlay.transports.webrtc_stream import ChannelTuning, WebRtcStream
from rendezvous.messages import PipeMessage

log = logging.getLogger(__name__)

_CHANNEL_ID = 0
_RECENT_SESSIONS = 1024


class WebRtcConnectError(StreamBroken):
    """A WebRTC attempt failed; the text says at which step and why."""


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
        """Always explicit: aiortc's default would query a public STUN host."""
        urls = [f"stun:[{h}]:{p}" if ":" in h else f"stun:{h}:{p}" for h, p in self.stun]
        return RTCConfiguration(iceServers=[RTCIceServer(urls=urls)] if urls else [])


@dataclass(slots=True)
class WebRtcStats:
    """Counters a node shows in `status`."""

    dials: int = 0
    dial_failures: int = 0
    accepted: int = 0
    accept_failures: int = 0
    rejected: int = 0
    bad_signals: int = 0


@dataclass(slots=True)
class _Dial:
    address: str
    device: bytes
    reply: asyncio.Future[Answer | Reject]


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


def _describe(pc: RTCPeerConnection) -> str:
    sctp = pc.sctp
    kinds: list[str] = []
    if sctp is not None:
        gatherer = sctp.transport.transport.iceGatherer
        kinds = sorted({c.type for c in gatherer.getLocalCandidates()})
    return (f"ICE {pc.iceConnectionState}, connection {pc.connectionState}, "
            f"local candidates: {', '.join(kinds) or 'none'}")


class WebRtcEndpoint:
    """Dials and accepts WebRTC streams for one device (see the module docstring)."""

    def __init__(self, pipe: PipeSender, settings: WebRtcSettings | None = None, *,
                 accept_from: Callable[[str, bytes], bool] | None = None) -> None:
        self.settings = settings or WebRtcSettings()
        self.stats = WebRtcStats()
        self._pipe = pipe
        self._accept_from = accept_from
        self._dials: dict[bytes, _Dial] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._incoming = 0
        self._backlog: asyncio.Queue[WebRtcStream | None] | None = None
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Ready to dial and accept."""
        self._backlog = asyncio.Queue(maxsize=self.settings.max_incoming)

    async def aclose(self) -> None:
        """Stop answering, cancel negotiations, close streams nobody accepted yet."""
        if self._closed:
            return
        self._closed = True
        for d in self._dials.values():
            if not d.reply.done():
                d.reply.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._backlog is not None:
            while not self._backlog.empty():
                stream = self._backlog.get_nowait()
                if stream is not None:
                    await stream.aclose()
            self._backlog.put_nowait(None)  # wakes accept() waiters

    async def __aenter__(self) -> WebRtcEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- signalling in ---------------------------------------------------------------
    def feed(self, msg: PipeMessage) -> bool:
        """Handle one PIPE push. False if it is not a WebRTC signal (route it elsewhere)."""
        if signal_tag(msg.payload) is None:
            return False
        try:
            sig = decode_signal(msg.payload)
        except SignalError as exc:
            self.stats.bad_signals += 1
            log.info("bad WebRTC signal from %s: %s", msg.sender, exc)
            return True
        self._on_signal(msg, sig)
        return True

    def _on_signal(self, msg: PipeMessage, sig: Signal) -> None:
        if isinstance(sig, Offer):
            self._on_offer(msg, sig)
            return
        dial = self._dials.get(sig.session)
        if dial is None or dial.address != msg.sender or dial.device != msg.sender_device:
            self.stats.bad_signals += 1  # late, duplicate, or not from the device we dialed
            return
        if not dial.reply.done():
            dial.reply.set_result(sig)

    def _on_offer(self, msg: PipeMessage, offer: Offer) -> None:
        key = msg.sender_device + offer.session
        if key in self._recent:
            return  # PIPE may repeat across a reconnect
        self._recent[key] = None
        if len(self._recent) > _RECENT_SESSIONS:
            self._recent.popitem(last=False)
        if self._closed or self._backlog is None:
            reason = "not accepting"
        elif self._accept_from is not None and not self._accept_from(msg.sender,
                                                                       msg.sender_device):
            reason = "not accepted"
        elif self._incoming + self._backlog.qsize() >= self.settings.max_incoming:
            reason = "busy"
        else:
            self._incoming += 1
            self._spawn(self._answer(msg, offer), f"webrtc answer {msg.sender}")
            return
        self.stats.rejected += 1
        if not self._closed:
            self._spawn(self._send(msg.sender, msg.sender_device, Reject(offer.session, reason)),
                        f"webrtc reject {msg.sender}")

    async def _send(self, to: str, device: bytes, sig: Signal) -> None:
        try:
            await self._pipe.pipe(to, encode_signal(sig), device=device)
        except Exception as exc:  # a reject is a courtesy; the dialer times out
            log.info("could not send %s to %s: %s", sig.TAG, to, exc)

    # --- accepting -------------------------------------------------------------------
    async def _answer(self, msg: PipeMessage, offer: Offer) -> None:
        s = self.settings
        pc = RTCPeerConnection(s.rtc_configuration())
        stream: WebRtcStream | None = None
        handed = False
        try:
            try:
                _check_offer(offer.sdp)
                await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
            except (ValueError, KeyError, IndexError) as exc:
                self.stats.bad_signals += 1
                await self._send(msg.sender, msg.sender_device,
                                 Reject(offer.session, "offer SDP not understood"))
                raise WebRtcConnectError(f"unusable offer: {exc}") from None
            channel = pc.createDataChannel("peerpost", negotiated=True, id=_CHANNEL_ID)
            stream = WebRtcStream(pc, channel, s.tuning, remote_address=msg.sender,
                                  remote_device=msg.sender_device)
            await pc.setLocalDescription(await pc.createAnswer())
            await self._pipe.pipe(msg.sender, encode_signal(
                Answer(offer.session, pc.localDescription.sdp)), device=msg.sender_device)
            try:
                async with asyncio.timeout(s.connect_timeout):
                    await stream.wait_open()
            except TimeoutError:
                raise WebRtcConnectError(
                    f"no connection within {s.connect_timeout} s ({_describe(pc)})") from None
            if self._backlog is None or self._backlog.full():
                raise WebRtcConnectError("accept backlog full")
            self._backlog.put_nowait(stream)
            self.stats.accepted += 1
            handed = True
        except Exception as exc:  # one failed answer must not end the node
            self.stats.accept_failures += 1
            log.info("WebRTC from %s failed: %s", msg.sender, exc)
        finally:
            self._incoming -= 1
            if not handed:
                await (stream.aclose() if stream is not None else pc.close())

    async def accept(self) -> WebRtcStream:
        """The next incoming stream; StreamClosed once the endpoint is closed."""
        if self._backlog is None:
            raise StreamClosed("endpoint not started")
        stream = await self._backlog.get()
        if stream is None:
            self._backlog.put_nowait(None)
            raise StreamClosed("WebRTC endpoint closed")
        return stream

    # --- dialing ---------------------------------------------------------------------
    async def dial(self, address: str, device: bytes, *, hold: float = 0) -> WebRtcStream:
        """A stream to `device` of `address`; WebRtcConnectError says why not.

        With `hold` > 0 the offer waits at the server up to that long for a device that is
        offline now (the seed's held request): it answers as soon as it comes online, and
        the transfer starts without a new request. Keep `hold` within `answer_timeout`.
        """
        if self._closed or self._backlog is None:
            raise StreamClosed("WebRTC endpoint is not running")
        if len(self._dials) >= self.settings.max_dials:
            raise WebRtcConnectError("too many WebRTC dials in progress")
        self.stats.dials += 1
        s = self.settings
        session = os.urandom(16)
        dial = _Dial(address, device, asyncio.get_running_loop().create_future())
        self._dials[session] = dial
        pc = RTCPeerConnection(s.rtc_configuration())
        ok = False
        try:
            channel = pc.createDataChannel("peerpost", negotiated=True, id=_CHANNEL_ID)
            stream = WebRtcStream(pc, channel, s.tuning, remote_address=address,
                                  remote_device=device)
            await pc.setLocalDescription(await pc.createOffer())
            try:
                await self._pipe.pipe(address, encode_signal(
                    Offer(session, pc.localDescription.sdp)), device=device, hold=hold)
            except Exception as exc:  # RendezvousError, SignalTooLarge, ...
                raise WebRtcConnectError(f"could not send the offer to {address}: {exc}"
                                         ) from None
            try:
                async with asyncio.timeout(s.answer_timeout):
                    reply = await dial.reply
            except TimeoutError:
                raise WebRtcConnectError(
                    f"{address} did not answer within {s.answer_timeout} s") from None
            if isinstance(reply, Reject):
                raise WebRtcConnectError(f"{address} declined: {reply.reason}")
            try:
                await pc.setRemoteDescription(RTCSessionDescription(reply.sdp, "answer"))
            except (ValueError, KeyError, IndexError) as exc:
                self.stats.bad_signals += 1
                raise WebRtcConnectError(f"unusable answer from {address}: {exc}") from None
            try:
                async with asyncio.timeout(s.connect_timeout):
                    await stream.wait_open()
            except TimeoutError:
                raise WebRtcConnectError(
                    f"no WebRTC connection to {address} within {s.connect_timeout} s "
                    f"({_describe(pc)})") from None
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
                await pc.close()
