"""Content sealing and the Merkle tree that names it.

A file is cut into chunks. Chunk *i* is sealed with XChaCha20-Poly1305 under the content key
with a nonce derived from *i*, so anyone holding the plaintext and the key reproduces the
exact ciphertext: co-recipients can serve chunks that verify against the sender's root.
The key is random per message, which is what makes a deterministic nonce safe (one key
never seals two different plaintexts under the same index).

The content id is the Merkle root over one leaf hash per chunk. Hash: BLAKE3, chosen by
measurement (`python -m benchmarks hashes`; on this machine kind, with AVX-512, one thread
hashes 1 MiB chunks at 6.5 GB/s, 0.15 CPU s per GB, against SHA-256's 1.8 GB/s). The tree
follows RFC 6962 section 2.1: inner nodes H(0x01 || l || r), and a tree of n leaves splits
at the largest power of two below n, so proofs are short and no leaf can be passed off as
an inner node. What a leaf covers is the content's *leaf scheme* (`LeafScheme`):

- SEALED (1, location messages of version 1): H(0x00 || sealed chunk). Naming a file meant
  sealing every chunk once (0.27 CPU s/GB here) only to hash it, and serving sealed it again.
- KEYED_PLAIN (2, what `send` makes on a CPU without AES instructions): BLAKE3 in keyed
  mode, key K_L = BLAKE3 derive_key(LEAF_CONTEXT, content key), over 0x00 || plaintext
  chunk. Naming a file is one hash pass over the plaintext, with no sealing.

Why KEYED_PLAIN keeps every property SEALED had:

- *Each chunk is verified before it is written.* The receiver opens the sealed chunk into
  its own buffer (the AEAD tag is checked under the content key; a forgery leaves nothing
  in the buffer), hashes the plaintext with K_L and compares with the leaf from the hash
  list, which was checked against the content id first (`open_verified`). Only a match is
  written; a mismatch wipes the buffer and raises VerificationError.
- *A lying peer is caught.* Everybody who can verify a chunk holds the content key (the
  recipients), and so does every co-recipient who serves: a malicious one can seal any
  plaintext it likes so that the AEAD accepts it, but it cannot find a plaintext other than
  the sender's with the same leaf. Keyed BLAKE3 stays collision- and second-preimage-
  resistant when its key is known (the key only replaces the IV of the same compression
  function); nothing here relies on K_L being secret from recipients. The chunk fails
  `open_verified`, and the downloader bans the source as before.
- *Co-recipients serve and are verified the same way.* Sealing is deterministic, so a
  co-recipient's chunk i opens to the same plaintext, whose keyed leaf is the sender's.
- *No nonce is reused.* Nonces are unchanged: (content key, index), the key random per
  message. The sender checks each chunk's keyed leaf on the plaintext it read *before*
  sealing it (`LocalContent.read_sealed`), so a file edited in place after `send` is never
  sealed under a nonce the old plaintext already went out under.
- *The content id tells nothing about the file.* It is announced in the DHT; since the
  leaves are keyed with a key derived from the secret content key, nobody without the key
  can confirm a guessed file from it (as SEALED leaves, hashes of ciphertext under a random
  key, did not allow either).

- KEYED_PLAIN_AES (3, what `send` makes on a CPU with AES instructions): the leaves of
  KEYED_PLAIN; each chunk is sealed with AES-256-GCM under K_E = BLAKE3
  derive_key(AES_CONTEXT, content key), with a fresh random 96-bit nonce for every sealing,
  sent in front of the ciphertext (nonce || ciphertext || tag, 28 bytes more than the
  plaintext). Measured here on 1 MiB chunks: 0.10 CPU s per GB each way, against 0.27 for
  ChaCha20-Poly1305; and serving no longer hashes what it seals (0.16 s/GB).

What KEYED_PLAIN_AES changes in that argument: only the nonces. Every sealing draws its own
from the operating system's CSPRNG, so no two sealings under one key share a nonce except
by chance: at most q²/2^97 for q sealings, 2^-33 at 2^32 sealings of one content (4 PiB of
1 MiB chunks), the bound NIST SP 800-38D sets for random GCM nonces. An edited file is then
sealed under fresh nonces like any other plaintext, so the sender need not check a chunk
against its leaf before sealing it: the receivers' leaf check rejects an edited chunk (and
the source that served it), and the sender stops serving once size or mtime show the edit.
Ciphertexts of one chunk differ between sealings and between holders; nothing depends on
them being equal, since the leaves name the plaintext. A CPU without AES instructions
makes KEYED_PLAIN contents (`preferred_scheme`): software AES is slow and not constant-time.

A content keeps the scheme it was named with (the location message's version says which),
so downloads started before an upgrade verify as they began.
"""

