"""Device vouches: bound to the address, the new key and the vouch context."""

from __future__ import annotations

import base64

import pytest

from crypto.errors import CryptoError, DecodeError, VerificationError
from crypto.identity import DeviceIdentity
from crypto.vouch import (
    VOUCH_CONTEXT,
    VOUCH_LEN,
    Vouch,
    device_key_text,
    make_vouch,
    parse_device_key,
    vouch_payload,
)

OLD = DeviceIdentity.from_seed(b"o" * 32)
NEW = DeviceIdentity.from_seed(b"n" * 32)
ROGUE = DeviceIdentity.from_seed(b"r" * 32)
ADDR = "bob@example.net"


def test_a_vouch_verifies_for_its_address_and_key_only() -> None:
    v = make_vouch(OLD, ADDR, NEW.public.verify_key)
    v.verify("Bob@Example.NET", NEW.public.verify_key)
    with pytest.raises(VerificationError):
        v.verify("carol@example.net", NEW.public.verify_key)
    with pytest.raises(VerificationError):
        v.verify(ADDR, ROGUE.public.verify_key)
    forged = Vouch(ROGUE.public.verify_key, v.signature)
    with pytest.raises(VerificationError):
        forged.verify(ADDR, NEW.public.verify_key)


def test_another_context_signature_is_no_vouch() -> None:
    sig = OLD.sign(b"auth", vouch_payload(ADDR, NEW.public.verify_key))
    with pytest.raises(VerificationError):
        Vouch(OLD.public.verify_key, sig).verify(ADDR, NEW.public.verify_key)
    assert VOUCH_CONTEXT == b"device-vouch"


def test_bytes_and_text_round_trip() -> None:
    v = make_vouch(OLD, ADDR, NEW.public.verify_key)
    assert len(v.to_bytes()) == VOUCH_LEN
    assert Vouch.from_bytes(v.to_bytes()) == v
    assert Vouch.from_text(v.to_text()) == v
    with pytest.raises(DecodeError):
        Vouch.from_bytes(b"x" * 95)
    with pytest.raises(DecodeError):
        Vouch.from_text("not base64 !!")


def test_device_keys_paste_as_hex_or_base64url() -> None:
    key = NEW.public.verify_key
    assert parse_device_key(key.hex()) == key
    assert parse_device_key(device_key_text(key) + "\n") == key
    with pytest.raises(CryptoError):
        parse_device_key("abc")


def test_text_forms_never_look_like_a_command_line_option() -> None:
    """A key or vouch whose base64url text began with '-' (1 in 64) was refused by
    `peerpost init --vouch VOUCH` and `peerpost devices vouch KEY` as an unknown option;
    the printed forms are hex, and base64url pastes are still read."""
    key = b"\xf8" + NEW.public.verify_key[1:]  # base64url: '-' first
    v = Vouch(key, b"\xfb" * 64)
    old_text = base64.urlsafe_b64encode(v.to_bytes()).decode().rstrip("=")
    assert old_text.startswith("-")
    assert not v.to_text().startswith("-") and Vouch.from_text(v.to_text()) == v
    assert Vouch.from_text(old_text) == v
    assert not device_key_text(key).startswith("-")
    assert base64.urlsafe_b64encode(key).decode().startswith("-")

