"""Receiving: open each envelope the server pushes, check it, and file it.

A location message signed by a device key that is not pinned for its sender (a new device
of a contact, a rogue key the server added, or a first contact) is filed `unverified`:
shown, never downloaded. The node then looks the sender up (FINGER, `recheck_keys`) and
`overlay.mail.contacts` decides: a key vouched for by a pinned one, or a first contact
whose signing key is among the keys FINGER returns at that time, becomes trusted and its
messages move on to `offered` (`release`); anything else waits for
`peerpost contacts accept`.

A pinned key is believed only as long as a FINGER of its address said it is still bound
within `KEYS_FRESH` (overlay.mail.contacts): a message or receipt it signs past that is
not judged yet (`Outcome.RECHECK`, the sender put in `key_checks`); the caller looks the
sender up and hands the same envelope in again, which is then judged on the keys the
server lists now (a revoked device's key retired: its message held unverified, its receipt
dropped). A lookup that fails leaves the pinned keys believed as before (logged once): the
envelope is filed either way, and the node keeps trying the lookup.

Everything from the server is outside input. An envelope that does not open for this
device, is badly signed, is malformed, or contradicts what the server authenticated (the
sender address) is dropped with a log line and a counter; nothing already stored is
touched. A receipt counts only when signed by a device key pinned for its recipient. The
caller acknowledges (REMOVE) an envelope only after `handle()` returned, so a message is on
disk before the server forgets it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from crypto.address import normalize_address
from crypto.content import chunk_count
from crypto.envelope import open_envelope
from crypto.errors import CryptoError
from crypto.identity import DeviceIdentity, PublicIdentity, peer_id_of
from crypto.location import LocationMessage, decode_location
from overlay.mail.contacts import Contacts, PinResult, more_than_held
from overlay.mail.db import RecordLimitError
from overlay.mail.inbox import Inbox
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import RECEIPT_KIND, Receipt, reason_text

log = logging.getLogger("peerpost.incoming")

LOCATION_KIND = "location"


class Outcome(Enum):
    NEW = "new"  # a new location message is in the inbox
    UNVERIFIED = "unverified"  # a new one, held: its signing key is not trusted yet
    DUPLICATE = "duplicate"  # seen before (the server redelivered), or a receipt that
    # changed nothing (replayed, stale, out of order)
    RECEIPT = "receipt"  # a recipient's receipt for something we sent
    DROPPED = "dropped"  # bad input: logged and counted
    REFUSED = "refused"  # the inbox is full: logged and counted, nothing stored changed
    RECHECK = "recheck"  # signed by a pinned key not confirmed for KEYS_FRESH: nothing
    # filed; look its sender up, then hand the envelope in again (`handle_looked_up`)


@dataclass(frozen=True, slots=True)
class Pushed:
    """The parts of a server push this module needs (rendezvous.client's Envelope has them)."""

    message_id: bytes
    sender: str  # the address the server authenticated
    blob: bytes
    # When the node took it from the server: its inbox time, also for one filed later
    # (set aside until a lookup of its sender answers). None: filed at once, now.
    taken_at: float | None = None


class IncomingMail:
    """Turns pushed envelopes into inbox entries and outbox receipt updates."""

    def __init__(self, identity: DeviceIdentity, address: str, inbox: Inbox, outbox: Outbox,
                 prefs: Prefs, contacts: Contacts, wall: Callable[[], float]) -> None:
        self.identity = identity
        self.address = address
        self.inbox = inbox
        self.outbox = outbox
        self.prefs = prefs
        self.contacts = contacts
        self.wall = wall
        self.counters: Counter[str] = Counter()
        self.key_checks: set[str] = set()  # senders whose key looked new: see recheck_keys
        # Senders a lookup failed for (or whose answer could not be applied): their pinned
        # keys are believed as before until one succeeds (see the module docstring).
        self.unconfirmed: set[str] = set()
        self._looked_up = False  # within `handle_looked_up` only

    def recheck_keys(self, sender: str, device_keys: list[bytes] | None,
                     vouches: dict[bytes, bytes] | None = None) -> list[bytes]:
        """Apply the key set (and vouches) the server lists for `sender` now (None: the
        lookup failed; empty: it lists no device, so every pinned key is retired); move the
        held messages whose signing key is trusted afterwards to `offered` and return
        their ids. Warns when keys are left for the user to accept."""
        if device_keys is None:
            self.counters["key-check-failed"] += 1
            self._not_confirmed(sender, "could not look up the keys of %s")
            return []
        if not device_keys:
            gone = self.contacts.retire_all(sender, self.wall())
            self._confirmed(sender)
            if gone:
                log.warning("%s: its server lists no device for it any more (revoked or "
                            "removed): the keys you trusted are retired, their messages "
                            "and receipts are not believed", sender)
            return []
        contact = self.contacts.get(sender)
        signers = contact.unvouched_keys if contact is not None else ()
        # pinned keys not listed now: retired by pin_keys, whatever else it finds
        gone = frozenset(contact.keys if contact is not None else ()) - frozenset(device_keys)
        with self.inbox.transaction():  # the keys and the messages they release: one commit
            result = self.contacts.pin_keys(sender, device_keys, self.wall(),
                                            vouches=vouches, signers=signers)
            released = self.release(sender)
        self._confirmed(sender)  # not before: an answer that can't be applied confirms nothing
        if result is PinResult.CHANGED:
            self.counters["key-changed"] += 1
            log.warning("KEY CHANGED for %s: the message is held, compare fingerprints "
                        "(`peerpost contacts`) before `peerpost contacts accept %s`",
                        sender, sender)
        elif result is PinResult.UNVOUCHED:
            self.counters["key-unvouched"] += 1
            if not more_than_held(device_keys):  # else pin_keys warned
                log.warning("%s has a device key no device you trust vouched for: its "
                            "messages are held; compare fingerprints (`peerpost contacts`), "
                            "then `peerpost contacts accept %s`", sender, sender)
        elif result is PinResult.ADDED:
            log.info("%s has a new device vouched for by a known one; trusted it", sender)
        if gone and result is not PinResult.CHANGED:  # CHANGED: all gone, and said so
            log.warning("%s: its server no longer lists some device key(s) you trusted (a "
                        "device revoked or removed): retired, their messages and receipts "
                        "are not believed", sender)
        return released

    def _confirmed(self, sender: str) -> None:
        self.unconfirmed.discard(sender)

    def _not_confirmed(self, sender: str, what: str) -> None:
        """A lookup of `sender` did not confirm its keys: warned once, until one does."""
        if sender in self.unconfirmed:
            return
        self.unconfirmed.add(sender)
        log.warning(what + ": the devices trusted for it stay trusted until a lookup "
                    "succeeds (the node tries again); its messages signed by any other key "
                    "wait for that or `peerpost contacts accept %s`", sender, sender)

    def _stale(self, sender: str, key: bytes) -> bool:
        """Whether what `key` signed waits for a lookup of `sender` (RECHECK): the key is
        pinned and its trust older than KEYS_FRESH. When this envelope's own lookup ran
        (`handle_looked_up`) and did not confirm the keys, they are believed as before."""
        if sender in self.unconfirmed or not self.contacts.needs_confirming(
                sender, key, self.wall()):
            return False
        if self._looked_up:
            self._not_confirmed(sender, "the keys of %s were not confirmed")
            return False
        self.key_checks.add(sender)
        self.counters["keys-confirm"] += 1
        return True

    def release(self, sender: str) -> list[bytes]:
        """Move `sender`'s held messages signed by a now trusted key to `offered`."""
        sender = normalize_address(sender)
        trusted = frozenset(peer_id_of(k) for k in self.contacts.trusted_keys(sender))
        released = self.inbox.release_unverified(sender, trusted)
        if released:
            log.info("%d held message(s) from %s are verified now", len(released), sender)
        return released

    def handle_looked_up(self, env: Pushed
                         ) -> tuple[Outcome, LocationMessage | Receipt | None]:
        """`handle` an envelope that came back RECHECK, once its sender was looked up
        (`recheck_keys`): keys that lookup did not confirm (it failed, or its answer could
        not be applied) are believed as before, warned once; never RECHECK again. Told for
        this envelope, not remembered for its sender: another envelope of the sender taken
        while its lookup runs (the push loop and the retry of envelopes left at the server
        run at once) was believed without one, its lookup taken for that one's."""
        self._looked_up = True  # handle does not await: no other envelope sees it
        try:
            return self.handle(env)
        finally:
            self._looked_up = False

    def handle(self, env: Pushed) -> tuple[Outcome, LocationMessage | Receipt | None]:
        """File one envelope. Never raises for bad input: it drops and counts instead.
        RECHECK: look up its sender (`recheck_keys`), then hand the same envelope in again
        (`handle_looked_up`)."""
        try:
            opened = open_envelope(self.identity, env.blob)
        except CryptoError as exc:
            return self._drop("envelope", env, exc)
        handler = self._kinds.get(opened.kind)
        if handler is None:
            return self._drop("unknown-kind", env, f"unknown envelope kind {opened.kind!r}")
        try:
            return handler(self, env, opened.sender.verify_key, opened.body)
        except CryptoError as exc:
            return self._drop(opened.kind, env, exc)

    def _location(self, env: Pushed, key: bytes,
                  body: bytes) -> tuple[Outcome, LocationMessage | Receipt | None]:
        msg = decode_location(body)
        h = msg.headers
        if h.sender != env.sender:
            return self._drop("location", env, f"signed as {h.sender} but the server "
                              f"authenticated {env.sender}")
        if h.message_id != env.message_id:
            return self._drop("location", env, "message id differs from the envelope's")
        if peer_id_of(key) != h.sender_peer_id:
            return self._drop("location", env, "signed by another device than it names")
        if self.address not in h.recipients:
            return self._drop("location", env, "this address is not among the recipients")
        if self._stale(h.sender, key):
            return Outcome.RECHECK, msg
        # A new sender's contact row and its message: one commit (each is an fsync).
        with self.inbox.transaction():
            try:
                trusted = self.contacts.note_signer(h.sender, key, self.wall())
            except RecordLimitError as exc:
                # A sender never seen before needs a contact entry and the contacts are
                # full. This raised out of the push loop and ended the node, and the
                # envelope, not acknowledged, ended it again at every login.
                return self._refused("contacts-full", env, msg, exc)
            kind = self.prefs.classify(h.sender)
            try:
                added = self._add(env, msg, body, kind, unverified=not trusted)
            except RecordLimitError as exc:
                # The user frees room with `peerpost rm` or `peerpost inbox --prune`.
                return self._refused("inbox-full", env, msg, f"{exc} (`peerpost inbox "
                                     "--prune` or `peerpost rm ID` make room)")
        if not trusted:
            # One key can't show it is the same person's device; the node asks the server
            # for the whole device set and its vouches (recheck_keys).
            self.key_checks.add(h.sender)
        if not added:
            self.counters["duplicate"] += 1
            return Outcome.DUPLICATE, msg
        self.counters["received"] += 1
        log.info("message %s from %s: %r (%d bytes)%s%s", h.message_id.hex(), h.sender,
                 msg.description.title, msg.handle.size, " [junk]" if kind == "junk" else "",
                 "" if trusted else " [unverified: signed by device "
                 f"{PublicIdentity(key).fingerprint()}, not trusted for the sender]")
        if not trusted:
            # Counted once it settles (overlay.mail.delivery): most move on to `offered`
            # as the lookup of their sender answers.
            return Outcome.UNVERIFIED, msg
        return Outcome.NEW, msg

    def _add(self, env: Pushed, msg: LocationMessage, body: bytes, kind: str, *,
             unverified: bool = False) -> bool:
        h = msg.headers
        return self.inbox.add(
            id=h.message_id, sender=h.sender, sender_peer_id=h.sender_peer_id,
            title=msg.description.title, note=msg.description.note, size=msg.handle.size,
            file_name=msg.description.file_name, media_type=msg.description.media_type,
            content_id=msg.handle.content_id,
            chunk_count=chunk_count(msg.handle.size, msg.handle.chunk_size),
            message=body, received_at=self.wall() if env.taken_at is None else env.taken_at,
            junk=kind == "junk", priority=kind == "priority", unverified=unverified,
        )

    def _receipt(self, env: Pushed, key: bytes,
                 body: bytes) -> tuple[Outcome, LocationMessage | Receipt | None]:
        receipt = Receipt.decode(body)
        entry = self.outbox.get(receipt.message_id)
        if entry is None or env.sender not in {r.address for r in entry.recipients}:
            return self._drop("receipt", env, "receipt for a message we did not send to them")
        if self._stale(env.sender, key):
            return Outcome.RECHECK, receipt
        if key not in self.contacts.trusted_keys(env.sender):
            # Only a device the message was sealed to can have opened it, and it was sealed
            # only to keys pinned for the recipient, so another key is the recipient's
            # server speaking for it (or a device whose trust was withdrawn since). Filed,
            # a forged "downloaded" let retention delete our copy while the recipient had
            # nothing, a forged "declined" stopped the serving. Dropped (and acknowledged):
            # the recipient stays as it was.
            # Counted apart from malformed ones: a rise means a server (or a revoked
            # device) speaking for its users, not a bug or line noise.
            return self._drop("receipt", env, f"signed by device "
                              f"{PublicIdentity(key).fingerprint()}, not trusted for "
                              f"{env.sender}", counter="dropped-receipt-untrusted")
        state = (RecipientStatus.DOWNLOADED if receipt.state == "deleted"
                 else RecipientStatus(receipt.state))
        # Filed readable: status, the web's Sent page and the log show it as it is.
        reason = None if receipt.reason is None else reason_text(receipt.reason)
        changed = self.outbox.set_recipient_state(receipt.message_id, env.sender, state,
                                                  self.wall(), reason=reason)
        # Each device the message was sealed to settles for itself: the address's other
        # devices may still fetch it from the sender's copy after this one has it. Its key
        # names the device (every receipt is signed by the device that sends it).
        if state in (RecipientStatus.DOWNLOADED, RecipientStatus.DECLINED):
            changed = self.outbox.settle_device(receipt.message_id, env.sender, key) or changed
        if not changed:
            # Replayed, stale or out of order: nothing to do, so no retention pass (which
            # reads the whole outbox) either.
            self.counters["receipts-unchanged"] += 1
            return Outcome.DUPLICATE, receipt
        if state is RecipientStatus.DECLINED:
            log.info("%s will not download message %s: %s", env.sender,
                     receipt.message_id.hex(), reason)
        self.counters["receipts"] += 1
        return Outcome.RECEIPT, receipt

    _kinds: dict[str, Callable[[IncomingMail, Pushed, bytes, bytes],
                               tuple[Outcome, LocationMessage | Receipt | None]]] = {
        LOCATION_KIND: _location,
        RECEIPT_KIND: _receipt,
    }

    def _refused(self, what: str, env: Pushed, msg: LocationMessage,
                 why: object) -> tuple[Outcome, LocationMessage | Receipt | None]:
        # Acknowledged all the same: left on the server it would come back at every login.
        self.counters[f"refused-{what}"] += 1
        log.warning("REFUSED message %s from %s: %s", env.message_id.hex(), env.sender, why)
        return Outcome.REFUSED, msg

    def _drop(self, what: str, env: Pushed, why: object, *,
              counter: str | None = None) -> tuple[Outcome, LocationMessage | Receipt | None]:
        self.counters[counter or f"dropped-{what}"] += 1
        log.warning("dropped envelope %s from %s: %s: %s", env.message_id.hex(), env.sender,
                    what, why)
        return Outcome.DROPPED, None
