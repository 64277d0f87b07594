"""The ways past direct TCP: a TCP hole punch, QUIC over punched UDP and WebRTC, all
signalled over PIPE, the server's relay, and the ladder.

Outbound, `PeerLinks.ladder` turns a holder into a source that tries direct TCP, then a TCP
punch from the mapping the server's STUN over TCP shows, then QUIC from a UDP socket whose
mapping the server's STUN shows (unless this node has QUIC turned off), then WebRTC through
the server's STUN, then the relay, each to its own timeout; for a holder of another domain
the PIPE signalling and the RELAY go to our own server all the same, which forwards them
over its server link. An invite from a caller of another domain names the caller's server,
which hosts that splice: we join there. Inbound, a punched, QUIC or WebRTC stream another
device opened, or a relay invite it sent, is served by the transfer server in a task this
object owns (the device that dialled is the transfer client, whichever end's connect won);
`aclose()` ends them and the punch, QUIC and WebRTC endpoints.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from crypto.address import format_hostport
from crypto.identity import DeviceIdentity
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import ConnectionLadder, Holder
from overlay.transports.punch import PunchEndpoint, PunchSettings
from overlay.transports.quic import QuicEndpoint, QuicSettings, UdpOpener, kernel_udp
from overlay.transports.relay import DEFAULT_TIMEOUT as RELAY_TIMEOUT
from overlay.transports.relay import relay_accept, relay_dial
from overlay.transports.signalling import PipeSender, UnknownOffers, read_signal
from overlay.transports.stream import Stream, StreamClosed, StreamError
from overlay.transports.webrtc import AiortcChannels, WebRtcEndpoint, WebRtcSettings
from rendezvous.client import PipeMessage, RelayInvite, RendezvousClient
from rendezvous.stun import SocketMaker, reusable_socket
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.node")

EndpointFactory = Callable[[PipeSender, WebRtcSettings], WebRtcEndpoint]


class PeerLinks:
    """The punch, QUIC, WebRTC and relay for one node, dialling out (the ladder) and
    serving in. `quic`: False turns the QUIC rung off (offers are declined at once, so a
    dialler goes on to WebRTC without waiting); `quic_udp` makes its UDP ports."""

    def __init__(self, identity: DeviceIdentity, address: str, server: tuple[str, int],
                 rendezvous: RendezvousClient, transfer: TransferServer,
                 endpoint: EndpointFactory, *,
                 punch_socket: SocketMaker = reusable_socket, quic: bool = True,
                 quic_udp: UdpOpener = kernel_udp,
                 rng: random.Random | None = None) -> None:
        self.identity = identity
        self.address = address
        self.server = server
        self.rendezvous = rendezvous  # relay connections use its TLS and pinned server key
        self.transfer = transfer
        self.settings = WebRtcSettings(stun=self._stun_udp())
        self.rtc = endpoint(rendezvous, self.settings)
        # A server that runs no STUN over TCP: no punch.
        self.punch = PunchEndpoint(rendezvous, PunchSettings(stun=self._stun_tcp(),
                                                             make_socket=punch_socket),
                                   rng=rng)
        stun = self._stun_udp()
        self.quic = QuicEndpoint(rendezvous, QuicSettings(stun=stun[0] if stun else None,
                                                          enabled=quic, open_udp=quic_udp))
        self.ladder = ConnectionLadder(
            webrtc=self._dial_webrtc, relay=self._dial_relay,
            punch=self._dial_punch if self.punch.settings.stun is not None else None,
            # A server that runs no STUN: no QUIC (the answer would be a refusal too).
            quic=self._dial_quic if quic and stun else None,
            punch_timeout=self.punch.settings.budget,
            quic_timeout=self.quic.settings.budget,
            webrtc_timeout=self.settings.answer_timeout + self.settings.connect_timeout,
            relay_timeout=RELAY_TIMEOUT)
        self._serving = TaskSet("node-serve", logger=log)  # one task per inbound stream
        # An offer of a rung we don't know (a later release's) is answered 'unsupported'.
        self.unknown = UnknownOffers(rendezvous)
        self._rungs: dict[str, PunchEndpoint | QuicEndpoint | WebRtcEndpoint] = {
            tag: rung for rung in (self.punch, self.quic, self.rtc) for tag in rung.SIGNALS}
        for rung in (self.punch, self.quic, self.rtc):  # rejects of bad offers: one rate
            rung.replies = self.unknown.replies  # for every reply owed to nobody

    async def start(self) -> None:
        await self.rtc.start()
        await self.punch.start()
        await self.quic.start()
        self._spawn(self._serve_accepted(self.punch, "serve-punch"), "punch-accept")
        self._spawn(self._serve_accepted(self.quic, "serve-quic"), "quic-accept")

    async def aclose(self) -> None:
        await self.punch.aclose()
        await self.quic.aclose()
        await self.unknown.aclose()
        await self._serving.aclose()
        await self.rtc.aclose()

    def _stun_udp(self) -> list[tuple[str, int]]:
        """The STUN (UDP, for ICE) of the server the session is on now, from its CHALLENGE."""
        stun = self.rendezvous.server_info.get("stun")
        return [(self.rendezvous.host, int(stun))] if isinstance(stun, int) else []

    def _stun_tcp(self) -> tuple[str, int] | None:
        """The STUN over TCP (for the punch) of the server the session is on now."""
        stun = self.rendezvous.server_info.get("stun_tcp")
        return (self.rendezvous.host, int(stun)) if isinstance(stun, int) else None

    def follow_server(self) -> None:
        """Point the STUN of WebRTC, QUIC and the punch at the server the session is on now:
        after a failover the first instance is gone, and a mapping it would show is of no
        use. Called before each dial and each signal, so a negotiation uses the current
        one."""
        stun = self._stun_udp()
        if list(self.settings.stun) != stun:
            log.info("STUN for WebRTC now %s", stun)
            self.settings = replace(self.settings, stun=stun)
            self.rtc.settings = self.settings
            if isinstance(self.rtc.channels, AiortcChannels):  # builds each peer connection
                self.rtc.channels.settings = self.settings
        stun_tcp = self._stun_tcp()
        if stun_tcp is not None and stun_tcp != self.punch.settings.stun:
            log.info("STUN over TCP for the punch now %s", format_hostport(*stun_tcp))
            self.punch.settings = replace(self.punch.settings, stun=stun_tcp)
        if stun and stun[0] != self.quic.settings.stun:
            self.quic.settings = replace(self.quic.settings, stun=stun[0])

    def paths(self) -> list[str]:
        """The rungs this node can dial a peer over now, in the ladder's order: the punch
        needs the server's STUN over TCP, QUIC its UDP STUN and not being turned off."""
        rungs = ["tcp"]
        if self.ladder.punch is not None and self._stun_tcp() is not None:
            rungs.append("tcp-punch")
        if self.ladder.quic is not None and self._stun_udp():
            rungs.append("quic")
        return [*rungs, "webrtc", "relay"]

    async def _dial_punch(self, holder: Holder) -> Stream:
        self.follow_server()
        return await self.punch.dial(holder.address or "", holder.peer_id)

    async def _dial_quic(self, holder: Holder) -> Stream:
        self.follow_server()
        return await self.quic.dial(holder.address or "", holder.peer_id)

    async def _dial_webrtc(self, holder: Holder) -> Stream:
        self.follow_server()
        # A NATed holder that is offline can't be retried directly: leave the offer
        # waiting at the server (the seed's held request) so it answers on coming back.
        hold = self.settings.answer_timeout if holder.nat else 0.0
        return await self.rtc.dial(holder.address or "", holder.peer_id, hold=hold)

    async def _dial_relay(self, holder: Holder) -> Stream:
        # The server the session is on now: another instance of the domain after a
        # failover; the callee is invited to the same one.
        host, port = self.rendezvous.host, self.rendezvous.port
        return await relay_dial(host, port, self.identity, self.address,
                                holder.address or "", holder.peer_id,
                                tls=self.rendezvous.tls, server_key=self.rendezvous.server_key)

    def feed(self, message: PipeMessage) -> bool:
        """A PIPE message for punch, QUIC or WebRTC signalling, or an offer of another rung
        (answered 'unsupported'); False if it is not signalling. The payload is read once
        and handed to the rung its tag names (an `unsupported` to the rung of the offer it
        answers)."""
        sig = read_signal(message.payload)
        if sig is None:
            return False
        self.follow_server()  # an offer is answered with the current server's STUN
        rung = self._rungs.get(sig.route or "")
        if rung is not None and rung.take(message, sig):
            return True
        return self.unknown.take(message, sig)

    def serve_relayed(self, invite: RelayInvite) -> None:
        """Join, in a task of our own, the relayed stream `invite` names, and serve it."""
        self._spawn(self._serve_relayed(invite), "serve-relay")

    async def _serve_relayed(self, invite: RelayInvite) -> None:
        host, port = self.rendezvous.host, self.rendezvous.port
        server_key = self.rendezvous.server_key
        if invite.host is not None and invite.port is not None and invite.key is not None:
            # A caller of another domain: its server hosts the splice, and must prove the
            # key our own server found for it in DNS (the invite came over our session).
            host, port, server_key = invite.host, invite.port, invite.key
        try:
            stream = await relay_accept(host, port, self.identity, self.address, invite,
                                        tls=self.rendezvous.tls, server_key=server_key)
        except StreamError as exc:
            log.info("relay from %s not joined: %s", invite.sender, exc)
            return
        await self.transfer.handle_stream(stream)

    async def serve_webrtc(self) -> None:
        """Hand each accepted WebRTC stream to the transfer server, until the endpoint
        closes."""
        while True:
            try:
                stream = await self.rtc.accept()
            except StreamClosed:
                return
            self._spawn(self.transfer.handle_stream(stream), "serve-webrtc")

    async def _serve_accepted(self, endpoint: PunchEndpoint | QuicEndpoint,
                              name: str) -> None:
        """Hand each stream `endpoint` accepts to the transfer server, until it closes."""
        while True:
            try:
                stream = await endpoint.accept()
            except StreamClosed:
                return
            self._spawn(self.transfer.handle_stream(stream), name)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._serving.spawn(coro, name=name)
