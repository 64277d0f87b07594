"""What arrives from the server, and the receipts that go back to senders.

`Delivery.pushes()` reads the session's pushes: envelopes go to the inbox (then are removed
from the server), PIPE messages and relay invites go to the transports through hooks the
node hands in. A receipt for our own message may let the sender's copy go (retention).
`Receipts` tells a sender we hold its file, and sends again the receipts the server did
not take. Neither needs the DHT or the transports: those are reached through callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from crypto.envelope import seal_for_recipients
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.location import LocationMessage, decode_location
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import Contacts
from overlay.mail.db import RecordLimitError
from overlay.mail.downloads import DownloadQueue
from overlay.mail.inbox import Decline, Inbox, InboxEntry
from overlay.mail.inbox_state import ACTIVE_STATES, InboxState
from overlay.mail.incoming import IncomingMail, Outcome, Pushed
from overlay.mail.outbox import Outbox
from overlay.mail.prefs import Prefs
from overlay.mail.receipts import DECLINED, RECEIPT_KIND, Receipt
from overlay.mail.retention import apply_retention
from rendezvous.backoff import Backoff
from rendezvous.client import (
    Envelope,
    PipeMessage,
    RelayInvite,
    RendezvousClient,
    RendezvousError,
)
from rendezvous.errors import NotFoundError
from rendezvous.records import DeviceInfo, FingerResult
from rendezvous.taskset import TaskSet, raise_if_cancelled

log = logging.getLogger("peerpost.node")

_Item = TypeVar("_Item", bytes, str)  # a message id or an address, retried with backoff
# An owed receipt as node.db pages it: (message id, location message, ..., time queued).
_Owed = TypeVar("_Owed", tuple[bytes, bytes, float], tuple[bytes, bytes, str, float])

LOGIN_FLUSH_WAIT = 3.0  # seconds downloads wait at most for the mailbox queued at login
LOOKUP_BACKOFF = Backoff(5.0, 300.0, jitter=0.8)  # a sender's keys looked up again
OWED_PAGE = 100  # owed receipts (downloaded, declined) read from node.db at a time
# Downloads whose `downloading` receipt waits to go; more start only at the queue's pace.
MAX_STARTED = 256
# Senders looked up (FINGER) at once: a flood of mail from unknown senders makes our server
# open no more links to their domains than this.
MAX_LOOKUPS = 8
# Envelopes the push loop sets aside for their sender's lookup; past it the loop waits for
# the lookup itself, as it always did (each is at most a frame in memory).
MAX_SET_ASIDE = 256


class Receipts:
    """Receipts to senders: `downloading` when a download stores its first chunk, one when
    it completes, and the owed ones again.

    The `downloading` receipt is best effort and never owed: kept in memory until the
    server takes it (a node restarted meanwhile does not send it, as its first chunk came
    before), and not sent once the download has ended, whose own receipt (or none, for a
    junk sender) says more.

    Declined receipts are queued in node.db by whoever declines (`Inbox.remove`, a
    download failed for good) and sent only by `owed()`, which `wake()` starts at once: one
    sender of them, so none goes twice, and a node offline or restarted sends them later.
    """

    def __init__(self, identity: DeviceIdentity, rendezvous: RendezvousClient, inbox: Inbox,
                 contacts: Contacts, *, wall: Callable[[], float], retry: float) -> None:
        self.identity = identity
        self.rendezvous = rendezvous
        self.inbox = inbox
        self.contacts = contacts
        self.wall = wall
        self.retry = retry
        self._wake = asyncio.Event()
        self._started: dict[bytes, LocationMessage] = {}

    def wake(self) -> None:
        """A receipt was left owed (a decline queued, a send not taken): send it now
        rather than at the next round."""
        self._wake.set()

    def started(self, entry: InboxEntry, msg: LocationMessage) -> None:
        """The download queue's first-chunk hook: the sender's `status` shows the
        recipient `downloading` once the owed loop's next round has sent it."""
        if entry.id in self._started or len(self._started) < MAX_STARTED:
            self._started[entry.id] = msg
            self.wake()

    async def completed(self, entry: InboxEntry, msg: LocationMessage) -> None:
        """The download queue's completion hook. A receipt the server did not take goes
        with the owed ones: the loop's next round starts now, and, if the server is away,
        again as soon as the session is back."""
        if not await self.send(entry.id, msg):
            self.wake()

    async def send(self, entry_id: bytes, msg: LocationMessage) -> bool:
        """Tell the sender we hold it; remembered as sent only once the server took it."""
        receipt = Receipt(entry_id, "downloaded", int(self.wall()))
        if not await self.send_to_sender(msg, RECEIPT_KIND, receipt.encode()):
            return False
        await asyncio.to_thread(self.inbox.mark_receipt_sent, entry_id, self.wall())
        return True

    async def owed(self) -> None:
        """Receipts the server did not take (it was down, or we were cut off) go again,
        at start and then every `retry` seconds, sooner when woken (a decline queued, a
        completion's receipt not taken) or, after a round the server was away for, when
        the session is back (`_until_next_round`), until it does: without one the sender
        never learns we have the file, or never will, and keeps its copy for good. Runs
        until cancelled."""
        while True:
            raise_if_cancelled()  # a send may have eaten it (see `_again`)
            self._wake.clear()
            away = False
            try:
                away = await self._send_started()
                away = await self._send_downloaded() or away
                away = await self._send_declines() or away
            except (sqlite3.Error, OSError) as exc:
                # node.db could not be read or written (its disk full, say): what is owed
                # stays owed, and the next round tries again. This ended the loop, and
                # with it the node (its tasks fail together).
                log.warning("owed receipts not sent this round (tried again in %.0f s): %s",
                            self.retry, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.retry):
                    await self._until_next_round(away)

    async def _until_next_round(self, away: bool) -> None:
        """Until woken or, after a round the server was `away` for, until the session is
        back (now, if it already is): a receipt owed for want of a server goes at the
        reconnect, not up to `retry` seconds later (the sender's status lagged by a minute
        after each outage)."""
        if away and self.rendezvous.connected:
            return
        async with asyncio.TaskGroup() as tg:
            back = tg.create_task(self._wake_when_back(), name="receipts: session back") \
                if away else None
            await self._wake.wait()
            if back is not None:
                back.cancel()

    async def _wake_when_back(self) -> None:
        # A login refused for good raises at once: no session comes back, and the rounds
        # go on at `retry` as before.
        with contextlib.suppress(RendezvousError):
            await self.rendezvous.wait_connected()
            self.wake()

    async def _send_started(self) -> bool:
        """Send the `downloading` receipts of downloads still going; True when the server
        is away (those not sent wait for it)."""
        for mid, msg in list(self._started.items()):
            entry = self.inbox.get(mid)
            if entry is not None and entry.state in ACTIVE_STATES:
                receipt = Receipt(mid, "downloading", int(self.wall()))
                if not await self.send_to_sender(msg, RECEIPT_KIND, receipt.encode()) \
                        and not self.rendezvous.connected:
                    return True
            self._started.pop(mid, None)
        return False

    async def _send_downloaded(self) -> bool:
        async def downloaded(row: tuple[bytes, bytes, float], msg: LocationMessage) -> bool:
            if not await self.send(row[0], msg):
                return False
            log.info("sent the owed receipt for %s", row[0].hex())
            return True

        return await self._each_owed(self.inbox.receipts_owed, downloaded)

    async def _send_declines(self) -> bool:
        async def declined(row: tuple[bytes, bytes, str, float], msg: LocationMessage) -> bool:
            mid, raw, reason, at = row
            receipt = Receipt(mid, DECLINED, int(at), reason)
            if not await self.send_to_sender(msg, RECEIPT_KIND, receipt.encode()):
                return False
            await asyncio.to_thread(self.inbox.mark_decline_sent, mid, self.wall(),
                                    sent=(Decline(reason, at), raw))
            log.info("told %s that message %s will not be downloaded: %s",
                     msg.headers.sender, mid.hex(), reason)
            return True

        return await self._each_owed(self.inbox.declines_owed, declined)

    async def _each_owed(self, read: Callable[[int, tuple[float, bytes] | None], list[_Owed]],
                         send: Callable[[_Owed, LocationMessage], Awaitable[bool]]) -> bool:
        """`send` every owed receipt `read` gives, a page at a time (oldest first, each page
        after the (time, id) of the last). A sender that did not take one (no trusted key
        for it, or the server refused it) is not tried again this round, and the pages go
        on past it: its receipts, the oldest, do not hold up the others'. True when it
        stopped because the server is away."""
        untaken: set[str] = set()
        after: tuple[float, bytes] | None = None
        while True:
            page = await asyncio.to_thread(read, OWED_PAGE, after)
            for row in page:
                msg = _stored(row[0], row[1])
                if msg is None or msg.headers.sender in untaken:
                    continue
                if not await send(row, msg):
                    if not self.rendezvous.connected:
                        return True  # the server is away: no use trying every other sender
                    untaken.add(msg.headers.sender)
            if len(page) < OWED_PAGE:
                return False
            after = (page[-1][-1], page[-1][0])

    async def send_to_sender(self, msg: LocationMessage, kind: str, body: bytes) -> bool:
        """Seal `body` to the sender's trusted device that sent `msg` (to all its trusted
        devices if that one is not pinned) and deposit it; False if it was not sent."""
        sender = msg.headers.sender
        keys = self.contacts.trusted_keys(sender)
        devices = [PublicIdentity(k) for k in keys
                   if PublicIdentity(k).peer_id == msg.headers.sender_peer_id] or \
                  [PublicIdentity(k) for k in keys]
        if not devices:
            log.warning("%s for %s not sent: no trusted key for %s", kind,
                        msg.headers.message_id.hex(), sender)
            return False
        items = [(sender, d.peer_id, blob)
                 for d, blob in seal_for_recipients(self.identity, kind, body, devices)]
        try:
            await self.rendezvous.send(os.urandom(16), items)
        except (RendezvousError, OSError) as exc:
            # The client already retried across reconnects for request_timeout.
            log.warning("%s for %s not sent (tried again later): %s", kind,
                        msg.headers.message_id.hex(), exc)
            return False
        return True


