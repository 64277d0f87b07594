"""The transfer handshake: both sides agree, any tampering fails, a wrong peer is refused."""

from __future__ import annotations

import copy

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import CryptoError, DecodeError, VerificationError
from crypto.handshake import (
    HandshakeInitiator,
    HandshakeResponder,
    HandshakeResult,
    SessionCipher,
)
from crypto.identity import DeviceIdentity

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)
MALLORY = DeviceIdentity.from_seed(b"m" * 32)


def run(
    expected: bytes | None = None, *, responder_id: DeviceIdentity = BOB
) -> tuple[HandshakeResult, HandshakeResult]:
    ini = HandshakeInitiator(ALICE, expected_peer=expected)
    res = HandshakeResponder(responder_id)
    m2 = res.receive_hello(ini.hello())
    m3 = ini.receive_response(m2)
    return ini.result, res.receive_finish(m3)


def test_both_sides_agree_on_peer_keys_and_transcript() -> None:
    a, b = run(BOB.peer_id)
    assert a.peer == BOB.public and b.peer == ALICE.public
    assert a.transcript == b.transcript and len(a.transcript) == 32
    assert a.send_key == b.recv_key and a.recv_key == b.send_key
    assert a.send_key != a.recv_key
    ca, cb = a.cipher(), b.cipher()
    assert cb.decrypt(ca.encrypt(b"hello")) == b"hello"
    assert ca.decrypt(cb.encrypt(b"back")) == b"back"


def test_fresh_sessions_have_fresh_transcripts() -> None:
    assert run()[0].transcript != run()[0].transcript


def test_wrong_expected_peer_is_refused() -> None:
    with pytest.raises(VerificationError, match="expected"):
        run(BOB.peer_id, responder_id=MALLORY)


def test_deterministic_with_given_ephemerals() -> None:
    def once() -> bytes:
        ini = HandshakeInitiator(ALICE, ephemeral_seed=b"1" * 32)
        res = HandshakeResponder(BOB, ephemeral_seed=b"2" * 32)
        ini.receive_response(res.receive_hello(ini.hello()))
        return ini.result.transcript

    assert once() == once()


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from([1, 2, 3]), bit=st.integers(min_value=0, max_value=10_000))
def test_a_flipped_bit_anywhere_fails(which: int, bit: int) -> None:
    ini = HandshakeInitiator(ALICE, expected_peer=BOB.peer_id)
    res = HandshakeResponder(BOB)
    m1 = ini.hello()
    if which == 1:
        m1 = _flip(m1, bit % (len(m1) * 8))
    with pytest.raises(CryptoError):
        m2 = res.receive_hello(m1)
        if which == 2:
            m2 = _flip(m2, bit % (len(m2) * 8))
        m3 = ini.receive_response(m2)
        if which == 3:
            m3 = _flip(m3, bit % (len(m3) * 8))
        res.receive_finish(m3)


def test_truncated_and_out_of_order_messages_fail() -> None:
    ini = HandshakeInitiator(ALICE)
    res = HandshakeResponder(BOB)
    with pytest.raises(DecodeError):
        res.receive_finish(b"x" * 112)
    with pytest.raises(DecodeError):
        res.receive_hello(ini.hello()[:-1])
    m2 = res.receive_hello(ini.hello())
    with pytest.raises(DecodeError):
        ini.receive_response(m2 + b"x")


def test_a_man_in_the_middle_cannot_swap_identities() -> None:
    # Mallory relays Alice's hello, then tries to pass Bob's reply on with her own key:
    # the identity block is sealed under keys only Alice and Bob share.
    ini = HandshakeInitiator(ALICE)
    bob = HandshakeResponder(BOB)
    m2 = bob.receive_hello(ini.hello())
    mallory = HandshakeResponder(MALLORY)
    fake = mallory.receive_hello(ini.hello())
    with pytest.raises(VerificationError):
        ini.receive_response(m2[:32] + fake[32:])


def test_session_cipher_rejects_replay_reorder_and_tamper() -> None:
    a, b = run()
    ca, cb = a.cipher(), b.cipher()
    f1, f2 = ca.encrypt(b"one"), ca.encrypt(b"two")
    with pytest.raises(VerificationError):
        cb.decrypt(f2)  # reordered
    assert cb.decrypt(f1) == b"one"
    with pytest.raises(VerificationError):
        cb.decrypt(f1)  # replayed
    c2 = b.cipher()
    with pytest.raises(VerificationError):
        c2.decrypt(_flip(f1, 3))
    with pytest.raises(DecodeError):
        SessionCipher(b"short", b"x" * 32)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.binary(max_size=40))
@settings(max_examples=40)
def test_session_frames_are_libsodiums_chacha20poly1305_byte_for_byte(
        frames: list[bytes], aad: bytes) -> None:
    """A node of an older release seals and opens control frames with libsodium: every
    frame, at every counter, is the same bytes either way."""
    send_key, recv_key = bytes(range(32)), bytes(range(32, 64))
    ours, theirs = SessionCipher(send_key, recv_key), SessionCipher(recv_key, send_key)
    for n, plain in enumerate(frames):
        nonce = bytes(4) + n.to_bytes(8, "big")
        sealed = ours.encrypt(plain, aad)
        assert sealed == sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            plain, aad, nonce, send_key)
        assert theirs.decrypt(sealed, aad) == plain
    twin = copy.deepcopy(theirs)  # the fuzzer copies sessions: same keys, same counters
    sealed = ours.encrypt(b"next", aad)
    assert twin.decrypt(sealed, aad) == theirs.decrypt(sealed, aad) == b"next"
    tampered = bytearray(ours.encrypt(b"x", aad))
    tampered[-1] ^= 1
    with pytest.raises(VerificationError):
        theirs.decrypt(bytes(tampered), aad)
