"""Sending: resolve recipients, describe the file, build, sign, seal and deposit the message.

`peerpost send FILE --to ADDRS` ends up here. Every check that can fail (the file, each
address, each pinned key) runs before anything is deposited, so a refused send leaves
nothing half-sent: no server copy, no outbox row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.address import domain_of, normalize_address
from crypto.content import LeafScheme
from crypto.envelope import seal_for_recipients
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.limits import MAX_TITLE
from crypto.location import (
    FOLDER_MEDIA_TYPE,
    Description,
    FolderInfo,
    Handle,
    Headers,
    LocationMessage,
    SenderHints,
)
from overlay.content.archive import MAP_SUFFIX
from overlay.content.catalog import ContentStore
from overlay.content.diskio import safe_file_name
from overlay.content.interfaces import ContentStoreError
from overlay.mail.contacts import MAX_KEYS_PER_ADDRESS, Contacts, PinResult, more_than_held
from overlay.mail.describe import describe_media, make_thumbnail, named_as_media
from overlay.mail.folders import (
    TAR_SUFFIX,
    FolderError,
    check_sent_folder,
    discard_unsent,
    is_own_archive,
    sweep_orphans,
)
from overlay.mail.outbox import NOT_SENT, Outbox, RecipientStatus
from rendezvous.client import RendezvousClient, RendezvousError
from rendezvous.errors import ConnectionLostError, RequestTimeoutError, is_disk_full
from rendezvous.records import FingerResult
from rendezvous.status import Status

log = logging.getLogger("peerpost.send")

LOCATION_KIND = "location"


class SendError(Exception):
    """The send was refused before anything left this node; the text names the cause."""


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    devices: tuple[PublicIdentity, ...]


@dataclass(frozen=True, slots=True)
class PreparedContent:
    """What the content store hands back for a local file."""

    content_id: bytes
    size: int
    chunk_size: int
    key: bytes
    capability: bytes
    scheme: LeafScheme = LeafScheme.KEYED_PLAIN_AES  # how its chunks are named and sealed


def _unreadable(path: Path, exc: BaseException) -> BaseException:
    """What a send raises for `exc`, an error naming or describing `path`: an OSError (the
    file removed, moved or made unreadable since it was checked) as a SendError that says
    nothing was sent; a full disk, and any other error, as it was raised."""
    if isinstance(exc, OSError) and not is_disk_full(exc):
        return SendError(f"cannot read {path}: {exc.strerror or exc}; nothing was sent")
    return exc


def check_recipients(addresses: list[str]) -> list[str]:
    """Normalise and de-duplicate `--to`, or raise SendError naming the bad one."""
    out: list[str] = []
    for a in addresses:
        try:
            n = normalize_address(a)
        except DecodeError as exc:
            raise SendError(str(exc)) from None
        if n not in out:
            out.append(n)
    if not out:
        raise SendError("no recipients")
    return out


async def describe(path: Path) -> tuple[Description, dict[str, Any]]:
    """Media facts and a thumbnail (PyAV, in a thread: decoding must not stall the loop)."""
    info = await asyncio.to_thread(describe_media, path)
    thumb = None
    if info.media_type.startswith("video/") or info.width:
        thumb = await asyncio.to_thread(make_thumbnail, path)
    stamps: list[tuple[str, int]] = [("modified", info.file_mtime)]
    if info.created:
        stamps.insert(0, ("recorded", info.created))
    fields = [(k, v) for k, v in (("video_codec", info.video_codec),
                                  ("audio_codec", info.audio_codec)) if v]
    desc = Description(
        # A legal name may be longer than a receiver can store with its suffixes: the name
        # it would store, cut as it would cut it (the extension kept).
        media_type=info.media_type, file_name=safe_file_name(path.name), stamps=tuple(stamps),
        fields=tuple(fields), duration_ms=info.duration_ms, width=info.width,
        height=info.height, thumbnail=thumb,
    )
    return desc, {"media_type": info.media_type, "duration_ms": info.duration_ms}


async def describe_folder(path: Path, folder: FolderInfo) -> tuple[Description, dict[str, Any]]:
    """A folder archive's description: a tar named like the folder (what a receiver that
    does not unpack keeps), with the folder's name and counts; nothing for PyAV to read."""
    mtime = int((await asyncio.to_thread(path.stat)).st_mtime)
    desc = Description(media_type=FOLDER_MEDIA_TYPE,
                       file_name=safe_file_name(folder.name + TAR_SUFFIX),
                       stamps=(("modified", mtime),), folder=folder)
    return desc, {"media_type": FOLDER_MEDIA_TYPE, "duration_ms": None}


