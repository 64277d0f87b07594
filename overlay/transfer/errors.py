"""The failures of the transfer layer: the protocol errors of crypto.errors, specialised, and
what a downloader sees of a session."""

from __future__ import annotations

from crypto import errors


class LocalProtocolError(errors.LocalProtocolError):
    """We misused our own protocol object (sent before the handshake, wrong role...)."""


class RemoteProtocolError(errors.RemoteProtocolError):
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
