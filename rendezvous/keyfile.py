"""Secret files on disk: device identities, domain keys, TLS keys, a node's config and
its web login token.

The key types in crypto/ turn themselves into text and back (`to_json`, `from_json`) and
do no I/O; reading and writing their files happens here. A secret file is written
atomically (a temporary file, fsync, rename) and created with mode 0600, never widened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crypto.identity import DeviceIdentity


def write_secret_file(path: Path | str, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically, the file created with mode 0600
    (never widened); a symbolic link in place of the temporary file is refused."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        left = memoryview(data.encode() if isinstance(data, str) else data)
        while left:  # os.write may take less than it was given
            left = left[os.write(fd, left):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_identity(identity: DeviceIdentity, path: Path | str) -> None:
    """A device identity's file (its seed: whoever reads it is that device)."""
    write_secret_file(path, identity.to_json())


def load_identity(path: Path | str) -> DeviceIdentity:
    """The identity in `path`; DecodeError if it is not one, OSError if unreadable."""
    # Imported here: PyNaCl costs about 15 ms of the start of every command that reads
    # no key, and the node's CLI imports this module for its config.
    from crypto.identity import DeviceIdentity

    return DeviceIdentity.from_json(Path(path).read_text())
