"""A real PostgreSQL server for tests: Debian's `postgresql` package, started per session.

API (fixtures are registered in tests/conftest.py, so every test folder can use them):

- `pg_cluster` (session fixture) -> `PgCluster`: one server for the whole test session,
  started on first use with `initdb` and `pg_ctl` in a temporary folder (as the `postgres`
  user when the tests run as root, since PostgreSQL refuses to run as root), on a free
  loopback port, with its unix socket in that folder and `trust` authentication. Without
  PostgreSQL the tests that use it skip with the reason; with `CI=true` that is an error.
  `fsync=off` there: tests check what the server does, not power loss (the benchmarks
  start their own durable server with `PgCluster.start(durable=True)`).
- `pg_url` (function fixture) -> `str`: the URL of a new, empty database of that server
  (`postgresql://postgres@127.0.0.1:PORT/t_N`), made for the test and left behind.
- `own_pg_cluster` (function fixture) -> `PgCluster`: a server of the test's own, for a
  test that stops it (`.stop()`) and starts it again (`.start_again()`): a database
  going away and coming back. About 1 s more than `pg_url`.
- `PgCluster.url(dbname)`: the URL of one of its databases; `PgCluster.create_database()`
  makes a fresh one and returns its URL (several per test: one per "domain").
- `PgCluster.start(base, durable=...)` / `.stop()`: for code that runs outside pytest
  (benchmarks): start a server whose files live under `base`, stop it.
- `PgCluster.postgres_pids()`: pids of the server's processes (postmaster and its
  children), for CPU accounting from /proc.
- `unavailable()`: why PostgreSQL cannot run here, or None.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_PG_ROOTS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def bin_dir() -> Path | None:
    """The folder of `initdb`/`pg_ctl`/`postgres`: Debian's newest, else the PATH's."""
    for root in _PG_ROOTS:
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    return None


def unavailable() -> str | None:
    """Why a PostgreSQL server cannot be started here (None: it can)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed: pip install -e .[test]"
    if bin_dir() is None:
        return "PostgreSQL is not installed (no initdb/pg_ctl): apt-get install -y postgresql"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and no runuser to start PostgreSQL as the postgres user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """One PostgreSQL server in a folder of its own (see the module doc)."""

    def __init__(self, base: Path, port: int, bindir: Path) -> None:
        self.base = base
        self.port = port
        self.bindir = bindir
        self.data = base / "pgdata"
        self.sockets = base / "sock"
        self.log = base / "postgres.log"
        self._names = itertools.count(1)

    @classmethod
    def start(cls, base: Path, *, durable: bool = False,
              settings: dict[str, str] | None = None) -> PgCluster:
        """initdb and start a server under `base` (created; must be empty or absent; when
        running as root it is handed to the postgres user, so every folder above it must
        let that user through: a fresh `tempfile.mkdtemp()` does).
        `durable`: fsync on (the default of PostgreSQL), as an operator runs it."""
        bindir = bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb/pg_ctl)")
        base.mkdir(parents=True, exist_ok=True)
        cluster = cls(base, _free_port(), bindir)
        cluster.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
            shutil.chown(cluster.sockets, "postgres", "postgres")
        cluster._run([str(bindir / "initdb"), "-D", str(cluster.data), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        opts = {"listen_addresses": "127.0.0.1", "port": str(cluster.port),
                "unix_socket_directories": str(cluster.sockets),
                "max_connections": "200", "fsync": "on" if durable else "off",
                "synchronous_commit": "on" if durable else "off",
                "full_page_writes": "on" if durable else "off"}
        opts.update(settings or {})
        with (cluster.data / "postgresql.conf").open("a") as f:
            for key, value in opts.items():
                f.write(f"{key} = '{value}'\n")
        cluster.start_again()
        return cluster

    def start_again(self) -> None:
        """Start the server: at first, or again after `stop()` (same port and files)."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-w", "-t", "60", "start"])

    def _run(self, argv: list[str]) -> None:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              cwd=self.base)
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()} {tail}")

    def stop(self) -> None:
        """Stop the server (fast shutdown); its files stay under `base`."""
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                       "-w", "stop"])

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{os.getpid()}_{next(self._names)}"
        self._run([str(self.bindir / "psql"), "-h", str(self.sockets), "-p", str(self.port),
                   "-U", "postgres", "-d", "postgres", "-q", "-v", "ON_ERROR_STOP=1",
                   "-c", f'CREATE DATABASE "{name}"'])
        return self.url(name)

    def postgres_pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, checkpointer...)."""
        try:
            main = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        pids = [main]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == main:
                pids.append(int(stat.parent.name))
        return pids


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server for the test session (see the module doc)."""
    yield from _cluster()


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server for this test alone, which it may stop and start again."""
    yield from _cluster()


def _cluster() -> Iterator[PgCluster]:
    reason = unavailable()
    if reason is not None:
        if _ci():
            pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="pgtest-"))
    try:
        cluster = PgCluster.start(base)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        if _ci():
            pytest.fail(f"CI must run the PostgreSQL tests, but it did not start: {exc}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty database for this test."""
    return pg_cluster.create_database()