from __future__ import annotations

import functools
import hmac
import os
import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Protocol

import blake3
import nacl.bindings
import nacl.exceptions
import nacl.utils

# libsodium itself, through PyNaCl's cffi module, for the per-chunk hot path only: PyNaCl's
# wrappers take `bytes` alone, fill a zeroed buffer and copy it into a new `bytes`, which
# measured 772 MiB/s opening 1 MiB chunks here against 1,131 MiB/s calling libsodium into a
# reused buffer. Same function, same nonce and AAD, so the sealed bytes are identical.
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

try:
    from cryptography.exceptions import InvalidTag as _InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM
    from cryptography.hazmat.primitives.ciphers.aead import (
        ChaCha20Poly1305 as _ChaCha20Poly1305,
    )
except ImportError:  # pragma: no cover - aiortc brings it in
    _HAVE_OPENSSL_INTO = _HAVE_AES = False
else:
    _HAVE_OPENSSL_INTO = hasattr(_ChaCha20Poly1305, "decrypt_into")
    _HAVE_AES = hasattr(_AESGCM, "decrypt_into")

from crypto.errors import DecodeError, VerificationError

KEY_LEN = 32
HASH_LEN = 32
TAG_LEN = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
DEFAULT_CHUNK_SIZE = 1 << 20
# Files from LARGE_CONTENT up are cut into larger chunks: every chunk costs both nodes a
# fixed amount of work on top of its bytes (a request, a frame, hand-offs between threads).
# A 1 GiB delivery here took 0.14 CPU s/GB less in 2 MiB chunks than in 1 MiB ones, and in
# 4 MiB chunks 0.10-0.15 s/GB less again, 5-7% less time from `send` to complete (runs of
# 6 alternating pairs); 3 MiB did about as well, 8 MiB 7% worse (a chunk no longer fits
# the 2 MiB L2 cache of a core while it is hashed and sealed or opened). But a player
# seeking in a clip that is still downloading waits for whole chunks: a seek to 80% of a
# 611 MB clip from a sender capped at 8 MB/s took 1,746 ms in 4 MiB chunks against 920 ms
# in 2 MiB ones. So audio and video keep 2 MiB, and files under LARGE_CONTENT 1 MiB (a
# swarm trades in chunks, and most clips are smaller).
LARGE_CONTENT = 512 << 20
LARGE_CHUNK_SIZE = 4 << 20
LARGE_MEDIA_CHUNK_SIZE = 2 << 20
MIN_CHUNK_SIZE = 1 << 10  # only for small contents: see SMALL_CONTENT_CHUNKS
MAX_CHUNK_SIZE = 16 << 20
MAX_CONTENT_SIZE = 1 << 44  # 16 TiB
# Every chunk costs the receiver state before any source is contacted (a bit, a hash, a
# scheduler slot): measured here, 2 GiB in 1 KiB chunks (2,097,152 chunks) cost 380 MiB
# and 1.8 s of blocked loop. So a content has at most MAX_CHUNKS chunks (1 TiB at the
# default 1 MiB), and one of more than SMALL_CONTENT_CHUNKS chunks uses chunks of at least
# MIN_LARGE_CHUNK_SIZE: chunks smaller than 64 KiB only make sense for small files.
MAX_CHUNKS = 1 << 20
SMALL_CONTENT_CHUNKS = 1 << 10
MIN_LARGE_CHUNK_SIZE = 64 << 10
_NONCE_PREFIX = b"peerpost/chunk\x00\x00"  # 16 bytes + 8-byte index = 24-byte XChaCha nonce
_AAD_PREFIX = b"peerpost/chunk/v1"
_IETF_NONCE_PAD = bytes(4)  # XChaCha20's inner nonce: 4 zero bytes, then nonce[16:]
# BLAKE3 derive_key contexts for K_L and K_E (globally unique, hardcoded, as BLAKE3 asks).
LEAF_CONTEXT = "peerpost 2026-12-05 chunk leaf key v2"
AES_CONTEXT = "peerpost 2026-12-05 chunk AES-256-GCM key v3"
GCM_NONCE_LEN = 12
# What sealing adds to a chunk, per scheme; frames and buffers are sized for the largest.
MAX_SEAL_OVERHEAD = GCM_NONCE_LEN + TAG_LEN


