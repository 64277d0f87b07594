"""Content sealing, the Merkle tree and capability proofs."""

from __future__ import annotations

from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nacl._sodium import ffi

from crypto import content
from crypto.capability import check_capability_proof, new_capability, prove_capability
from crypto.content import (
    GCM_NONCE_LEN,
    MAX_SEAL_OVERHEAD,
    TAG_LEN,
    ChunkCipher,
    ChunkVerifier,
    LeafScheme,
    aes_key,
    aliasing_into_works,
    chunk_count,
    chunk_hash,
    cpu_has_aes,
    hchacha20,
    in_place_aead,
    leaf_key,
    merkle_proof,
    merkle_root,
    new_content_key,
    open_chunk,
    open_chunk_into,
    plain_chunk_len,
    plain_leaf,
    preferred_scheme,
    seal_chunk,
    seal_chunk_in_place,
    verify_chunk,
    verify_merkle_proof,
)
from crypto.errors import DecodeError, VerificationError

KEY = bytes(range(32))


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[(bit // 8) % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


def sealed_chunks(data: bytes, chunk_size: int, key: bytes = KEY) -> list[bytes]:
    n = chunk_count(len(data), chunk_size)
    return [seal_chunk(key, i, data[i * chunk_size : (i + 1) * chunk_size]) for i in range(n)]


@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=2**63 - 1))
@settings(max_examples=80)
def test_chunk_sealing_is_deterministic_and_round_trips(plain: bytes, index: int) -> None:
    a = seal_chunk(KEY, index, plain)
    assert a == seal_chunk(KEY, index, plain)  # any holder reproduces the exact ciphertext
    assert open_chunk(KEY, index, a) == plain
    assert len(a) == len(plain) + 16


@given(st.binary(min_size=0, max_size=3000), st.integers(min_value=0))
@settings(max_examples=80)
def test_any_flipped_bit_in_a_sealed_chunk_is_rejected(plain: bytes, bit: int) -> None:
    sealed = seal_chunk(KEY, 3, plain)
    with pytest.raises(VerificationError):
        open_chunk(KEY, 3, flip(sealed, bit))


@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=2**63 - 1))
@settings(max_examples=80)
def test_direct_libsodium_paths_match_pynacl_byte_for_byte(plain: bytes, index: int) -> None:
    reference = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plain, b"peerpost/chunk/v1" + index.to_bytes(8, "big"),
        b"peerpost/chunk\x00\x00" + index.to_bytes(8, "big"), KEY)
    assert seal_chunk(KEY, index, plain) == reference
    buf = bytearray(plain) + bytearray(TAG_LEN)
    seal_chunk_in_place(KEY, index, buf, len(plain))
    assert buf == reference  # what the serving side sends is what the leaf names
    out = bytearray(len(plain) + 7)
    assert open_chunk_into(KEY, index, memoryview(buf), out) == plain
    assert open_chunk_into(KEY, index, reference, out) == plain


@given(st.binary(min_size=0, max_size=3000), st.integers(min_value=0))
@settings(max_examples=80)
def test_open_into_rejects_any_flipped_bit_and_releases_no_plaintext(plain: bytes,
                                                                     bit: int) -> None:
    sealed = bytearray(seal_chunk(KEY, 3, plain))
    sealed[(bit // 8) % len(sealed)] ^= 1 << (bit % 8)
    out = bytearray(b"\xaa" * len(plain))
    with pytest.raises(VerificationError):
        open_chunk_into(KEY, 3, sealed, out)
    assert out in (b"\xaa" * len(plain), bytes(len(plain)))  # untouched or wiped


def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


def _ciphers(key: bytes) -> list[ChunkCipher]:
    """The OpenSSL path and the libsodium fallback of one key."""
    fallback = ChunkCipher(key)
    fallback._aead = None  # as without cryptography's *_into calls
    return [ChunkCipher(key), fallback]


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=5000),
       st.integers(min_value=0, max_value=2**64 - 1))
@settings(max_examples=80)
def test_chunk_cipher_seals_exactly_as_pynacl(key: bytes, plain: bytes, index: int) -> None:
    reference = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plain, b"peerpost/chunk/v1" + index.to_bytes(8, "big"),
        b"peerpost/chunk\x00\x00" + index.to_bytes(8, "big"), key)
    for cipher in _ciphers(key):
        out = bytearray(len(plain) + TAG_LEN)
        cipher.seal_into(index, memoryview(plain), out)
        assert out == reference
        back = bytearray(len(plain) + 3)
        assert cipher.open_into(index, out, back) == plain


