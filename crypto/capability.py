"""The fetch capability, and proofs of holding it that are bound to one session.

The handle in a location message carries a random 32-byte capability. A requester proves
it holds the capability by a keyed hash over the content id and the *transcript hash* of the
transfer session's handshake. Both ends compute the transcript themselves, so a proof seen
on one session is worthless on any other (no replay), and the capability itself never
crosses the wire after the location message.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.utils

from crypto.errors import DecodeError, VerificationError

CAPABILITY_LEN = 32
PROOF_LEN = 32
_LABEL = b"peerpost/capability-proof/v1"


def new_capability() -> bytes:
    return nacl.utils.random(CAPABILITY_LEN)


def prove_capability(capability: bytes, content_id: bytes, transcript: bytes) -> bytes:
    """The proof for `content_id` on the session whose transcript hash is `transcript`."""
    if len(capability) != CAPABILITY_LEN:
        raise DecodeError("a capability is 32 bytes")
    h = hashlib.blake2b(key=capability, digest_size=PROOF_LEN)
    for part in (_LABEL, content_id, transcript):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def check_capability_proof(
    capability: bytes, content_id: bytes, transcript: bytes, proof: bytes
) -> None:
    """Raise VerificationError unless `proof` was made with `capability` on this session."""
    if not hmac.compare_digest(prove_capability(capability, content_id, transcript), proof):
        raise VerificationError("capability proof rejected")
