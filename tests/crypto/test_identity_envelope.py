"""Identities, signatures, sealing and the signed-then-sealed envelope."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.address import normalize_address
from crypto.codec import packb, unpackb
from crypto.envelope import open_envelope, seal_for_recipients, sign_payload
from crypto.errors import DecodeError, VerificationError
from crypto.identity import DeviceIdentity, PublicIdentity, peer_id_of, seal, verify

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)
CAROL = DeviceIdentity.from_seed(b"c" * 32)


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[(bit // 8) % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def test_peer_id_is_blake2b_160_of_the_public_key() -> None:
    import hashlib

    assert ALICE.peer_id == hashlib.blake2b(ALICE.public.verify_key, digest_size=20).digest()
    assert peer_id_of(ALICE.public.verify_key) == ALICE.peer_id
    assert len(ALICE.public.fingerprint().replace(" ", "")) == 40


@pytest.mark.parametrize(
    "text, reason",
    [
        ("not json", "not JSON"),
        ('{"kind": "other"}', "not a peerpost device identity"),
        ('{"kind": "peerpost-device", "version": 99, "seed": ""}', "unsupported"),
        ('{"kind": "peerpost-device", "version": 1, "seed": "zz"}', "64 hex digits"),
    ],
)
def test_bad_identity_files_say_why(text: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        DeviceIdentity.from_json(text)


@given(st.binary(max_size=2048), st.integers(min_value=0))
@settings(max_examples=60)
def test_signature_rejects_any_flipped_bit(message: bytes, bit: int) -> None:
    sig = ALICE.sign(b"test", message)
    verify(ALICE.public.verify_key, b"test", message, sig)
    with pytest.raises(VerificationError):
        verify(ALICE.public.verify_key, b"test", message, flip(sig, bit))
    if message:
        with pytest.raises(VerificationError):
            verify(ALICE.public.verify_key, b"test", flip(message, bit), sig)


def test_signature_contexts_are_disjoint() -> None:
    sig = ALICE.sign(b"one", b"m")
    with pytest.raises(VerificationError):
        ALICE.public.verify(b"two", b"m", sig)
    with pytest.raises(VerificationError):
        BOB.public.verify(b"one", b"m", sig)


@given(st.binary(max_size=4096), st.integers(min_value=0))
@settings(max_examples=60)
def test_sealed_box_round_trip_and_tamper(plaintext: bytes, bit: int) -> None:
    sealed = seal(BOB.public, plaintext)
    assert BOB.open_sealed(sealed) == plaintext
    with pytest.raises(VerificationError):
        BOB.open_sealed(flip(sealed, bit))
    with pytest.raises(VerificationError):
        CAROL.open_sealed(sealed)


@given(st.binary(max_size=4096), st.integers(min_value=0))
@settings(max_examples=60)
def test_envelope_round_trip_and_any_flipped_bit(body: bytes, bit: int) -> None:
    copies = seal_for_recipients(ALICE, "location", body, [BOB.public, CAROL.public])
    assert [r for r, _ in copies] == [BOB.public, CAROL.public]
    for who, (_, blob) in zip((BOB, CAROL), copies, strict=True):
        opened = open_envelope(who, blob)
        assert (opened.kind, opened.sender, opened.body) == ("location", ALICE.public, body)
        with pytest.raises((VerificationError, DecodeError)):
            open_envelope(who, flip(blob, bit))
    with pytest.raises(VerificationError):
        open_envelope(BOB, copies[1][1])  # Carol's copy does not open for Bob


def test_envelope_with_a_forged_signature_is_rejected() -> None:
    # Mallory signs with her key but claims Alice's: the inner signature must fail.
    signed = unpackb(sign_payload(CAROL, "location", b"hello"), max_bytes=1024)
    signed["key"] = ALICE.public.verify_key
    blob = seal(BOB.public, packb(signed))
    with pytest.raises(VerificationError, match="bad signature"):
        open_envelope(BOB, blob)


def test_envelope_over_the_limit_is_refused_before_opening() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        open_envelope(BOB, b"x" * 70_000)


def test_public_identity_refuses_garbage_keys() -> None:
    with pytest.raises(DecodeError):
        PublicIdentity(b"short")


@pytest.mark.parametrize("good", ["bob@example.net", "Bob@Example.NET ", "a.b+c@x-y.example"])
def test_addresses_normalize(good: str) -> None:
    assert normalize_address(good) == good.strip().lower()


@pytest.mark.parametrize("bad", ["", "bob", "@example.net", "bob@", "bob@@x", "b ob@x.net",
                                 "bob@-x.net", "x" * 300 + "@a.b"])
def test_bad_addresses_are_refused_with_the_text(bad: str) -> None:
    with pytest.raises(DecodeError, match="not a valid address"):
        normalize_address(bad)