def _stored(entry_id: bytes, raw: bytes) -> LocationMessage | None:
    try:
        return decode_location(raw)
    except DecodeError as exc:  # stored only after it decoded; never expected
        log.warning("inbox %s: stored message unreadable: %s", entry_id.hex(), exc)
        return None


class Delivery:
    """Reads the session's pushes into the inbox, and starts downloads after login.

    Hooks into the transports and the DHT: `on_pipe(message)` feeds a PIPE message to
    WebRTC signalling (False: not signalling), `on_relay(invite)` serves a relayed stream
    another device opened to us, `withdraw(content_id)` stops offering a content whose
    copy retention deleted or archived, `on_finger(address, answer)` hands on the answer
    to each FINGER of a sender (the holder finder would ask the same as its download
    starts), `on_arrived(entry)` tells of each new message once it is filed as it will
    stay: at once, or, for one filed `unverified` whose sender it looks up (a first
    contact, a contact's new device), once that lookup answered or failed (a first
    contact's message has moved on to `offered` by then; told as it was filed, it showed
    `unverified` for the few milliseconds before). Once per message: the lookups asked
    again later and `peerpost contacts accept` are not arrivals. Whether it was told is
    kept in the inbox (`arrival`): a node stopped during that lookup tells nothing then
    (the message was not settled; told `unverified` then, it was never told again) and
    leaves the envelope at the server, whose push at the next login runs the lookup again
    and tells it then; `on_arrived`'s owner marks it told (`Inbox.arrival_told`) once its
    work is done, and `tell_due()` tells again, at start, what a stop cut short. The
    counter `unverified` counts a message once it settled so, not each one filed so
    (nearly every first contact's, which went on to `offered` a moment later).

    A sender whose keys could not be looked up (FINGER failed: its domain's server down,
    the link between the servers cut, our own server away) is looked up again with
    `lookup_backoff` until an answer comes (`lookups()`), so that its held messages go
    on as soon as its domain answers, not only when it sends again.

    An envelope the inbox could not store (node.db's disk full) is not acknowledged: it
    stays at the server, and `unstored()` asks for it again with `lookup_backoff` until
    it is stored (at the next login the server pushes it again anyway).

    An envelope that waits for a lookup of its sender (a pinned key's trust older than
    KEYS_FRESH), or for an earlier envelope of its sender that does, is set aside and
    judged once that lookup answers or fails; the push loop goes on taking the others. A
    contact's slow or unreachable server (FINGER waits up to the link's timeout) held up
    every message behind that contact's, from anyone. Kept from before: an envelope is
    acknowledged only once stored (a crash meanwhile loses nothing: the server pushes it
    again), one sender's envelopes are filed in the order taken, none is believed on a
    stale key before a lookup of its sender ran, at most one lookup per sender runs at a
    time (a second envelope waits for the one running) and MAX_LOOKUPS in all. The lookup
    a key not trusted yet asks for runs beside the push loop the same way.
    """

    def __init__(self, rendezvous: RendezvousClient, incoming: IncomingMail, outbox: Outbox,
                 store: ContentStore, prefs: Prefs, downloads: DownloadQueue, *,
                 archive: Path, on_pipe: Callable[[PipeMessage], bool],
                 on_relay: Callable[[RelayInvite], None],
                 withdraw: Callable[[bytes], Awaitable[None]],
                 lookup_backoff: Backoff = LOOKUP_BACKOFF,
                 rng: random.Random | None = None,
                 on_finger: Callable[[str, FingerResult], object] | None = None,
                 on_arrived: Callable[[InboxEntry], None] | None = None) -> None:
        self.rendezvous = rendezvous
        self.incoming = incoming
        self.outbox = outbox
        self.store = store
        self.prefs = prefs
        self.downloads = downloads
        self.archive = archive
        self.on_pipe = on_pipe
        self.on_relay = on_relay
        self.withdraw = withdraw
        self.on_finger = on_finger
        self.on_arrived = on_arrived
        self._handled: set[bytes] = set()
        self._login_pending: set[bytes] | None = None
        self._login_read = asyncio.Event()
        self.lookup_backoff = lookup_backoff
        self._rng = rng or random.Random()
        self._lookup_failed: set[str] = set()  # senders to look up again
        self._lookup_wake = asyncio.Event()
        self._unstored: set[bytes] = set()  # envelopes left at the server, asked again
        self._unstored_wake = asyncio.Event()
        # Per sender, the last envelope set aside and not judged yet: the next one of that
        # sender waits for it (`_in_turn`), so both are filed in the order taken.
        self._turns: dict[str, asyncio.Future[None]] = {}
        self._set_aside = 0
        self._looking: dict[str, asyncio.Future[None]] = {}  # the lookup running per sender
        self._lookup_slots = asyncio.Semaphore(MAX_LOOKUPS)

    @property
    def waiting(self) -> int:
        """Envelopes taken and not judged yet: they wait for a lookup of their sender, or
        behind an earlier envelope of their sender that does."""
        return self._set_aside

    async def downloads_after_login(self) -> None:
        """Start the download queue once the mailbox that was waiting at login is read.

        At login the server pushes queued envelopes one by one; choosing what to fetch
        before all of them are in would start an ordinary message ahead of a priority
        one further down the queue. Bounded: a slow flush delays downloads by
        LOGIN_FLUSH_WAIT seconds at most.
        """
        try:
            pending = {e.message_id for e in await self.rendezvous.list()}
        except (RendezvousError, OSError) as exc:
            log.info("LIST at login failed (%s); starting downloads at once", exc)
            pending = set()
        self._login_pending = pending - self._handled
        if self._login_pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOGIN_FLUSH_WAIT):
                    await self._login_read.wait()
        self._login_pending = set()
        await self.downloads.run()

    def _note_handled(self, message_id: bytes) -> None:
        if self._login_pending is None:
            self._handled.add(message_id)  # before LIST answered
            return
        self._login_pending.discard(message_id)
        if not self._login_pending:
            self._login_read.set()

    async def pushes(self) -> None:
        """Handle every push of the session until it ends. An envelope that waits for a
        lookup is judged in a child of this loop (`_take`); when the pushes end, the loop
        waits for those, and a cancel leaves them at the server."""
        async with TaskSet("envelopes set aside", limit=MAX_SET_ASIDE, logger=log) as aside:
            async for push in self.rendezvous.pushes():
                if isinstance(push, RelayInvite):
                    self.on_relay(push)
                    continue
                if isinstance(push, PipeMessage):
                    if not self.on_pipe(push):
                        self.incoming.counters["dropped-pipe"] += 1
                        log.info("dropped a PIPE message from %s that isn't signalling",
                                 push.sender)
                    continue
                await self._take(push.envelope, aside)
                self._note_handled(push.envelope.message_id)
            await aside.wait()

    async def _take(self, env: Envelope, aside: TaskSet | None = None) -> None:
        """Into the inbox, then acknowledged; left at the server if it could not be stored.

        Signed by a pinned key whose trust is older than KEYS_FRESH (RECHECK), it is judged
        on the keys its sender's server lists now, or, if it can't be asked, as before;
        taken while an earlier envelope of its sender waits for that, it waits behind it.
        With `aside` (the push loop's children) such an envelope, and one whose key asks
        for a lookup once filed, is finished in a child and this returns at once; without
        (the retry of envelopes left at the server) it returns once all is done.
        """
        pushed = Pushed(env.message_id, env.sender, env.blob, self.incoming.wall())
        if env.sender not in self._turns:
            outcome, asked = self._judge(pushed, self.incoming.handle)
            if outcome is not Outcome.RECHECK:
                def rest() -> Coroutine[Any, Any, None]:
                    return self._filed(pushed, outcome, lookup=asked)
                if not asked or aside is None or aside.spawn(
                        rest(), name=f"lookup of {env.sender}") is None:
                    await rest()
                return
        previous = self._turns.get(env.sender)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns[env.sender] = turn
        self._set_aside += 1

        def judge() -> Coroutine[Any, Any, None]:
            return self._in_turn(pushed, previous, turn)
        task = None if aside is None else aside.spawn(
            judge(), name=f"envelope from {env.sender}")
        if task is None:
            await judge()
        else:  # cancelled before it ran: the next of its sender still gets its turn
            task.add_done_callback(lambda _: self._turn_over(pushed.sender, turn, previous))

    async def _in_turn(self, pushed: Pushed, previous: asyncio.Future[None] | None,
                       turn: asyncio.Future[None]) -> None:
        """Judge `pushed` once the envelope of its sender taken before it (`previous`) is
        judged, after a lookup of its sender when its key's trust is stale (without
        `previous`, `_take` found that already); then `turn` ends and the next may go."""
        outcome: Outcome | None = Outcome.RECHECK
        asked = False
        try:
            if previous is not None:
                await asyncio.wait({previous})  # which a cancel here does not cancel
                outcome, asked = self._judge(pushed, self.incoming.handle)
            if outcome is Outcome.RECHECK:
                # The lookup of its sender that runs now, or its own: judged on its answer
                # (`handle_looked_up`), never on another's taken for it.
                await self._lookup(pushed.sender)
                outcome, _ = self._judge(pushed, self.incoming.handle_looked_up)
                asked = False  # a retired key's message asks for one: this one just ran
                if outcome is Outcome.RECHECK:  # not expected: left at the server, not lost
                    self._leave(pushed, "not judged after its sender's lookup")
                    return
        finally:
            self._turn_over(pushed.sender, turn, previous)
        await self._filed(pushed, outcome, lookup=asked)

    def _turn_over(self, sender: str, turn: asyncio.Future[None],
                   previous: asyncio.Future[None] | None) -> None:
        """`turn` ends, but not before `previous` (its envelope cancelled while waiting)."""
        if previous is not None and not previous.done():
            previous.add_done_callback(lambda _: self._turn_over(sender, turn, None))
            return
        if turn.done():
            return
        turn.set_result(None)
        self._set_aside -= 1
        if self._turns.get(sender) is turn:
            del self._turns[sender]

    def _judge(self, pushed: Pushed, handle: Callable[[Pushed], tuple[Outcome, object]]
               ) -> tuple[Outcome | None, bool]:
        """`handle`'s outcome (`_handle`), and whether it asked for a lookup of the sender
        (the sender taken from `key_checks`, which no await separates from `handle`)."""
        outcome = self._handle(pushed, handle)
        asked = pushed.sender in self.incoming.key_checks
        self.incoming.key_checks.discard(pushed.sender)
        return outcome, asked

    async def _filed(self, pushed: Pushed, outcome: Outcome | None, *, lookup: bool) -> None:
        """After the inbox took `pushed`: the download woken, its sender looked up if its
        key asked for that (`lookup`), `on_arrived` told (after that lookup), then
        acknowledged."""
        if outcome is None:
            return
        self._unstored.discard(pushed.message_id)
        # The download is woken (a new message; a first contact's once FINGER has
        # listed its key) before the REMOVE: it came first, and its round trip and
        # commit at the server stood between the inbox and the download, and held up
        # the FINGER behind it (the server's store answers in order).
        if outcome is Outcome.NEW:
            self.downloads.wake()
        if lookup:
            # Cancelled (the node stopping), the message is not settled: nothing is told
            # and it is not acknowledged, so the next login takes it again (a duplicate
            # then, whose sender is looked up again) and tells it as it settles then.
            await self._lookup(pushed.sender)
        if outcome in (Outcome.NEW, Outcome.UNVERIFIED, Outcome.DUPLICATE):
            self._settled(pushed.message_id)
        # Acknowledge only after the inbox committed it; a dropped one is removed too,
        # or the server would hand the same garbage back at every login.
        with contextlib.suppress(RendezvousError, OSError):
            await self.rendezvous.remove(pushed.message_id)
        if outcome is Outcome.RECEIPT:
            await self.retention()

    def _settled(self, message_id: bytes) -> None:
        """The message keeps its state now: told once (a duplicate whose arrival was told
        already, or a receipt, is not pending and tells nothing), counted if held."""
        try:
            entry = self.incoming.inbox.settle_arrival(message_id)
        except (sqlite3.Error, OSError) as exc:  # stays pending: told at its next push
            log.warning("arrival of message %s not recorded: %s", message_id.hex(), exc)
            return
        if entry is None:
            return
        if entry.state is InboxState.UNVERIFIED:
            self.incoming.counters["unverified"] += 1
        self._tell(entry)

    def _tell(self, entry: InboxEntry) -> None:
        if self.on_arrived is not None:
            self.on_arrived(entry)
            return
        try:
            self.incoming.inbox.arrival_told(entry.id)
        except (sqlite3.Error, OSError) as exc:
            log.warning("arrival of message %s not recorded: %s", entry.id.hex(), exc)

    def tell_due(self) -> None:
        """Tell (`on_arrived`) each message settled whose arrival was not told to the end:
        the node stopped before its command ran or finished. Call once, at start. One
        filed and not held, whose settling the stop cut short, is settled now; a held one
        is settled by the lookup `lookups()` runs at start, or its envelope's next push."""
        try:
            due = self.incoming.inbox.arrivals_due()
            pending = self.incoming.inbox.pending_arrivals()
        except (sqlite3.Error, OSError) as exc:
            log.warning("arrivals not told at the last stop not read: %s", exc)
            return
        for entry in due:
            self._tell(entry)
        for entry in pending:
            if entry.state is not InboxState.UNVERIFIED:
                self._settled(entry.id)

    def _handle(self, pushed: Pushed, handle: Callable[[Pushed], tuple[Outcome, object]]
                ) -> Outcome | None:
        """The inbox's outcome (`handle`'s), or None if node.db could not store it (it
        stays at the server and is asked for again)."""
        try:
            outcome, _ = handle(pushed)
        except (sqlite3.Error, OSError) as exc:
            self._leave(pushed, exc)
            return None
        return outcome

    def _leave(self, pushed: Pushed, why: object) -> None:
        """Not acknowledged: it stays at the server and `unstored()` asks for it again."""
        if pushed.message_id not in self._unstored:
            log.error("message %s from %s not stored (%s): it stays at the server and is "
                      "taken again in a while", pushed.message_id.hex(), pushed.sender, why)
        self._unstored.add(pushed.message_id)
        self._unstored_wake.set()

    async def unstored(self) -> None:
        """Ask the server again, with backoff, for the envelopes the inbox could not
        store, until each is stored or gone. Runs until cancelled."""
        await self._again(self._unstored, self._unstored_wake, self._ask_again)

    async def _ask_again(self, mid: bytes) -> None:
        try:
            env = await self.rendezvous.retrieve(mid)
        except NotFoundError:  # taken meanwhile (pushed again at a login)
            self._unstored.discard(mid)
            return
        except (RendezvousError, OSError) as exc:
            log.info("asking again for message %s failed: %s", mid.hex(), exc)
            return
        await self._take(env)
        if mid not in self._unstored:
            log.info("message %s stored now", mid.hex())

    async def _again(self, pending: set[_Item], wake: asyncio.Event,
                     each: Callable[[_Item], Awaitable[None]]) -> None:
        """`each(item)` for every item of `pending`, after `lookup_backoff` (growing while
        items stay), until `pending` is empty; then wait for `wake`. Runs until cancelled."""
        attempt = 0
        while True:
            # `each` asks the server, and a request made while the session reconnects
            # waits under asyncio.wait_for, which hands back the reconnect instead of the
            # node's cancel when both land in one loop iteration: the loop went on for ever.
            raise_if_cancelled()
            if not pending:
                attempt = 0
                wake.clear()
                await wake.wait()
                continue
            attempt += 1
            await asyncio.sleep(self.lookup_backoff.delay(attempt, self._rng))
            for item in sorted(pending):
                await each(item)

    async def _lookup(self, sender: str) -> None:
        """Look `sender` up (`_recheck`), or wait for its lookup that runs now: one per
        sender at a time, MAX_LOOKUPS in all. No await lies between the answer applied
        (`recheck_keys`) and this lookup's end, so an envelope filed before it ended had
        its signing key among those the answer was judged with."""
        while (running := self._looking.get(sender)) is not None:
            await asyncio.wait({running})
            if not running.cancelled():
                return
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._looking[sender] = mine
        try:
            async with self._lookup_slots:
                await self._recheck(sender)
            mine.set_result(None)
        finally:
            del self._looking[sender]
            mine.cancel()  # cancelled, or failed: whoever waits for it looks up on its own

    async def lookup_ended(self, sender: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once no lookup of `sender` is under way (at once if none is), or after
        `timeout` seconds. A lookup's answer is applied before it ends (`_lookup`): a
        first contact's message it let through is `offered` in the inbox by then. That
        lookup is under way from the loop step after its message is filed, before any
        request that saw the message in the inbox can be read."""
        if (running := self._looking.get(sender)) is None:
            return
        log.info("waiting up to %.0f s for the lookup of %s under way", timeout, sender)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while running is not None:
                    await asyncio.wait({running})  # which a cancel here does not cancel
                    running = self._looking.get(sender)

    async def _recheck(self, sender: str) -> None:
        devices: tuple[DeviceInfo, ...] | None = None
        try:
            info = await self.rendezvous.finger(sender)
        except (RendezvousError, OSError) as exc:  # can't check: held, and asked again
            log.info("FINGER %s failed: %s", sender, exc)
            self._lookup_failed.add(sender)
            self._lookup_wake.set()
        else:
            devices = info.devices
            self._lookup_failed.discard(sender)
            if self.on_finger is not None:
                self.on_finger(sender, info)  # what the download about to start asks
        vouches = {d.verify_key: d.vouch for d in devices or () if d.vouch is not None}
        try:
            retired = self.incoming.contacts.retired
            offered = self.incoming.recheck_keys(
                sender, None if devices is None else [d.verify_key for d in devices],
                vouches)
        except RecordLimitError as exc:
            # The contacts full (a sender no longer among them): a later look-up would
            # find the same. It raised out of the loop and ended the node. (More devices
            # listed than a contact holds is applied as far as it fits: see contacts.)
            log.warning("the keys of %s not checked: %s", sender, exc)
            return
        except (sqlite3.Error, OSError) as exc:
            # node.db refused the update (its disk full, say): looked up again later. It
            # raised out of the push loop, or the retry loop, and so ended the node.
            log.warning("the keys of %s not checked (looked up again later): %s",
                        sender, exc)
            self._lookup_failed.add(sender)
            self._lookup_wake.set()
            return
        if offered:
            self.downloads.wake()
        if self.incoming.contacts.retired != retired:
            # A device retired (revoked or removed) is not waited for by the sender's
            # retention any more (`Outbox.pending_retention`): a copy only it held can go.
            await self.retention()

    async def lookups(self) -> None:
        """Look up again, with backoff, the senders whose lookup failed, until each gets
        an answer. At start every sender with a held message is looked up once (why it
        is held is not stored). Runs until cancelled."""
        held = await asyncio.to_thread(self.incoming.inbox.unverified_senders)
        self._lookup_failed.update(held)
        await self._again(self._lookup_failed, self._lookup_wake, self._look_again)

    async def _look_again(self, sender: str) -> None:
        """`_lookup`, then the sender's messages whose arrival waited for a lookup are
        settled: also one whose envelope the server no longer pushes (expired there while
        the node was stopped), which would wait for ever otherwise."""
        await self._lookup(sender)
        try:
            pending = self.incoming.inbox.pending_arrivals(sender)
        except (sqlite3.Error, OSError) as exc:
            log.warning("arrivals from %s not read: %s", sender, exc)
            return
        for entry in pending:
            self._settled(entry.id)

    async def retention(self) -> None:
        """Apply the retention preference to every message all recipients now hold (or
        declined); a content the node no longer holds is no longer announced."""
        try:
            done = await asyncio.to_thread(apply_retention, self.outbox, self.store,
                                           self.prefs, self.archive, self.incoming.inbox)
            for entry, _ in done:
                # Deleted, archived, or released (a folder's map, a file nobody wanted).
                if await asyncio.to_thread(self.store.local, entry.content_id) is None:
                    await self.withdraw(entry.content_id)
        except (OSError, sqlite3.Error) as exc:
            # A full or read-only disk (the archive's, or node.db's) must not stop the
            # node: node.db's error raised out of the push loop and ended it.
            log.warning("retention step failed (it is retried at the next receipt or "
                        "start): %s", exc)