def build_message(
    identity: DeviceIdentity, sender: str, recipients: list[str], content: PreparedContent,
    description: Description, *, title: str, note: str, home_server: str,
    direct_addresses: list[str], now: float,
) -> LocationMessage:
    """The location message for `content` (headers, description, handle); raises SendError if
    invalid."""
    desc = Description(
        title=title[:MAX_TITLE], note=note, media_type=description.media_type,
        file_name=description.file_name, stamps=description.stamps,
        copyright=description.copyright, fields=description.fields,
        duration_ms=description.duration_ms, width=description.width,
        height=description.height, thumbnail=description.thumbnail,
        folder=description.folder,
    )
    msg = LocationMessage(
        headers=Headers(message_id=os.urandom(16), sender=sender,
                        sender_peer_id=identity.peer_id, recipients=tuple(recipients),
                        created=int(now)),
        description=desc,
        handle=Handle(content_id=content.content_id, size=content.size,
                      chunk_size=content.chunk_size, content_key=content.key,
                      capability=content.capability, scheme=content.scheme,
                      sender=SenderHints(peer_id=identity.peer_id, home_server=home_server,
                                         addresses=tuple(direct_addresses[:8]))),
    )
    try:
        msg.encode()
    except DecodeError as exc:
        raise SendError(f"the message would be invalid: {exc}") from None
    return msg


def seal_message(identity: DeviceIdentity, msg: LocationMessage,
                 recipients: list[Recipient]) -> list[tuple[str, bytes, bytes]]:
    """One sealed copy per recipient device, as (address, device peer id, blob) items."""
    body = msg.encode()
    items: list[tuple[str, bytes, bytes]] = []
    for r in recipients:
        for device, blob in seal_for_recipients(identity, LOCATION_KIND, body, list(r.devices)):
            items.append((r.address, device.peer_id, blob))
    return items


# One SEND must fit the server's frame limit (256 KiB by default) and its items-per-SEND
# policy (64): a message with a thumbnail is up to ~60 KiB sealed per device, so a family
# of twenty would not fit in one. Stay well under both; every batch carries the same
# message id (the server keeps one copy per device and message id).
SEND_BATCH_ITEMS = 64
SEND_BATCH_BYTES = 160 * 1024


