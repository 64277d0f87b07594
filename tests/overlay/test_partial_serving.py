"""A co-recipient serves the chunks it holds while its own download runs, and keeps
serving them across the moment that download completes and `.part` is renamed into place.

The serving read runs in a sealing thread and the rename in another (the downloader's
`complete()`): a read that picked the `.part` name just before the rename, and opened it
just after, failed with FileNotFoundError, logged "cannot serve chunk N: ... .part" and
answered the other receiver UNAVAILABLE for a chunk this node holds."""

from __future__ import annotations

import asyncio
import builtins
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.content import partial as partial_module
from overlay.content.catalog import ContentStore
from overlay.transfer.frames import Chunk, Error, ErrorCode
from overlay.transfer.requester import open_transfer_session
from overlay.transfer.server import TransferServer
from overlay.transports.tcp import connect_tcp

ME = DeviceIdentity.from_seed(b"r" * 32)


async def test_a_chunk_read_as_the_download_completes_is_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    sender = ContentStore(tmp_path / "sender")
    source = await sender.add_local_file(tmp_path / "f", chunk_size=1024)
    receiver = ContentStore(tmp_path / "receiver")
    part = receiver.open_partial(source.content_id, source.size, source.chunk_size,
                                 source.key, source.capability, tmp_path / "in", "f",
                                 scheme=source.scheme)
    part.set_leaves(source.leaves)
    for i in range(5):
        assert part.write_chunk(i, source.read_sealed(i))
    assert part.is_complete

    completing: list[threading.Thread] = []
    real_open, real_os = builtins.open, os

    def complete_now() -> None:
        # The downloader's thread completes the file while the serving read gets its
        # descriptor (given half a second; a read that keeps it out meanwhile is fine).
        if not completing:
            t = threading.Thread(target=part.complete, name="complete")
            completing.append(t)
            t.start()
            t.join(0.5)

    def open_as_the_rename_lands(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".part"):  # the name picked, the file not yet open
            complete_now()
        return real_open(file, *args, **kwargs)

    class DupAsTheRenameLands:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        def dup(self, fd: int) -> int:
            complete_now()
            return real_os.dup(fd)

    monkeypatch.setattr(partial_module, "open", open_as_the_rename_lands, raising=False)
    monkeypatch.setattr(partial_module, "os", DupAsTheRenameLands())
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), receiver)
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(source.content_id, source.capability)
        await session.request(source.content_id, 3)
        async with asyncio.timeout(10):
            reply = await session.next_chunk()
        assert isinstance(reply, Chunk), f"a held chunk was refused: {reply}"
        assert source.cipher.open(3, reply.data) == data[3072:4096]
        assert server.counters["read_errors"] == 0
        await session.aclose()
    finally:
        await server.aclose()
        for t in completing:
            await asyncio.to_thread(t.join)
        receiver.close()
        sender.close()
    [final] = (tmp_path / "in").glob("f*")
    assert final.read_bytes() == data and not list(tmp_path.glob("in/**/*.part"))


async def test_a_partial_whose_part_was_deleted_serves_no_chunk_of_the_new_one(
        tmp_path: Path) -> None:
    """The received folder is removed by hand mid-download and the download starts again
    into a new, empty `.part` under the same name. A session opened before still holds the
    old partial, whose held bits say 'all held': it read the new file's zeros, sealed them
    under the content key and sent them, and the requester's leaf check caught them as a
    lying holder (and banned this node). Refused as unavailable instead."""
    data = os.urandom(5000)
    (tmp_path / "f").write_bytes(data)
    sender = ContentStore(tmp_path / "sender")
    source = await sender.add_local_file(tmp_path / "f", chunk_size=1024)
    receiver = ContentStore(tmp_path / "receiver")

    def open_part() -> Any:
        return receiver.open_partial(source.content_id, source.size, source.chunk_size,
                                     source.key, source.capability, tmp_path / "in", "f",
                                     scheme=source.scheme)

    old = open_part()
    old.set_leaves(source.leaves)
    for i in range(5):
        assert old.write_chunk(i, source.read_sealed(i))
    server = TransferServer(DeviceIdentity.from_seed(b"s" * 32), receiver)
    host, port = await server.start()
    try:
        session = await open_transfer_session(await connect_tcp(host, port), ME)
        await session.open(source.content_id, source.capability)  # the old partial
        shutil.rmtree(tmp_path / "in")
        new = open_part()  # the download starts again
        assert new is not old and not new.have(2)
        await session.request(source.content_id, 2)
        async with asyncio.timeout(10):
            reply = await session.next_chunk()
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNAVAILABLE, (
            f"served a chunk this node no longer holds: {type(reply).__name__}")
        await session.aclose()
    finally:
        await server.aclose()
        receiver.close()
        sender.close()
