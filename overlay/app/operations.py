"""The operations the control socket serves: what `peerpost send/inbox/fetch/...` can ask.

`ControlOperations.table()` is the explicit name -> handler table `ControlServer` looks
requests up in. Each handler reads its arguments through `Fields` (bounded, typed) and
answers with plain msgpack-able values; a refusal is a `ControlError` whose text the CLI
prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from crypto.codec import Fields
from crypto.content import DEFAULT_CHUNK_SIZE, chunk_count
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.limits import MAX_NOTE, MAX_SEND_TO, MAX_TITLE
from crypto.location import FOLDER_MEDIA_TYPE, decode_location, folder_from_fields
from overlay.app.control import ControlError, Operation
from overlay.app.control_wire import shown_id
from overlay.content.archive import ArchiveView
from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.mail.contacts import Contact, Contacts
from overlay.mail.db import LIST_LIMIT
from overlay.mail.downloads import DownloadQueue
from overlay.mail.folders import (
    UnpackRecord,
    delete_received,
    is_own_archive,
    release_archives,
)
from overlay.mail.inbox import Decline, Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.incoming import IncomingMail
from overlay.mail.outbox import (
    SETTLED,
    WITHDRAWN_REASON,
    Outbox,
    OutboxEntry,
    RecipientStatus,
    devices_to_fetch_text,
    forwarding_text,
)
from overlay.mail.outgoing import MailSender, SendError
from overlay.mail.prefs import RETENTIONS, Prefs, parse_rate, parse_size, unknown_pref
from overlay.mail.receipts import REMOVED_REASON
from overlay.transfer.downloader import WITHDRAWN_FAILURE
from overlay.transfer.server import TransferServer
from rendezvous.client import RendezvousClient, RendezvousError, ServerIdentityError
from rendezvous.cliutil import package_version
from rendezvous.domainkey import fingerprint

log = logging.getLogger("peerpost.node")
CANCELLED_TEXT = "cancelled; fetch it to go on (the chunks already here are kept)"
# The longest a `progress` call waits for a change; `fetch --wait` asks for 200 ms, so
# its bar still moves about five times a second.
MAX_PROGRESS_WAIT_MS = 1000
_ENDED = (InboxState.COMPLETE, InboxState.FAILED)
# A recipient in these may still download from this node, at this domain or another (its
# mail queued at our server or delivered to theirs): the sender's computer must stay on.
OWED = (RecipientStatus.SENT, RecipientStatus.DOWNLOADING)
SEND_RECONNECT_WAIT = 2.0  # seconds a send waits for a session that is being re-established
OFFLINE_TEXT = ("the node is offline: the server is unreachable; nothing was sent; try again "
                "when `peerpost info` shows connected")


def key_mismatch_text(server: str, error: ServerIdentityError) -> str:
    """What the user reads while the node's server does not prove the pinned key: where,
    and both fingerprints."""
    pinned = fingerprint(error.expected) if error.expected is not None else "none"
    shown = fingerprint(error.seen) if error.seen is not None else "none"
    if error.seen is not None and error.expected in (None, error.seen):
        return (f"the server at {server} shows the key {shown} but does not prove it over "
                "this connection (a proxy terminating TLS in between?)")
    return (f"the server at {server} presented another key than the one pinned for it "
            f"(pinned {pinned}, presented {shown})")


def mismatch_state(rendezvous: RendezvousClient) -> dict[str, Any] | None:
    """The session's key mismatch for `ping` (JSON), or None while there is none."""
    m = rendezvous.mismatch
    if m is None:
        return None
    return {"server": m.server, "text": key_mismatch_text(m.server, m.error),
            "pinned": fingerprint(m.expected) if m.expected is not None else None,
            "presented": fingerprint(m.seen) if m.seen is not None else None,
            "next_try_in": max(0.0, m.retry_at - asyncio.get_running_loop().time())}


