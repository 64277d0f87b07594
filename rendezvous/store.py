"""The storage interface of the rendezvous server, and the outcomes it returns.

The server talks to accounts and queued envelopes only through `Store`, so an operator who
outgrows one machine can swap SQLite for a shared database. Every write method returns
only after its change is durable: the server acknowledges SEND after `enqueue` returns.

Envelopes carry a store-wide sequence number (`QueuedEnvelope.seq`) that only grows.
`authenticate` returns the highest sequence number at the moment it read the device's
queue (`hi`); the server uses it to flush that queue in pages while new envelopes are
pushed live, with each envelope delivered once per session (see server.py).

Besides accounts and envelopes the store keeps what must survive a restart of the server:
which accounts have exchanged mail (FINGER shows presence only between them), PIPE
messages held for offline devices, and each account's relayed volume of the day.

Federation: envelopes for another domain's recipients wait in a durable outbound queue
(`queue_outbound`) until the link to that domain takes them (`outbound_done`) or they
expire and bounce (`outbound_expire`); each row keeps its state for `track`. Envelopes
that arrive over a link go through `enqueue_forwarded`, which remembers every (device,
message id) it stored, so a forward repeated after the first copy was downloaded and
removed is not delivered again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from crypto.codec import unpackb
from crypto.errors import CryptoError, DecodeError
from crypto.vouch import Vouch
from rendezvous.messages import PipeMessage, Send
from rendezvous.records import Envelope, EnvelopeInfo, check_advertise
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
    vouch: bytes | None = None  # crypto.vouch bytes it registered with, if any


@dataclass(frozen=True, slots=True)
class StoreStats:
    accounts: int
    devices: int
    queued_envelopes: int
    bytes_stored: int          # blob bytes of queued envelopes
    file_bytes: int            # the database files on disk (main + WAL)
    outbound_queued: int = 0   # envelopes waiting to be forwarded to other domains


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    """How new accounts and devices may appear (see `Store.authenticate`)."""

    open_registration: bool = False
    max_devices_per_account: int = 16


@dataclass(frozen=True, slots=True)
class RegistrationFacts:
    """What the store holds that registering a device is judged on."""

    exists: bool  # the account
    invite: Sequence[Any] | None  # the given invite's (address, expires_at, used_by) row
    device_keys: frozenset[bytes]  # the verify keys of the account's devices


class RegistrationVerdict(NamedTuple):
    refusal: AuthOutcome | None  # why not; None: bind the device
    invite_ok: bool  # the invite is good and gets used
    vouch: bytes | None  # what to store as the device's vouch


def judge_registration(address: str, verify_key: bytes, register: bool, invite: str | None,
                       now: float, policy: RegistrationPolicy, vouch: bytes | None,
                       found: RegistrationFacts) -> RegistrationVerdict:
    """May a new device bind to `address`, creating the account if needed? The rules and
    their texts, for every store."""
    if not register:
        if not found.exists:
            return RegistrationVerdict(AuthOutcome(
                Status.UNAUTHORIZED, f"no account {address}: register with an invite first"),
                False, None)
        return RegistrationVerdict(AuthOutcome(
            Status.UNAUTHORIZED, f"this device is not bound to {address}"), False, None)
    invite_ok = False
    if invite is not None:
        row = found.invite
        invite_ok = row is not None and row[0] == address and row[1] > now and row[2] is None
        if not invite_ok:
            return RegistrationVerdict(AuthOutcome(
                Status.FORBIDDEN, f"invite is not valid for {address} (unknown, used or "
                "expired)"), False, None)
    if not found.exists:
        if not (invite_ok or policy.open_registration):
            return RegistrationVerdict(AuthOutcome(
                Status.FORBIDDEN, "registration needs an invite (this server is not open)"),
                False, None)
        # The first device of an account has nobody to vouch for it.
        return RegistrationVerdict(None, invite_ok, None)
    if not invite_ok:
        return RegistrationVerdict(AuthOutcome(
            Status.FORBIDDEN, f"adding a device to {address} needs an invite for it"),
            False, None)
    count = len(found.device_keys)
    if count >= policy.max_devices_per_account:
        return RegistrationVerdict(AuthOutcome(
            Status.FORBIDDEN, f"{address} already has {count} devices, the limit"),
            False, None)
    if vouch is not None and not _vouch_ok(address, verify_key, vouch, found.device_keys):
        return RegistrationVerdict(AuthOutcome(
            Status.FORBIDDEN, f"the vouch is not signed by a device of {address} for this "
            "device key"), False, None)
    return RegistrationVerdict(None, invite_ok, vouch)


def _vouch_ok(address: str, verify_key: bytes, raw: bytes, device_keys: frozenset[bytes]
              ) -> bool:
    """Whether `raw` is a vouch for `verify_key` by a device bound to `address`."""
    try:
        vouch = Vouch.from_bytes(raw)
        vouch.verify(address, verify_key)
    except CryptoError:
        return False
    return vouch.by in device_keys


@dataclass(frozen=True, slots=True)
class Quota:
    """What may be queued for one recipient account, and of that from one sender account
    (`sender_count` / `sender_bytes`; 0 turns the per-sender cap off)."""

    count: int
    bytes: int
    sender_count: int = 0
    sender_bytes: int = 0
    # What may be queued here from all senders of one other domain (0: off; links only).
    domain_count: int = 0
    domain_bytes: int = 0


class OutboundRow(NamedTuple):
    """One envelope in the outbound queue, for a device of another domain."""

    id: int
    domain: str
    message_id: bytes
    sender: str
    recipient: str
    device: bytes
    priority: int
    blob: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class OutboundState:
    """How far one recipient of a message got at the sender's server (TRACK)."""

    recipient: str
    state: str              # "queued", "delivered" or "bounced"
    queued_at: float
    since: float | None     # queued: first failed attempt of the current outage
    error: str | None       # queued: the last error; bounced: the reason
    updated_at: float

    def to_wire(self) -> dict[str, Any]:
        """Times as whole seconds of the wall clock."""
        out: dict[str, Any] = {"to": self.recipient, "state": self.state,
                               "queued_at": int(self.queued_at),
                               "updated_at": int(self.updated_at)}
        if self.since is not None:
            out["since"] = int(self.since)
        if self.error is not None:
            out["error"] = self.error[:1000]
        return out


