"""Device identities: an Ed25519 signing key, the X25519 key derived from it, the peer id.

The peer id is BLAKE2b-160 of the Ed25519 public key; it doubles as the Kademlia node id.
Signatures are domain-separated by a context label so a signature made for one purpose
never verifies for another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from crypto.errors import DecodeError, VerificationError

PEER_ID_LEN = 20
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
SEAL_OVERHEAD = nacl.bindings.crypto_box_SEALBYTES
_IDENTITY_FILE_VERSION = 1


def peer_id_of(verify_key: bytes) -> bytes:
    """BLAKE2b-160 of an Ed25519 public key."""
    if len(verify_key) != PUBLIC_KEY_LEN:
        raise DecodeError(f"public key must be {PUBLIC_KEY_LEN} bytes, got {len(verify_key)}")
    return hashlib.blake2b(verify_key, digest_size=PEER_ID_LEN).digest()


def _signed_bytes(context: bytes, message: bytes) -> bytes:
    # "peerpost/" + context + NUL keeps every purpose's signatures disjoint.
    return b"peerpost/" + context + b"\x00" + message


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of a device: what others pin, verify against and seal to."""

    verify_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.verify_key, bytes) or len(self.verify_key) != PUBLIC_KEY_LEN:
            raise DecodeError("an Ed25519 public key is 32 bytes")
        try:
            nacl.signing.VerifyKey(self.verify_key).to_curve25519_public_key()
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise DecodeError(f"not a valid Ed25519 public key: {exc}") from None

    @property
    def peer_id(self) -> bytes:
        return peer_id_of(self.verify_key)

    @property
    def box_public_key(self) -> bytes:
        """The X25519 public key derived from the Ed25519 key (for sealing to this device)."""
        return bytes(nacl.signing.VerifyKey(self.verify_key).to_curve25519_public_key())

    def fingerprint(self) -> str:
        """A short human-comparable rendering of the peer id (groups of 4 hex digits)."""
        h = self.peer_id.hex()
        return " ".join(h[i : i + 4] for i in range(0, len(h), 4))

    def verify(self, context: bytes, message: bytes, signature: bytes) -> None:
        """Raise VerificationError unless `signature` is this device's over (context, message)."""
        verify(self.verify_key, context, message, signature)


def verify(verify_key: bytes, context: bytes, message: bytes, signature: bytes) -> None:
    """Check a detached Ed25519 signature made with `DeviceIdentity.sign(context, message)`."""
    if len(signature) != SIGNATURE_LEN:
        raise VerificationError("bad signature length")
    try:
        nacl.signing.VerifyKey(verify_key).verify(_signed_bytes(context, message), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise VerificationError("bad signature") from None


def seal(recipient: PublicIdentity, plaintext: bytes) -> bytes:
    """Anonymous public-key encryption to a device (libsodium `crypto_box_seal`)."""
    return bytes(nacl.public.SealedBox(nacl.public.PublicKey(recipient.box_public_key)).encrypt(
        plaintext
    ))


class DeviceIdentity:
    """A device's private keys. Saved as versioned JSON with mode 0600; never pickled."""

    __slots__ = ("_box", "_signing", "public")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing = signing_key
        self.public = PublicIdentity(bytes(signing_key.verify_key))
        self._box = nacl.public.PrivateKey(bytes(signing_key.to_curve25519_private_key()))

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceIdentity:
        """Deterministic identity from 32 seed bytes (tests and the simulator)."""
        if len(seed) != 32:
            raise DecodeError("an identity seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def peer_id(self) -> bytes:
        return self.public.peer_id

    @property
    def seed(self) -> bytes:
        return bytes(self._signing)

    @property
    def box_private_key(self) -> bytes:
        return bytes(self._box)

    def sign(self, context: bytes, message: bytes) -> bytes:
        """A detached signature over (context, message)."""
        return bytes(self._signing.sign(_signed_bytes(context, message)).signature)

    def open_sealed(self, sealed: bytes) -> bytes:
        """Open a `seal()`ed box addressed to this device, or raise VerificationError."""
        try:
            return bytes(nacl.public.SealedBox(self._box).decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise VerificationError("sealed box does not open with this device's key") from None

    # --- persistence -------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {"version": _IDENTITY_FILE_VERSION, "kind": "peerpost-device", "seed": self.seed.hex()}
        )

    @classmethod
    def from_json(cls, text: str) -> DeviceIdentity:
        return cls.from_seed(seed_from_json(text, "peerpost-device", _IDENTITY_FILE_VERSION,
                                            what="identity", label="device identity"))


def seed_from_json(text: str, kind: str, version: int, *, what: str, label: str) -> bytes:
    """The 32-byte seed of a key file `{"version", "kind", "seed": hex}` of `kind` and
    `version`; DecodeError naming `what` ("identity", "domain key") otherwise, and `label`
    when the kind is wrong ("not a peerpost device identity")."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"{what} file is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise DecodeError(f"not a peerpost {label}")
    if obj.get("version") != version:
        raise DecodeError(f"unsupported {what} file version {obj.get('version')!r}")
    seed = obj.get("seed")
    try:
        raw = bytes.fromhex(seed) if isinstance(seed, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise DecodeError(f"{what} seed must be 64 hex digits")
    return raw