@given(st.binary(max_size=3000), st.integers(min_value=0))
@settings(max_examples=80)
def test_chunk_cipher_rejects_any_flipped_bit_and_releases_nothing(plain: bytes,
                                                                   bit: int) -> None:
    sealed = bytearray(seal_chunk(KEY, 3, plain))
    sealed[(bit // 8) % len(sealed)] ^= 1 << (bit % 8)
    for cipher in _ciphers(KEY):
        out = bytearray(b"\xaa" * len(plain))
        with pytest.raises(VerificationError):
            cipher.open_into(3, sealed, out)
        assert out in (b"\xaa" * len(plain), bytes(len(plain)))
        with pytest.raises(VerificationError):
            cipher.open_into(4, seal_chunk(KEY, 3, plain), bytearray(len(plain)))


def test_chunk_cipher_checks_its_buffers() -> None:
    cipher = ChunkCipher(KEY)
    with pytest.raises(DecodeError):
        cipher.seal_into(0, b"hello", bytearray(5 + TAG_LEN - 1))
    with pytest.raises(DecodeError):
        cipher.open_into(0, seal_chunk(KEY, 0, b"hello"), bytearray(4))
    with pytest.raises(VerificationError):
        cipher.open_into(0, bytes(TAG_LEN - 1), bytearray(16))
    with pytest.raises(DecodeError):
        ChunkCipher(KEY[:31])


def test_direct_paths_check_their_buffers() -> None:
    sealed = seal_chunk(KEY, 0, b"hello")
    with pytest.raises(DecodeError):
        open_chunk_into(KEY, 0, sealed, bytearray(4))  # too small for the plaintext
    with pytest.raises(VerificationError):
        open_chunk_into(KEY, 0, sealed[:TAG_LEN - 1], bytearray(16))  # shorter than a tag
    with pytest.raises(VerificationError):
        open_chunk_into(KEY, 1, sealed, bytearray(5))  # index bound, as in open_chunk
    with pytest.raises(DecodeError):
        seal_chunk_in_place(KEY, 0, bytearray(5 + TAG_LEN - 1), 5)  # no room for the tag
    with pytest.raises(DecodeError):
        seal_chunk_in_place(KEY[:31], 0, bytearray(5 + TAG_LEN), 5)


def test_chunk_index_and_key_are_bound() -> None:
    sealed = seal_chunk(KEY, 0, b"hello")
    with pytest.raises(VerificationError):
        open_chunk(KEY, 1, sealed)  # moved to another position
    with pytest.raises(VerificationError):
        open_chunk(new_content_key(), 0, sealed)


def test_chunk_layout() -> None:
    assert chunk_count(0, 1024) == 1
    assert chunk_count(1024, 1024) == 1
    assert chunk_count(1025, 1024) == 2
    assert plain_chunk_len(1025, 1024, 1) == 1
    assert plain_chunk_len(0, 1024, 0) == 0


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70), st.data())
@settings(max_examples=80)
def test_merkle_proofs_verify_for_every_leaf(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(min_value=0, max_value=len(leaves) - 1))
    verify_merkle_proof(root, i, len(leaves), leaves[i], merkle_proof(leaves, i))


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=40, unique=True),
       st.data())
@settings(max_examples=80)
def test_any_flipped_bit_in_a_merkle_proof_is_rejected(leaves: list[bytes],
                                                       data: st.DataObject) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(min_value=0, max_value=len(leaves) - 1))
    proof = merkle_proof(leaves, i)
    j = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=255))
    bad = list(proof)
    bad[j] = flip(bad[j], bit)
    with pytest.raises(VerificationError):
        verify_merkle_proof(root, i, len(leaves), leaves[i], bad)
    with pytest.raises(VerificationError):
        verify_merkle_proof(root, i, len(leaves), flip(leaves[i], bit), proof)
    with pytest.raises(VerificationError):
        verify_merkle_proof(flip(root, bit), i, len(leaves), leaves[i], proof)
    other = data.draw(st.integers(min_value=0, max_value=len(leaves) - 1))
    assume(other != i)
    with pytest.raises(VerificationError):
        verify_merkle_proof(root, other, len(leaves), leaves[i], proof)