@dataclass(frozen=True, slots=True)
class FingerView:
    """What FINGER may show: the devices of the address (None: no such account), and
    whether the asker has exchanged mail with it (see `Store.enqueue`)."""

    devices: list[DeviceRecord] | None
    exchanged: bool


@dataclass(frozen=True, slots=True)
class PipeQuota:
    """Bounds of the PIPE hold: per device, per sender account within a device's hold, and
    for the whole server. Costs are payload bytes plus a fixed overhead per message."""

    per_device: int
    bytes_per_device: int
    per_sender: int
    bytes_per_sender: int
    total_bytes: int


class Store(Protocol):
    """Accounts, devices, invites and queued envelopes. Every method's result is awaited."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def authenticate(self, address: str, verify_key: bytes, *, register: bool,
                           invite: str | None, advertise: dict[str, Any] | None, now: float,
                           policy: RegistrationPolicy, page: int,
                           vouch: bytes | None = None, record: bool = True) -> AuthOutcome:
        """Check (or, with `register`, create) the binding of a device key to an address.

        A key already bound to `address` is accepted whatever `register`/`invite` say.
        `register` creates a new account with open registration or a valid invite; adding
        a device to an existing account needs an invite for that address. A `vouch`
        (`crypto.vouch` bytes) given when a device is added is kept for FINGER if it
        verifies under a device already bound to the address, and refused otherwise; on a
        new account or a known device it is ignored. On success the device's last-seen
        time (and advertisement, when given) are updated.

        `record=False` writes nothing, for a server whose disk is full: a device already
        bound is let in without those updates (soft state the next login writes), one the
        registration rules refuse (unknown, revoked, no invite) gets their refusal as
        ever, and one they would bind is refused with UNAVAILABLE and `STORAGE_FULL`.
        """
        ...

    def enqueue(self, sender: str, send: Send, now: float, expires_at: float,
                quota: Quota) -> Awaitable[EnqueueOutcome]:
        """Store all items of a SEND or none (unknown address/device, quota).

        `quota` bounds what is queued per recipient account and, of that, per sender
        account. A stored SEND also records that `sender` and each recipient have
        exchanged mail, and so have the recipients of one message among themselves
        (they fetch its content from each other); `finger` reads this.

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

    async def finger(self, asker: str, address: str) -> FingerView:
        """`devices(address)` and whether `asker` has exchanged mail with it, in one
        lookup, so an unknown address costs the same store round trip as a known one."""
        ...

    async def hold_pipe(self, device: bytes, message: PipeMessage, expires_at: float,
                        now: float, quota: PipeQuota) -> str | None:
        """Keep `message` for `device` until `expires_at` (wall clock, so a hold survives
        a restart); the refusal text when a bound of `quota` would be passed."""
        ...

    async def take_pipes(self, device: bytes, now: float) -> list[PipeMessage]:
        """Remove and return the unexpired messages held for `device`, oldest first."""
        ...

    async def reread_accounts(self, devices: list[bytes]) -> set[bytes]:
        """Forget what is cached of accounts and devices (changed from outside by an
        operator command) and return those of `devices` still bound to an account."""
        ...

    async def relay_usage(self, account: str, day: int) -> int:
        """Bytes relayed for `account` on UTC day `day` as last saved (0 if none)."""
        ...

    async def save_relay_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        """Save account -> (day, bytes relayed that day), replacing what was saved."""
        ...

    async def set_advertise(self, device: bytes, advertise: dict[str, Any]) -> None: ...

    async def touch(self, device: bytes, last_seen: float) -> None: ...

    async def expire(self, now: float) -> int:
        """Drop envelopes whose expiry has passed; return how many. Also drops expired
        held PIPE messages and relay volumes of past days."""
        ...

    async def add_invite(self, address: str, token: str, now: float, expires_at: float) -> None:
        ...

    async def stats(self) -> StoreStats: ...

    # --- federation ----------------------------------------------------------------------
    async def queue_outbound(self, sender: str, send: Send, now: float, expires_at: float,
                             max_queued: int) -> str | None:
        """Commit the items of `send` (all for other domains) to the outbound queue; a
        retried SEND adds nothing. The refusal text when `sender` would have more than
        `max_queued` envelopes waiting."""
        ...

    async def outbound_domains(self) -> list[str]:
        """The domains that have envelopes waiting."""
        ...

    async def outbound_due(self, domain: str, after: int, limit: int) -> list[OutboundRow]:
        """Waiting envelopes for `domain` with id > after, oldest first."""
        ...

    async def outbound_done(self, ids: list[int], state: str, reason: str | None,
                            now: float) -> None:
        """Mark envelopes "delivered" or "bounced" (with `reason`); their blobs go."""
        ...

    async def outbound_failed(self, domain: str, error: str, now: float) -> None:
        """Record a failed attempt on every envelope waiting for `domain`."""
        ...

    async def outbound_expire(self, now: float) -> int:
        """Bounce waiting envelopes whose expiry passed; forget finished rows older than
        the envelope lifetime. Returns how many bounced."""
        ...

    async def withdraw(self, sender: str, message_id: bytes) -> tuple[int, int]:
        """Delete `sender`'s envelopes of `message_id` still queued here, and those still
        waiting for another domain; (queued here, waiting outbound) deleted."""
        ...

    async def track(self, sender: str, message_id: bytes) -> list[OutboundState]:
        """Per foreign recipient of `sender`'s message: its forwarding state."""
        ...

    def enqueue_forwarded(self, sender: str, send: Send, now: float, expires_at: float,
                          quota: Quota) -> Awaitable[EnqueueOutcome]:
        """`enqueue` for a SEND that came over a link: items whose (device, message id)
        was stored before (even if since removed) are acknowledged, not stored again."""
        ...


