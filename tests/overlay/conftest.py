"""Fixtures the overlay tests share: a node's database and its content store, each in its
own folder of the test's tmp_path (a module's own fixture of the same name wins)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