def test_merkle_root_matches_rfc6962_shape() -> None:
    # Five leaves: root = H(1 | H(1|H(1|a|b)|H(1|c|d)) | e) -- the left side is the largest
    # power of two, as RFC 6962 2.1 requires.
    import blake3

    a, b, c, d, e = (bytes([i]) * 32 for i in range(5))

    def node(x: bytes, y: bytes) -> bytes:
        return blake3.blake3(b"\x01" + x + y).digest()

    assert merkle_root([a, b, c, d, e]) == node(node(node(a, b), node(c, d)), e)
    assert merkle_root([a]) == a


@given(st.binary(min_size=0, max_size=9000), st.integers(min_value=0))
@settings(max_examples=50)
def test_chunk_verifier_accepts_exact_chunks_and_rejects_any_flip(data: bytes, bit: int) -> None:
    chunk_size = 1024
    chunks = sealed_chunks(data, chunk_size)
    leaves = [chunk_hash(c) for c in chunks]
    root = merkle_root(leaves)
    v = ChunkVerifier(root, leaves, len(data), chunk_size)
    for i, c in enumerate(chunks):
        v.verify(i, c)
        with pytest.raises(VerificationError):
            v.verify(i, flip(c, bit))
    verify_chunk(root, leaves, len(data), chunk_size, 0, chunks[0])


def test_hash_list_that_does_not_match_the_root_is_rejected() -> None:
    chunks = sealed_chunks(b"x" * 5000, 1024)
    leaves = [chunk_hash(c) for c in chunks]
    root = merkle_root(leaves)
    with pytest.raises(VerificationError, match="does not match the content id"):
        ChunkVerifier(root, [leaves[1], leaves[0], *leaves[2:]], 5000, 1024)
    with pytest.raises(VerificationError, match="entries"):
        ChunkVerifier(root, leaves[:-1], 5000, 1024)
    with pytest.raises(DecodeError):
        ChunkVerifier(root, leaves, 5000, 3)  # absurd chunk size


def test_a_chunk_from_another_position_is_rejected() -> None:
    chunks = sealed_chunks(b"y" * 4096, 1024)
    leaves = [chunk_hash(c) for c in chunks]
    v = ChunkVerifier(merkle_root(leaves), leaves, 4096, 1024)
    with pytest.raises(VerificationError):
        v.verify(1, chunks[2])


def keyed_plain(data: bytes, chunk_size: int, key: bytes = KEY
                ) -> tuple[bytes, list[bytes], list[bytes]]:
    """(content id, KEYED_PLAIN leaves, sealed chunks) of `data`."""
    n = chunk_count(len(data), chunk_size)
    plains = [data[i * chunk_size : (i + 1) * chunk_size] for i in range(n)]
    leaves = [plain_leaf(leaf_key(key), p) for p in plains]
    return merkle_root(leaves), leaves, sealed_chunks(data, chunk_size, key)


def test_keyed_plain_catches_a_key_holder_that_seals_other_plaintext() -> None:
    # A co-recipient holds the content key: its forged chunk passes the AEAD, and only the
    # keyed leaf (collision resistant whether or not the key is known) tells it apart.
    data = bytes(range(256)) * 16
    root, leaves, _ = keyed_plain(data, 1024)
    v = ChunkVerifier(root, leaves, len(data), 1024, scheme=LeafScheme.KEYED_PLAIN, key=KEY)
    forged_plain = bytearray(data[1024:2048])
    forged_plain[7] ^= 1
    forged = seal_chunk(KEY, 1, bytes(forged_plain))
    assert open_chunk(KEY, 1, forged) == forged_plain
    out = bytearray(1024)
    with pytest.raises(VerificationError, match="chunk 1 does not match its hash"):
        v.open_verified(ChunkCipher(KEY), 1, forged, out)
    assert out == bytes(1024), "nothing of the forged plaintext is left to write"
    assert not v.check_plain(1, forged_plain)


def test_keyed_plain_leaves_depend_on_the_content_key_and_need_it() -> None:
    data = b"the same file" * 300
    root_a, leaves_a, _ = keyed_plain(data, 1024, KEY)
    root_b, _, _ = keyed_plain(data, 1024, new_content_key())
    # The id (announced in the DHT) reveals nothing of the file without the key: the same
    # file under another key, or hashed without one, gives unrelated leaves.
    assert root_a != root_b
    assert leaves_a[0] != chunk_hash(data[:1024])
    assert leaf_key(KEY) != KEY and len(leaf_key(KEY)) == 32
    with pytest.raises(DecodeError):
        ChunkVerifier(root_a, leaves_a, len(data), 1024, scheme=LeafScheme.KEYED_PLAIN)
    v = ChunkVerifier(root_a, leaves_a, len(data), 1024, scheme=LeafScheme.KEYED_PLAIN,
                      key=KEY)
    with pytest.raises(DecodeError):
        v.verify(0, seal_chunk(KEY, 0, data[:1024]))  # its chunks are checked once opened
    sealed_leaves = [chunk_hash(c) for c in sealed_chunks(data, 1024)]
    with pytest.raises(VerificationError, match="content id"):
        ChunkVerifier(root_a, sealed_leaves, len(data), 1024, scheme=LeafScheme.KEYED_PLAIN,
                      key=KEY)


