"""The node's home folder: identity, config, databases, control socket, received files.

Layout (all owner-only):
    identity.json   device keys (crypto.identity, mode 0600)
    config.json     address, rendezvous server and its pinned key, name server, listen
                    address, options (versioned JSON)
    node.db         inbox, outbox, preferences, contacts (overlay.mail.db)
    store/          content store metadata and partial downloads (overlay.content.catalog)
    received/       finished downloads
    control.sock    the daemon's local control socket (Unix, mode 0600)
    node.log        the daemon's log (what `peerpost node` writes to stderr), rotated at
                    10 MiB, 3 old files kept (node.log.1 ...)
    node.lock       held (fcntl) by the one running daemon; holds its pid
    login-wait.json while the daemon waits at start to log in (it answers only after):
                    why, and when it tries next (`login_wait`)

Without --home or $PEERPOST_HOME the folder is ~/.peerpost where that exists (homes made
before), else the platform's user data folder (platformdirs: $XDG_DATA_HOME/peerpost,
~/.local/share/peerpost on Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from crypto.errors import DecodeError
from rendezvous.keyfile import load_identity, save_identity, write_secret_file

if TYPE_CHECKING:
    # PyNaCl, which both need, costs about 15 ms of every CLI command's start; `send`,
    # `inbox`, ... only find the control socket here: imported where keys are read.
    from crypto.identity import DeviceIdentity

    # dataclasses and inspect, which NodeConfig brings (7 ms): imported where a config is read.
    from overlay.app.config import NodeConfig


class HomeError(Exception):
    """The home folder is missing, incomplete or unreadable; the text says what to do."""


class HomeBusy(HomeError):
    """Another daemon runs for this home folder."""


def default_home() -> Path:
    """$PEERPOST_HOME, else ~/.peerpost where it exists, else the platform's data folder."""
    env = os.environ.get("PEERPOST_HOME")
    if env:
        return Path(env).expanduser()
    legacy = Path.home() / ".peerpost"
    if legacy.exists():
        return legacy
    import platformdirs

    return Path(platformdirs.user_data_dir("peerpost", appauthor=False))


class NodeHome:
    """Paths and the small files in one node's home folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self._lock_depth = 0  # daemon_lock()s this object holds: the outer one has the lock

    identity_path = property(lambda self: self.root / "identity.json")
    config_path = property(lambda self: self.root / "config.json")
    db_path = property(lambda self: self.root / "node.db")
    store_dir = property(lambda self: self.root / "store")
    control_path = property(lambda self: self.root / "control.sock")
    log_path = property(lambda self: self.root / "node.log")
    lock_path = property(lambda self: self.root / "node.lock")
    login_wait_path = property(lambda self: self.root / "login-wait.json")

    @contextlib.contextmanager
    def daemon_lock(self) -> Iterator[None]:
        """Hold the home's daemon lock (fcntl, released by the kernel when the process
        ends, even on SIGKILL); HomeBusy naming the holder's pid when another has it. A
        `restore` killed while it put its files in place is finished first
        (`rendezvous.staged`), so nothing runs on half a home. Taken again through the same
        object, it is already held: `peerpost node` takes it before importing the node."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HomeBusy(
                    f"a peerpost node is already running for {self.root}{_holder(fd)}; stop "
                    "it first, or use another --home") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            from rendezvous.staged import finish_interrupted  # see load_config

            if finished := finish_interrupted(self.root):
                # logging only here: `send`, `inbox`, ... load this module and log nothing
                import logging

                logging.getLogger("peerpost.home").warning(
                    "finished a restore that was stopped midway: put %s in place",
                    ", ".join(finished))
            self._lock_depth = 1
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)  # closing the descriptor releases the lock

    def daemon_running(self) -> str | None:
        """None when no daemon holds this home's lock; else how to name the one that does
        (" (pid N)", or "" when its pid can't be read)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:  # a shared lock, dropped at once: the daemon's is exclusive
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def note_login_wait(self, why: str | None, next_try: float = 0.0) -> None:
        """The daemon waits at start to log in: `why`, and the wall-clock time of its next
        try, for the CLI to show while the control socket is not up yet; None: done. Only
        an aid to the eye: a home it can't be written in (full disk) does not stop the
        login (the log says the same)."""
        with contextlib.suppress(OSError):
            if why is None:
                self.login_wait_path.unlink(missing_ok=True)
            else:
                write_secret_file(self.login_wait_path,
                                  json.dumps({"why": why[:2000], "next_try": next_try}))

    def login_wait(self) -> tuple[str, float] | None:
        """(why, next try) as `note_login_wait` left it; None if none or unreadable."""
        try:
            data = json.loads(self.login_wait_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        why, at = data.get("why"), data.get("next_try")
        if not isinstance(why, str) or not isinstance(at, int | float) or isinstance(at, bool):
            return None
        return why, float(at)

    def received_dir(self, config: NodeConfig) -> Path:
        return Path(config.download_dir) if config.download_dir else self.root / "received"

    def exists(self) -> bool:
        return bool(self.identity_path.exists() and self.config_path.exists())

    def check_creatable(self) -> None:
        """HomeError when the folder can't be made (a file in its place or above it, a
        folder not writable). `init` asks before it registers: a failure after that left
        the address bound to a key never saved, and its invite used."""
        path = self.root
        while not path.exists() and not path.is_symlink() and path.parent != path:
            path = path.parent
        if path == self.root and not path.is_dir():
            raise HomeError(f"--home {self.root} is a file, not a folder: choose another "
                            "--home")
        if not path.is_dir():
            raise HomeError(f"--home {self.root} can't be made: {path} is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise HomeError(f"--home {self.root} can't be made: {path} is not writable")

    def create(self, config: NodeConfig, identity: DeviceIdentity) -> None:
        """Make the folder (0700) and write identity and config; refuse to overwrite."""
        if self.exists():
            addr = self.load_config().address
            raise HomeError(f"{self.root} already holds a peerpost node ({addr})")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        save_identity(identity, self.identity_path)
        self.save_config(config)

    def save_config(self, config: NodeConfig) -> None:
        write_secret_file(self.config_path, config.to_json())

    def load_config(self) -> NodeConfig:
        if not self.config_path.exists():
            # Imported here, as above: it imports shutil and tempfile, which every CLI
            # command loaded with this module only for these two rare paths (2-3 ms of
            # each command's start, as argparse's shutil was: rendezvous.cliutil).
            from rendezvous.staged import interrupted

            if interrupted(self.root):  # finished under the lock: `restore` takes it
                raise HomeError(
                    f"a restore into {self.root} was stopped before it was done: run "
                    "`peerpost restore` with the same backup again, which finishes it")
            raise HomeError(
                f"no peerpost node in {self.root}: run `peerpost --home {self.root} init "
                "--address NAME@DOMAIN --server HOST:PORT` first"
            )
        from overlay.app.config import NodeConfig

        try:
            return NodeConfig.from_json(self.config_path.read_text())
        except DecodeError as exc:
            raise HomeError(f"{self.config_path}: {exc}") from None

    def load_identity(self) -> DeviceIdentity:
        if not self.identity_path.exists():
            raise HomeError(f"no identity in {self.root}: run `peerpost init` first")
        try:
            return load_identity(self.identity_path)
        except DecodeError as exc:
            raise HomeError(f"{self.identity_path}: {exc}") from None


def _holder(lock_fd: int) -> str:
    """How to name the lock's holder: " (pid N)" from the pid it wrote into the lock file,
    else ""."""
    pid = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip()
    return f" (pid {pid})" if pid.isdigit() else ""
