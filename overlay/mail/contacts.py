"""Contacts: device keys pinned per address on first use (`peerpost contacts`).

A sender looks a recipient up (FINGER) and gets the set of device keys the recipient's
server binds to that address. The first set seen is pinned. After that the rule is:

- the presented set includes at least one pinned key: the address is continuous with what
  we trusted. Keys new to us are devices the user added and are pinned too (`ADDED`, worth
  showing, not alarming); pinned keys missing from the set stay pinned (a device that is
  offline or retired does no harm, and if it comes back it is still trusted).
- the presented set shares no key with the pinned ones: `CHANGED`. Nothing is replaced. The
  presented keys are recorded as pending (replacing any older pending set) and the contact
  is flagged until the user compares fingerprints out of band and calls `accept_change`,
  which makes the pending set the pinned set, or `dismiss_change`, which drops it.
  Until then `trusted_keys` returns only the old keys, so nothing is sealed to a key the
  user has not accepted.

`pin` is the same rule for a single key, such as the one that signed an incoming message.
One key alone can't show continuity, so a second device of a known sender first reads as
`CHANGED`; a FINGER lookup passed to `pin_keys` that shows it next to a pinned key turns it
into an ordinary `ADDED` device and clears the flag.

The trade-off: a server that adds a rogue key *next to* a real one gets `ADDED`, not
`CHANGED`. Catching that needs the recipient's own devices to vouch for each other, which
the protocol doesn't have yet; `ADDED` is reported so the caller can at least show it.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from crypto.address import normalize_address
from crypto.identity import PublicIdentity
from overlay.mail.db import NodeDB, RecordLimitError, count_rows

MAX_KEYS_PER_ADDRESS = 16
DEFAULT_MAX_CONTACTS = 10_000


class PinResult(Enum):
    NEW = "new"  # first time we see this address: all presented keys pinned
    SAME = "same"  # every presented key was already pinned
    ADDED = "added"  # a pinned key is among them; the others are pinned as new devices
    CHANGED = "changed"  # none of the pinned keys is presented: flag loudly, pin nothing


@dataclass(frozen=True, slots=True)
class Contact:
    address: str
    keys: tuple[bytes, ...]
    fingerprints: tuple[str, ...]
    first_seen: float
    changed: bool
    pending_keys: tuple[bytes, ...]
    pending_fingerprints: tuple[str, ...]


class Contacts:
    """Trust-on-first-use key pinning; see the module docstring for the rule."""

    __slots__ = ("_db", "_max_contacts")

    def __init__(self, db: NodeDB, *, max_contacts: int = DEFAULT_MAX_CONTACTS) -> None:
        self._db = db
        self._max_contacts = max_contacts

    def pin(self, address: str, verify_key: bytes, now: float) -> PinResult:
        """Pin one presented device key (`pin_keys` with a set of one)."""
        return self.pin_keys(address, [verify_key], now)

    def pin_keys(self, address: str, verify_keys: Iterable[bytes], now: float) -> PinResult:
        """Compare the device keys an address presents now with those pinned for it."""
        addr = normalize_address(address)
        presented = _checked_keys(verify_keys)
        with self._db.transaction() as conn:
            contact = conn.execute("SELECT 1 FROM contact WHERE address = ?", (addr,)).fetchone()
            if contact is None:
                if count_rows(conn, "contact") >= self._max_contacts:
                    raise RecordLimitError(f"at most {self._max_contacts} contacts")
                conn.execute(
                    "INSERT INTO contact (address, first_seen, updated_at) VALUES (?, ?, ?)",
                    (addr, now, now),
                )
                _insert_keys(conn, addr, presented, "pinned", now)
                return PinResult.NEW
            pinned = _keys(conn, addr, "pinned")
            if presented <= pinned:
                return PinResult.SAME
            if presented & pinned:
                new = presented - pinned
                if len(pinned) + len(new) > MAX_KEYS_PER_ADDRESS:
                    raise RecordLimitError(
                        f"{addr} would have more than {MAX_KEYS_PER_ADDRESS} pinned devices"
                    )
                # A key pending from an earlier change that now shows up next to a pinned
                # key is simply a new device; it stops being pending.
                conn.executemany(
                    "DELETE FROM contact_key WHERE address = ? AND verify_key = ?",
                    [(addr, k) for k in new],
                )
                _insert_keys(conn, addr, new, "pinned", now)
                _refresh_changed_flag(conn, addr, now)
                return PinResult.ADDED
            conn.execute(
                "DELETE FROM contact_key WHERE address = ? AND status = 'pending'", (addr,)
            )
            _insert_keys(conn, addr, presented, "pending", now)
            _refresh_changed_flag(conn, addr, now)
            return PinResult.CHANGED

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
            conn.execute(
                "UPDATE contact_key SET status = 'pinned' WHERE address = ?", (addr,)
            )
            conn.execute("UPDATE contact SET changed = 0 WHERE address = ?", (addr,))

    def dismiss_change(self, address: str) -> bool:
        """Drop the pending keys and keep the pinned ones; False if nothing was pending."""
        addr = normalize_address(address)
        with self._db.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM contact_key WHERE address = ? AND status = 'pending'", (addr,)
            ).rowcount
            conn.execute("UPDATE contact SET changed = 0 WHERE address = ?", (addr,))
            return gone > 0

    def trusted_keys(self, address: str) -> frozenset[bytes]:
        """The pinned keys of `address` (empty if unknown): the only ones to seal to."""
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
        out = []
        for r in rows:
            pinned = tuple(keys.get((r["address"], "pinned"), ()))
            pending = tuple(keys.get((r["address"], "pending"), ()))
            out.append(
                Contact(
                    address=r["address"],
                    keys=pinned,
                    fingerprints=tuple(PublicIdentity(k).fingerprint() for k in pinned),
                    first_seen=float(r["first_seen"]),
                    changed=bool(r["changed"]),
                    pending_keys=pending,
                    pending_fingerprints=tuple(PublicIdentity(k).fingerprint() for k in pending),
                )
            )
        return out


def _checked_keys(verify_keys: Iterable[bytes]) -> frozenset[bytes]:
    keys = frozenset(PublicIdentity(bytes(k)).verify_key for k in verify_keys)
    if not 1 <= len(keys) <= MAX_KEYS_PER_ADDRESS:
        raise ValueError(f"an address presents 1..{MAX_KEYS_PER_ADDRESS} device keys")
    return keys


def _keys(conn: sqlite3.Connection, address: str, status: str) -> frozenset[bytes]:
    rows = conn.execute(
        "SELECT verify_key FROM contact_key WHERE address = ? AND status = ?", (address, status)
    ).fetchall()
    return frozenset(bytes(r["verify_key"]) for r in rows)


def _insert_keys(
    conn: sqlite3.Connection, address: str, keys: Iterable[bytes], status: str, now: float
) -> None:
    conn.executemany(
        "INSERT INTO contact_key (address, verify_key, status, first_seen) VALUES (?, ?, ?, ?)",
        [(address, k, status, now) for k in sorted(keys)],
    )


def _refresh_changed_flag(conn: sqlite3.Connection, address: str, now: float) -> None:
    conn.execute(
        "UPDATE contact SET updated_at = ?, changed = EXISTS (SELECT 1 FROM contact_key"
        " WHERE address = ? AND status = 'pending') WHERE address = ?",
        (now, address, address),
    )
