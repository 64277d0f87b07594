"""Secret files: identities and keys written atomically, owner-only, read back intact."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from rendezvous.keyfile import load_identity, save_identity, write_secret_file

ALICE = DeviceIdentity.from_seed(b"a" * 32)


def test_identity_file_round_trip_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    save_identity(ALICE, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_identity(path)
    assert again.peer_id == ALICE.peer_id
    assert b"pickle" not in path.read_bytes()
    assert not (tmp_path / "identity.json.tmp").exists()


def test_a_secret_file_is_replaced_whole_and_never_widened(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_secret_file(path, "first")
    os.chmod(path, 0o600)
    write_secret_file(path, "second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_file_that_is_not_an_identity_says_why(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    path.write_text('{"kind": "other"}')
    with pytest.raises(DecodeError, match="not a peerpost device identity"):
        load_identity(path)