def test_chunk_nonces_are_unique_per_index_under_one_key() -> None:
    # One key, many indexes: the keystreams (ciphertext of zeros) never repeat, so no two
    # chunks of a content share a nonce; the same index under another key differs too.
    zeros = bytes(64)
    streams = {seal_chunk(KEY, i, zeros)[:64] for i in range(2000)}
    assert len(streams) == 2000
    assert seal_chunk(new_content_key(), 0, zeros)[:64] not in streams
    c = ChunkCipher(KEY)
    out = bytearray(64 + TAG_LEN)
    for i in (0, 1, 255, 256, 2**32, 2**63 - 1):
        c.seal_into(i, zeros, out)
        assert bytes(out) == seal_chunk(KEY, i, zeros)


def plain_leaf_content(data: bytes, chunk_size: int,
                       scheme: LeafScheme = LeafScheme.KEYED_PLAIN_AES, key: bytes = KEY,
                       ) -> tuple[ChunkVerifier, ChunkCipher, list[bytes]]:
    """A content of `data` whose leaves hash the plaintext: its verifier, cipher and one
    sealing of each chunk."""
    root, leaves, _ = keyed_plain(data, chunk_size, key)
    cipher = ChunkCipher(key, scheme)
    chunks = []
    for i in range(len(leaves)):
        plain = data[i * chunk_size : (i + 1) * chunk_size]
        out = bytearray(len(plain) + cipher.overhead)
        cipher.seal_into(i, plain, out)
        chunks.append(bytes(out))
    verifier = ChunkVerifier(root, leaves, len(data), chunk_size, scheme=scheme, key=key)
    return verifier, cipher, chunks


@pytest.mark.parametrize("scheme", [LeafScheme.KEYED_PLAIN, LeafScheme.KEYED_PLAIN_AES])
@given(st.binary(min_size=0, max_size=5000), st.integers(min_value=0))
@settings(max_examples=50)
def test_plain_leaves_open_exact_chunks_and_reject_any_flip_leaving_nothing(
        scheme: LeafScheme, data: bytes, bit: int) -> None:
    chunk_size = 1024
    v, cipher, chunks = plain_leaf_content(data, chunk_size, scheme)
    out = bytearray(chunk_size)
    for i, c in enumerate(chunks):
        plain = data[i * chunk_size : (i + 1) * chunk_size]
        assert len(c) == len(plain) + scheme.seal_overhead
        assert v.open_verified(cipher, i, c, out) == plain
        assert v.check_plain(i, plain)
        out[:] = b"\xee" * chunk_size
        with pytest.raises(VerificationError):  # nonce, ciphertext or tag
            v.open_verified(cipher, i, flip(c, bit), out)
        assert out[: len(plain)] == bytes(len(plain))


def test_aes_nonces_are_fresh_for_every_sealing_and_the_index_is_bound() -> None:
    data = bytes(range(256)) * 8
    v, cipher, chunks = plain_leaf_content(data, 1024)
    assert cipher.overhead == MAX_SEAL_OVERHEAD == GCM_NONCE_LEN + TAG_LEN
    again = bytearray(1024 + cipher.overhead)
    nonces = set()
    for _ in range(500):  # the same chunk sealed again and again (serving, co-recipients)
        cipher.seal_into(0, data[:1024], again)
        nonces.add(bytes(again[:GCM_NONCE_LEN]))
        assert v.open_verified(cipher, 0, again, bytearray(1024)) == data[:1024]
    assert len(nonces) == 500
    with pytest.raises(VerificationError, match="chunk 1 does not open"):
        cipher.open(1, chunks[0])  # chunk 0 passed off as chunk 1: the AAD binds the index
    with pytest.raises(VerificationError, match="does not open"):
        ChunkCipher(new_content_key(), LeafScheme.KEYED_PLAIN_AES).open(0, chunks[0])
    with pytest.raises(VerificationError, match="does not open"):
        ChunkCipher(KEY, LeafScheme.KEYED_PLAIN).open(0, chunks[0])  # not a ChaCha chunk
    with pytest.raises(VerificationError, match="shorter than its nonce"):
        cipher.open(0, b"short")
    with pytest.raises(VerificationError, match="wrong length"):
        v.open_verified(cipher, 0, chunks[0][:-1], bytearray(1024))
    with pytest.raises(DecodeError, match="room"):
        cipher.seal_into(0, data[:1024], bytearray(1024 + TAG_LEN))


