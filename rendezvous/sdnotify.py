"""systemd readiness (`Type=notify`): `notify("READY=1")` to `$NOTIFY_SOCKET`.

The protocol is one datagram of newline-separated `KEY=VALUE` lines on an AF_UNIX
datagram socket; a name starting with '@' is in the abstract namespace (a leading NUL
byte). Without `$NOTIFY_SOCKET` (not started by systemd) it does nothing. A failure to
send is logged and ignored: readiness is a courtesy to the supervisor, never a reason to
stop serving.
"""

from __future__ import annotations

import logging
import os
import socket

from rendezvous.logfmt import kv

log = logging.getLogger("rendezvous.sdnotify")


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=...") to the service manager; True if sent."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not lines:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.warning(kv("sdnotify.failed", socket=target, error=exc))
        return False
    return True
