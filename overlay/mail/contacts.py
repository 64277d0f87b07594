"""Contacts: the device keys trusted per address (`peerpost contacts`).

A sender looks a recipient up (FINGER) and gets the device keys the recipient's server
binds to that address, each with the vouch it registered with, if any (`crypto.vouch`: an
existing device's signature over (address, new key)). The server is not trusted to add
keys, so the rule for a presented set is:

- first contact (no key was ever pinned for the address): trust on first use, all
  presented keys are pinned (`NEW`). When the lookup was made because a message arrived
  (`signers` given), only if the key that signed it is among the keys FINGER returns at
  that time; otherwise nothing is pinned and the signer stays `unvouched` (`UNVOUCHED`).
- a pinned key missing from the set is **retired** (`RETIRED`, when nothing else needs the
  user): the server lists an offline device too, so missing means unbound (the operator
  revoked it, `peerpost-rendezvous devices revoke`, or the account dropped it). A retired
  key is never sealed to again and a message or receipt it signed is believed no more than
  one from a stranger's key; `peerpost contacts` shows it with when. This happens at the
  next FINGER of the address: a send to it, a message signed by a key not trusted yet, or
  a message or receipt signed by a pinned key when the address's keys were last confirmed
  (by any FINGER of it) more than KEYS_FRESH ago (`needs_confirming`): so a revoked device
  is believed at most KEYS_FRESH after the revoke even by a contact that never writes to
  the address again. A FINGER that lists no device at all retires every pinned key
  (`retire_all`).
- keys already pinned: `SAME`. A new key carrying a vouch that verifies under a pinned key
  presented now (or under a key pinned this way, so a chain of vouches works) is pinned too
  (`ADDED`).
- a new key next to pinned ones without such a vouch is `unvouched` (`UNVOUCHED`): shown,
  never sealed to, and its messages are held. A server that adds a rogue key next to the
  real ones gets exactly this. `accept` (`peerpost contacts accept`) pins it.
- the set shares no key with the pinned ones and nothing in it is vouched for by one:
  `CHANGED`. Nothing new is pinned (the pinned keys, all missing, are retired). The
  presented keys are recorded as pending (replacing any older pending set) and the
  contact is flagged until the user compares fingerprints out of band and calls
  `accept`/`accept_change`, which makes the pending set the pinned set, or
  `dismiss_change`, which drops it.

A contact holds at most MAX_KEYS_PER_ADDRESS pinned keys (and as many unvouched, and as
many pending), but a server may list more devices (a foreign domain's up to 256). Such a
set is still what the server binds now: pinned keys it does not list are retired and the
address is confirmed as for any other. Of the new keys it would pin (first contact, a
vouch) only as many as fit are pinned, those that signed the messages being checked first,
then in the server's order; the others are unvouched (shown, never sealed to, their
messages held), and only the first MAX_KEYS_PER_ADDRESS of those, or of a `CHANGED` set,
are recorded. A warning names the limit.

Retiring never opens a door. A contact whose pinned keys are all retired is not a first
contact (a key was pinned once: `retired_key` keeps a row per retired key), so the keys it
presents next are `CHANGED` unless a key still pinned vouches for them, and none is. A vouch
by a retired key counts for nothing: whoever holds the lost device holds its key and can
vouch for a key of their own. A retired key the server lists again is not vouched back in
either: a vouch signs (address, key) with no date, so the one it registered with is as good
as new for a server that kept it; it is shown as unvouched (or pending), and only the user's
`accept` trusts it again. So a server can retire keys only by unlisting them, which denies
service (it could refuse the mail anyway), and cannot get a key of its choosing trusted: it
can present keys, but only a vouch from a key still pinned and presented, first contact, or
the user pins one. A retired key is never forgotten (its old vouch would pin it again); an
address with `MAX_RETIRED_PER_ADDRESS` of them takes no vouch any more, only `accept`.

`trusted_keys` returns only pinned keys, so nothing is sealed to a key the user or a pinned
device has not vouched for. `note_signer` is the receiving side's check of the one key that
signed a message: pinned, or recorded as `unvouched` until a FINGER lookup (`pin_keys` with
`signers`) or the user settles it.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from crypto.address import normalize_address
from crypto.errors import CryptoError
from crypto.identity import PublicIdentity
from crypto.vouch import Vouch
from overlay.mail.db import NodeDB, RecordLimitError, count_rows

log = logging.getLogger("peerpost.contacts")

MAX_KEYS_PER_ADDRESS = 16
# Retired keys of an address past which a vouch counts for nothing (a new device needs the
# user's accept). A retired key is never forgotten: forgotten, the vouch it registered with
# would pin it again. Only keys once pinned get retired (first contact, a vouch, an accept),
# so past this only keys the user accepted (and the at most 16 pinned then) add rows.
MAX_RETIRED_PER_ADDRESS = 4 * MAX_KEYS_PER_ADDRESS
DEFAULT_MAX_CONTACTS = 10_000


def more_than_held(listed: Iterable[bytes]) -> bool:
    """Whether a server lists more device keys than a contact holds: `pin_keys` then
    warns naming the limit, and `contacts accept` can't pin the rest either."""
    return len(frozenset(listed)) > MAX_KEYS_PER_ADDRESS
