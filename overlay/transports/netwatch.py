"""Hear of the host's network changing under a running node, as it happens.

On Linux a netlink route socket subscribed to link and address changes (RTMGRP_LINK,
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR) is told when an interface goes down or up or an
address comes or goes: a laptop's Wi-Fi leaving one network and joining another does
both, even when the new network hands it the very address it had (two home routers on
192.168.1.0/24), which a look at the route to the server alone can't tell from no change.
The messages are not parsed: each burst only says "look again" (the node then asks STUN
whether its public address moved). Where there is no netlink (not Linux, a loop without
add_reader such as the simulator's) `start()` returns False and the node only polls.
"""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("peerpost.netwatch")

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
MAX_DRAIN = 256  # netlink messages read per wakeup; more wait for the next one


class NetworkEvents:
    """An event set when the kernel reports a link or address change (`wait`)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    def start(self) -> bool:
        """Subscribe; False (and nothing to close) where netlink or add_reader is missing."""
        family = getattr(socket, "AF_NETLINK", None)
        if family is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except OSError as exc:
            log.info("no netlink route socket (%s): network changes are polled for", exc)
            return False
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable)
        except (OSError, NotImplementedError) as exc:
            sock.close()
            log.info("cannot listen for network changes (%s): they are polled for", exc)
            return False
        self._sock, self._loop = sock, loop
        return True

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(MAX_DRAIN):
            try:
                if not sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: the kernel dropped some: a change all the same
                break
        self._changed.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once a change is reported within `timeout` seconds (then cleared)."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()
