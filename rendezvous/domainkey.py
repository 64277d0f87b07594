"""A mail domain's server key: Ed25519, proves "this is the server of DOMAIN" to clients.

The server keeps it in its data folder as `domain_key.json` (versioned JSON, mode 0600),
made by `peerpost-rendezvous serve` the first time it starts (`load_or_create`). Its
public half is what a node pins (`server_key` in the node's config) and what DNS will
publish as TXT `_peerpost.DOMAIN`:

    v=peerpost1; k=ed25519; p=<base64 of the 32-byte public key>

`txt_value` makes that string and `parse_txt` reads it back; a record of another version
or key kind is refused with a `DecodeError` that says which. `fingerprint` is how a key
is shown to people: `SHA256:` and the unpadded base64 of SHA-256 of the public key, the
shape `ssh` prints for host keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

import nacl.signing

from crypto.errors import DecodeError
from crypto.identity import PUBLIC_KEY_LEN, seed_from_json
from rendezvous.keyfile import write_secret_file

DOMAIN_KEY_NAME = "domain_key.json"
TXT_VERSION = "peerpost1"
TXT_KIND = "ed25519"
_FILE_VERSION = 1
_FILE_KIND = "peerpost-domain-key"
MAX_TXT_LEN = 255  # one DNS character-string


class DomainKey:
    """The private domain key: signs the server's half of the handshake."""

    __slots__ = ("_signing", "public")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing = signing_key
        self.public = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls) -> DomainKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DomainKey:
        """Deterministic key from 32 seed bytes (the simulator)."""
        if len(seed) != 32:
            raise DecodeError("a domain key seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, context: bytes, message: bytes) -> bytes:
        """A detached signature, domain-separated like `DeviceIdentity.sign`."""
        return bytes(self._signing.sign(b"peerpost/" + context + b"\x00" + message).signature)

    # --- persistence -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": _FILE_VERSION, "kind": _FILE_KIND,
                           "seed": bytes(self._signing).hex()})

    @classmethod
    def from_json(cls, text: str) -> DomainKey:
        return cls.from_seed(seed_from_json(text, _FILE_KIND, _FILE_VERSION, what="domain key",
                                            label="domain key file"))

    def save(self, path: Path) -> None:
        """Write atomically, created 0600 (never widened)."""
        write_secret_file(path, self.to_json())


def load_or_create(data_dir: Path) -> DomainKey:
    """DATA/domain_key.json, made (0600) if it is not there yet."""
    path = Path(data_dir) / DOMAIN_KEY_NAME
    if path.exists():
        return DomainKey.from_json(path.read_text())
    key = DomainKey.generate()
    key.save(path)
    return key


def fingerprint(public: bytes) -> str:
    """`SHA256:` + unpadded base64 of SHA-256 of the public key (as ssh shows keys)."""
    digest = hashlib.sha256(public).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def encode_key(public: bytes) -> str:
    """The standard base64 of a public key (what `server_key` and the TXT `p=` hold)."""
    return base64.b64encode(public).decode()


def decode_key(text: str, what: str = "key") -> bytes:
    """A 32-byte Ed25519 public key from its base64; DecodeError if it is not one."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecodeError(f"{what}: not base64") from None
    if len(raw) != PUBLIC_KEY_LEN:
        raise DecodeError(f"{what}: an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, "
                          f"got {len(raw)}")
    return raw


def txt_value(public: bytes) -> str:
    """The TXT record value that publishes `public` for a domain."""
    return f"v={TXT_VERSION}; k={TXT_KIND}; p={encode_key(public)}"


def parse_txt(value: str) -> bytes:
    """The public key in a `_peerpost.DOMAIN` TXT value; DecodeError says what is wrong."""
    if len(value) > MAX_TXT_LEN:
        raise DecodeError(f"TXT value of {len(value)} characters, at most {MAX_TXT_LEN}")
    tags: dict[str, str] = {}
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise DecodeError(f"TXT value: {part!r} is not NAME=VALUE")
        if name in tags:
            raise DecodeError(f"TXT value: tag {name!r} appears twice")
        tags[name] = val.strip()
    version = tags.get("v")
    if version is None:
        raise DecodeError("TXT value: no version (v=)")
    if version != TXT_VERSION:
        raise DecodeError(f"TXT value: version {version!r} is not supported "
                          f"(this software reads {TXT_VERSION!r})")
    kind = tags.get("k")
    if kind is None:
        raise DecodeError("TXT value: no key kind (k=)")
    if kind != TXT_KIND:
        raise DecodeError(f"TXT value: key kind {kind!r} is not supported "
                          f"(this software reads {TXT_KIND!r})")
    key = tags.get("p")
    if key is None:
        raise DecodeError("TXT value: no public key (p=)")
    return decode_key(key, "TXT value p=")
