"""Resume after `kill -9`: a real downloader process killed mid-way, then restarted.

The restarted process finishes the file, never re-fetches a chunk the first one stored, and
the holder sends at most chunk count + the downloader's in-flight bound chunks in total.
Run as a module (`python -m tests.overlay.test_fetch_resume SPEC`), this file is the child.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from crypto.content import LeafScheme
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.transfer.downloader import ChunkStored, Downloader, FetchEvent
from overlay.transfer.server import TransferServer
from overlay.transports.ladder import Source
from overlay.transports.stream import Stream
from overlay.transports.tcp import connect_tcp

CHUNK = 16 << 10
CHUNKS = 120
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


async def _child(spec: dict[str, str | int]) -> None:
    store = ContentStore(Path(str(spec["store"])))
    part = store.open_partial(bytes.fromhex(str(spec["cid"])), int(spec["size"]), CHUNK,
                              bytes.fromhex(str(spec["key"])), bytes.fromhex(str(spec["cap"])),
                              Path(str(spec["dest"])), "clip.ts",
                              scheme=LeafScheme(int(spec["scheme"])))
    port = int(spec["port"])

    async def connect() -> Stream:
        return await connect_tcp("127.0.0.1", port, timeout=5)

    def on_event(e: FetchEvent) -> None:
        if isinstance(e, ChunkStored):
            print(f"stored {e.index}", flush=True)

    d = Downloader(part, [Source("holder", connect)], DeviceIdentity.from_seed(b"d" * 32),
                   window=8, on_event=on_event)
    print(f"resuming {part.held} bound {d.in_flight_bound}", flush=True)
    path = await d.run()
    print(f"done {path}", flush=True)


async def _spawn(spec: dict[str, str | int]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.overlay.test_fetch_resume", json.dumps(spec),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


async def _lines(proc: asyncio.subprocess.Process, until: int | None) -> list[str]:
    """Read the child's lines until `until` chunks are stored (then kill -9) or it exits."""
    out: list[str] = []
    stored = 0
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while line := (await proc.stdout.readline()).decode().strip():
            out.append(line)
            stored += line.startswith("stored ")
            if until is not None and stored >= until:
                proc.send_signal(signal.SIGKILL)
                break
        await proc.wait()
    return out


async def test_killed_downloader_resumes_without_refetching(tmp_path: Path) -> None:
    data = random.Random(11).randbytes(CHUNKS * CHUNK - 99)
    (tmp_path / "clip.ts").write_bytes(data)
    holder_store = ContentStore(tmp_path / "holder")
    content = await holder_store.add_local_file(tmp_path / "clip.ts", chunk_size=CHUNK)
    # Slow enough that the kill lands mid-way; the rate is not what is tested.
    server = TransferServer(DeviceIdentity.from_seed(b"h" * 32), holder_store,
                            max_upload_rate=1 << 20)
    _, port = await server.start("127.0.0.1", 0)
    spec: dict[str, str | int] = {
        "store": str(tmp_path / "recv"), "dest": str(tmp_path / "inbox"), "port": port,
        "cid": content.content_id.hex(), "size": content.size, "key": content.key.hex(),
        "cap": content.capability.hex(), "scheme": int(content.scheme)}
    try:
        first = await _lines(await _spawn(spec), until=30)
        assert not any(line.startswith("done") for line in first), "killed too late"
        second = await _lines(await _spawn(spec), until=None)
    finally:
        await server.aclose()

    assert second[-1] == f"done {tmp_path / 'inbox' / 'clip.ts'}"
    assert (tmp_path / "inbox" / "clip.ts").read_bytes() == data
    assert not list((tmp_path / "inbox").glob("*.part"))
    stored_first = {int(x.split()[1]) for x in first if x.startswith("stored ")}
    stored_second = {int(x.split()[1]) for x in second if x.startswith("stored ")}
    assert len(stored_first) >= 30
    assert not stored_first & stored_second, "a chunk verified before the kill was fetched again"
    assert stored_first | stored_second <= set(range(CHUNKS))
    resumed_with = int(second[0].split()[1])
    assert resumed_with >= len(stored_first)
    bound = int(second[0].split()[3])
    served = server.chunks_served(content.content_id)
    assert CHUNKS <= served <= CHUNKS + bound, (served, bound)


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
