"""`peerpost-rendezvous serve` failing once every `--listen` address is bound, real processes
on a real PostgreSQL: the instance bus starts after the listeners, and its failure is
printed as itself, naming the database, for one `--listen` and for two. It once raised
IndexError (one `--listen`: the second address was never given), blamed the second address
('cannot listen on [::1]:P'), or ended in a traceback (an error PostgreSQL reported). A
bind that fails still names the address that failed, the first of two as well."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.pgtest import PgCluster

from .conftest import DOMAIN
from .test_operator import run

pytestmark = pytest.mark.slow
QUIET = ("--stun-port", "off", "--dht-port", "off")
LISTENS = ((), ("--listen", "[::1]:0"))  # one --listen, then two
_roles = itertools.count(1)


async def _serve(data: Path, url: str, *more: str) -> tuple[int, str, str]:
    """`serve --store URL --listen 127.0.0.1:0 MORE...`: its exit code, stdout and stderr."""
    return await run("serve", "--domain", DOMAIN, "--data", str(data), "--store", url,
                     "--listen", "127.0.0.1:0", *more, *QUIET)


def _failed(code: int, out: str, err: str) -> str:
    """The last line of a `serve` that must have failed after binding, and said so."""
    assert code == 1 and out == "", (code, out, err)
    assert "Traceback" not in err and "cannot listen" not in err, err
    return err.rstrip("\n").rsplit("\n", 1)[-1]


async def test_a_bus_postgresql_refuses_after_binding_is_named(
        tmp_path: Path, pg_cluster: PgCluster) -> None:
    # A role allowed one connection: the store's takes it, the bus's (made once the
    # listeners are bound) is refused by PostgreSQL, as at an operator's connection limit.
    role = f"rv_bus_{next(_roles)}"
    conn = await asyncpg.connect(pg_cluster.url())
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        await conn.execute(f"CREATE DATABASE {role} OWNER {role}")
    finally:
        await conn.close()
    url = f"postgresql://{role}@127.0.0.1:{pg_cluster.port}/{role}"
    for more in LISTENS:
        line = _failed(*await _serve(tmp_path / "d", url, *more))
        assert line == (f"peerpost-rendezvous: cannot connect to {url}: too many "
                        f'connections for role "{role}"'), more
    # Connected, and the bus's first statement refused (the schema is there by now).
    conn = await asyncpg.connect(pg_cluster.url(role))
    try:
        await conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        await conn.execute(
            "CREATE FUNCTION no_instances() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no instance may join'; END $$; "
            "CREATE TRIGGER no_instances BEFORE INSERT ON rv_instances "
            "FOR EACH ROW EXECUTE FUNCTION no_instances()")
    finally:
        await conn.close()
    line = _failed(*await _serve(tmp_path / "d", url))
    assert line == f"peerpost-rendezvous: {url}: no instance may join"


@contextlib.asynccontextmanager
async def _one_connection_through(port: int) -> AsyncIterator[int]:
    """A forwarder to 127.0.0.1:`port` that stops listening once it has taken one
    connection (a tunnel or pooler going away): a second connect is refused by the kernel.
    Yields its port."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.close()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        pipes.create_task(pipe(reader, up_writer))
        pipes.create_task(pipe(up_reader, writer))

    async with asyncio.TaskGroup() as pipes:
        listener = await asyncio.start_server(take, "127.0.0.1", 0)
        try:
            yield listener.sockets[0].getsockname()[1]
        finally:
            listener.close()  # serve has exited: its connection's pipes end with it


async def test_an_oserror_after_binding_is_printed_as_itself(
        tmp_path: Path, pg_cluster: PgCluster) -> None:
    database = pg_cluster.create_database().rsplit("/", 1)[1]
    for more in LISTENS:
        async with _one_connection_through(pg_cluster.port) as port:
            url = f"postgresql://postgres@127.0.0.1:{port}/{database}"
            result = await _serve(tmp_path / "d", url, *more)
        line = _failed(*result)
        assert line == f"peerpost-rendezvous: cannot connect to {url}: Connection refused"


async def test_a_taken_first_address_is_named_with_one_listen_and_with_two(
        tmp_path: Path) -> None:
    # The second of two taken is test_serve_dual_stack's; a port a serve holds, test_operator's.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for n, more in enumerate(((), ("--listen", f"[::1]:{port}"))):
            code, out, err = await run("serve", "--domain", DOMAIN, "--data",
                                       str(tmp_path / f"d{n}"), "--listen",
                                       f"127.0.0.1:{port}", *more, *QUIET)
            assert (code, out) == (1, ""), err
            assert "Traceback" not in err and "[::1]" not in err, err
            assert err.rstrip("\n").rsplit("\n", 1)[-1] == (
                f"peerpost-rendezvous: cannot listen on 127.0.0.1:{port} (TCP): "
                "Address already in use"), more
