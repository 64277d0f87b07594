"""The transfer session handshake: mutual authentication, session keys, a transcript hash.

Three messages, SIGMA-I shaped (Krawczyk, "SIGMA", CRYPTO 2003):

    M1  initiator -> responder   LABEL || e_i
    M2  responder -> initiator   e_r || AEAD_r(vk_r || sig_r(H(M1 || e_r || vk_r)))
    M3  initiator -> responder   AEAD_i(vk_i || sig_i(H(M1 || M2 || vk_i)))

`e_i`/`e_r` are fresh X25519 keys; the libsodium `crypto_kx` session keys over them feed
both the handshake AEAD keys and the traffic keys. Each side signs the transcript so far
with its Ed25519 device key, and sends that signature *inside* the AEAD under the shared
keys: the MAC binds the identity to the key exchange (no identity misbinding: a third
party cannot swap in its own signature, since it cannot produce the AEAD) and hides both
identities from a passive observer. The transcript hash is BLAKE2b-256 over M1, M2 and M3;
capability proofs bind to it, so a proof is worthless on any other session.

Pure: no I/O, no clock. Ephemeral keys can be passed in for deterministic tests.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto.errors import DecodeError, VerificationError
from crypto.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, DeviceIdentity, PublicIdentity

PROTOCOL_LABEL = b"peerpost-transfer/1".ljust(24, b"\x00")
TRANSCRIPT_LEN = 32
SIGN_CONTEXT = b"transfer-handshake"
_KX_LEN = sodium.crypto_kx_PUBLIC_KEY_BYTES
_AEAD_TAG = sodium.crypto_aead_chacha20poly1305_ietf_ABYTES
_KEY_LEN = sodium.crypto_aead_chacha20poly1305_ietf_KEYBYTES
_IDENTITY_BLOCK = PUBLIC_KEY_LEN + SIGNATURE_LEN
HELLO_LEN = len(PROTOCOL_LABEL) + _KX_LEN
RESPONSE_LEN = _KX_LEN + _IDENTITY_BLOCK + _AEAD_TAG
FINISH_LEN = _IDENTITY_BLOCK + _AEAD_TAG
MAX_MESSAGE_LEN = max(HELLO_LEN, RESPONSE_LEN, FINISH_LEN)
_ZERO_NONCE = bytes(sodium.crypto_aead_chacha20poly1305_ietf_NPUBBYTES)


def _derive(key: bytes, purpose: bytes, data: bytes = b"") -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=_KEY_LEN, person=purpose.ljust(16, b"\0")
                           ).digest()


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=TRANSCRIPT_LEN, person=b"peerpost-hs-v1\0\0")
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def _seal(key: bytes, plaintext: bytes) -> bytes:
    # Each handshake key seals exactly one message, so a zero nonce is safe.
    out: bytes = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, None, _ZERO_NONCE, key)
    return out


def _open(key: bytes, ciphertext: bytes, what: str) -> bytes:
    try:
        out: bytes = sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, None, _ZERO_NONCE, key
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise VerificationError(f"handshake {what} does not authenticate") from None
    return out


def _ephemeral(seed: bytes | None) -> tuple[bytes, bytes]:
    if seed is None:
        seed = nacl.utils.random(sodium.crypto_kx_SEED_BYTES)
    if len(seed) != sodium.crypto_kx_SEED_BYTES:
        raise DecodeError("an ephemeral seed is 32 bytes")
    pk, sk = sodium.crypto_kx_seed_keypair(seed)
    return pk, sk


def _identity_block(block: bytes, signed: bytes) -> PublicIdentity:
    peer = PublicIdentity(block[:PUBLIC_KEY_LEN])  # DecodeError on a bad key
    peer.verify(SIGN_CONTEXT, signed, block[PUBLIC_KEY_LEN:])
    return peer


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What an authenticated session knows: the peer, the transcript, the traffic keys."""

    peer: PublicIdentity
    transcript: bytes
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)

    def cipher(self) -> SessionCipher:
        """A fresh cipher for this session's control frames."""
        return SessionCipher(self.send_key, self.recv_key)


def _traffic(
    peer: PublicIdentity, transcript: bytes, rx: bytes, tx: bytes, initiator: bool
) -> HandshakeResult:
    # Traffic keys depend on the full transcript, so they exist only for this exact exchange.
    send = _derive(tx, b"pp-traffic-i2r" if initiator else b"pp-traffic-r2i", transcript)
    recv = _derive(rx, b"pp-traffic-r2i" if initiator else b"pp-traffic-i2r", transcript)
    return HandshakeResult(peer, transcript, send, recv)


class HandshakeInitiator:
    """The side that connects. `hello()`, then `receive_response(m2)` gives M3 to send."""

    __slots__ = ("_expected", "_identity", "_m1", "_pk", "_result", "_sk")

    def __init__(
        self, identity: DeviceIdentity, *, expected_peer: bytes | None = None,
        ephemeral_seed: bytes | None = None,
    ) -> None:
        self._identity = identity
        self._expected = expected_peer
        self._pk, self._sk = _ephemeral(ephemeral_seed)
        self._m1 = PROTOCOL_LABEL + self._pk
        self._result: HandshakeResult | None = None

    def hello(self) -> bytes:
        """M1."""
        return self._m1

    def receive_response(self, m2: bytes) -> bytes:
        """Check M2; return M3. Raises VerificationError/DecodeError on anything wrong."""
        if self._result is not None:
            raise DecodeError("handshake response received twice")
        if len(m2) != RESPONSE_LEN:
            raise DecodeError(f"handshake response is {len(m2)} bytes, expected {RESPONSE_LEN}")
        e_r = bytes(m2[:_KX_LEN])
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(self._pk, self._sk, e_r)
        except (nacl.exceptions.CryptoError, ValueError):
            raise VerificationError("handshake: unusable ephemeral key") from None
        block = _open(_derive(rx, b"pp-hs-r2i"), bytes(m2[_KX_LEN:]), "response")
        vk_r = block[:PUBLIC_KEY_LEN]
        peer = _identity_block(block, _hash(b"r", self._m1, e_r, vk_r))
        if self._expected is not None and not hmac.compare_digest(peer.peer_id, self._expected):
            raise VerificationError(
                f"peer is {peer.peer_id.hex()}, expected {self._expected.hex()}"
            )
        vk_i = self._identity.public.verify_key
        sig_i = self._identity.sign(SIGN_CONTEXT, _hash(b"i", self._m1, bytes(m2), vk_i))
        m3 = _seal(_derive(tx, b"pp-hs-i2r"), vk_i + sig_i)
        transcript = _hash(b"transcript", self._m1, bytes(m2), m3)
        self._result = _traffic(peer, transcript, rx, tx, initiator=True)
        return m3

    @property
    def result(self) -> HandshakeResult:
        if self._result is None:
            raise DecodeError("handshake not complete")
        return self._result


