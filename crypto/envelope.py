"""Signed-then-sealed envelopes: one sealed copy of a signed payload per recipient device.

The payload is signed by the sender's device key under a context naming its kind
("location", "receipt", ...), then sealed with `crypto_box_seal` to each recipient device
separately. The server only ever sees the sealed blob.
Opening checks the seal, the outer shape, and the signature, and returns who signed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crypto.codec import Fields, packb, unpackb
from crypto.errors import DecodeError
from crypto.identity import (
    PUBLIC_KEY_LEN,
    SEAL_OVERHEAD,
    SIGNATURE_LEN,
    DeviceIdentity,
    PublicIdentity,
    seal,
)

ENVELOPE_VERSION = 1
MAX_KIND_LEN = 32
DEFAULT_MAX_ENVELOPE = 64 * 1024  # the server's default envelope limit
# Version, kind, key, signature and msgpack framing around the body.
SIGNED_OVERHEAD = 160


@dataclass(frozen=True, slots=True)
class SignedPayload:
    """What an opened envelope yields: the kind, who signed it, and the body bytes."""

    kind: str
    sender: PublicIdentity
    body: bytes


def _context(kind: str) -> bytes:
    return b"envelope/" + kind.encode()


def sign_payload(identity: DeviceIdentity, kind: str, body: bytes) -> bytes:
    """The signed (not yet sealed) form of `body`."""
    if not 0 < len(kind) <= MAX_KIND_LEN:
        raise DecodeError("envelope kind must be 1..32 characters")
    sig = identity.sign(_context(kind), body)
    return packb(
        {"v": ENVELOPE_VERSION, "kind": kind, "key": identity.public.verify_key, "sig": sig,
         "body": body}
    )


def seal_for_recipients(
    identity: DeviceIdentity, kind: str, body: bytes, recipients: Sequence[PublicIdentity]
) -> list[tuple[PublicIdentity, bytes]]:
    """Sign once, then seal one copy to each recipient device."""
    signed = sign_payload(identity, kind, body)
    return [(r, seal(r, signed)) for r in recipients]


def open_envelope(
    identity: DeviceIdentity, blob: bytes, *, max_bytes: int = DEFAULT_MAX_ENVELOPE
) -> SignedPayload:
    """Open a sealed envelope addressed to `identity` and check its signature.

    Raises VerificationError (not for us, or forged) or DecodeError (malformed).
    """
    if len(blob) > max_bytes:
        raise DecodeError(f"envelope of {len(blob)} bytes exceeds the limit {max_bytes}")
    signed = identity.open_sealed(blob)
    f = Fields(unpackb(signed, max_bytes=max_bytes), "envelope")
    version = f.int("v", lo=0, hi=255)
    if version != ENVELOPE_VERSION:
        raise DecodeError(f"unsupported envelope version {version}")
    kind = f.str("kind", min_len=1, max_len=MAX_KIND_LEN)
    sender = PublicIdentity(f.bytes("key", size=PUBLIC_KEY_LEN))
    sig = f.bytes("sig", size=SIGNATURE_LEN)
    body = f.bytes("body", max_len=max_bytes)
    sender.verify(_context(kind), body, sig)
    return SignedPayload(kind=kind, sender=sender, body=body)


def max_body_for(envelope_limit: int = DEFAULT_MAX_ENVELOPE) -> int:
    """The largest body that still fits the server's envelope limit once signed and sealed."""
    return envelope_limit - SEAL_OVERHEAD - SIGNED_OVERHEAD