# --- what every backend shares: row shapes, quota texts, state merging -------------------
ENVELOPE_COLUMNS = "seq, device, mid, sender, recipient, prio, blob, received_at"


RECENT_MESSAGES = 4096  # message id -> recipients so far, for multi-SEND messages


class RecentMessages:
    """The recipients of the last RECENT_MESSAGES message ids, so that a message sent in
    several SENDs makes all its recipients correspondents of each other."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[str, set[str]]] = {}

    def exchanged(self, sender: str, message_id: bytes,
                  recipients: set[str]) -> set[tuple[str, str]]:
        """Pairs (a < b) that have now exchanged mail: the sender with each recipient, and
        the message's recipients among themselves, earlier SENDs of it included."""
        seen = self._seen.get(message_id)
        if seen is None or seen[0] != sender:
            if len(self._seen) >= RECENT_MESSAGES:
                del self._seen[next(iter(self._seen))]
            seen = self._seen[message_id] = (sender, set())
        earlier = seen[1]
        everyone = sorted(earlier | recipients)
        pairs = {(min(sender, r), max(sender, r)) for r in recipients if r != sender}
        pairs.update((min(a, b), max(a, b)) for a in recipients for b in everyone if a != b)
        earlier.update(recipients)
        return pairs


def settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    """Give `fut` its result or exception, unless it is done already (cancelled)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def queued_envelope(row: Any) -> QueuedEnvelope:
    """A row of `ENVELOPE_COLUMNS` (a tuple or a database record) as a QueuedEnvelope."""
    seq, device, mid, sender, recipient, prio, blob, received_at = row
    return QueuedEnvelope(int(seq), Envelope(bytes(mid), sender, recipient, bytes(device),
                                             prio, bytes(blob), received_at))


def load_advertise(raw: bytes | None) -> dict[str, Any]:
    """A device's stored advertisement, or {} if there is none or it no longer checks."""
    if not raw:
        return {}
    try:
        return check_advertise(unpackb(raw, max_bytes=8192), 8192)
    except DecodeError:
        return {}


