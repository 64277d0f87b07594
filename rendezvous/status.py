"""Reply status codes of the rendezvous protocol, each with its standard text.

The numbers follow HTTP/SIP where a meaning exists there, so logs read naturally.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """A reply's numeric status; `text` is the default human-readable reason."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    TOO_LARGE = 413
    RATE_LIMITED = 429
    NOT_ONLINE = 480  # SIP "temporarily unavailable": the device has no live session
    SERVER_ERROR = 500
    UNAVAILABLE = 503
    QUOTA = 507  # "insufficient storage": the recipient's queue is full

    @property
    def text(self) -> str:
        return _TEXT[self]

    @classmethod
    def known(cls, code: int) -> bool:
        return code in cls._value2member_map_


_TEXT: dict[Status, str] = {
    Status.OK: "ok",
    Status.BAD_REQUEST: "bad request",
    Status.UNAUTHORIZED: "not authenticated",
    Status.FORBIDDEN: "forbidden",
    Status.NOT_FOUND: "not found",
    Status.TOO_LARGE: "too large",
    Status.RATE_LIMITED: "rate limit exceeded",
    Status.NOT_ONLINE: "not online",
    Status.SERVER_ERROR: "server error",
    Status.UNAVAILABLE: "server shutting down",
    Status.QUOTA: "quota exceeded",
}
