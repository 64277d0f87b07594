"""The storage interface of the rendezvous server, and the outcomes it returns.

The server talks to accounts and queued envelopes only through `Store`, so an operator who
outgrows one machine can swap SQLite for a shared database. Every write method returns
only after its change is durable: the server acknowledges SEND after `enqueue` returns.

Envelopes carry a store-wide sequence number (`QueuedEnvelope.seq`) that only grows.
`authenticate` returns the highest sequence number at the moment it read the device's
queue (`hi`); the server uses it to flush that queue in pages while new envelopes are
pushed live, with each envelope delivered once per session (see server.py).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from rendezvous.messages import Send
from rendezvous.records import Envelope, EnvelopeInfo
from rendezvous.status import Status


class QueuedEnvelope(NamedTuple):
    seq: int
    envelope: Envelope


class QueuedInfo(NamedTuple):
    seq: int
    info: EnvelopeInfo


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """Whether `verify_key` may act as `address`; if so, the first page of its queue."""

    status: Status
    text: str
    created: bool = False                 # a new account or a newly bound device
    first_page: tuple[QueuedEnvelope, ...] = ()
    hi: int = 0                           # highest envelope seq when the queue was read


@dataclass(frozen=True, slots=True)
class EnqueueOutcome:
    """Result of a SEND: on OK the envelopes newly stored (re-sent ones are not repeated)."""

    status: Status
    text: str
    stored: tuple[QueuedEnvelope, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    verify_key: bytes
    peer_id: bytes
    last_seen: float | None
    advertise: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreStats:
    accounts: int
    devices: int
    queued_envelopes: int
    bytes_stored: int          # blob bytes of queued envelopes
    file_bytes: int            # the database files on disk (main + WAL)


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    """How new accounts and devices may appear (see `Store.authenticate`)."""

    open_registration: bool = False
    max_devices_per_account: int = 16


@dataclass(frozen=True, slots=True)
class Quota:
    count: int
    bytes: int


class Store(Protocol):
    """Accounts, devices, invites and queued envelopes. Every method's result is awaited."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def authenticate(self, address: str, verify_key: bytes, *, register: bool,
                           invite: str | None, advertise: dict[str, Any] | None, now: float,
                           policy: RegistrationPolicy, page: int) -> AuthOutcome:
        """Check (or, with `register`, create) the binding of a device key to an address.

        A key already bound to `address` is accepted whatever `register`/`invite` say.
        `register` creates a new account with open registration or a valid invite; adding
        a device to an existing account needs an invite for that address. On success the
        device's last-seen time (and advertisement, when given) are updated.
        """
        ...

    def enqueue(self, sender: str, send: Send, now: float, expires_at: float,
                quota: Quota) -> Awaitable[EnqueueOutcome]:
        """Store all items of a SEND or none (unknown address/device, quota).

        Like `remove`, this may hand back a plain `asyncio.Future` rather than a coroutine,
        so the server can answer the request from a callback without a task per request.
        """
        ...

    async def pending(self, device: bytes, after: int, upto: int, limit: int,
                      now: float) -> list[QueuedEnvelope]:
        """Unexpired envelopes of `device` with after < seq <= upto, oldest first."""
        ...

    async def list_infos(self, device: bytes, after: int, limit: int,
                         now: float) -> list[QueuedInfo]:
        """Like `pending` without blobs, for LIST."""
        ...

    async def retrieve(self, device: bytes, message_id: bytes, now: float) -> Envelope | None:
        ...

    def remove(self, device: bytes, message_id: bytes) -> Awaitable[bool]:
        """Delete an envelope of `device`; False when it wasn't queued."""
        ...

    async def devices(self, address: str) -> list[DeviceRecord] | None:
        """Devices bound to `address`, or None when there is no such account."""
        ...

    async def set_advertise(self, device: bytes, advertise: dict[str, Any]) -> None: ...

    async def touch(self, device: bytes, last_seen: float) -> None: ...

    async def expire(self, now: float) -> int:
        """Drop envelopes whose expiry has passed; return how many."""
        ...

    async def add_invite(self, address: str, token: str, now: float, expires_at: float) -> None:
        ...

    async def stats(self) -> StoreStats: ...