# Seconds a FINGER's word on an address's keys is taken as current. Past it, a message or
# receipt signed by a pinned key waits for one FINGER of the address before it is believed:
# at most one lookup round trip per contact per hour, whatever the contact sends (a
# thousand receipts an hour cost one), against a stolen device's key believed for at most
# an hour after the operator revoked it (a send to the address, or any other lookup,
# retires it at once). A clock set back by more than this makes the keys stale too.
KEYS_FRESH = 3600.0


class PinResult(Enum):
    NEW = "new"  # first time we see this address: all presented keys pinned
    SAME = "same"  # every presented key was already pinned
    ADDED = "added"  # new keys vouched for by pinned ones: pinned as new devices
    UNVOUCHED = "unvouched"  # a new key without a vouch from a pinned one: held for the user
    CHANGED = "changed"  # none of the pinned keys is presented: flag loudly, pin nothing
    RETIRED = "retired"  # pinned keys missing from the set were retired, nothing else new


@dataclass(frozen=True, slots=True)
class Contact:
    address: str
    keys: tuple[bytes, ...]
    fingerprints: tuple[str, ...]
    first_seen: float
    changed: bool
    pending_keys: tuple[bytes, ...]
    pending_fingerprints: tuple[str, ...]
    unvouched_keys: tuple[bytes, ...] = ()
    unvouched_fingerprints: tuple[str, ...] = ()
    retired_keys: tuple[bytes, ...] = ()  # unlisted by the server: never trusted again
    retired_fingerprints: tuple[str, ...] = ()
    retired_at: tuple[float, ...] = ()  # when each was retired
    keys_confirmed_at: float | None = None  # the last FINGER of the address (None: never)


