"""`fast_signatures()`: the DHT's Ed25519 signatures replaced by a keyed hash, for scale.

Ed25519 costs about 50 us to sign and 120 us to verify here, and a lookup on a large DHT
signs and verifies every reply and every provider record: at 100,000 nodes that is most of
the wall time. Inside the context, `DeviceIdentity.sign` returns BLAKE2b-512 keyed with the
device's public key over the same signed bytes, and the DHT's `verify` recomputes it. Such
a "signature" proves nothing (anyone can make one from the public key), so a run using it
says so in its summary and plot titles; message sizes, counts and the code paths stay the
same. Only the simulator uses this, for the lookups workload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from crypto.errors import VerificationError
from crypto.identity import SIGNATURE_LEN, DeviceIdentity


def _mac(verify_key: bytes, context: bytes, message: bytes) -> bytes:
    h = hashlib.blake2b(key=verify_key[:64], digest_size=SIGNATURE_LEN)
    h.update(b"peerpost/" + context + b"\x00")
    h.update(message)
    return h.digest()


def fast_sign(self: DeviceIdentity, context: bytes, message: bytes) -> bytes:
    """The stand-in signature of `self` over (context, message)."""
    return _mac(self.public.verify_key, context, message)


def fast_verify(verify_key: bytes, context: bytes, message: bytes, signature: bytes) -> None:
    """Raise VerificationError unless `signature` is `fast_sign`'s for `verify_key`."""
    if len(signature) != SIGNATURE_LEN or _mac(verify_key, context, message) != signature:
        raise VerificationError("bad signature")


@contextmanager
def fast_signatures() -> Iterator[None]:
    """Patch the DHT's signing and verifying for the duration (restored after)."""
    from overlay.dht import protocol, records

    saved: list[tuple[Any, str, Callable[..., Any]]] = [
        (DeviceIdentity, "sign", DeviceIdentity.sign),
        (protocol, "verify", getattr(protocol, "verify")),  # noqa: B009
        (records, "verify", getattr(records, "verify"))]  # noqa: B009
    DeviceIdentity.sign = fast_sign  # type: ignore[method-assign]
    setattr(protocol, "verify", fast_verify)  # noqa: B010
    setattr(records, "verify", fast_verify)  # noqa: B010
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
