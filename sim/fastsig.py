"""`fast_signatures()`: the DHT's Ed25519 signatures replaced by a keyed hash, for scale.

Ed25519 costs about 50 us to sign and 120 us to verify here, and a lookup on a large DHT
signs and verifies every reply and every provider record: at 1,000 nodes and 200 lookups
a run took 17-19 s with Ed25519 and 8.7-9.2 s with this (each in its own process), with
the same trace hash. Inside the
context, `DeviceIdentity.sign` returns BLAKE2b-512 keyed with the device's public key over
the same signed bytes, and the DHT's `verify` recomputes it. Such a "signature" proves
nothing (anyone can make one from the public key), so a run using it says so in its
summary and plot titles; message sizes, counts and the code paths stay the same.

Only the thread that entered the context signs and verifies this way: the replacements
are installed once and pass through to Ed25519 in every other thread and outside the
context, so runs in threads of one process (a Dask worker's) never mix the two schemes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from crypto.errors import VerificationError
from crypto.identity import SIGNATURE_LEN, DeviceIdentity

_local = threading.local()
_install_lock = threading.Lock()
_real: dict[str, Callable[..., Any]] = {}


def _fast() -> bool:
    return bool(getattr(_local, "depth", 0))


def _mac(verify_key: bytes, context: bytes, message: bytes) -> bytes:
    h = hashlib.blake2b(key=verify_key[:64], digest_size=SIGNATURE_LEN)
    h.update(b"peerpost/" + context + b"\x00")
    h.update(message)
    return h.digest()


def fast_sign(identity: DeviceIdentity, context: bytes, message: bytes) -> bytes:
    """The stand-in signature of `identity` over (context, message)."""
    return _mac(identity.public.verify_key, context, message)


def fast_verify(verify_key: bytes, context: bytes, message: bytes, signature: bytes) -> None:
    """Raise VerificationError unless `signature` is `fast_sign`'s for `verify_key`."""
    if len(signature) != SIGNATURE_LEN or _mac(verify_key, context, message) != signature:
        raise VerificationError("bad signature")


def _sign(self: DeviceIdentity, context: bytes, message: bytes) -> bytes:
    if _fast():
        return fast_sign(self, context, message)
    result: bytes = _real["sign"](self, context, message)
    return result


def _verify_for(name: str) -> Callable[[bytes, bytes, bytes, bytes], None]:
    def verify(verify_key: bytes, context: bytes, message: bytes, signature: bytes) -> None:
        if _fast():
            fast_verify(verify_key, context, message, signature)
        else:
            _real[name](verify_key, context, message, signature)
    return verify


def _install() -> None:
    from overlay.dht import protocol, records

    with _install_lock:
        if _real:
            return
        _real["sign"] = DeviceIdentity.sign
        _real["protocol"] = getattr(protocol, "verify")  # noqa: B009
        _real["records"] = getattr(records, "verify")  # noqa: B009
        DeviceIdentity.sign = _sign  # type: ignore[method-assign]
        setattr(protocol, "verify", _verify_for("protocol"))  # noqa: B010
        setattr(records, "verify", _verify_for("records"))  # noqa: B010


def installed() -> bool:
    """Whether the pass-through replacements are in place (after the first use)."""
    return bool(_real)


@contextmanager
def fast_signatures() -> Iterator[None]:
    """Sign and verify the DHT's messages with the keyed hash in this thread, for the
    duration."""
    _install()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