class Contacts:
    """Key pinning with vouches; see the module docstring for the rule."""

    __slots__ = ("_db", "_max_contacts", "retired")

    def __init__(self, db: NodeDB, *, max_contacts: int = DEFAULT_MAX_CONTACTS) -> None:
        self._db = db
        self._max_contacts = max_contacts
        # Keys retired through this object (`pin_keys`, `retire_all`) since it was made: a
        # caller that reads it before and after a lookup knows whether that lookup retired
        # a device, which the sender's retention then no longer waits for.
        self.retired = 0

    def pin(self, address: str, verify_key: bytes, now: float) -> PinResult:
        """Pin one presented device key (`pin_keys` with a set of one)."""
        return self.pin_keys(address, [verify_key], now)

    def pin_keys(self, address: str, verify_keys: Iterable[bytes], now: float, *,
                 vouches: Mapping[bytes, bytes] | None = None,
                 signers: Iterable[bytes] = ()) -> PinResult:
        """Compare the device keys an address presents now (FINGER) with those pinned.

        `vouches` maps a presented key to the vouch bytes it registered with; `signers` are
        the keys that signed the messages this lookup checks, if any. See the module
        docstring for the rule.
        """
        addr = normalize_address(address)
        listed = _checked_keys(verify_keys)
        presented = frozenset(listed)
        signed = frozenset(signers)
        with self._db.transaction() as conn:
            result, trusted, gone = self._pin_keys(conn, addr, listed, now, vouches or {},
                                                   signed)
        self.retired += len(gone)
        if more_than_held(presented):
            log.warning("%s: its server lists %d devices, more than the %d a contact holds: "
                        "%d of them are not trusted (nothing is sealed to them, what they "
                        "sign is held) while it lists more than %d", addr, len(presented),
                        MAX_KEYS_PER_ADDRESS, len(presented - trusted), MAX_KEYS_PER_ADDRESS)
        return result

    def _pin_keys(self, conn: sqlite3.Connection, addr: str, listed: tuple[bytes, ...],
                  now: float, vouches: Mapping[bytes, bytes], signed: frozenset[bytes]
                  ) -> tuple[PinResult, frozenset[bytes], frozenset[bytes]]:
        """`pin_keys` in its transaction: the result, the keys pinned afterwards and the
        keys it retired."""
        presented = frozenset(listed)
        order = {k: i for i, k in enumerate(listed)}

        def first(keys: frozenset[bytes], n: int = MAX_KEYS_PER_ADDRESS) -> frozenset[bytes]:
            """The `n` of `keys` kept where not all fit: signers, then the server's order."""
            return frozenset(sorted(keys, key=lambda k: (k not in signed,
                                                         order.get(k, len(order)), k))[:n])

        self._ensure_contact(conn, addr, now)
        _confirmed(conn, addr, now)
        pinned = _keys(conn, addr, "pinned")
        gone = pinned - presented
        _retire(conn, addr, gone, now)
        pinned -= gone
        retired = _retired_keys(conn, addr)
        if not pinned and not retired:  # no key was ever pinned: see the module docstring
            if signed and not signed & presented:
                _set_unvouched(conn, addr, first(signed), now)
                _refresh_changed_flag(conn, addr, now)
                return PinResult.UNVOUCHED, pinned, gone
            new = first(presented)
            over = presented - new
            _set_unvouched(conn, addr, first((signed - presented) | over), now)
            _delete_keys(conn, addr, new)
            _insert_keys(conn, addr, new, "pinned", now)
            _refresh_changed_flag(conn, addr, now)
            return (PinResult.UNVOUCHED if over else PinResult.NEW), new, gone
        vouched = (_vouched_for(addr, presented - retired, pinned, vouches)
                   if len(retired) < MAX_RETIRED_PER_ADDRESS else frozenset())
        if not pinned and not vouched:
            conn.execute(
                "DELETE FROM contact_key WHERE address = ? AND status = 'pending'", (addr,)
            )
            pending = first(presented)
            _delete_keys(conn, addr, pending)  # unvouched before, part of it now
            _insert_keys(conn, addr, pending, "pending", now)
            _refresh_changed_flag(conn, addr, now)
            return PinResult.CHANGED, pinned, gone
        added = first(vouched, MAX_KEYS_PER_ADDRESS - len(pinned))  # the rest: no room
        _delete_keys(conn, addr, added)
        _insert_keys(conn, addr, added, "pinned", now)
        rest = (presented | (signed - retired)) - pinned - added
        _set_unvouched(conn, addr, first(rest), now)
        _refresh_changed_flag(conn, addr, now)
        if rest:
            return PinResult.UNVOUCHED, pinned | added, gone
        if gone:
            return PinResult.RETIRED, pinned, gone
        return (PinResult.ADDED if added else PinResult.SAME), pinned | added, gone

    def retire_all(self, address: str, now: float) -> frozenset[bytes]:
        """The address's server lists no device for it now (FINGER answered with none, its
        last device revoked): every pinned key is retired. Returns the keys retired."""
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            gone = _keys(conn, addr, "pinned")
            _retire(conn, addr, gone, now)
            _confirmed(conn, addr, now)
        self.retired += len(gone)
        return gone

    def needs_confirming(self, address: str, verify_key: bytes, now: float) -> bool:
        """Whether `verify_key` is pinned for `address` but the address's keys were last
        confirmed by a FINGER more than KEYS_FRESH before `now` (or after it, the clock set
        back; or never): what it signs is believed only after a FINGER (`pin_keys`, or
        `retire_all` when it lists none) says whether the key is still bound."""
        row = self._db.query_one(
            "SELECT c.keys_confirmed_at FROM contact_key k JOIN contact c USING (address)"
            " WHERE k.address = ? AND k.verify_key = ? AND k.status = 'pinned'",
            (normalize_address(address), bytes(verify_key)))
        if row is None:
            return False  # not trusted anyway: a FINGER follows as for any unknown key
        at = row["keys_confirmed_at"]
        return at is None or abs(now - float(at)) > KEYS_FRESH

    def note_signer(self, address: str, verify_key: bytes, now: float) -> bool:
        """Whether the key that signed a message is pinned for `address`; if not, it is
        recorded as `unvouched` (the address becomes a contact with no pinned key if it
        was unknown) until `pin_keys(..., signers=...)` or the user settles it."""
        addr = normalize_address(address)
        key = PublicIdentity(bytes(verify_key)).verify_key
        with self._db.transaction() as conn:
            self._ensure_contact(conn, addr, now)
            if key in _keys(conn, addr, "pinned"):
                return True
            if key in _retired_keys(conn, addr):
                return False  # shown as retired; trusted again only as the docstring says
            if key not in _keys(conn, addr, "unvouched"):
                held = _keys(conn, addr, "unvouched")
                if len(held) >= MAX_KEYS_PER_ADDRESS:
                    conn.execute(
                        "DELETE FROM contact_key WHERE address = ? AND status = 'unvouched'"
                        " AND verify_key = (SELECT verify_key FROM contact_key WHERE"
                        " address = ? AND status = 'unvouched' ORDER BY first_seen LIMIT 1)",
                        (addr, addr))
                conn.execute("DELETE FROM contact_key WHERE address = ? AND verify_key = ?",
                             (addr, key))
                _insert_keys(conn, addr, [key], "unvouched", now)
                _refresh_changed_flag(conn, addr, now)
            return False

    def accept(self, address: str) -> frozenset[bytes]:
        """The user checked the keys (`peerpost contacts accept`): a pending key change
        replaces the pinned set, and unvouched keys are pinned next to it. Returns the keys
        trusted now that were not before; KeyError if nothing was waiting."""
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            pinned = _keys(conn, addr, "pinned")
            pending = _keys(conn, addr, "pending")
            unvouched = _keys(conn, addr, "unvouched")
            if not pending and not unvouched:
                raise KeyError(f"no key of {addr} is waiting to be accepted")
            new = (pending or pinned) | unvouched
            if len(new) > MAX_KEYS_PER_ADDRESS:
                raise RecordLimitError(
                    f"{addr} would have more than {MAX_KEYS_PER_ADDRESS} pinned devices"
                )
            if pending:
                conn.execute(
                    "DELETE FROM contact_key WHERE address = ? AND status = 'pinned'", (addr,)
                )
            _pin_waiting(conn, addr)
            return frozenset(new - pinned)

    def _ensure_contact(self, conn: sqlite3.Connection, addr: str, now: float) -> None:
        if conn.execute("SELECT 1 FROM contact WHERE address = ?", (addr,)).fetchone():
            return
        if count_rows(conn, "contact") >= self._max_contacts:
            raise RecordLimitError(f"at most {self._max_contacts} contacts")
        conn.execute(
            "INSERT INTO contact (address, first_seen, updated_at) VALUES (?, ?, ?)",
            (addr, now, now),
        )

    def accept_change(self, address: str, verify_key: bytes) -> None:
        """The user checked the new key: the pending set (which must hold it) is pinned.

        Accepting a key that is already pinned does nothing, so accepting each pending key
        in turn is fine. Raises KeyError if `verify_key` is neither pinned nor pending for
        `address`, which catches accepting a key a later lookup has already superseded.
        """
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            pending = _keys(conn, addr, "pending")
            if verify_key not in pending:
                if verify_key in _keys(conn, addr, "pinned"):
                    return
                raise KeyError(f"{addr} has no pending key change to that key")
            conn.execute(
                "DELETE FROM contact_key WHERE address = ? AND status = 'pinned'", (addr,)
            )
            _pin_waiting(conn, addr)

    def dismiss_change(self, address: str) -> bool:
        """Drop the pending and unvouched keys and keep the pinned ones; False if nothing
        was waiting."""
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM contact_key WHERE address = ? AND status IN"
                " ('pending', 'unvouched')", (addr,)
            ).rowcount
            conn.execute("UPDATE contact SET changed = 0 WHERE address = ?", (addr,))
            return gone > 0

    def trusted_keys(self, address: str) -> frozenset[bytes]:
        """The pinned keys of `address` (empty if unknown): the only ones to seal to, and
        the only ones whose messages and receipts are believed (never a retired one)."""
        addr = normalize_address(address)
        rows = self._db.query(
            "SELECT verify_key FROM contact_key WHERE address = ? AND status = 'pinned'",
            (addr,),
        )
        return frozenset(bytes(r["verify_key"]) for r in rows)

    def get(self, address: str) -> Contact | None:
        """One contact, or None if never pinned."""
        found = self._contacts("WHERE address = ?", (normalize_address(address),))
        return found[0] if found else None

    def list(self) -> builtins.list[Contact]:
        """Every contact, by address."""
        return self._contacts("", ())

    def remove(self, address: str) -> bool:
        """Forget an address and its keys (the next lookup pins afresh)."""
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM contact WHERE address = ?", (addr,)).rowcount > 0

    def _contacts(self, where: str, params: tuple[str, ...]) -> builtins.list[Contact]:
        rows = self._db.query(f"SELECT * FROM contact {where} ORDER BY address", params)
        key_rows = self._db.query(
            f"SELECT address, verify_key, status FROM contact_key {where}"
            " ORDER BY first_seen, verify_key",
            params,
        )
        keys: dict[tuple[str, str], builtins.list[bytes]] = {}
        for k in key_rows:
            keys.setdefault((k["address"], k["status"]), []).append(bytes(k["verify_key"]))
        retired: dict[str, builtins.list[tuple[bytes, float]]] = {}
        for k in self._db.query(f"SELECT address, verify_key, retired_at FROM retired_key"
                                f" {where} ORDER BY retired_at, verify_key", params):
            retired.setdefault(k["address"], []).append(
                (bytes(k["verify_key"]), float(k["retired_at"])))
        out = []
        for r in rows:
            pinned = tuple(keys.get((r["address"], "pinned"), ()))
            pending = tuple(keys.get((r["address"], "pending"), ()))
            unvouched = tuple(keys.get((r["address"], "unvouched"), ()))
            gone = retired.get(r["address"], [])
            out.append(
                Contact(
                    address=r["address"],
                    keys=pinned,
                    fingerprints=tuple(PublicIdentity(k).fingerprint() for k in pinned),
                    first_seen=float(r["first_seen"]),
                    changed=bool(r["changed"]),
                    pending_keys=pending,
                    pending_fingerprints=tuple(PublicIdentity(k).fingerprint() for k in pending),
                    unvouched_keys=unvouched,
                    unvouched_fingerprints=tuple(
                        PublicIdentity(k).fingerprint() for k in unvouched),
                    retired_keys=tuple(k for k, _ in gone),
                    retired_fingerprints=tuple(PublicIdentity(k).fingerprint()
                                               for k, _ in gone),
                    retired_at=tuple(at for _, at in gone),
                    keys_confirmed_at=(None if r["keys_confirmed_at"] is None
                                       else float(r["keys_confirmed_at"])),
                )
            )
        return out


