"""Seeded entropy for the real code a simulation runs.

The node, server and crypto code draw fresh randomness from the operating system: content
keys (`nacl.utils.random`), key pairs and box nonces (PyNaCl), message and batch ids, STUN
transaction ids and nonces (`os.urandom`), server nonces (`secrets.token_bytes`). Under the
simulator those bytes change the run: a content key makes the content id, the content id is
the DHT key, and the order of a lookup's first queries follows the XOR distance to it.
Without this module small family-video, nat-mix and churn runs (3-6 hosts, 1 MB) gave a
different trace hash in each of 3 processes, same scenario, same seed.

`seeded(rng)` makes those three functions return bytes from `rng` in the thread that entered
it, for as long as it is entered; every other thread (a Dask worker's communication thread,
say) still gets the operating system's bytes, and so does a module drawing a secret while it is
imported (a process draws that once, whichever run happens to import the module first).
Installed on first use, the replacements are pass-throughs wherever no simulation runs. What
libsodium draws inside one call (the ephemeral key of a sealed box) stays random: it changes
bytes, never sizes or timing.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

_local = threading.local()
_install_lock = threading.Lock()
_real: dict[str, Callable[[int], bytes]] = {}


def _stream() -> random.Random | None:
    rng: random.Random | None = getattr(_local, "rng", None)
    if rng is not None and _importing():
        return None  # a module's import-time secret is drawn once per process: not the run's
    return rng


def _importing() -> bool:
    """Whether a module is being imported below this call (importlib's frames are on the
    stack): `multiprocessing` draws its authkey when first imported, which happens inside
    whichever run first needs it."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _urandom(size: int) -> bytes:
    rng = _stream()
    return rng.randbytes(size) if rng is not None else _real["os.urandom"](size)


def _nacl_random(size: int = 32) -> bytes:
    rng = _stream()
    return rng.randbytes(size) if rng is not None else _real["nacl.utils.random"](size)


def _token_bytes(nbytes: int | None = None) -> bytes:
    size = 32 if nbytes is None else nbytes
    rng = _stream()
    return rng.randbytes(size) if rng is not None else _real["secrets.token_bytes"](size)


def _install() -> None:
    with _install_lock:
        if _real:
            return
        _real["os.urandom"] = os.urandom
        _real["nacl.utils.random"] = nacl.utils.random
        _real["secrets.token_bytes"] = secrets.token_bytes
        os.urandom = _urandom
        nacl.utils.random = _nacl_random
        secrets.token_bytes = _token_bytes
        # PyNaCl's own modules call `random` imported by name (key generation, Box nonces).
        for module in (nacl.public, nacl.signing, nacl.secret):
            if getattr(module, "random", None) is _real["nacl.utils.random"]:
                module.random = _nacl_random  # type: ignore[attr-defined]


@contextmanager
def seeded(rng: random.Random) -> Iterator[None]:
    """While entered, this thread's `os.urandom`, `nacl.utils.random` and
    `secrets.token_bytes` return bytes drawn from `rng` (nesting restores the outer one)."""
    _install()
    outer = _stream()
    _local.rng = rng
    try:
        yield
    finally:
        _local.rng = outer
