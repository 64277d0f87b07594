"""The failures of the transfer layer, split as STYLE.md 6 asks."""

from __future__ import annotations


class LocalProtocolError(Exception):
    """We misused our own protocol object (sent before the handshake, wrong role...)."""


class RemoteProtocolError(Exception):
    """The peer sent something invalid; caught at the single receive point."""


class TransferError(Exception):
    """A transfer session could not do what was asked."""


class SessionFailed(TransferError):
    """The session is gone: handshake refused, protocol violation, stream lost, timeout."""


class RemoteError(TransferError):
    """The peer answered a request with an error reply."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