def _checked_keys(verify_keys: Iterable[bytes]) -> tuple[bytes, ...]:
    """The keys presented, each once, in the server's order (more than a contact holds
    too: see the module docstring)."""
    keys = tuple(dict.fromkeys(PublicIdentity(bytes(k)).verify_key for k in verify_keys))
    if not keys:
        raise ValueError("an address presents 1 or more device keys")
    return keys


def _keys(conn: sqlite3.Connection, address: str, status: str) -> frozenset[bytes]:
    rows = conn.execute(
        "SELECT verify_key FROM contact_key WHERE address = ? AND status = ?", (address, status)
    ).fetchall()
    return frozenset(bytes(r["verify_key"]) for r in rows)


def _retired_keys(conn: sqlite3.Connection, address: str) -> frozenset[bytes]:
    rows = conn.execute("SELECT verify_key FROM retired_key WHERE address = ?",
                        (address,)).fetchall()
    return frozenset(bytes(r["verify_key"]) for r in rows)


def _retire(conn: sqlite3.Connection, address: str, keys: frozenset[bytes],
            now: float) -> None:
    """Unpin `keys` and record them retired, for good (a row, not a pinned key, is what
    keeps the address from being a first contact, and what keeps a key's old vouch from
    pinning it again; see MAX_RETIRED_PER_ADDRESS for the bound)."""
    if not keys:
        return
    _delete_keys(conn, address, keys)
    conn.executemany(
        "INSERT OR REPLACE INTO retired_key (address, verify_key, retired_at) VALUES (?, ?, ?)",
        [(address, k, now) for k in sorted(keys)])