@pytest.mark.parametrize("in_place", [None, False], ids=["installed", "copying"])
@pytest.mark.parametrize("scheme", list(LeafScheme))
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=70_000),
       st.integers(min_value=0, max_value=2**64 - 1))
@settings(max_examples=40)
def test_sealing_in_place_makes_the_bytes_sealing_into_a_second_buffer_does(
        in_place: bool | None, scheme: LeafScheme, key: bytes, plain: bytes,
        index: int) -> None:
    # Serving reads a chunk straight into the buffer that goes out and seals it there;
    # receiving opens it where it arrived. Both ways: as this installation's
    # `cryptography` allows, and copying first as where it refuses aliased buffers.
    cipher = ChunkCipher(key, scheme, in_place=in_place)
    n, lead = len(plain), scheme.seal_lead
    buf = bytearray(b"\xaa" * (n + cipher.overhead))
    buf[lead : lead + n] = plain
    cipher.seal_in_place(index, buf, n)
    if scheme is LeafScheme.KEYED_PLAIN_AES:  # one-shot AES-GCM under the nonce it drew
        nonce = bytes(buf[:GCM_NONCE_LEN])
        aad = b"peerpost/chunk/v1" + index.to_bytes(8, "big")
        assert buf[GCM_NONCE_LEN:] == AESGCM(aes_key(key)).encrypt(nonce, plain, aad)
    else:
        assert buf == seal_chunk(key, index, plain)
    assert cipher.open(index, buf) == plain
    with memoryview(buf) as view:
        assert cipher.open_into(index, view, view[lead:]) == plain
    assert buf[lead : lead + n] == plain
    with pytest.raises(DecodeError, match="room"):
        cipher.seal_in_place(index, bytearray(n + cipher.overhead + 1), n)


def _address_range(b: Any) -> tuple[int, int]:
    view = memoryview(b)
    start = int(ffi.cast("uintptr_t", ffi.from_buffer(view)))
    return start, start + view.nbytes


class _WrappedAead:
    """An AEAD of `cryptography` (its classes can't be subclassed), passed through."""

    base: Any

    def __init__(self, key: bytes) -> None:
        self.real = self.base(key)

    def encrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        return bytes(self.real.encrypt(nonce, data, aad))

    def decrypt(self, nonce: bytes, data: Any, aad: Any) -> bytes:
        return bytes(self.real.decrypt(nonce, data, aad))

    def encrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> int:
        return int(self.real.encrypt_into(nonce, data, aad, buf))

    def decrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> int:
        return int(self.real.decrypt_into(nonce, data, aad, buf))


def _refusing_overlap(aead: type[Any]) -> type[Any]:
    """`aead` as cryptography 51.0.1 has it (pyca/cryptography#15656): *_into with input
    and output sharing any byte, exact aliasing too, raises ValueError."""

    class Refusing(_WrappedAead):
        base = aead

        def _check(self, data: Any, buf: Any) -> None:
            (a0, a1), (b0, b1) = _address_range(data), _address_range(buf)
            if a0 < b1 and b0 < a1:
                raise ValueError("data and buf must not overlap")

        def encrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> int:
            self._check(data, buf)
            return super().encrypt_into(nonce, data, aad, buf)

        def decrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> int:
            self._check(data, buf)
            return super().decrypt_into(nonce, data, aad, buf)

    return Refusing


def _garbling_aliases(aead: type[Any]) -> type[Any]:
    """`aead` where sealing in place gives other bytes than sealing out of place (as a
    release that reads input it has already overwritten would)."""

    class Garbling(_WrappedAead):
        base = aead

        def encrypt_into(self, nonce: bytes, data: Any, aad: Any, buf: Any) -> int:
            n = super().encrypt_into(nonce, data, aad, buf)
            if _address_range(data)[0] == _address_range(buf)[0]:
                memoryview(buf)[0] ^= 1
            return n

    return Garbling


