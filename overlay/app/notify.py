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

Bounded: at most `max_running` commands at once, at most `max_waiting` more wait their turn
(further events are dropped with a log line and a counter), and each is killed after
`timeout` seconds. `notify-send`, where it is installed, shows a desktop notification the
same way (argv, bounded); where it is not, that part is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from overlay.mail.inbox import InboxEntry
from rendezvous.taskset import TaskSet

log = logging.getLogger("peerpost.notify")

MAX_RUNNING = 4
MAX_WAITING = 64
HOOK_TIMEOUT = 30.0
_MAX_FIELD = 1000  # characters of a title or address put into the environment


class MessageHook:
    """Runs the user's command (and notify-send) for message events; owns those processes."""

    def __init__(self, command: str | None, *, desktop: bool = True,
                 max_running: int = MAX_RUNNING, max_waiting: int = MAX_WAITING,
                 timeout: float = HOOK_TIMEOUT) -> None:
        self.argv = shlex.split(command) if command else []
        self.notify_send = shutil.which("notify-send") if desktop else None
        self.timeout = timeout
        self.counters: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(max_running)
        self._tasks = TaskSet("message-hooks", limit=max_running + max_waiting, logger=log)

    @property
    def enabled(self) -> bool:
        return bool(self.argv or self.notify_send)

    def fire(self, entry: InboxEntry, event: str,
             done: Callable[[], None] | None = None) -> None:
        """A message arrived (`arrived`) or finished downloading (`complete`). `done()` is
        called once every command this event started ended by itself (or was dropped over
        the bound), never when the node's stop cancelled one."""
        if entry.junk and event == "arrived":
            if done is not None:
                done()
            return
        env = {
            "PEERPOST_ID": entry.id.hex(),
            "PEERPOST_FROM": _field(entry.sender),
            "PEERPOST_TITLE": _field(entry.title),
            "PEERPOST_STATE": entry.state.value,
            "PEERPOST_PATH": entry.path or "",
            "PEERPOST_EVENT": event,
        }
        commands = [self.argv] if self.argv else []
        if self.notify_send:
            what = "new message" if event == "arrived" else "download complete"
            commands.append([self.notify_send, "--app-name=peerpost", "--",
                             f"peerpost: {what} from {env['PEERPOST_FROM']}",
                             env["PEERPOST_TITLE"]])
        left = len(commands)

        def ended() -> None:
            nonlocal left
            left -= 1
            if left <= 0 and done is not None:
                done()
        if not commands:
            ended()
        for argv in commands:
            self._spawn(argv, env, ended)

    def _spawn(self, argv: list[str], fields: Mapping[str, str],
               ended: Callable[[], None]) -> None:
        if self._tasks.closed:
            return  # the node stopping: `done` is not called, told again at its next start
        if self._tasks.full:
            self.counters["dropped"] += 1
            log.warning("message hook dropped for %s: %d already running or waiting",
                        fields["PEERPOST_ID"], len(self._tasks))
            ended()
            return
        self._tasks.spawn(self._ended(self._run(argv, fields), ended),
                          name=f"hook-{argv[0]}")

    @staticmethod
    async def _ended(run: Coroutine[Any, Any, None], ended: Callable[[], None]) -> None:
        await run  # a cancel (the node stopping) raises here: `ended` is not called
        ended()

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
