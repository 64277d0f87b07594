"""Device vouches: an existing device of an account signs a new device key of that account.

A vouch is the voucher's Ed25519 public key (32 bytes) followed by its signature (64 bytes)
over (address, new device key) under the context "device-vouch", so it verifies for that
address and that key only, and no other signature of the device ever verifies as a vouch.
It travels as these 96 bytes (registration, FINGER) or as text: the token `peerpost devices
vouch` prints and `peerpost init --vouch` takes. That text is hex, which a command line never
mistakes for an option; base64url, as printed before, began with '-' for one vouch in 64
(`--vouch -Tmo...` was refused as a usage error). Base64url text is still read.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from crypto.address import normalize_address
from crypto.errors import DecodeError
from crypto.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, DeviceIdentity, PublicIdentity

VOUCH_CONTEXT = b"device-vouch"
VOUCH_LEN = PUBLIC_KEY_LEN + SIGNATURE_LEN


def vouch_payload(address: str, device_key: bytes) -> bytes:
    """The signed bytes: the normalized address, a NUL (never in an address), the key."""
    if len(device_key) != PUBLIC_KEY_LEN:
        raise DecodeError(f"a device key is {PUBLIC_KEY_LEN} bytes, got {len(device_key)}")
    return normalize_address(address).encode() + b"\x00" + device_key


@dataclass(frozen=True, slots=True)
class Vouch:
    """`by` (an existing device's key) says `device_key` is another device of `address`."""

    by: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return self.by + self.signature

    @classmethod
    def from_bytes(cls, raw: bytes) -> Vouch:
        if len(raw) != VOUCH_LEN:
            raise DecodeError(f"a vouch is {VOUCH_LEN} bytes, got {len(raw)}")
        return cls(bytes(raw[:PUBLIC_KEY_LEN]), bytes(raw[PUBLIC_KEY_LEN:]))

    def to_text(self) -> str:
        return self.to_bytes().hex()

    @classmethod
    def from_text(cls, text: str) -> Vouch:
        """A vouch as a person pastes it: hex, or base64url."""
        return cls.from_bytes(_hex_or_base64url(text, 2 * VOUCH_LEN, "a vouch"))

    def verify(self, address: str, device_key: bytes) -> None:
        """Raise VerificationError (or DecodeError) unless this vouch is `by`'s for the pair."""
        PublicIdentity(self.by).verify(VOUCH_CONTEXT, vouch_payload(address, device_key),
                                       self.signature)


def make_vouch(voucher: DeviceIdentity, address: str, device_key: bytes) -> Vouch:
    """`voucher` (a device of `address`) vouches for `device_key` as another device of it."""
    PublicIdentity(device_key)  # refuse a key that is no Ed25519 point
    return Vouch(voucher.public.verify_key,
                 voucher.sign(VOUCH_CONTEXT, vouch_payload(address, device_key)))


def _hex_or_base64url(text: str, hex_len: int, what: str) -> bytes:
    t = text.strip()
    try:
        return bytes.fromhex(t) if len(t) == hex_len else \
            base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
    except (binascii.Error, ValueError):
        raise DecodeError(f"{what} is {hex_len} hex digits or base64url text") from None


def parse_device_key(text: str) -> bytes:
    """A device key as a person pastes it: 64 hex digits or base64url (43 characters)."""
    return PublicIdentity(_hex_or_base64url(text, 2 * PUBLIC_KEY_LEN,
                                            "a device key")).verify_key


def device_key_text(device_key: bytes) -> str:
    """The hex form `parse_device_key` reads back (hex never starts with '-', which a
    command line would take for an option: `peerpost devices vouch KEY`)."""
    return device_key.hex()