def test_in_place_is_used_only_where_the_installed_cryptography_gets_it_right() -> None:
    assert in_place_aead() is aliasing_into_works((AESGCM, ChaCha20Poly1305))
    for wrap in (_refusing_overlap, _garbling_aliases):
        assert not aliasing_into_works((wrap(AESGCM), ChaCha20Poly1305))
        assert not aliasing_into_works((AESGCM, wrap(ChaCha20Poly1305)))


@pytest.mark.parametrize("scheme", [LeafScheme.SEALED, LeafScheme.KEYED_PLAIN_AES])
def test_a_cryptography_that_refuses_aliased_buffers_still_seals_and_opens(
        monkeypatch: pytest.MonkeyPatch, scheme: LeafScheme) -> None:
    aes, chacha = _refusing_overlap(AESGCM), _refusing_overlap(ChaCha20Poly1305)
    monkeypatch.setattr(content, "_AESGCM", aes)
    monkeypatch.setattr(content, "_ChaCha20Poly1305", chacha)
    verdict = aliasing_into_works((aes, chacha))
    assert verdict is False
    plain = bytes(range(256)) * 300 + b"tail"
    n, lead = len(plain), scheme.seal_lead
    for in_place in (True, verdict):
        cipher = ChunkCipher(KEY, scheme, in_place=in_place)
        buf = bytearray(n + cipher.overhead)
        buf[lead : lead + n] = plain
        if in_place:  # what the node did before it checked: every served chunk failed
            with pytest.raises(ValueError, match="must not overlap"):
                cipher.seal_in_place(3, buf, n)
            continue
        cipher.seal_in_place(3, buf, n)
        reference = ChunkCipher(KEY, scheme, in_place=False)
        assert reference.open(3, buf) == plain
        if scheme is LeafScheme.SEALED:
            assert buf == seal_chunk(KEY, 3, plain)
        assert cipher.open_into(3, bytes(buf), bytearray(n)) == plain  # two buffers
        with memoryview(buf) as view:
            assert cipher.open_into(3, view, view[lead:]) == plain  # opened where it lies
        assert buf[lead : lead + n] == plain


def test_aes_catches_a_key_holder_that_seals_other_plaintext() -> None:
    data = bytes(range(256)) * 16
    v, cipher, _ = plain_leaf_content(data, 1024)
    forged_plain = bytearray(data[1024:2048])
    forged_plain[7] ^= 1
    forged = bytearray(1024 + cipher.overhead)
    cipher.seal_into(1, forged_plain, forged)
    assert cipher.open(1, forged) == forged_plain  # the AEAD accepts a key holder's chunk
    out = bytearray(1024)
    with pytest.raises(VerificationError, match="chunk 1 does not match its hash"):
        v.open_verified(cipher, 1, forged, out)
    assert out == bytes(1024), "nothing of the forged plaintext is left to write"


def test_aes_is_chosen_where_the_cpu_has_it() -> None:
    x86 = "processor : 0\nflags : fpu sse2 aes pclmulqdq avx2\n"
    assert cpu_has_aes(x86, "x86_64")
    assert not cpu_has_aes("flags : fpu sse2 avx2\n", "x86_64")
    assert not cpu_has_aes("flags : fpu aes\n", "x86_64")  # no carry-less multiply
    assert cpu_has_aes("Features : fp asimd aes pmull sha1\n", "aarch64")
    assert not cpu_has_aes("Features : half thumb vfp\n", "armv7l")
    assert cpu_has_aes(None, "x86_64") and not cpu_has_aes(None, "riscv64")
    x86_aes = "flags : fpu sse2 aes pclmulqdq\n"
    assert preferred_scheme(x86_aes, "x86_64") is LeafScheme.KEYED_PLAIN_AES
    assert preferred_scheme("flags : fpu sse2\n", "x86_64") is LeafScheme.KEYED_PLAIN
    assert preferred_scheme(None, "riscv64") is LeafScheme.KEYED_PLAIN


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
       st.integers(min_value=0))
@settings(max_examples=50)
def test_capability_proofs_are_bound_to_the_session(cid: bytes, transcript: bytes,
                                                    bit: int) -> None:
    cap = new_capability()
    proof = prove_capability(cap, cid, transcript)
    check_capability_proof(cap, cid, transcript, proof)
    with pytest.raises(VerificationError):
        check_capability_proof(cap, cid, flip(transcript, bit), proof)  # replayed elsewhere
    with pytest.raises(VerificationError):
        check_capability_proof(cap, cid, transcript, flip(proof, bit))
    with pytest.raises(VerificationError):
        check_capability_proof(new_capability(), cid, transcript, proof)
