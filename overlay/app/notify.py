"""Telling the user that mail came: `node --on-message CMD` and a desktop notification.

CMD (the flag, or the config's `on_message`) is split once with `shlex.split` and run with
that argv, never through a shell, when a message arrives and when its download completes.
The message's fields go in environment variables, never on the command line:
PEERPOST_ID, PEERPOST_FROM, PEERPOST_TITLE, PEERPOST_STATE (`offered`, `unverified`,
`complete`, ...), PEERPOST_PATH (the received file once complete, else empty), and
PEERPOST_EVENT (`arrived` or `complete`). Title and sender are a stranger's text: a
command that passes them on must quote them.

`arrived` runs once per message, with the state the message keeps: for one from a first
contact or a contact's new device, once the node has looked the sender's keys up (a first
contact's message is `offered` then, a key left for `peerpost contacts accept` or a lookup
that failed leaves it `unverified`); for any other, as soon as it is filed. Moving on from
`unverified` later (a lookup that succeeds on a retry, `peerpost contacts accept`) runs
nothing: it is not an arrival. A node stopped during that lookup runs nothing for the
message then; the lookup runs again at the next start, and `arrived` with it. A command
the node's stop killed (or that had not started) runs again at the next start, with the
message's state then: only one that ran to its end, failed to start or ran over
`timeout` counts as run (overlay.mail.delivery keeps that in node.db). A message whose
download prefs start at once is `offered` in PEERPOST_STATE: `arrived` is told before the
download starts, though CMD may run while it goes on; `complete` follows when it ends. A
junk sender's message (`peerpost prefs junk`) runs nothing: the inbox hides it and it is
never fetched.

`complete` runs once per message the same way: node.db makes it owed in the commit that
makes the message complete, and a command the node's stop killed (or that had not started)
runs again at the next start, with the message's state then (`complete`, the file's path).

Bounded: at most `max_running` commands at once, and at most `max_running + max_waiting`
events running or waiting their turn in memory; each command is killed after `timeout`
seconds. An event that finds no room is not dropped: it stays owed in node.db (`arrival`
or `completion` `due`, as after a stop), counted `deferred`, and is read back from there,
oldest first (every `arrived` owed before any `complete`), once half of the waiting room
is free again; so are the events fired meanwhile, so that none overtakes the older ones.
What a stop leaves owed runs at the next start, the same way. `notify-send`, where it is
installed, shows a desktop notification for each event (argv, in the same bound); where it
is not, that part is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from overlay.mail.inbox import InboxEntry
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.notify")

MAX_RUNNING = 4
MAX_WAITING = 64
HOOK_TIMEOUT = 30.0
_MAX_FIELD = 1000  # characters of a title or address put into the environment


Told = Callable[[InboxEntry, str], None]
Owed = Callable[[int], Iterable[tuple[InboxEntry, str]]]


class MessageHook:
    """Runs the user's command (and notify-send) for message events; owns those processes.

    `told(entry, event)` records in node.db that an event ran to its end; `owed(n)` reads
    back the events node.db holds owed, oldest first, at most `n` of each kind."""

    def __init__(self, command: str | None, *, told: Told, owed: Owed, desktop: bool = True,
                 max_running: int = MAX_RUNNING, max_waiting: int = MAX_WAITING,
                 timeout: float = HOOK_TIMEOUT) -> None:
        self.argv = shlex.split(command) if command else []
        self.notify_send = shutil.which("notify-send") if desktop else None
        self.timeout = timeout
        self.counters: Counter[str] = Counter()
        self._told = told
        self._owed = owed
        self._slots = asyncio.Semaphore(max_running)
        self._tasks = TaskSet("message-hooks", limit=max_running + max_waiting, logger=log)
        # Read node.db back once no more than this many events run or wait.
        self._low_water = max_running + max_waiting // 2
        self._behind = False  # events owed in node.db that are not in memory

    @property
    def enabled(self) -> bool:
        return bool(self.argv or self.notify_send)

    def fire(self, entry: InboxEntry, event: str) -> None:
        """A message arrived (`arrived`) or finished downloading (`complete`): run the
        commands, then `told` it once every one ended by itself, never when the node's
        stop cancelled one. With no room, or older events owed, it stays owed in node.db
        and runs once its turn comes. An event already running or waiting is not run
        twice."""
        key = (entry.id, event)
        if self._tasks.closed or key in self._tasks:
            return  # stopping: owed in node.db, run at the next start
        commands = self._commands(entry, event)
        if not commands:
            self._told(entry, event)
            return
        if self._behind or self._tasks.full:
            if not self._behind:
                log.warning("message hooks: %d running or waiting; later ones wait in"
                            " node.db for their turn", len(self._tasks))
            self._behind = True
            self.counters["deferred"] += 1
            return
        task = self._tasks.spawn(self._event(entry, event, commands), name=f"hook-{event}",
                                 key=key)
        if task is not None:  # after the set's own callback: the room counts it out
            task.add_done_callback(self._ended)

    def catch_up(self) -> None:
        """Run the events node.db holds owed, oldest first, as far as the bound allows; the
        rest once room is free. The node calls it at start; then it runs by itself."""
        if self._tasks.closed:
            return
        self._behind = False
        limit = self._tasks.limit or 1
        # At most `limit` are in memory: among the oldest 2 * limit owed of a kind are
        # enough not in memory yet to fill the room, if so many are owed.
        for entry, event in self._owed(2 * limit):
            if self._tasks.full:
                self._behind = True
                return
            self.fire(entry, event)

    def _commands(self, entry: InboxEntry, event: str) -> list[tuple[list[str], dict[str, str]]]:
        if entry.junk and event == "arrived":
            return []  # hidden by the inbox, never fetched: nothing to tell
        env = {
            "PEERPOST_ID": entry.id.hex(),
            "PEERPOST_FROM": _field(entry.sender),
            "PEERPOST_TITLE": _field(entry.title),
            "PEERPOST_STATE": entry.state.value,
            "PEERPOST_PATH": entry.path or "",
            "PEERPOST_EVENT": event,
        }
        commands = [(self.argv, env)] if self.argv else []
        if self.notify_send:
            what = "new message" if event == "arrived" else "download complete"
            commands.append(([self.notify_send, "--app-name=peerpost", "--",
                              f"peerpost: {what} from {env['PEERPOST_FROM']}",
                              env["PEERPOST_TITLE"]], env))
        return commands

    async def _event(self, entry: InboxEntry, event: str,
                     commands: list[tuple[list[str], dict[str, str]]]) -> None:
        async with asyncio.TaskGroup() as tg:  # a cancel (the node stopping) raises here
            for argv, fields in commands:
                tg.create_task(self._run(argv, fields))
        self._told(entry, event)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._behind and not task.cancelled() and len(self._tasks) <= self._low_water:
            self.catch_up()

    async def _run(self, argv: list[str], fields: Mapping[str, str]) -> None:
        async with self._slots:
            env = {**os.environ, **fields}
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True)
            except OSError as exc:
                self.counters["failed"] += 1
                log.warning("message hook %s could not start: %s", argv[0], exc)
                return
            try:
                async with asyncio.timeout(self.timeout):
                    rc = await proc.wait()
            except TimeoutError:
                self.counters["timed-out"] += 1
                log.warning("message hook %s ran over %.0f s; killed", argv[0], self.timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            self.counters["ran"] += 1
            if rc != 0:
                log.info("message hook %s exited %d", argv[0], rc)

    async def aclose(self) -> None:
        await self._tasks.aclose()


def _field(text: str) -> str:
    """Outside text for an environment variable: bounded, no NUL (exec refuses it)."""
    return text[:_MAX_FIELD].replace("\0", "")
