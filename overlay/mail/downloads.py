"""The download queue: which inbox message to fetch next, retries, and completion.

One owner task (`run`) picks work from the inbox in its order (priority senders first,
then oldest first; junk never), keeps at most `max_active` downloads going, and sleeps
until woken (a new message, a `fetch`, a node coming online) or until the next retry is
due. When no source is reachable a download is not failed: it goes to `retrying` with an
exponential backoff and shows the next attempt time in `inbox` (the seed's step 445).

A full disk is not a failure either: the download goes to `retrying` with the reason and
resumes by itself once there is room. When node.db's disk is the full one and even that
state can't be written, the queue keeps it (`held_off`, shown by `inbox`) and tries again
after the backoff. Any other failure of one download (a name the disk refuses, a bug) marks
that message `failed` with the reason, logged once; it never ends the loop or restarts the
same download in a tight loop. Offered messages larger than the `auto_download_max`
preference wait for `peerpost fetch`.

A download that fails for good (DownloadFailed: an archive refused, the sender's file
changed) queues a declined receipt with the failure's short reason, in the transaction
that records the failure, and calls `on_declined` (the receipts' wake-up); a retryable
failure, a user's cancel and an error of our own (a bug) queue nothing. A later `fetch`
(Try again) of such a message is one try when the sender has that receipt: it may have
stopped serving the message (every recipient declined it), so when every source answers
that it does not serve it the try fails saying so (`NoSourceNow`) instead of waiting for
ever; a source unreachable or stalled is still a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace

from crypto.errors import CryptoError
from crypto.location import LocationMessage, decode_location
from overlay.mail.inbox import Decline, Inbox, InboxEntry
from overlay.mail.inbox_state import InboxState
from overlay.mail.prefs import Prefs
from rendezvous.backoff import Backoff
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.downloads")


class RetryLater(Exception):
    """No source could be reached now; try again after a backoff."""


class NoSourceNow(RetryLater):
    """No source could serve the missing chunks now (none reached, or none holds them).

    Retried after a backoff, unless this node told the sender it would never download the
    message (a declined receipt sent) and `none_serve`: every source answered that it does
    not have the content or no longer serves it. Once every recipient declined, the sender
    stops serving it, so only a co-recipient could, and waiting for one would be for ever.
    That try fails, with `told_no_source_text` (`DownloadQueue._download`). A source that
    could not be reached or stalled (the sender offline, a co-recipient that has it
    offline) may serve it later: that is a retry as before."""

    def __init__(self, text: str, *, none_serve: bool = False) -> None:
        super().__init__(text)
        self.none_serve = none_serve


# The start of the failure of a retry that found no source, of a message whose sender this
# node told it would never download it (the web inbox words it by this).
TOLD_NO_SOURCE = "no source has it"


def told_no_source_text(sender: str, reason: str, detail: str) -> str:
    """The failure of a retry no source served, of a message whose sender was told this
    node would not download it (`reason`, the declined receipt's); `detail`: the sources'
    answers."""
    return (f"{TOLD_NO_SOURCE}: {sender} was told you would not download it ({reason}) and "
            f"may have stopped serving it; ask them to send it again ({detail})")


class DownloadFailed(Exception):
    """The download can't succeed (e.g. the content does not match its id); no retry.

    `declined`: the short reason the sender is told in a declined receipt (no local path
    in it: it leaves this machine), or None when the sender is not told: it withdrew the
    message itself, or this machine's disk or folder failed, which the user may mend and
    try again (removing the entry tells the sender)."""

    def __init__(self, text: str, *, declined: str | None = None) -> None:
        super().__init__(text)
        self.declined = declined


@dataclass
class SourceView:
    """What `inbox --json` shows for one source of an active download."""

    peer: str
    path: str
    bytes: int = 0
    rate: float = 0.0
    banned: bool = False
    left: bool = False  # a path the source moved off to a faster one: its bytes, no more

    def as_dict(self) -> dict[str, object]:
        return {"peer": self.peer, "path": self.path, "bytes": self.bytes,
                "rate": round(self.rate, 1), "banned": self.banned}


@dataclass
class Activity:
    """Live view of one download, for `inbox` and `fetch --wait`.

    `attempt` holds the running attempt's sources, by peer and path (a source that moved
    to a faster path shows both); `earlier` what ended attempts
    fetched since the node started (their rates 0). `sources`, what the user sees, is the
    two together, one view per peer and path, so bytes fetched before a retry still count.
    """

    attempt: dict[tuple[str, str], SourceView] = field(default_factory=dict)
    earlier: dict[tuple[str, str], SourceView] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def sources(self) -> dict[tuple[str, str], SourceView]:
        return _added(self.earlier, self.attempt.values())

    def show(self, views: Iterable[SourceView]) -> None:
        """The running attempt's sources are now `views`."""
        self.attempt = {(v.peer, v.path): v for v in views}

    def end_attempt(self) -> None:
        """Keep what the attempt fetched (and whom it banned) in `earlier`."""
        kept = (replace(v, rate=0.0) for v in self.attempt.values() if v.bytes or v.banned)
        self.earlier = _added(self.earlier, kept)
        self.attempt = {}