class ControlOperations:
    """The control handlers of one node, over the parts of it they read and change."""

    def __init__(self, identity: DeviceIdentity, address: str, *,
                 listen_addr: tuple[str, int] | None, rendezvous: RendezvousClient,
                 incoming: IncomingMail, sender: MailSender, inbox: Inbox, outbox: Outbox,
                 prefs: Prefs, contacts: Contacts, downloads: DownloadQueue,
                 transfer: TransferServer, max_in_flight: int,
                 store: ContentStore | None = None,
                 withdraw: Callable[[bytes], Awaitable[None]] | None = None,
                 reach: Callable[[], dict[str, Any]] | None = None,
                 received: Path | None = None,
                 hook_counters: Mapping[str, int] | None = None,
                 retention: Callable[[], Awaitable[None]] | None = None,
                 lookup_ended: Callable[[str, float], Awaitable[None]] | None = None) -> None:
        self.identity = identity
        self.address = address
        self.listen_addr = listen_addr
        self.rendezvous = rendezvous
        self.incoming = incoming
        self.sender = sender
        self.inbox = inbox
        self.outbox = outbox
        self.prefs = prefs
        self.contacts = contacts
        self.downloads = downloads
        self.transfer = transfer
        self.max_in_flight = max_in_flight
        self.store = store
        self.withdraw_announcement = withdraw  # the DHT's provider record of a content
        # The sender's retention pass: run after a send whose lookup of an address retired
        # a device (`Contacts.retired`) an earlier message may still have waited for.
        self.retention = retention
        # Returns once no lookup of a sender's keys is under way (`Delivery.lookup_ended`).
        self.lookup_ended = lookup_ended
        self.reach = reach  # NAT, the address the server sees, the rungs we dial over
        self.received = received  # the download folder
        # `--on-message`'s runs: ran, failed, timed-out, deferred (waited in node.db)
        self.hook_counters = hook_counters if hook_counters is not None else {}
        self.version = package_version()

    def table(self) -> dict[str, Operation]:
        return {
            "ping": self.ping,
            "send": self.send,
            "inbox": self.inbox_list,
            "fetch": self.fetch,
            "cancel": self.cancel,
            "progress": self.progress,
            "status": self.status,
            "prefs": self.prefs_get,
            "prefs_set": self.prefs_set,
            "prefs_list": self.prefs_list,
            "contacts": self.contacts_list,
            "contacts_accept": self.contacts_accept,
            "rm": self.rm,
            "withdraw": self.withdraw,
            "resend": self.resend,
            "prune": self.prune,
        }

    async def ping(self, a: Fields) -> Any:
        # `version`: what a newer CLI names when this node lacks something it asks for.
        return {"address": self.address, "version": self.version,
                "peer_id": self.identity.peer_id.hex(),
                "fingerprint": self.identity.public.fingerprint(),
                "listen": list(self.listen_addr or ()),
                "connected": self.rendezvous.connected,
                "refused": self.rendezvous.refused,
                "mismatch": mismatch_state(self.rendezvous),
                "counters": {**self.incoming.counters, **{
                    f"on-message {k}": v for k, v in self.hook_counters.items()}},
                "inbox": self.inbox_state(),
                "outbox": {"messages": self.outbox.count(), "listed": LIST_LIMIT},
                **({"reach": self.reach()} if self.reach is not None else {})}

    def inbox_state(self) -> dict[str, Any]:
        n, limit = self.inbox.count(), self.inbox.max_entries
        return {"messages": n, "max": limit, "full": n >= limit,
                "junk": self.inbox.count(junk_only=True),
                "refused": self.incoming.counters["refused-inbox-full"],
                "listed": LIST_LIMIT}  # the most `inbox` lists: the newest

    async def send(self, a: Fields) -> Any:
        """Send now or not at all: the recipients' device keys come from the server
        (FINGER), so an offline node has nothing to seal to and keeps no queue."""
        to = a.list("to", _item_text, max_items=MAX_SEND_TO) or ()
        if not self.rendezvous.connected:
            # The server restarted, or the node fails over to the domain's next server: try
            # at once (not when the backoff says), and wait for that rather than fail.
            self.rendezvous.retry_now()
            try:
                await self.rendezvous.wait_connected(SEND_RECONNECT_WAIT)
            except RendezvousError:
                if (refused := self.rendezvous.refused) is not None:
                    raise ControlError(f"the server refused this node's login ({refused}); "
                                       "nothing was sent") from None
                if (m := self.rendezvous.mismatch) is not None:
                    why = key_mismatch_text(m.server, m.error)
                    raise ControlError(f"the node is offline: {why}; nothing was sent") from None
                raise ControlError(OFFLINE_TEXT) from None
        folder = folder_from_fields(a.map("folder", optional=True))
        retired = self.contacts.retired
        try:
            mid = await self.sender.send(Path(a.str("path", max_len=4096)), list(to),
                                         a.str("title", max_len=MAX_TITLE),
                                         a.str("note", max_len=MAX_NOTE), folder)
        except SendError as exc:
            if not self.rendezvous.connected:  # the server went away during the send
                raise ControlError(f"{OFFLINE_TEXT} ({exc})") from None
            raise ControlError(str(exc)) from None
        if self.retention is not None and self.contacts.retired != retired:
            await self.retention()
        return {"id": mid.hex()}

    def entry_json(self, e: InboxEntry) -> dict[str, Any]:
        act = self.downloads.active.get(e.id)
        state, next_attempt, error = e.state.value, e.next_attempt, e.error
        if (held := self.downloads.held_off(e.id)) is not None:  # node.db took no state
            state, (next_attempt, error) = InboxState.RETRYING.value, held
        return {
            "id": e.id.hex(), "from": e.sender, "title": e.title, "note": e.note,
            "size": e.size, "file_name": e.file_name, "media_type": e.media_type,
            "state": state, "progress": round(e.progress, 4), "path": e.path,
            "junk": e.junk, "priority": e.priority, "received_at": e.received_at,
            "next_attempt": next_attempt, "attempts": e.attempts, "error": error,
            "started_at": e.started_at, "first_byte_at": e.first_byte_at,
            "completed_at": e.completed_at,
            "queued": self._waits_its_turn(e, state),
            "sources": [s.as_dict() for s in act.sources.values()] if act else [],
            "folder": folder_json(e),
        }

    def _waits_its_turn(self, e: InboxEntry, state: str) -> bool:
        """Its download starts by itself once another one ends: one downloading whose turn
        has not come (fetched, or paused for a priority sender's), or one still `offered`
        that the preferences fetch without a `fetch` (auto-download, at most
        auto-download-max), which the downloader moves on only when it starts it. An
        `offered` one they do not fetch waits for the user."""
        if state == InboxState.DOWNLOADING.value:
            return not self.downloads.running(e.id)
        if state != InboxState.OFFERED.value or e.junk or not self.prefs.auto_download:
            return False
        most = self.prefs.auto_download_max
        return most is None or e.size <= most

    async def inbox_list(self, a: Fields) -> Any:
        include_junk = bool(a.bool("include_junk", optional=True))
        return [self.entry_json(e) for e in self.inbox.list(include_junk=include_junk)]

    async def rm(self, a: Fields) -> Any:
        """Remove one message from the inbox; its partial download always goes, the
        received file only with `delete_file`."""
        e = self.find(a.str("id", min_len=1, max_len=32))
        removed = await self._remove(e, delete_file=bool(a.bool("delete_file", optional=True)))
        return {"removed": [removed], "inbox": self.inbox_state()}

    async def prune(self, a: Fields) -> Any:
        """Remove complete and failed messages received more than `days` ago (and every
        junk sender's message with `junk`); files stay unless `delete_file`."""
        days = a.int("days", lo=0, hi=100_000)
        junk = bool(a.bool("junk", optional=True))
        delete_file = bool(a.bool("delete_file", optional=True))
        now = self.downloads.wall()
        gone = [await self._remove(e, delete_file=delete_file)
                for e in self.inbox.prunable(before=now - days * 86400, junk=junk)]
        return {"removed": gone, "inbox": self.inbox_state()}

    async def _remove(self, e: InboxEntry, *, delete_file: bool) -> dict[str, Any]:
        # Not downloaded: its sender is told (unless junk or unverified, see Inbox.remove);
        # a download that failed for good may have queued that earlier, with its reason.
        # A message its sender withdrew (`cancel`) goes without a word: the sender knows,
        # and shows the recipient cancelled whatever it is told.
        earlier = self.declined_json(e.id)
        withdrawn = e.state is InboxState.FAILED and e.error == WITHDRAWN_FAILURE
        await self.downloads.cancel(e.id, remove=True, decline=None if withdrawn else
                                    Decline(REMOVED_REASON, self.downloads.wall()))
        # A message fetched after all (Try again) keeps its old decline: its `downloaded`
        # receipt was the last word, not that.
        told = (e.sender if e.state is not InboxState.COMPLETE
                and self.inbox.declined(e.id) is not None else None)
        deleted = kept = None
        # The same content received twice is one file (or folder): it stays for the other.
        if shared := self.inbox.sharing(e):
            if delete_file and e.path:
                kept = (f"{e.path} is kept: message {shared[0].id.hex()[:12]} "
                        f"({shared[0].title}) uses it too")
            return {"id": e.id.hex(), "title": e.title, "deleted_file": None,
                    "kept_file": kept, "sender_told": told, "told_earlier": earlier}
        sent_too = self.outbox.newest_of(e.content_id)
        folder = folder_json(e) is not None
        # Mail to oneself: the inbox's path is the file or folder this node sent, except a
        # copy it unpacked into the download folder (of several paths sent together, or of
        # a folder gone by then).
        copy = (sent_too is not None and bool(e.path) and folder
                and await asyncio.to_thread(self._sent_copy, e))
        if sent_too is not None and e.path and not copy and delete_file:
            kept = (f"{e.path} is kept: it is the {'folder' if folder else 'file'} you sent "
                    f"as message {sent_too.id.hex()[:12]}")
        if self.store is not None and sent_too is None:
            held = self.store.local(e.content_id)
            try:
                self.store.remove(e.content_id, delete_file=delete_file)
            except ContentStoreError:
                pass  # nothing was fetched yet
            else:
                deleted = (str(held.path) if held is not None and delete_file
                           and not isinstance(held, ArchiveView) else None)
        if (delete_file and deleted is None and e.path and e.state is InboxState.COMPLETE
                and folder and (sent_too is None or copy)):
            # An unpacked folder: the store leaves it.
            if await asyncio.to_thread(delete_received, Path(e.path)):
                deleted = e.path
        if sent_too is not None and folder:
            # Mailed to oneself: the copy's record, and the map kept for the address's
            # other devices, go now.
            if self.received is not None:
                await asyncio.to_thread(UnpackRecord(self.received, e.content_id).forget_copy)
            if self.store is not None:
                await asyncio.to_thread(release_archives, self.outbox, self.store,
                                        self.inbox.holds)
        if self.store is not None and await asyncio.to_thread(self.store.lookup,
                                                              e.content_id) is None:
            await self._unannounce(e.content_id)  # forgotten, or a map released
        return {"id": e.id.hex(), "title": e.title, "deleted_file": deleted,
                "kept_file": kept, "sender_told": told, "told_earlier": earlier}

    def _sent_copy(self, e: InboxEntry) -> bool:
        """Of a folder this node sent to its own address, whether `e`'s path is a copy it
        unpacked rather than the folder sent: by the sent map's `source` while the map is
        held, else by the copy the unpack recorded. A copy unpacked before copies were
        recorded is taken for the user's folder and kept. Blocking."""
        here = os.path.realpath(e.path or "")
        held = self.store.local(e.content_id) if self.store is not None else None
        if isinstance(held, ArchiveView) and held.sent:
            return held.layout.source is None or os.path.realpath(held.layout.source) != here
        copy = None if self.received is None else UnpackRecord(
            self.received, e.content_id).copy()
        return copy is not None and os.path.realpath(copy) == here

    def find(self, prefix: str) -> InboxEntry:
        """The one inbox entry whose id starts with `prefix` (hex), or ControlError."""
        matches, found = self.inbox.with_id_prefix(prefix, limit=1)
        if not found:
            # `send` printed it, so it is the id at hand: `fetch` it on the sending node. At
            # most 12 of its digits (still a prefix of the one sent) keep it to 80 columns.
            if self.outbox.with_id_prefix(prefix, limit=1)[1]:
                raise ControlError(f"{prefix[:12]} is a message you sent (`peerpost status` "
                                   "shows who has it)")
            raise ControlError(f"no message {shown_id(prefix)} in the inbox (`peerpost inbox` "
                               "lists them)")
        if found > 1:
            raise ControlError(f"{shown_id(prefix)} matches {found} messages; give more "
                               "digits")
        return matches[0]

    async def fetch(self, a: Fields) -> Any:
        """Start (or resume) the download of a message. A first contact's message is
        filed `unverified` while its sender is looked up (one FINGER, milliseconds); a
        fetch in that moment waits for the lookup (at most the client's request timeout,
        within which a FINGER answers or fails) and goes on if it let the message through.
        One whose sender is not being looked up is refused at once."""
        e = self.find(a.str("id", min_len=1, max_len=32))
        if e.state is InboxState.UNVERIFIED and self.lookup_ended is not None:
            await self.lookup_ended(e.sender, self.rendezvous.request_timeout)
            e = self.find(e.id.hex())  # removed meanwhile: "no message ..."
        if e.state is InboxState.UNVERIFIED:
            raise ControlError(
                f"{e.id.hex()[:12]} is signed by a device key of {e.sender} that you do not "
                f"trust yet; compare fingerprints (`peerpost contacts`), then "
                f"`peerpost contacts accept {e.sender}`")
        self.inbox.take_back_decline(e.id)  # not sent yet: the sender need not know
        self.downloads.request(e.id)
        fresh = self.inbox.get(e.id)
        return {**self.entry_json(fresh or e), "declined": self.declined_json(e.id)}

    def declined_json(self, mid: bytes) -> dict[str, Any] | None:
        """This node's declined receipt for an inbox message: its reason, and whether the
        sender has it (`sent`: then the sender may have stopped serving the message, if
        every recipient declined it); None if it declined nothing."""
        told = self.inbox.declined(mid)
        return None if told is None else {"reason": told[0], "sent": told[1] is not None}

    async def cancel(self, a: Fields) -> Any:
        """Stop a running or waiting download. The message goes to `failed` (the state a
        user's cancel takes: `offered` would be picked up again at once by auto-download)
        with a note that `fetch` resumes it; the verified chunks stay on disk."""
        e = self.find(a.str("id", min_len=1, max_len=32))
        if e.state not in (InboxState.DOWNLOADING, InboxState.RETRYING):
            raise ControlError(f"{e.id.hex()[:12]} is {e.state.value}, not downloading")
        # Failed first, so the queue does not start it again when the task ends.
        self.inbox.transition(e.id, InboxState.FAILED, error=CANCELLED_TEXT)
        await self.downloads.cancel(e.id)
        fresh = self.inbox.get(e.id)
        return self.entry_json(fresh or e)

    async def progress(self, a: Fields) -> Any:
        """The entry as `inbox` shows it. With `wait_ms` (at most MAX_PROGRESS_WAIT_MS) and
        a download not yet complete or failed, the answer waits until its state or
        progress changes, or that long: `fetch --wait` returns the moment the download
        ends instead of up to a poll later. Without it, the answer comes at once."""
        e = self.find(a.str("id", min_len=1, max_len=32))
        wait_ms = a.int("wait_ms", lo=0, hi=MAX_PROGRESS_WAIT_MS, optional=True) or 0
        if wait_ms and e.state not in _ENDED:
            e = await self._changed(e, wait_ms / 1000)
        return self.entry_json(e)

    async def _changed(self, e: InboxEntry, wait: float) -> InboxEntry:
        """`e` as stored once its state or progress differs from now, or after `wait`
        seconds; woken by the download queue's change event, never by polling."""
        seen = (e.state, e.chunks_held)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while True:
                    await self.downloads.changed().wait()
                    fresh = self.inbox.get(e.id)
                    if fresh is None:  # removed meanwhile: the next call says so
                        break
                    e = fresh
                    if (e.state, e.chunks_held) != seen:
                        break
        return e

    async def status(self, a: Fields) -> Any:
        want = a.str("id", max_len=32, optional=True)
        out = []
        sent = self.outbox.with_id_prefix(want, limit=LIST_LIMIT)[0] if want else self.outbox.list()
        # Of the ones someone downloaded, which devices sealed to may still fetch it here.
        owed = self.outbox.devices_owed([m.id for m in sent if any(
            r.state is RecipientStatus.DOWNLOADED for r in m.recipients)])
        for m in sent:
            forwarding = await self._forwarding(m)
            shown = {a: text for a, (_, text) in forwarding.items()}
            bounced = {a for a, (state, _) in forwarding.items() if state == "bounced"}
            served = self.transfer.chunks_served(m.content_id)
            try:
                chunk_size = decode_location(m.message).handle.chunk_size
            except DecodeError:
                chunk_size = DEFAULT_CHUNK_SIZE  # a row from before messages were kept
            changed = self.source_changed(m)
            # Who may still fetch it from here: an address not there yet, or one whose
            # first device has it while another it was sealed to has not (none can once
            # the file changed).
            sealed = {} if changed else owed.get(m.id, {})
            devices = {r.address: sealed[r.address] for r in m.recipients
                       if r.state is RecipientStatus.DOWNLOADED and r.address in sealed}
            waiting = {r.address for r in m.recipients if r.state in OWED} | devices.keys()
            for addr, n in devices.items():
                shown[addr] = f"downloaded ({devices_to_fetch_text(n)})"
            for addr, pending in self._pending(m).items():
                if not pending:
                    shown[addr] = "cancelled"
                elif changed:
                    shown[addr] = "source changed"
            for r in m.recipients:
                if r.state is RecipientStatus.DECLINED:
                    shown[r.address] = f"declined ({r.reason})"
            # A folder's map is the node's, deleted whatever the preference once nobody
            # needs it; the user's files stay: "map", not the "delete" recorded for it.
            folder = self.store is not None and is_own_archive(self.store.root, m.path)
            done = m.retention_action if m.retention_done else None
            out.append({
                "source_changed": changed, "folder": folder,
                "id": m.id.hex(), "title": m.title, "size": m.size, "path": m.path,
                "content_id": m.content_id.hex(), "created_at": m.created_at,
                "chunk_count": chunk_count(m.size, chunk_size),
                "chunks_served": served, "max_in_flight": self.max_in_flight,
                "retention_done": "map" if folder and done else done,
                "recipients": [{"address": r.address, "state": r.state.value,
                                "updated_at": r.updated_at, "reason": r.reason,
                                "shown": shown.get(r.address, r.state.value),
                                "devices_owed": devices.get(r.address, 0),
                                "owed": (r.address in waiting and not changed
                                         and r.address not in bounced)}
                               for r in m.recipients],
            })
        return out

    def source_changed(self, m: OutboxEntry) -> str | None:
        """Why the sent file can't be served any more (edited, moved, deleted), or None.
        After retention moved or deleted it on purpose, nothing is owed: None."""
        if self.store is None or m.retention_done:
            return None
        content = self.store.local(m.content_id)
        if content is None or content.changed.withdrawn:
            return None
        return content.source_changed()

    @staticmethod
    def _pending(m: OutboxEntry) -> dict[str, bool]:
        """Recipients that don't have it yet (nor declined it) -> True, cancelled ones ->
        False."""
        out: dict[str, bool] = {}
        for r in m.recipients:
            if r.state is RecipientStatus.FAILED and r.reason == WITHDRAWN_REASON:
                out[r.address] = False
            elif r.state not in (*SETTLED, RecipientStatus.FAILED):
                out[r.address] = True
        return out

    def find_sent(self, prefix: str) -> OutboxEntry:
        """The one sent message whose id starts with `prefix` (hex), or ControlError."""
        matches, found = self.outbox.with_id_prefix(prefix, limit=1)
        if not found:
            raise ControlError(f"no sent message {shown_id(prefix)} (see `peerpost status`)")
        if found > 1:
            raise ControlError(f"{shown_id(prefix)} matches {found} messages; give more "
                               "digits")
        return matches[0]

    async def withdraw(self, a: Fields) -> Any:
        """The sender's cancel: stop serving the content (requesters are told it was
        withdrawn), withdraw its DHT announcement, and mark every recipient that doesn't
        have it yet `failed: cancelled by the sender`. Its envelopes still queued at our
        server (for recipients of this domain, or waiting for another domain) are taken
        back (WITHDRAW); those another domain's server already holds stay there, and
        their download fails with `withdrawn` when fetched."""
        m = self.find_sent(a.str("id", min_len=1, max_len=32))
        taken_back: tuple[int, int] | None = None
        try:
            taken_back = await self.rendezvous.withdraw(m.id)
        except (RendezvousError, OSError) as exc:
            log.warning("cancel %s: the server did not take back the queued envelopes (%s); "
                        "recipients who fetch it are told it was withdrawn", m.id.hex(), exc)
        if self.store is not None:
            content = self.store.local(m.content_id)
            if content is not None:
                content.withdraw()
        await self._unannounce(m.content_id)
        now = self.downloads.wall()
        cancelled = []
        for r in m.recipients:
            if self.outbox.set_recipient_state(m.id, r.address, RecipientStatus.FAILED, now,
                                               reason=WITHDRAWN_REASON):
                cancelled.append(r.address)
        if self.store is not None:  # a folder archive nobody needs now goes
            await asyncio.to_thread(release_archives, self.outbox, self.store)
        return {"id": m.id.hex(), "title": m.title, "cancelled": cancelled,
                "unqueued": sum(taken_back) if taken_back is not None else None}

    async def _unannounce(self, content_id: bytes) -> None:
        """Stop offering `content_id` in the DHT: this node no longer serves it."""
        if self.withdraw_announcement is not None:
            try:
                async with asyncio.timeout(10.0):
                    await self.withdraw_announcement(content_id)
            except (TimeoutError, OSError):
                pass  # the DHT record expires by itself

    def rewithdraw(self) -> None:
        """At start: contents of messages the sender cancelled are not served again."""
        if self.store is None:
            return
        for content_id in self.outbox.withdrawn_contents():
            content = self.store.local(content_id)
            if content is not None:
                content.withdraw()

    async def resend(self, a: Fields) -> Any:
        """Send the file of a sent message again, as it is now, to the same recipients:
        a new message (new id, new content)."""
        m = self.find_sent(a.str("id", min_len=1, max_len=32))
        try:
            desc = decode_location(m.message).description
            note, folder = desc.note, desc.folder
        except DecodeError:
            note, folder = "", None
        to = [r.address for r in m.recipients]
        if (folder is not None and self.store is not None
                and is_own_archive(self.store.root, m.path)
                and not await asyncio.to_thread(os.path.exists, m.path)):
            raise ControlError(f"the map of {folder.name}/ is gone (nobody needed it any "
                               "more): send the folder again with `peerpost send`")
        try:
            mid = await self.sender.send(Path(m.path), to, m.title, note, folder)
        except SendError as exc:
            raise ControlError(str(exc)) from None
        return {"id": mid.hex(), "replaces": m.id.hex(), "to": to}

    async def _forwarding(self, m: OutboxEntry) -> dict[str, tuple[str, str]]:
        """What the server says of foreign recipients it holds or handed on (TRACK),
        for those not yet downloading: its state (queued, delivered, bounced) and
        `forwarding_text`; {} if it can't be asked now."""
        home = self.address.rpartition("@")[2]
        waiting = [r.address for r in m.recipients if r.state is RecipientStatus.SENT
                   and not r.address.endswith("@" + home)]
        if not waiting or not self.rendezvous.connected:
            return {}
        try:
            async with asyncio.timeout(5.0):
                domain, states = await self.rendezvous.track(m.id)
        except (RendezvousError, TimeoutError):
            return {}
        return {t.to: (t.state, forwarding_text(t.state, domain, t.to, t.since, t.error))
                for t in states if t.to in waiting}

    async def prefs_get(self, a: Fields) -> Any:
        return self.prefs.as_dict()

    async def prefs_set(self, a: Fields) -> Any:
        key, value = a.str("key", max_len=64), a.str("value", max_len=4096)
        if (error := unknown_pref(key)) is not None:
            raise ControlError(error)
        key = key.replace("_", "-")  # `prefs --json` names them with underscores
        if key == "auto-download":
            if value not in ("on", "off"):
                raise ControlError("auto-download takes on or off")
            self.prefs.auto_download = value == "on"
        elif key == "retention":
            if value not in RETENTIONS:
                raise ControlError(f"retention is one of {', '.join(RETENTIONS)}")
            self.prefs.retention = value
        elif key == "archive-dir":
            if value not in ("", "none") and not Path(value).is_absolute():
                raise ControlError(f"archive-dir must be an absolute path, not {value!r}")
            self.prefs.archive_dir = None if value in ("", "none") else value
        elif key == "auto-download-max":
            try:
                self.prefs.auto_download_max = parse_size(value)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
        elif key == "max-upload-rate":
            try:
                self.prefs.max_upload_rate = parse_rate(value)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            self.transfer.set_upload_rate(self.prefs.max_upload_rate)  # at once
        self.downloads.wake()
        return self.prefs.as_dict()

    async def prefs_list(self, a: Fields) -> Any:
        which, action = a.str("list", max_len=16), a.str("action", max_len=16)
        pattern = a.str("address", max_len=254)
        if which not in ("priority", "junk"):
            raise ControlError(f"unknown list {which!r}")
        if action == "remove":
            # Off the list named only: `priority remove` of a junk sender took it off the
            # junk list, and its held messages started downloading.
            if not self.prefs.remove_sender(pattern, which):
                other = self.prefs.list_of(pattern)
                if other is not None:
                    raise ControlError(f"{pattern} is on the {other} list, not the {which} "
                                       f"list; nothing changed (`prefs {other} remove` "
                                       "takes it off that one)")
                raise ControlError(f"{pattern} is not in the {which} list")
            # What came while the sender was junk is theirs again: listed, downloadable.
            self.inbox.clear_junk([s for s in self.inbox.junk_senders()
                                   if self.prefs.classify(s) != "junk"])
            self.downloads.wake()
        elif which == "priority":
            self.prefs.add_priority(pattern)
        else:
            self.prefs.add_junk(pattern)
        return self.prefs.as_dict()

    async def contacts_list(self, a: Fields) -> Any:
        return [contact_json(c) for c in self.contacts.list()]

    async def contacts_accept(self, a: Fields) -> Any:
        """The user compared fingerprints: trust the waiting keys of an address, and let
        its held (`unverified`) messages go on to `offered` (downloaded if prefs say so)."""
        addr = a.str("address", max_len=254)
        try:
            self.contacts.accept(addr)
        except KeyError:
            raise ControlError(f"no key of {addr} is waiting to be accepted") from None
        if self.incoming.release(addr):
            self.downloads.wake()
        return await self.contacts_list(a)