def _confirmed(conn: sqlite3.Connection, address: str, now: float) -> None:
    """A FINGER answered for `address` at `now`: its pinned keys are as current as that."""
    conn.execute("UPDATE contact SET keys_confirmed_at = ? WHERE address = ?", (now, address))


def _pin_waiting(conn: sqlite3.Connection, address: str) -> None:
    """The user accepted: the pending and unvouched keys of `address` are pinned (a retired
    one among them is no longer retired) and the contact is no longer flagged."""
    conn.execute(
        "DELETE FROM retired_key WHERE address = ? AND verify_key IN (SELECT verify_key FROM"
        " contact_key WHERE address = ? AND status IN ('pending', 'unvouched'))",
        (address, address))
    conn.execute("UPDATE contact_key SET status = 'pinned' WHERE address = ? AND status IN"
                 " ('pending', 'unvouched')", (address,))
    conn.execute("UPDATE contact SET changed = 0 WHERE address = ?", (address,))


def _insert_keys(
    conn: sqlite3.Connection, address: str, keys: Iterable[bytes], status: str, now: float
) -> None:
    conn.executemany(
        "INSERT INTO contact_key (address, verify_key, status, first_seen) VALUES (?, ?, ?, ?)",
        [(address, k, status, now) for k in sorted(keys)],
    )