def per_recipient(rows: list[OutboundState]) -> list[OutboundState]:
    """One state per recipient from its devices' rows: bounced if any device bounced,
    else queued if any waits, else delivered."""
    rank = {"bounced": 2, "queued": 1, "delivered": 0}
    out: dict[str, OutboundState] = {}
    for row in rows:
        have = out.get(row.recipient)
        if have is None or rank.get(row.state, 0) > rank.get(have.state, 0):
            out[row.recipient] = row
    return list(out.values())


def over_quota(sender: str, adding: Mapping[str, list[int]], quota: Quota, *,
               domains: Mapping[str, list[int]], usage: Mapping[str, list[int]],
               pairs: Mapping[tuple[str, str], list[int]]) -> str | None:
    """The refusal text if adding [count, bytes] per recipient passes a quota, given what is
    queued now: per sending domain, per recipient and per (sender, recipient)."""
    if quota.domain_count or quota.domain_bytes:
        domain = sender.rpartition("@")[2]
        used = domains.get(domain, [0, 0])
        count = sum(a[0] for a in adding.values())
        size = sum(a[1] for a in adding.values())
        if (quota.domain_count and used[0] + count > quota.domain_count) or \
                (quota.domain_bytes and used[1] + size > quota.domain_bytes):
            return (f"quota exceeded for mail from {domain}: {used[0]} envelopes / "
                    f"{used[1]} bytes queued here, limit {quota.domain_count} / "
                    f"{quota.domain_bytes} per domain")
    for address, (count, size) in adding.items():
        used = usage.get(address, [0, 0])
        if used[0] + count > quota.count or used[1] + size > quota.bytes:
            return (f"quota exceeded for {address}: {used[0]} envelopes / {used[1]} bytes "
                    f"queued, limit {quota.count} / {quota.bytes}")
        mine = pairs.get((sender, address), [0, 0])
        if (quota.sender_count and mine[0] + count > quota.sender_count) or \
                (quota.sender_bytes and mine[1] + size > quota.sender_bytes):
            return (f"quota exceeded for {address} from {sender}: {mine[0]} envelopes / "
                    f"{mine[1]} bytes of yours queued there, limit {quota.sender_count} / "
                    f"{quota.sender_bytes} per sender")
    return None