def contact_json(c: Contact) -> dict[str, Any]:
    """A contact as `contacts --json` has it. Besides the key lists as node.db keeps them,
    `keys` has every fingerprint once, in the order `contacts` and the web page show them,
    with its `state`: pinned, pending (a key change), unvouched (a new device nobody
    vouched for), listed_again (retired, and its server lists it again: pending or
    unvouched in node.db, but a key the user trusted before) or retired (no longer listed),
    and `retired_at` for the last two. `alerts` is what waits for the user, as both say it:
    key_changed (a pending key, not one listed again: the contacts module flags `changed`
    exactly when a key is pending, so `changed` adds nothing), unvouched, listed_again."""
    retired = dict(zip(c.retired_fingerprints, c.retired_at, strict=True))
    fingerprints = [PublicIdentity(k).fingerprint() for k in c.keys]
    pending = [f for f in c.pending_fingerprints if f not in retired]
    unvouched = [f for f in c.unvouched_fingerprints if f not in retired]
    back = [f for f in (*c.pending_fingerprints, *c.unvouched_fingerprints) if f in retired]
    keys = [{"fingerprint": f, "state": state, "retired_at": retired.get(f)}
            for state, fps in (("pinned", fingerprints), ("pending", pending),
                               ("unvouched", unvouched), ("listed_again", back),
                               ("retired", [f for f in retired if f not in back]))
            for f in fps]
    alerts = [name for name, due in (("key_changed", pending), ("unvouched", unvouched),
                                     ("listed_again", back)) if due]
    return {"address": c.address, "fingerprints": fingerprints,
            "first_seen": c.first_seen, "changed": c.changed,
            "pending": list(c.pending_fingerprints),
            "unvouched": list(c.unvouched_fingerprints),
            "retired": [{"fingerprint": f, "retired_at": at} for f, at in retired.items()],
            "keys_confirmed_at": c.keys_confirmed_at, "keys": keys, "alerts": alerts}


def folder_json(e: InboxEntry) -> dict[str, Any] | None:
    """A folder archive's name and counts for `inbox --json` (its `path` is the unpacked
    folder once complete); None for a single file."""
    if e.media_type != FOLDER_MEDIA_TYPE:
        return None
    try:
        folder = decode_location(e.message).description.folder
    except DecodeError:
        return None
    return None if folder is None else dataclasses.asdict(folder)


def _item_text(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) > 254:
        raise ControlError(f"{what}: expected an address")
    return v