class LeafScheme(IntEnum):
    """What a content's Merkle leaves hash (see the module docstring)."""

    SEALED = 1  # H(0x00 || sealed chunk)
    KEYED_PLAIN = 2  # keyed H_{K_L}(0x00 || plaintext chunk)
    KEYED_PLAIN_AES = 3  # KEYED_PLAIN's leaves; AES-256-GCM with random nonces

    @property
    def plain_leaves(self) -> bool:
        """Whether the leaves hash the plaintext (KEYED_PLAIN and KEYED_PLAIN_AES)."""
        return self is not LeafScheme.SEALED

    @property
    def seal_overhead(self) -> int:
        """Bytes a sealed chunk has beyond its plaintext."""
        return MAX_SEAL_OVERHEAD if self is LeafScheme.KEYED_PLAIN_AES else TAG_LEN

    @property
    def seal_lead(self) -> int:
        """Bytes of a sealed chunk in front of its ciphertext (the GCM nonce): opened in
        place, the plaintext starts this far into the sealed chunk."""
        return GCM_NONCE_LEN if self is LeafScheme.KEYED_PLAIN_AES else 0


def cpu_has_aes(cpuinfo: str | None, machine: str) -> bool:
    """Whether a CPU has AES and carry-less multiply instructions (AES-NI and PCLMULQDQ on
    x86, the AES and PMULL extensions on ARM), from Linux's /proc/cpuinfo text; where that
    says nothing (None, or no flags line), whether `machine` is x86-64 or ARM64, every one
    of which sold since about 2015 has both."""
    for line in (cpuinfo or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags = set(value.split())
            return "aes" in flags and bool(flags & {"pclmulqdq", "pmull"})
    return machine.lower() in ("x86_64", "amd64", "arm64", "aarch64")


def preferred_scheme(cpuinfo: str | None, machine: str) -> LeafScheme:
    """The scheme `send` names new contents with on a machine whose /proc/cpuinfo text is
    `cpuinfo` (None where it has none) and whose `platform.machine()` is `machine`."""
    if _HAVE_AES and cpu_has_aes(cpuinfo, machine):
        return LeafScheme.KEYED_PLAIN_AES
    return LeafScheme.KEYED_PLAIN


def leaf_key(content_key: bytes) -> bytes:
    """K_L: the BLAKE3 key KEYED_PLAIN leaves are hashed under."""
    if len(content_key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    out: bytes = blake3.blake3(content_key, derive_key_context=LEAF_CONTEXT).digest()
    return out


def leaf_hasher(key_l: bytes) -> blake3.blake3:
    """A KEYED_PLAIN leaf being hashed, under K_L: fed one chunk's plaintext in pieces of
    any size, its `digest()` is `plain_leaf` of the whole chunk."""
    return blake3.blake3(b"\x00", key=key_l)


def plain_leaf(key_l: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
    """The KEYED_PLAIN leaf of one plaintext chunk, under K_L = `leaf_key(content key)`."""
    h = leaf_hasher(key_l)
    h.update(plaintext)
    out: bytes = h.digest()
    return out


def new_content_key() -> bytes:
    """A fresh random content key; one per message, never reused."""
    return nacl.utils.random(KEY_LEN)


def check_layout(size: int, chunk_size: int) -> None:
    """Raise DecodeError unless (size, chunk_size) describe a content we accept."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecodeError(f"chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if not 0 <= size <= MAX_CONTENT_SIZE:
        raise DecodeError(f"content size {size} outside 0..{MAX_CONTENT_SIZE}")
    count = chunk_count(size, chunk_size)
    if count > MAX_CHUNKS:
        raise DecodeError(f"{count} chunks of {chunk_size} bytes: at most {MAX_CHUNKS}")
    if count > SMALL_CONTENT_CHUNKS and chunk_size < MIN_LARGE_CHUNK_SIZE:
        raise DecodeError(f"{count} chunks of {chunk_size} bytes: a content of more than "
                          f"{SMALL_CONTENT_CHUNKS} chunks uses chunks of at least "
                          f"{MIN_LARGE_CHUNK_SIZE} bytes")


def chunk_size_for(size: int, *, media: bool = False) -> int:
    """The chunk size a file of `size` bytes is named with; `media`: audio or video, which
    a recipient may play while it downloads."""
    if size < LARGE_CONTENT:
        return DEFAULT_CHUNK_SIZE
    return LARGE_MEDIA_CHUNK_SIZE if media else LARGE_CHUNK_SIZE


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks; an empty file still has one (empty) chunk so its root is defined."""
    return max(1, -(-size // chunk_size))


def plain_chunk_len(size: int, chunk_size: int, index: int) -> int:
    """Plaintext length of chunk `index`."""
    n = chunk_count(size, chunk_size)
    if not 0 <= index < n:
        raise DecodeError(f"chunk index {index} outside 0..{n - 1}")
    return min(chunk_size, size - index * chunk_size) if size else 0


def sealed_chunk_len(size: int, chunk_size: int, index: int,
                     scheme: LeafScheme = LeafScheme.SEALED) -> int:
    return plain_chunk_len(size, chunk_size, index) + LeafScheme(scheme).seal_overhead


def aes_key(content_key: bytes) -> bytes:
    """K_E: the AES-256-GCM key of a KEYED_PLAIN_AES content's chunks."""
    if len(content_key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    out: bytes = blake3.blake3(content_key, derive_key_context=AES_CONTEXT).digest()
    return out


def _nonce(index: int) -> bytes:
    return _NONCE_PREFIX + index.to_bytes(8, "big")


def _aad(index: int) -> bytes:
    return _AAD_PREFIX + index.to_bytes(8, "big")


def seal_chunk(key: bytes, index: int, plaintext: bytes | memoryview) -> bytes:
    """Deterministically seal chunk `index` (same key, index and plaintext → same bytes)."""
    if len(key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        bytes(plaintext), _aad(index), _nonce(index), key
    )
    return out


def seal_chunk_in_place(key: bytes, index: int, buf: bytearray | memoryview,
                        plain_len: int) -> None:
    """Seal chunk `index` in place: `buf` holds `plain_len` plaintext bytes followed by
    TAG_LEN bytes of room, and afterwards holds exactly `seal_chunk`'s output.

    For the serving side: read the plaintext straight into the buffer that goes out, with
    no second buffer and no copy."""
    if len(key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    if plain_len < 0 or len(buf) != plain_len + TAG_LEN:
        raise DecodeError(f"a buffer for {plain_len} plaintext bytes is {plain_len + TAG_LEN} "
                          f"bytes long, got {len(buf)}")
    aad, c = _aad(index), _ffi.from_buffer(buf, require_writable=True)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        c, _ffi.NULL, c, plain_len, aad, len(aad), _ffi.NULL, _nonce(index), key)
    if rc != 0:  # pragma: no cover - libsodium fails only on absurd lengths
        raise DecodeError(f"chunk {index} cannot be sealed")


def _opened_len(index: int, sealed: bytes | bytearray | memoryview,
                out: bytearray | memoryview) -> int:
    """The plaintext length of a sealed chunk, checked against the room in `out`."""
    n = len(sealed) - TAG_LEN
    if n < 0:
        raise VerificationError(f"chunk {index} is shorter than its tag")
    if len(out) < n:
        raise DecodeError(f"output buffer of {len(out)} bytes for a {n}-byte chunk")
    return n


def open_chunk_into(key: bytes, index: int, sealed: bytes | bytearray | memoryview,
                    out: bytearray | memoryview) -> memoryview:
    """Decrypt and authenticate chunk `index` into `out` (at least `len(sealed) - TAG_LEN`
    bytes); returns the view of `out` holding the plaintext, or raises VerificationError.

    libsodium checks the tag before it decrypts, and zeroes `out` on a forgery: no
    unauthenticated plaintext is ever released. Runs without the GIL; a reused `out` means
    no allocation per chunk."""
    if len(key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    n = _opened_len(index, sealed, out)
    aad = _aad(index)
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        _ffi.from_buffer(out, require_writable=True), _ffi.NULL, _ffi.NULL,
        _ffi.from_buffer(sealed), len(sealed), aad, len(aad), _nonce(index), key)
    if rc != 0:
        raise VerificationError(f"chunk {index} does not open with the content key")
    return memoryview(out)[:n]


def _rotl32(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha, section 2.2): the subkey XChaCha20 encrypts
    under. Pure Python, run once per content key: our nonces share their first 16 bytes."""
    if len(key) != KEY_LEN or len(nonce16) != 16:
        raise DecodeError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    s = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key),
         *struct.unpack("<4I", nonce16)]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl32(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl32(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = _rotl32(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = _rotl32(s[b] ^ s[c], 7)

    for _ in range(10):
        quarter(0, 4, 8, 12)
        quarter(1, 5, 9, 13)
        quarter(2, 6, 10, 14)
        quarter(3, 7, 11, 15)
        quarter(0, 5, 10, 15)
        quarter(1, 6, 11, 12)
        quarter(2, 7, 8, 13)
        quarter(3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


class _IntoAead(Protocol):
    """What `in_place_aead` drives: an AEAD of `cryptography` with the *_into calls."""

    def __init__(self, key: bytes) -> None: ...

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def encrypt_into(self, nonce: bytes, data: memoryview, associated_data: bytes | None,
                     buf: memoryview) -> int: ...

    def decrypt_into(self, nonce: bytes, data: memoryview, associated_data: bytes | None,
                     buf: memoryview) -> int: ...


def aliasing_into_works(aeads: Iterable[type[_IntoAead]]) -> bool:
    """Whether each AEAD seals and opens with input and output the same bytes (the layout
    of `ChunkCipher.seal_in_place` and of a chunk opened where it arrived) and gets the
    bytes it gets out of place. cryptography 50 does (OpenSSL's EVP calls allow exact
    aliasing); 51.0.1, after pyca/cryptography#15656, raises ValueError "data and buf must
    not overlap" for any overlap, exact or partial; a release may as well copy or garble.
    A refusal or a wrong byte means False."""
    key, nonce, aad = bytes(range(KEY_LEN)), bytes(GCM_NONCE_LEN), b"peerpost/in-place"
    plain = bytes(range(256)) * 4 + b"odd"  # several blocks and a partial one
    try:
        for make in aeads:
            aead = make(key)
            sealed = aead.encrypt(nonce, plain, aad)
            buf = bytearray(plain) + bytes(len(sealed) - len(plain))
            with memoryview(buf) as view:
                aead.encrypt_into(nonce, view[:len(plain)], aad, view)
                if buf != sealed:
                    return False
                aead.decrypt_into(nonce, view, aad, view[:len(plain)])
                if buf[:len(plain)] != plain:
                    return False
    except Exception:  # whatever a release raises, in place is off
        return False
    return True


@functools.cache
def in_place_aead() -> bool:
    """`aliasing_into_works` for the installed `cryptography`, checked once per process:
    each ChunkCipher reads the answer when it is made, so a chunk costs one attribute
    test. False: chunks are copied before OpenSSL seals or opens them where they lie."""
    return _HAVE_AES and _HAVE_OPENSSL_INTO and aliasing_into_works(
        (_AESGCM, _ChaCha20Poly1305))


def _shares_memory(a: memoryview, b: memoryview) -> bool:
    """Whether two buffers overlap in memory."""
    if not a.nbytes or not b.nbytes:
        return False
    pa = int(_ffi.cast("uintptr_t", _ffi.from_buffer(a)))
    pb = int(_ffi.cast("uintptr_t", _ffi.from_buffer(b)))
    return pa < pb + b.nbytes and pb < pa + a.nbytes


class ChunkCipher:
    """Seals and opens the chunks of one content, as its scheme says.

    SEALED and KEYED_PLAIN: `seal_chunk`'s exact bytes, faster. XChaCha20-Poly1305 is
    ChaCha20-Poly1305 (RFC 8439) under the subkey HChaCha20(key, nonce[:16]) with the
    12-byte nonce 0^4 || nonce[16:]. Every chunk nonce starts with the same 16 bytes, so the
    subkey is derived once here, and each chunk goes through OpenSSL's ChaCha20-Poly1305
    (the `cryptography` package, which aiortc already requires): 2.3-2.5 GB/s measured here
    into caller buffers against libsodium's 0.6-0.9. Where `cryptography` lacks the *_into
    calls, libsodium does it.

    KEYED_PLAIN_AES: AES-256-GCM under K_E, a fresh random nonce per sealing in front of
    the ciphertext; the AAD binds the chunk index as above.

    `in_place` (default: `in_place_aead()`, this installation's answer) says whether
    OpenSSL may seal and open with input and output the same bytes; False copies the input
    first wherever the two would share memory.
    """

    __slots__ = ("_aead", "_aes", "_in_place", "_key", "overhead", "scheme")

    def __init__(self, key: bytes, scheme: LeafScheme = LeafScheme.SEALED, *,
                 in_place: bool | None = None) -> None:
        if len(key) != KEY_LEN:
            raise DecodeError("a content key is 32 bytes")
        self._key = key
        self._in_place = in_place_aead() if in_place is None else in_place
        self.scheme = LeafScheme(scheme)
        self.overhead = self.scheme.seal_overhead
        self._aes = None
        self._aead = None
        if self.scheme is LeafScheme.KEYED_PLAIN_AES:
            if not _HAVE_AES:  # pragma: no cover - cryptography >= 44 has the *_into calls
                raise DecodeError("this installation cannot open AES-256-GCM chunks "
                                  "(the cryptography package is older than 44)")
            self._aes = _AESGCM(aes_key(key))
        elif _HAVE_OPENSSL_INTO:
            self._aead = _ChaCha20Poly1305(hchacha20(key, _NONCE_PREFIX))

    @property
    def in_place(self) -> bool:
        """Whether sealing or opening a chunk where it lies costs no copy: False where the
        installed cryptography refuses it (51 and later) and the input would be copied
        first, so a caller with a second buffer at hand should seal or open into that
        (`seal_into`, `open_into`) rather than in place."""
        return self._in_place or (self._aes is None and self._aead is None)

    def seal_into(self, index: int, plaintext: bytes | bytearray | memoryview,
                  out: bytearray | memoryview) -> None:
        """Seal chunk `index` into `out`, exactly `len(plaintext) + self.overhead` bytes that
        don't overlap `plaintext`; afterwards `out` holds the sealed chunk (`seal_chunk`'s
        output for the deterministic schemes)."""
        n = len(plaintext)
        if len(out) != n + self.overhead:
            raise DecodeError(f"a sealed chunk of {n} bytes needs {n + self.overhead} bytes "
                              f"of room, got {len(out)}")
        if self._aes is not None:
            nonce = os.urandom(GCM_NONCE_LEN)
            view = memoryview(out)
            view[:GCM_NONCE_LEN] = nonce
            self._aes.encrypt_into(nonce, plaintext, _aad(index), view[GCM_NONCE_LEN:])
            return
        if self._aead is None:
            memoryview(out)[:n] = plaintext
            seal_chunk_in_place(self._key, index, out, n)
            return
        self._aead.encrypt_into(_IETF_NONCE_PAD + index.to_bytes(8, "big"), plaintext,
                                _aad(index), out)

    def seal_in_place(self, index: int, buf: bytearray | memoryview, n: int) -> None:
        """Seal chunk `index` where it lies: `buf` is exactly `n + self.overhead` bytes with
        the `n` plaintext bytes from `scheme.seal_lead` on, and afterwards holds what
        `seal_into` would have written. The file is read straight into the buffer that goes
        out: serving 1 GiB from the page cache, a second 2 MiB buffer for the plaintext
        made each chunk's working set twice this machine's 2 MiB L2, and reading then
        sealing cost 0.02-0.03 CPU s/GB more than in one buffer. OpenSSL's EVP calls allow
        input and output to be the same bytes (not partly overlapping ones, which the
        layout here never makes), up to cryptography 50: `in_place_aead` checks it, and
        where it fails the plaintext is copied out first (one chunk-sized copy more)."""
        if n < 0 or len(buf) != n + self.overhead:
            raise DecodeError(f"a sealed chunk of {n} bytes needs {n + self.overhead} bytes "
                              f"of room, got {len(buf)}")
        if self._aes is None and self._aead is None:
            seal_chunk_in_place(self._key, index, buf, n)
            return
        with memoryview(buf) as view:
            if self._aes is not None:
                nonce = os.urandom(GCM_NONCE_LEN)
                view[:GCM_NONCE_LEN] = nonce
                body = view[GCM_NONCE_LEN:]
                plain = body[:n] if self._in_place else bytes(body[:n])
                self._aes.encrypt_into(nonce, plain, _aad(index), body)
            elif self._aead is not None:
                plain = view[:n] if self._in_place else bytes(view[:n])
                self._aead.encrypt_into(_IETF_NONCE_PAD + index.to_bytes(8, "big"),
                                        plain, _aad(index), view)

    def open_into(self, index: int, sealed: bytes | bytearray | memoryview,
                  out: bytearray | memoryview) -> memoryview:
        """Decrypt and authenticate chunk `index` into `out`: the view of `out` holding
        the plaintext, or VerificationError with no unauthenticated byte left in `out`."""
        aes, chacha = self._aes, self._aead
        if aes is None and chacha is None:
            return open_chunk_into(self._key, index, sealed, out)
        body = memoryview(sealed)
        if aes is not None:
            if len(body) < GCM_NONCE_LEN:
                raise VerificationError(f"chunk {index} is shorter than its nonce")
            nonce, body = bytes(body[:GCM_NONCE_LEN]), body[GCM_NONCE_LEN:]
        n = _opened_len(index, body, out)
        view = memoryview(out)[:n]
        if not self._in_place and _shares_memory(body, view):
            body = memoryview(bytes(body))
        try:
            if aes is not None:
                aes.decrypt_into(nonce, body, _aad(index), view)
            elif chacha is not None:
                chacha.decrypt_into(_IETF_NONCE_PAD + index.to_bytes(8, "big"), body,
                                    _aad(index), view)
        except _InvalidTag:
            # OpenSSL decrypts before it checks the tag: release no unauthenticated bytes.
            view[:] = bytes(n)
            raise VerificationError(
                f"chunk {index} does not open with the content key") from None
        return view

    def open(self, index: int, sealed: bytes | bytearray | memoryview) -> bytes:
        """Chunk `index` opened into a new buffer (VerificationError if it does not open)."""
        out = bytearray(max(0, len(sealed) - self.overhead))
        return bytes(self.open_into(index, sealed, out))


def open_chunk(key: bytes, index: int, sealed: bytes | memoryview) -> bytes:
    """Decrypt and authenticate chunk `index`, or raise VerificationError."""
    if len(key) != KEY_LEN:
        raise DecodeError("a content key is 32 bytes")
    try:
        out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(sealed), _aad(index), _nonce(index), key
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise VerificationError(f"chunk {index} does not open with the content key") from None
    return out


# --- Merkle tree (RFC 6962 shape, BLAKE3) ----------------------------------------------


def chunk_hash(sealed: bytes | bytearray | memoryview) -> bytes:
    """The leaf hash of one sealed chunk."""
    h = blake3.blake3(b"\x00")
    h.update(sealed)
    return h.digest()


def _node(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    # Largest power of two strictly below n (n >= 2).
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root over leaf hashes. Iterative, so a million leaves cost no deep recursion."""
    if not leaves:
        raise DecodeError("a Merkle tree needs at least one leaf")
    # Pairing left to right and promoting a lone last node gives exactly the RFC 6962
    # shape (the left subtree is always the largest complete power of two).
    level = list(leaves)
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path for leaf `index` (RFC 6962 2.1.1), bottom-up."""
    if not 0 <= index < len(leaves):
        raise DecodeError(f"leaf index {index} outside 0..{len(leaves) - 1}")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    # Walk top-down collecting siblings, then reverse to bottom-up order.
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(merkle_root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(merkle_root(leaves[lo : lo + k]))
            lo = lo + k
    path.reverse()
    return path


def verify_merkle_proof(
    root: bytes, index: int, leaf_count: int, leaf: bytes, proof: Sequence[bytes]
) -> None:
    """Raise VerificationError unless `proof` shows `leaf` at `index` under `root`."""
    if not 0 <= index < leaf_count:
        raise VerificationError(f"leaf index {index} outside 0..{leaf_count - 1}")
    # Recompute the shape top-down to know, for each level, which side the sibling is on.
    sides: list[bool] = []  # True: sibling is on the right
    lo, hi = 0, leaf_count
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            sides.append(True)
            hi = lo + k
        else:
            sides.append(False)
            lo = lo + k
    if len(proof) != len(sides):
        raise VerificationError("Merkle proof has the wrong length")
    acc = leaf
    for sibling, right in zip(proof, reversed(sides), strict=True):
        if len(sibling) != HASH_LEN:
            raise VerificationError("Merkle proof node has the wrong size")
        acc = _node(acc, sibling) if right else _node(sibling, acc)
    if not hmac.compare_digest(acc, root):
        raise VerificationError("Merkle proof does not lead to the content id")


class ChunkVerifier:
    """Checks chunks of one content against its root, given the chunk-hash list.

    The list is checked against the root once, here; after that each chunk costs one hash.
    A KEYED_PLAIN content needs its content key (`key`): its leaves hash plaintext.
    """

    __slots__ = ("_leaf_key", "_leaves", "chunk_size", "root", "scheme", "size")

    def __init__(self, root: bytes, leaves: Sequence[bytes], size: int, chunk_size: int,
                 *, scheme: LeafScheme = LeafScheme.SEALED, key: bytes | None = None) -> None:
        check_layout(size, chunk_size)
        if len(root) != HASH_LEN:
            raise DecodeError("a content id is 32 bytes")
        expected = chunk_count(size, chunk_size)
        if len(leaves) != expected:
            raise VerificationError(
                f"hash list has {len(leaves)} entries, the content has {expected} chunks"
            )
        if any(len(h) != HASH_LEN for h in leaves):
            raise VerificationError("hash list entry of the wrong size")
        if not hmac.compare_digest(merkle_root(leaves), root):
            raise VerificationError("hash list does not match the content id")
        self.scheme = LeafScheme(scheme)
        if self.scheme.plain_leaves:
            if key is None:
                raise DecodeError(f"a {self.scheme.name} content is verified with its "
                                  "content key")
            self._leaf_key: bytes | None = leaf_key(key)
        else:
            self._leaf_key = None
        self._leaves = tuple(leaves)
        self.root = root
        self.size = size
        self.chunk_size = chunk_size

    @property
    def leaves(self) -> tuple[bytes, ...]:
        return self._leaves

    @property
    def count(self) -> int:
        return len(self._leaves)

    def _check_shape(self, index: int, sealed: bytes | bytearray | memoryview) -> None:
        if not 0 <= index < len(self._leaves):
            raise VerificationError(f"chunk index {index} outside 0..{len(self._leaves) - 1}")
        if len(sealed) != sealed_chunk_len(self.size, self.chunk_size, index, self.scheme):
            raise VerificationError(f"chunk {index} has the wrong length {len(sealed)}")

    def verify(self, index: int, sealed: bytes | bytearray | memoryview) -> None:
        """Raise VerificationError unless `sealed` is chunk `index` of this SEALED content
        (a KEYED_PLAIN chunk is checked once opened: `open_verified`)."""
        if self._leaf_key is not None:
            raise DecodeError("a KEYED_PLAIN chunk is verified by open_verified")
        self._check_shape(index, sealed)
        if not hmac.compare_digest(chunk_hash(sealed), self._leaves[index]):
            raise VerificationError(f"chunk {index} does not match its hash")

    def check_plain(self, index: int, plaintext: bytes | bytearray | memoryview) -> bool:
        """Whether `plaintext` is chunk `index` of this KEYED_PLAIN content."""
        if self._leaf_key is None:
            raise DecodeError("a SEALED content's leaves hash sealed chunks")
        return 0 <= index < len(self._leaves) and hmac.compare_digest(
            plain_leaf(self._leaf_key, plaintext), self._leaves[index])

    def open_verified(self, cipher: ChunkCipher, index: int,
                      sealed: bytes | bytearray | memoryview,
                      out: bytearray | memoryview) -> memoryview:
        """Chunk `index` verified against its leaf and opened into `out`: the view of `out`
        holding the plaintext, or VerificationError with nothing of it left in `out`.

        SEALED: the sealed bytes are hashed, then opened. KEYED_PLAIN: opened (the AEAD
        rejects anyone without the key), then the plaintext's keyed hash is compared, which
        catches a key holder that sealed other plaintext."""
        self._check_shape(index, sealed)
        if self._leaf_key is None:
            if not hmac.compare_digest(chunk_hash(sealed), self._leaves[index]):
                raise VerificationError(f"chunk {index} does not match its hash")
            return cipher.open_into(index, sealed, out)
        view = cipher.open_into(index, sealed, out)
        if not hmac.compare_digest(plain_leaf(self._leaf_key, view), self._leaves[index]):
            view[:] = bytes(len(view))
            raise VerificationError(f"chunk {index} does not match its hash")
        return view


def verify_chunk(
    root: bytes, leaves: Sequence[bytes], size: int, chunk_size: int, index: int,
    sealed: bytes | memoryview,
) -> None:
    """One-shot form of ChunkVerifier: check one sealed chunk against the content id."""
    ChunkVerifier(root, leaves, size, chunk_size).verify(index, sealed)
