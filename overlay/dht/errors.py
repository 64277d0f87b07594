"""The DHT's two kinds of protocol error, specialised from crypto.errors."""

from __future__ import annotations

from crypto import errors


class LocalProtocolError(errors.LocalProtocolError):
    """We misused our own DHT API (bad argument, node not listening, closed)."""


class RemoteProtocolError(errors.RemoteProtocolError):
    """A peer sent something invalid. Caught at the single receive point, counted, dropped.

    `reason` is a short stable word used as the counter name in `DhtNode.stats()`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
