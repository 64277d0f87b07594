"""Errors of the rendezvous layer.

- `LocalProtocolError`: our own code misused the protocol API (a bug here). Raised.
- `RemoteProtocolError`: the peer sent something invalid. Caught at the single receive
  point of a connection and turned into an error reply (or a close for framing errors)
  plus a counter; it never crashes the server or the client.
- `RendezvousError` and subclasses: what a client library user sees when the server
  refuses a request, the connection is lost, or a request times out.
"""

from __future__ import annotations

import errno
import sys

from crypto import errors
from rendezvous.status import Status

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full


STORAGE_FULL = "the server's storage is full: try again later"
DATABASE_AWAY = "the server's database is unavailable: try again later"


class DatabaseAway(ConnectionError):
    """The database server could not be reached (stopped, restarting, failing over): a
    state of the database that ends when it is back, not a fault of the request."""


def is_database_away(exc: BaseException) -> bool:
    """`exc` says the database server is away: it could not be reached (DatabaseAway), or
    it ended the session or refused a new one while it shuts down or starts up (asyncpg's
    connection and client errors, SQLSTATE 57P01-57P03). SQLite, a file in this process,
    raises none of these."""
    if isinstance(exc, DatabaseAway):
        return True
    asyncpg = sys.modules.get("asyncpg")  # loaded only by a server with a PostgreSQL store
    if asyncpg is None:
        return False
    e = asyncpg.exceptions
    # The client's own errors too: the store's connections run one statement at a time, so
    # these come from a session the server ended under a statement ('connection is
    # closed'; 'cannot switch to state 15; another operation (2) is in progress' when
    # PostgreSQL shut down during a COMMIT).
    return isinstance(exc, e.PostgresConnectionError | e.AdminShutdownError
                      | e.CrashShutdownError | e.CannotConnectNowError | e.InterfaceError
                      | e.InternalClientError)


def error_text(exc: BaseException) -> str:
    """What went wrong, for a message: the exception's text, or when it has none (asyncio's
    connect timeout raises `TimeoutError()`, a reset TLS handshake `ConnectionResetError()`)
    "timed out" or its type. `f"{exc or ...}"` never falls back: an exception is true."""
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for want of room (ENOSPC, EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's
    disk_full): a state of a disk that freeing space ends, not a fault of the request."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    # An error of SQLite's exists only once sqlite3 is loaded; a process that opened no
    # database (`peerpost send`) is spared its import (3 ms) to learn this is not one.
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.OperationalError):
        return bool(getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)
    return getattr(exc, "sqlstate", None) == _PG_DISK_FULL


class LocalProtocolError(errors.LocalProtocolError):
    """Our side used the protocol API wrongly (e.g. a verb in the wrong state)."""


class RemoteProtocolError(errors.RemoteProtocolError):
    """The peer violated the protocol; `status` is the reply to give, `fatal` closes."""

    def __init__(self, text: str, status: Status = Status.BAD_REQUEST, *,
                 fatal: bool = False, request_id: int = 0) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.fatal = fatal
        self.request_id = request_id


class RendezvousError(Exception):
    """A request failed: `status` is the server's code (0 for local failures), `text` why."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text}" if status else text)
        self.status = status
        self.text = text


class AuthenticationError(RendezvousError):
    """The server refused AUTHORIZATION (unknown device, bad signature, no invite...)."""

    @property
    def transient(self) -> bool:
        """The server failed (5xx: its store down, its disk full) or is over a session cap
        (429), which says nothing about this device: log in again later. Any other status
        (401, 403: no such account, a revoked device) is the server's word on the device."""
        return self.status >= 500 or self.status == Status.RATE_LIMITED


class BadRequestError(RendezvousError):
    """The server found the request malformed (400)."""


class NotFoundError(RendezvousError):
    """No such address, device or queued envelope (404)."""


class TooLargeError(RendezvousError):
    """An envelope or pipe payload over the server's limit (413)."""


class RateLimitedError(RendezvousError):
    """This connection sent requests faster than the server allows (429)."""


class NotOnlineError(RendezvousError):
    """A PIPE with hold=0 to a device that has no live session (480)."""


class QuotaError(RendezvousError):
    """The recipient's queue is full (507)."""


class ServerError(RendezvousError):
    """The server failed internally or is shutting down (5xx)."""


class ConnectionLostError(RendezvousError):
    """The connection closed before a reply came, and reconnecting is off or failed."""

    def __init__(self, text: str = "connection to the rendezvous server lost") -> None:
        super().__init__(0, text)


class RequestTimeoutError(RendezvousError, TimeoutError):
    """No reply within the request timeout."""

    def __init__(self, text: str) -> None:
        RendezvousError.__init__(self, 0, text)


_BY_STATUS: dict[int, type[RendezvousError]] = {
    Status.BAD_REQUEST: BadRequestError,
    Status.UNAUTHORIZED: AuthenticationError,
    Status.FORBIDDEN: AuthenticationError,
    Status.NOT_FOUND: NotFoundError,
    Status.TOO_LARGE: TooLargeError,
    Status.RATE_LIMITED: RateLimitedError,
    Status.NOT_ONLINE: NotOnlineError,
    Status.QUOTA: QuotaError,
    Status.SERVER_ERROR: ServerError,
    Status.UNAVAILABLE: ServerError,
}


def error_for(status: int, text: str) -> RendezvousError:
    """The most specific RendezvousError subclass for a server reply status."""
    return _BY_STATUS.get(status, RendezvousError)(status, text)
