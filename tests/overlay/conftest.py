"""Fixtures the overlay tests share: a node's database and its content store, each in its
own folder of the test's tmp_path, and a LocalNetwork with its server started (a module's
own fixture of the same name wins)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from overlay.content.catalog import ContentStore
from overlay.mail.db import NodeDB


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path / "node") as opened:
        yield opened


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContentStore]:
    s = ContentStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    """A rendezvous server as a real process on loopback; add and start nodes on it."""
    with LocalNetwork(tmp_path / "lab") as n:
        n.start_server()
        yield n
