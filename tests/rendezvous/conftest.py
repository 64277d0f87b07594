"""Shared helpers: identities, an in-process server on port 0, a raw protocol session."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from rendezvous.client_core import ClientConnection
from rendezvous.domainkey import load_or_create
from rendezvous.errors import DatabaseAway
from rendezvous.limits import Limits
from rendezvous.messages import Challenge, Reply, Request, ServerMessage, encode_request
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore

DOMAIN = "example.net"


def ident(n: int) -> DeviceIdentity:
    """A deterministic device identity."""
    return DeviceIdentity.from_seed(bytes([n]) * 32)


def disk_full() -> sqlite3.OperationalError:
    """The error SQLite raises when the disk is full, to inject at a store's boundary."""
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # as sqlite3 sets it on a real one
    return exc


def pg_starting_up() -> DatabaseAway:
    """What PgStore fails an op with while PostgreSQL starts up or shuts down (its
    reconnect refused with CannotConnectNowError)."""
    return DatabaseAway("cannot connect to postgresql://rv@127.0.0.1/rv: the database "
                        "system is starting up")


@asynccontextmanager
async def running_server(data: Path, *, open_registration: bool = True,
                         limits: Limits | None = None, port: int = 0,
                         ) -> AsyncIterator[RendezvousServer]:
    # The domain key lives in the data folder, as `serve` keeps it: a restart keeps it.
    server = RendezvousServer(DOMAIN, SqliteStore(data / "rv.sqlite3"),
                              open_registration=open_registration, limits=limits,
                              domain_key=load_or_create(data))
    await server.start("127.0.0.1", port)
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RendezvousServer]:
    async with running_server(tmp_path) as srv:
        yield srv


def port_of(server: RendezvousServer) -> int:
    if server.address is None:
        raise RuntimeError("server not started")
    return server.address[1]


class RawSession:
    """A hand-driven connection: write any bytes, read decoded server messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.core = ClientConnection()
        self.challenge: Challenge | None = None

    @classmethod
    async def open(cls, port: int) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        s = cls(reader, writer)
        first = await s.read()
        if not isinstance(first, Challenge):
            raise AssertionError(f"expected a challenge first, got {first!r}")
        return s

    async def read(self, within: float = 5.0) -> ServerMessage:
        while True:
            msg = self.core.next_event()
            if msg is not None:
                if isinstance(msg, Challenge):
                    self.challenge = msg
                return msg
            data = await asyncio.wait_for(self.reader.read(65536), within)
            if not data:
                raise ConnectionResetError("server closed the connection")
            self.core.receive_data(data)

    async def reply(self, within: float = 5.0) -> Reply:
        """The next REPLY (skipping pushes and challenges)."""
        while True:
            msg = await self.read(within)
            if isinstance(msg, Reply):
                return msg

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self, body: bytes) -> None:
        await self.write(struct.pack(">I", len(body)) + body)

    async def auth(self, identity: DeviceIdentity, address: str, **kw: Any) -> Reply:
        self.core.authorize(identity, address, **kw)
        await self.write(self.core.data_to_send())
        return await self.reply()

    async def request(self, req: Request) -> Reply:
        await self.frame(encode_request(req))
        return await self.reply()

    async def closed_by_server(self, within: float = 5.0) -> bool:
        """True once the server has closed the connection (reads EOF)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), within)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass


def mid() -> bytes:
    return os.urandom(16)


async def eventually(check: Callable[[], Awaitable[None]], within: float = 15.0) -> None:
    """Run `check` until its assertions hold, again every 50 ms, for state no event
    announces (a database row another process writes, a lease ending). After `within`
    seconds its last AssertionError is the failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(0.05)