class HandshakeResponder:
    """The side that accepts. `receive_hello(m1)` gives M2; `receive_finish(m3)` the result."""

    __slots__ = ("_identity", "_keys", "_m1", "_m2", "_pk", "_result", "_sk")

    def __init__(self, identity: DeviceIdentity, *, ephemeral_seed: bytes | None = None) -> None:
        self._identity = identity
        self._pk, self._sk = _ephemeral(ephemeral_seed)
        self._m1 = b""
        self._m2 = b""
        self._keys: tuple[bytes, bytes] | None = None
        self._result: HandshakeResult | None = None

    def receive_hello(self, m1: bytes) -> bytes:
        """Check M1; return M2."""
        if self._keys is not None:
            raise DecodeError("handshake hello received twice")
        if len(m1) != HELLO_LEN:
            raise DecodeError(f"handshake hello is {len(m1)} bytes, expected {HELLO_LEN}")
        if not hmac.compare_digest(bytes(m1[: len(PROTOCOL_LABEL)]), PROTOCOL_LABEL):
            raise DecodeError("handshake hello: unknown protocol or version")
        e_i = bytes(m1[len(PROTOCOL_LABEL) :])
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(self._pk, self._sk, e_i)
        except (nacl.exceptions.CryptoError, ValueError):
            raise VerificationError("handshake: unusable ephemeral key") from None
        self._m1 = bytes(m1)
        vk_r = self._identity.public.verify_key
        sig_r = self._identity.sign(SIGN_CONTEXT, _hash(b"r", self._m1, self._pk, vk_r))
        self._m2 = self._pk + _seal(_derive(tx, b"pp-hs-r2i"), vk_r + sig_r)
        self._keys = (rx, tx)
        return self._m2

    def receive_finish(self, m3: bytes) -> HandshakeResult:
        """Check M3; the handshake is then complete."""
        if self._keys is None or self._result is not None:
            raise DecodeError("handshake finish out of order")
        if len(m3) != FINISH_LEN:
            raise DecodeError(f"handshake finish is {len(m3)} bytes, expected {FINISH_LEN}")
        rx, tx = self._keys
        block = _open(_derive(rx, b"pp-hs-i2r"), bytes(m3), "finish")
        vk_i = block[:PUBLIC_KEY_LEN]
        peer = _identity_block(block, _hash(b"i", self._m1, self._m2, vk_i))
        transcript = _hash(b"transcript", self._m1, self._m2, bytes(m3))
        self._result = _traffic(peer, transcript, rx, tx, initiator=False)
        return self._result


class SessionCipher:
    """ChaCha20-Poly1305-IETF with a 64-bit counter nonce per direction.

    The receiver expects the next counter value exactly, so a replayed, dropped, reordered
    or altered frame fails to open; after a failure the session must be torn down.

    Frames go through OpenSSL's ChaCha20-Poly1305 (`cryptography`), keyed once per session:
    the same RFC 8439 AEAD as libsodium's, byte for byte, at 0.8 µs per control frame here
    against 3.6 µs through PyNaCl's wrapper, twice per 1 MiB chunk moved.
    """

    __slots__ = ("_recv", "_recv_key", "_recv_n", "_send", "_send_key", "_send_n")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        if len(send_key) != _KEY_LEN or len(recv_key) != _KEY_LEN:
            raise DecodeError("session keys are 32 bytes")
        self._send_key, self._recv_key = send_key, recv_key
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_n = 0
        self._recv_n = 0

    def __copy__(self) -> SessionCipher:
        """The same keys at the same counters (OpenSSL's key objects can't be copied)."""
        twin = SessionCipher(self._send_key, self._recv_key)
        twin._send_n, twin._recv_n = self._send_n, self._recv_n
        return twin

    def __deepcopy__(self, memo: dict[int, object]) -> SessionCipher:
        return self.__copy__()

    overhead = _AEAD_TAG

    @staticmethod
    def _nonce(n: int) -> bytes:
        return b"\0\0\0\0" + n.to_bytes(8, "big")

    def encrypt(self, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Seal the next outgoing frame."""
        if self._send_n >= 1 << 64:
            raise DecodeError("session cipher exhausted; open a new session")
        out = self._send.encrypt(self._nonce(self._send_n), plaintext, aad)
        self._send_n += 1
        return out

    def decrypt(self, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """Open the next incoming frame, or raise VerificationError."""
        try:
            out = self._recv.decrypt(self._nonce(self._recv_n), ciphertext, aad)
        except (InvalidTag, ValueError, TypeError):
            raise VerificationError("control frame does not authenticate") from None
        self._recv_n += 1
        return out