def send_batches(items: list[tuple[str, bytes, bytes]], *, max_items: int = SEND_BATCH_ITEMS,
                 max_bytes: int = SEND_BATCH_BYTES) -> list[list[tuple[str, bytes, bytes]]]:
    """Split SEND items into batches of at most `max_items` and about `max_bytes` of blobs
    (an item larger than that goes alone; the server judges it). Order is kept."""
    batches: list[list[tuple[str, bytes, bytes]]] = []
    current: list[tuple[str, bytes, bytes]] = []
    size = 0
    for item in items:
        n = len(item[2]) + len(item[0]) + len(item[1]) + 16
        if current and (len(current) >= max_items or size + n > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        batches.append(current)
    return batches



class MailSender:
    """Sends files as location messages: the whole of `peerpost send` on the daemon side.

    `announce(content_id)` offers the new content to co-recipients (the DHT directory) and
    `direct_addresses()` gives the HOST:PORT hints written into each message; both are
    handed in, so this module needs neither the DHT nor the transports.
    """

    def __init__(self, identity: DeviceIdentity, address: str, *,
                 rendezvous: RendezvousClient, store: ContentStore, contacts: Contacts,
                 outbox: Outbox, announce: Callable[[bytes], None],
                 direct_addresses: Callable[[], list[str]], home_server: str,
                 wall: Callable[[], float]) -> None:
        self.identity = identity
        self.address = address
        self.rendezvous = rendezvous
        self.store = store
        self.contacts = contacts
        self.outbox = outbox
        self.announce = announce
        self.direct_addresses = direct_addresses
        self.home_server = home_server
        self.wall = wall

    def fail_unacknowledged(self) -> int:
        """At start: a send cut by the node's own end (kill -9, power loss) between writing
        its outbox row and the server's acknowledgement is failed with the reason, so
        `status` does not show it `queued` forever and `peerpost resend` can send it.
        A folder archive packed for a send that never reached the node is deleted."""
        n = self.outbox.fail_unacknowledged(
            f"{NOT_SENT}: the node stopped before the server acknowledged it; "
            "`peerpost resend` sends it again", self.wall())
        if n:
            log.warning("%d recipient(s) of sends cut by the node's stop marked failed", n)
        # A folder archive whose `send` was cut before it reached the node goes too (file
        # times are the real clock's, whatever clock the node runs on).
        sweep_orphans(self.outbox, self.store, time.time())
        return n

    async def send(self, path: Path, to: list[str], title: str, note: str,
                   folder: FolderInfo | None = None) -> bytes:
        """Send `path` to the addresses `to`; returns the message id. Raises SendError, with
        nothing deposited, when the file, an address or a pinned key is refused.

        With `folder`, `path` is the map of a folder (or an archive an older version
        packed) in the store's outgoing folder, and nowhere else: it is deleted once nobody
        needs it, the files it names never; one whose send fails before it is recorded is
        deleted at once."""
        if folder is None:
            return await self._send(path, to, title, note, None)
        if not is_own_archive(self.store.root, path):
            raise SendError(f"{path} is not a folder archive this node packed")
        try:
            await asyncio.to_thread(check_sent_folder, path, folder)
        except FolderError as exc:
            raise SendError(f"{exc}; nothing was sent") from None
        named: list[bytes] = []  # its content id, then its message id, once known
        try:
            return await self._send(path, to, title, note, folder, named)
        except BaseException:
            recorded = len(named) > 1 and self.outbox.get(named[1]) is not None
            if not recorded:  # else `resend` may send it again; released when done
                discard_unsent(self.outbox, self.store, path, named[0] if named else None)
            raise

    async def _send(self, path: Path, to: list[str], title: str, note: str,
                    folder: FolderInfo | None, named_ids: list[bytes] | None = None) -> bytes:
        # From before the file is read until the send ends (its message recorded by then,
        # or nothing was): a retention pass meanwhile leaves the file where it is.
        with self.outbox.sending(str(path)):
            return await self._named_and_sent(path, to, title, note, folder, named_ids)

    async def _named_and_sent(self, path: Path, to: list[str], title: str, note: str,
                              folder: FolderInfo | None,
                              named_ids: list[bytes] | None) -> bytes:
        addresses = check_recipients(to)
        if not await asyncio.to_thread(path.is_file):
            raise SendError(f"no such file: {path}")
        # Three things start at once: the FINGER round trips (one per address, across
        # domains a WAN round trip or more through the remote server), the hash pass that
        # names the file (the store's threads, about 0.2 s a GiB here) and its description
        # (PyAV's probe and thumbnail, in a thread). Naming records nothing: the content is
        # recorded (`hold`) only once every recipient is accepted. A refused recipient
        # stops the pass (checked per chunk) and cancels the description, and the send
        # raises only once the pass has ended and the description's task is done. The
        # PyAV call in flight, in its thread, is not stopped by the cancel: it reads on
        # until it ends (the probe reads at most 2 MiB, no read stalls over 5 s, the
        # thumbnail demuxes at most 1500 packets), its result unused.
        stop = threading.Event()
        naming = asyncio.gather(
            self.store.name_sent_archive(path, stop=stop) if path.suffix == MAP_SUFFIX
            and folder is not None
            else self.store.name_local_file(path, stop=stop, media=named_as_media(path)),
            return_exceptions=True)
        describing = asyncio.gather(
            describe(path) if folder is None else describe_folder(path, folder),
            return_exceptions=True)
        try:
            recipients = await self._recipients(addresses)
            # Not `gather`: cancelled, it would cancel naming's task and leave its threads
            # reading; `wait` leaves both to the `finally` below.
            both: list[asyncio.Future[Any]] = [naming, describing]
            await asyncio.wait(both)
            (named,), (described,) = naming.result(), describing.result()
        finally:
            stopping = not naming.done()  # a recipient was refused, or this send cancelled
            if stopping:
                # Not cancelled: that would leave its threads reading. Its outcome (the
                # NamingStopped, or a name nobody records) is in the gather's result.
                stop.set()
            cancelling = not describing.done()
            if cancelling:
                describing.cancel()
            if stopping:
                await asyncio.wait([naming])
            if cancelling:
                # Not `await describing` under suppress(CancelledError): that would also
                # swallow a cancel of this task arriving meanwhile.
                await asyncio.wait([describing])
                if not describing.cancelled():
                    # A cancelled gather ends with CancelledError set as its exception:
                    # retrieved here, or asyncio logs it as never retrieved.
                    describing.exception()
        if isinstance(named, BaseException):  # either one's error, as it was raised before
            raise self._unnamed(path, folder, named)
        if isinstance(described, BaseException):
            raise _unreadable(path, described)
        try:  # the file may have gone or changed while the recipients were judged
            local = await asyncio.to_thread(self.store.hold, named)
        except (ContentStoreError, OSError) as exc:
            raise self._unnamed(path, folder, exc) from None
        description = described[0]
        if named_ids is not None:
            named_ids.append(local.content_id)
        self.announce(local.content_id)
        content = PreparedContent(local.content_id, local.size, local.chunk_size, local.key,
                                  local.capability, local.scheme)
        msg = build_message(self.identity, self.address, addresses, content, description,
                            title=title, note=note, home_server=self.home_server,
                            direct_addresses=self.direct_addresses(), now=self.wall())
        items = seal_message(self.identity, msg, recipients)
        mid = msg.headers.message_id
        if named_ids is not None:
            named_ids.append(mid)
        self.outbox.add(id=mid, path=str(path), title=title, size=content.size,
                        content_id=content.content_id, recipients=addresses,
                        created_at=self.wall(), message=msg.encode(),
                        devices=[(r.address, d.verify_key) for r in recipients
                                 for d in r.devices
                                 if d.verify_key != self.identity.public.verify_key])
        acked: set[str] = set()
        try:
            for batch in send_batches(items):  # many recipients: several SENDs, one id
                await self.rendezvous.send(mid, batch)
                for addr in dict.fromkeys(a for a, _, _ in batch):
                    self.outbox.set_recipient_state(mid, addr, RecipientStatus.SENT,
                                                    self.wall())
                    acked.add(addr)
        except RendezvousError as exc:
            # Left `queued`, these rows would wait forever: nothing sends them again.
            unsent = [a for a in addresses if a not in acked]  # both normalised
            for addr in unsent:
                self.outbox.set_recipient_state(mid, addr, RecipientStatus.FAILED, self.wall(),
                                                reason=f"{NOT_SENT}: {exc}")
            raise SendError(f"{mid.hex()[:12]} was not sent to {', '.join(unsent)}: the "
                            f"server did not take it ({exc}); `peerpost resend "
                            f"{mid.hex()[:12]}` sends it again") from None
        log.info("sent %s (%s, %d bytes) to %s", mid.hex(), title, content.size,
                 ", ".join(addresses))
        return mid

    @staticmethod
    def _unnamed(path: Path, folder: FolderInfo | None, exc: BaseException) -> BaseException:
        """What a send raises when naming or recording `path` raised `exc`."""
        if isinstance(exc, ContentStoreError):  # changed since it was mapped or named
            again = "; send the folder again with `peerpost send`" if folder else ""
            return SendError(f"{exc}{again}; nothing was sent")
        return _unreadable(path, exc)

    async def _recipients(self, addresses: list[str]) -> list[Recipient]:
        """Each address's Recipient: the FINGERs go out at once (one round trip, not one
        per address), the answers are judged in order, so the first refused address is
        the error and the keys of the addresses after it are not pinned, as one by one."""
        answers = await asyncio.gather(*(self.rendezvous.finger(a) for a in addresses),
                                       return_exceptions=True)
        out = []
        for addr, answer in zip(addresses, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, RendezvousError):
                raise answer
            out.append(self._judge(addr, answer))
        return out

    async def _recipient(self, addr: str) -> Recipient:
        """`addr`'s devices from FINGER, sealed to only if their keys are pinned."""
        try:
            answer: FingerResult | RendezvousError = await self.rendezvous.finger(addr)
        except RendezvousError as exc:
            answer = exc
        return self._judge(addr, answer)

    def _judge(self, addr: str, answer: FingerResult | RendezvousError) -> Recipient:
        """The Recipient for `addr` given its FINGER answer, or SendError."""
        if isinstance(answer, RendezvousError):
            exc = answer
            remote = domain_of(addr)
            if exc.status == Status.UNAVAILABLE and remote != domain_of(self.address):
                # Its server is out of reach: seal to the keys pinned for it, and the
                # message waits at our server until that domain takes it.
                pinned = self.contacts.trusted_keys(addr)
                if pinned:
                    log.info("%s is unreachable; sealing for %s with its %d pinned key(s)",
                             remote, addr, len(pinned))
                    return Recipient(addr, tuple(PublicIdentity(k) for k in sorted(pinned)))
                # The server's text says why ("b.test is unreachable: no server found"): a
                # misspelt domain and a server that is down call for different actions.
                known = self.contacts.get(addr)
                if known is not None and known.retired_keys:
                    raise SendError(
                        f"{exc.text}; no key of {addr} is trusted (its server no longer "
                        f"listed the ones you trusted: retired), so nothing was sent: "
                        f"compare fingerprints (`peerpost contacts`), then `peerpost "
                        f"contacts accept {addr}`, or try again later") from None
                raise SendError(f"{exc.text}; {addr}'s keys are unknown, so nothing was "
                                "sent: check the address, or try again later") from None
            if isinstance(exc, RequestTimeoutError | ConnectionLostError):
                raise SendError(f"your server did not answer when asked for {addr}'s keys "
                                f"({exc}), so nothing was sent: try again later (`peerpost "
                                "info` shows the connection)") from None
            # The server's words, without its status code; named once.
            text = exc.text or str(exc)
            raise SendError(text if addr in text else f"{addr}: {text}") from None
        info = answer
        keys = [d.verify_key for d in info.devices]
        if not keys:
            # Its last device revoked or removed: what was pinned is retired too.
            gone = self.contacts.retire_all(addr, self.wall())
            raise SendError(f"{addr}: no device is registered for this address"
                            + (" (the keys you trusted for it are retired)" if gone else ""))
        vouches = {d.verify_key: d.vouch for d in info.devices if d.vouch is not None}
        pin = self.contacts.pin_keys(addr, keys, self.wall(), vouches=vouches)
        if pin is PinResult.CHANGED:
            # Pinned keys its server no longer lists are retired by now, so no key is left
            # to seal to; nothing was recorded or sent.
            raise SendError(
                f"the keys of {addr} have CHANGED since you last sent to them: its server "
                f"no longer lists any device key you trusted (those are retired), and none "
                f"of the keys it lists was vouched for by one; nothing was sent. Compare "
                f"fingerprints out of band (`peerpost contacts`), then "
                f"`peerpost contacts accept {addr}` to send anyway")
        if pin is PinResult.RETIRED:
            log.warning("%s: its server no longer lists some device key(s) you trusted (a "
                        "device revoked or removed): retired, not sealed to", addr)
        trusted = self.contacts.trusted_keys(addr)
        if pin is PinResult.UNVOUCHED and more_than_held(keys):
            # `contacts accept` can't pin past the limit either: only fewer devices can help.
            log.warning("%s: not sealing to %d of the %d device keys its server lists: a "
                        "contact holds at most %d", addr, sum(k not in trusted for k in keys),
                        len(set(keys)), MAX_KEYS_PER_ADDRESS)
        elif pin is PinResult.UNVOUCHED:
            log.warning("%s: not sealing to %d device key(s) no trusted device vouched for; "
                        "compare fingerprints (`peerpost contacts`), then "
                        "`peerpost contacts accept %s`", addr,
                        sum(k not in trusted for k in keys), addr)
        devices = tuple(PublicIdentity(k) for k in keys if k in trusted)
        if not devices:
            raise SendError(
                f"{addr}: none of its device keys is trusted (no vouch from a key you "
                f"pinned); compare fingerprints (`peerpost contacts`), then "
                f"`peerpost contacts accept {addr}`")
        return Recipient(addr, devices)