def _added(base: dict[tuple[str, str], SourceView], views: Iterable[SourceView],
           ) -> dict[tuple[str, str], SourceView]:
    """`base` with `views` added, by peer and path: bytes summed, banned if either was, the
    rate of the view added."""
    out = dict(base)
    for v in views:
        key = (v.peer, v.path)
        old = out.get(key)
        out[key] = v if old is None else replace(v, bytes=old.bytes + v.bytes,
                                                 banned=old.banned or v.banned)
    return out


@dataclass(frozen=True, slots=True)
class _Hold:
    """A message whose state node.db would not take: left alone until `until` (wall time).
    `count`: holds in a row, which node.db did not count as attempts (the backoff grows)."""

    until: float
    why: str
    count: int


# fetch(entry, message, activity, on_progress(chunks_held)) -> final path
Fetcher = Callable[[InboxEntry, LocationMessage, Activity, Callable[[int], None]],
                   Awaitable[str]]
Completed = Callable[[InboxEntry, LocationMessage], Awaitable[None]]


class DownloadQueue:
    """Owns the download tasks of one node."""

    def __init__(self, inbox: Inbox, prefs: Prefs, fetch: Fetcher, on_complete: Completed, *,
                 wall: Callable[[], float], rng: random.Random, max_active: int = 1,
                 retry_base: float = 5.0, retry_max: float = 300.0,
                 on_declined: Callable[[], None] | None = None,
                 on_started: Callable[[InboxEntry, LocationMessage], None] | None = None
                 ) -> None:
        self.inbox = inbox
        self._on_declined = on_declined
        self._on_started = on_started  # a message's first chunk stored (once per message)
        self.prefs = prefs
        self._fetch = fetch
        self._on_complete = on_complete
        self.wall = wall
        self.rng = rng
        self.max_active = max_active
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.active: dict[bytes, Activity] = {}
        self._tasks = TaskSet("downloads", logger=log)  # keyed by message id
        self._wake = asyncio.Event()
        self._changes = asyncio.Event()  # set, and replaced, at each change (see changed())
        self._requested: set[bytes] = set()  # `fetch ID` while auto-download is off
        self._priority: dict[bytes, bool] = {}  # running downloads: from a priority sender?
        self._preempting: set[bytes] = set()
        # Messages whose retry or failure could not even be recorded (node.db's disk is
        # full): not started again before their hold ends, nor in a tight loop.
        self._holds: dict[bytes, _Hold] = {}
        self._stopping: set[bytes] = set()  # being cancelled (see cancel)
        self.counters: dict[str, int] = {"failed": 0, "stuck": 0}

    def wake(self) -> None:
        self._wake.set()

    def changed(self) -> asyncio.Event:
        """An event set at the next change of any download: progress recorded, a state
        entered (downloading, complete, failed, retrying), a cancel. `fetch --wait` waits
        on it (the control `progress` op) instead of polling the inbox."""
        return self._changes

    def _changed(self) -> None:
        event, self._changes = self._changes, asyncio.Event()
        event.set()

    def running(self, message_id: bytes) -> bool:
        """Whether this message's download runs now: one `downloading` in the inbox that
        does not waits its turn (another download first, or paused for a priority
        sender's message)."""
        return message_id in self._tasks

    def request(self, message_id: bytes) -> None:
        """The user asked for this message (`peerpost fetch`)."""
        entry = self.inbox.get(message_id)
        if entry is None:
            raise KeyError(f"no message {message_id.hex()} in the inbox")
        if entry.junk:
            self.inbox.set_flags(message_id, junk=False)  # fetching it says it isn't junk
        if entry.state in (InboxState.OFFERED, InboxState.FAILED):
            self.inbox.transition(message_id, InboxState.DOWNLOADING)
        elif entry.state is InboxState.RETRYING:
            self.inbox.transition(message_id, InboxState.DOWNLOADING)
        self._requested.add(message_id)
        self._holds.pop(message_id, None)
        self._changed()
        self.wake()

    async def cancel(self, message_id: bytes, *, remove: bool = False,
                     decline: Decline | None = None) -> None:
        """Stop the download of this message if one runs, and wait for it; with `remove`
        (`peerpost rm`), then take the message out of the inbox, with `decline` queuing
        a declined receipt if it was not complete nor its sender junk (`Inbox.remove`,
        `_unless_junk`). The queue does not start it again meanwhile: the ended task
        wakes the queue, and a message still in the inbox as downloading was started
        anew, to fail on the entry `rm` then removed."""
        self._stopping.add(message_id)
        try:
            self._requested.discard(message_id)
            self._holds.pop(message_id, None)
            self.active.pop(message_id, None)
            task = self._tasks.get(message_id)
            self._tasks.cancel(message_id)
            self._changed()
            if task is not None:
                await asyncio.wait([task])
            if remove:
                entry = self.inbox.get(message_id)
                decline = self._unless_junk(entry, decline)
                self.inbox.remove(message_id, decline=decline)
                if decline is not None:
                    self._declined()
        finally:
            self._stopping.discard(message_id)
            # A `fetch` (Try again) while it stopped moved it to downloading, and the
            # queue, woken by the ended task, passed it over as still stopping.
            self.wake()

    def held_off(self, message_id: bytes) -> tuple[float, str] | None:
        """(when it is tried again, why) for a message whose state node.db would not
        take, else None."""
        hold = self._holds.get(message_id)
        return (hold.until, hold.why) if hold is not None and hold.until > self.wall() else None

    def backoff(self, attempts: int) -> float:
        # Jitter keeps retries from bunching up.
        return Backoff(self.retry_base, self.retry_max, jitter=0.8).delay(attempts, self.rng)

    async def run(self) -> None:
        """The scheduling loop; cancelled by the node on shutdown (its tasks with it)."""
        try:
            while True:
                self._wake.clear()
                # One `now` for both: a hold that came due while `_start_due` read what to
                # start (passed over as not due yet) was then left out of `due` as past, and
                # with no retrying message the loop waited for a wake that never came: the
                # download never resumed.
                now = self.wall()
                self._start_due(now)
                timeout = None
                due = [t for t in (self.inbox.next_wakeup(),
                                   *(h.until for h in self._holds.values() if h.until > now))
                       if t is not None]
                if due:
                    timeout = max(0.05, min(due) - now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            for t in self._tasks:
                t.cancel()
            await self._tasks.wait()

    def _start_due(self, now: float) -> None:
        order = self.inbox.fetch_order(now, include_offered=self.prefs.auto_download,
                                       offered_max_size=self.prefs.auto_download_max)
        for entry in order:
            hold = self._holds.get(entry.id)
            if entry.id in self._tasks or entry.id in self._stopping or \
                    (hold is not None and hold.until > now):
                continue
            if len(self._tasks) >= self.max_active:
                # Priority senders come first even when their message arrives while an
                # ordinary download runs (at login the server pushes messages one by one):
                # pause an ordinary one. Its verified chunks are on disk; it resumes after.
                if entry.priority:
                    self._preempt_one()
                break
            self._priority[entry.id] = entry.priority
            task = self._tasks.spawn(self._download(entry), key=entry.id,
                                     name=f"download-{entry.id.hex()[:8]}")
            if task is not None:
                # After the set has let go of it, so the loop can start the next one.
                task.add_done_callback(lambda _: self.wake())

    def _preempt_one(self) -> None:
        for mid, priority in self._priority.items():
            if not priority and mid not in self._preempting:
                log.info("pausing %s for a priority sender's message", mid.hex())
                self._preempting.add(mid)
                self._tasks.cancel(mid)
                return

    async def _download(self, entry: InboxEntry) -> None:
        mid = entry.id
        act = self.active.setdefault(mid, Activity())
        act.started_at = act.started_at or self.wall()
        try:
            try:
                # The entry as stored now, not as the queue saw it when it spawned this
                # task: a `fetch` in between (`request`) moves it to downloading itself,
                # and moving it again failed the download the user had just asked for
                # (IllegalTransition: cannot go from downloading to downloading).
                current = self.inbox.get(mid)
                if current is None or current.junk or \
                        current.state not in (entry.state, InboxState.DOWNLOADING):
                    return  # removed, junked or settled meanwhile: nothing to start
                entry = current
                # One commit (an fsync on the loop) for the start time and the state.
                started = ("started", act.started_at)
                moved = entry.state is not InboxState.DOWNLOADING
                if moved:
                    entry = self.inbox.transition(mid, InboxState.DOWNLOADING, mark=started)
                else:
                    self.inbox.mark_time(mid, *started)
            except (sqlite3.Error, OSError) as db_exc:
                # node.db would not take the start (its disk full): the queue starts it
                # again after the backoff. The mark raised out of the task, and the queue
                # started it again at once, a traceback each time, for as long as the
                # disk stayed full.
                hold = self._holds.get(mid)
                self._hold_off(mid, self.wall() + self.backoff(1 + (hold.count if hold else 0)),
                               "not started", db_exc)
                return
            if moved:
                self._changed()
            try:
                msg = decode_location(entry.message)
            except CryptoError as exc:
                self.inbox.transition(mid, InboxState.FAILED, error=f"stored message: {exc}")
                return

            first = [entry.first_byte_at is not None]

            def progress(held: int) -> None:
                # The first chunk's time in the same commit as its progress.
                first_byte = None if first[0] or not held else self.wall()
                self.inbox.set_progress(mid, held, first_byte=first_byte)
                first[0] = first[0] or first_byte is not None
                self._changed()
                # Not when the first chunk is the whole file: `downloaded` follows at once.
                if first_byte is not None and held < entry.chunk_count and \
                        self._on_started is not None:
                    self._on_started(entry, msg)

            try:
                try:
                    path = await self._fetch(entry, msg, act, progress)
                finally:
                    act.end_attempt()
            except RetryLater as exc:
                told = (self.inbox.declined(mid)
                        if isinstance(exc, NoSourceNow) and exc.none_serve else None)
                if told is not None and told[1] is not None:  # the sender knows: no wait
                    self._fail(mid, told_no_source_text(entry.sender, told[0], str(exc)))
                    return
                current = self.inbox.get(mid)
                hold = self._holds.get(mid)
                attempts = (current.attempts if current else 1) + (hold.count if hold else 0)
                when = self.wall() + self.backoff(attempts)
                try:
                    self.inbox.transition(mid, InboxState.RETRYING, next_attempt=when,
                                          error=str(exc))
                except Exception as db_exc:  # node.db's disk may be the full one
                    self._hold_off(mid, when, str(exc), db_exc)
                    return
                self._holds.pop(mid, None)
                log.info("message %s: %s; retrying in %.1f s", mid.hex(), exc, when - self.wall())
                return
            except DownloadFailed as exc:
                self._fail(mid, str(exc), declined=exc.declined)
                return
            self._holds.pop(mid, None)
            done = self.inbox.transition(mid, InboxState.COMPLETE, path=path,
                                         mark=("completed", self.wall()))
            self._changed()  # before the receipt's round trip
            log.info("message %s complete: %s", mid.hex(), path)
            await self._on_complete(done, msg)
        except asyncio.CancelledError:
            if mid not in self._preempting:
                raise  # shutdown: let it end
        except Exception as exc:  # one message's failure never stops or spins the queue
            log.error("message %s: download raised %s", mid.hex(), type(exc).__name__,
                      exc_info=exc)
            self._fail(mid, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        finally:
            self._priority.pop(mid, None)
            self._preempting.discard(mid)
            self._requested.discard(mid)
            self._changed()  # retrying, failed, or paused for a priority sender

    def _fail(self, mid: bytes, reason: str, *, declined: str | None = None) -> None:
        """Mark the message failed with `reason` (and queue a declined receipt saying
        `declined`, if given); if even that fails (a full disk refuses node.db's write
        too), try the download again after the longest backoff."""
        self.counters["failed"] += 1
        try:
            current = self.inbox.get(mid)
            if current is not None and current.state is not InboxState.FAILED:
                decline = self._unless_junk(
                    current, Decline(declined, self.wall()) if declined else None)
                self.inbox.transition(mid, InboxState.FAILED, error=reason or "failed",
                                      decline=decline)
                if decline is not None:
                    self._declined()
            log.warning("message %s failed: %s", mid.hex(), reason)
            self._holds.pop(mid, None)
        except Exception as exc:
            self._hold_off(mid, self.wall() + self.retry_max, reason, exc)

    def _unless_junk(self, entry: InboxEntry | None,
                     decline: Decline | None) -> Decline | None:
        """`decline`, or None if `entry`'s sender is on the junk list now: its junk flag
        says how the sender was classed when the message came, and a sender the user
        junked since learns nothing either (`Inbox` checks the flag, `_queue_decline`)."""
        if decline is None or entry is None or self.prefs.classify(entry.sender) == "junk":
            return None
        return decline

    def _declined(self) -> None:
        if self._on_declined is not None:
            self._on_declined()

    def _hold_off(self, mid: bytes, until: float, why: str, db_exc: Exception) -> None:
        """Leave `mid` alone until `until` (wall time), its state unrecorded; the queue
        starts it again then."""
        self.counters["stuck"] += 1
        before = self._holds.get(mid)
        self._holds[mid] = _Hold(until, why, (before.count if before else 0) + 1)
        log.error("message %s: %s (node.db did not take it: %s); trying again in %.0f s",
                  mid.hex(), why, db_exc, until - self.wall())