def _delete_keys(conn: sqlite3.Connection, address: str, keys: Iterable[bytes]) -> None:
    conn.executemany("DELETE FROM contact_key WHERE address = ? AND verify_key = ?",
                     [(address, k) for k in keys])


def _set_unvouched(conn: sqlite3.Connection, address: str, keys: frozenset[bytes],
                   now: float) -> None:
    """The unvouched keys of `address` become `keys` (first-seen times kept)."""
    held = _keys(conn, address, "unvouched")
    _delete_keys(conn, address, held - keys)
    new = keys - held
    _delete_keys(conn, address, new)  # a key pending from a change now shows as a device
    _insert_keys(conn, address, new, "unvouched", now)


def _vouched_for(address: str, presented: frozenset[bytes], pinned: frozenset[bytes],
                 vouches: Mapping[bytes, bytes]) -> frozenset[bytes]:
    """Presented keys not pinned whose vouch verifies under a pinned key, or under a key
    that qualifies this way (a chain), for `address`."""
    trusted = set(pinned)
    found: set[bytes] = set()
    bad: set[bytes] = set()  # checked once: up to 256 listed, each failing every round
    progress = True
    while progress:
        progress = False
        for key in presented - trusted - bad:
            raw = vouches.get(key)
            if raw is None:
                continue
            try:
                vouch = Vouch.from_bytes(raw)
                if vouch.by not in trusted:
                    continue
                vouch.verify(address, key)
            except CryptoError:
                bad.add(key)
                continue
            trusted.add(key)
            found.add(key)
            progress = True
    return frozenset(found)


def _refresh_changed_flag(conn: sqlite3.Connection, address: str, now: float) -> None:
    conn.execute(
        "UPDATE contact SET updated_at = ?, changed = EXISTS (SELECT 1 FROM contact_key"
        " WHERE address = ? AND status = 'pending') WHERE address = ?",
        (now, address, address),
    )
