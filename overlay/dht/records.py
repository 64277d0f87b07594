"""Signed provider records: "this device serves content X; reach it here, until then".

A record is signed by the provider's device key (context b"dht-provider"), so any node may
relay or store it and nobody can forge or extend one. Expiry is wall-clock unix seconds
(records travel between machines; a loop clock means nothing elsewhere).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from crypto.address import parse_hostport
from crypto.codec import Fields, item_str, packb, unpackb
from crypto.errors import DecodeError, VerificationError
from crypto.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, DeviceIdentity, peer_id_of, verify
from overlay.dht.errors import LocalProtocolError, RemoteProtocolError

CONTENT_ID_LEN = 32
RECORD_TTL = 48 * 3600
REPUBLISH_INTERVAL = 22 * 3600
# A record may claim to live a little longer than one TTL: the provider's clock may run ahead.
CLOCK_SKEW = 600
MAX_ADDRESSES = 8
MAX_ADDRESS_LEN = 64
MAX_RECORD_BYTES = 1024
_VERSION = 1
_CONTEXT = b"dht-provider"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def dht_key(content_id: bytes) -> bytes:
    """The 160-bit DHT key a content id is stored under.

    Hashing (rather than truncating) spreads even low-entropy ids evenly over the id space.
    """
    return hashlib.blake2b(content_id, digest_size=20, person=b"peerpost-dht").digest()


def check_address(text: str) -> str:
    """Return `text` if it is "host:port" (IPv4, [IPv6] or a DNS name), else raise DecodeError."""
    if not isinstance(text, str) or not 3 <= len(text) <= MAX_ADDRESS_LEN:
        raise DecodeError(f"address must be 3..{MAX_ADDRESS_LEN} characters of text")
    host, port = parse_hostport(text, what=f"address {text!r}")
    if port == 0:
        raise DecodeError(f"address {text!r}: expected host:port with a port in 1..65535")
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DecodeError(f"address {text!r}: bad IPv6 literal") from None
    elif not _HOSTNAME.match(host):
        raise DecodeError(f"address {text!r}: bad host name")
    return text


def _check_address_item(v: Any, what: str) -> str:
    try:
        return check_address(item_str(MAX_ADDRESS_LEN)(v, what))
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One provider of one content id, signed by that provider."""

    content_id: bytes
    provider_key: bytes
    addresses: tuple[str, ...]
    home_server: str
    expires: int
    signature: bytes

    @property
    def peer_id(self) -> bytes:
        return peer_id_of(self.provider_key)

    @property
    def key(self) -> bytes:
        """The DHT key this record lives under."""
        return dht_key(self.content_id)

    @classmethod
    def create(
        cls, identity: DeviceIdentity, content_id: bytes, addresses: list[str] | tuple[str, ...],
        home_server: str, now: float, ttl: int = RECORD_TTL,
    ) -> ProviderRecord:
        """Sign a record for `identity` valid for `ttl` seconds from wall-clock `now`."""
        if not isinstance(content_id, bytes) or len(content_id) != CONTENT_ID_LEN:
            raise LocalProtocolError(f"a content id is {CONTENT_ID_LEN} bytes")
        if not 0 < ttl <= RECORD_TTL:
            raise LocalProtocolError(f"ttl must be in 1..{RECORD_TTL} seconds")
        if len(addresses) > MAX_ADDRESSES:
            raise LocalProtocolError(f"at most {MAX_ADDRESSES} addresses")
        try:
            addrs = tuple(check_address(a) for a in addresses)
            check_address(home_server)
        except DecodeError as exc:
            raise LocalProtocolError(str(exc)) from None
        expires = int(now) + ttl
        key = identity.public.verify_key
        sig = identity.sign(_CONTEXT, _signed(content_id, key, addrs, home_server, expires))
        record = cls(content_id, key, addrs, home_server, expires, sig)
        if len(record.encode()) > MAX_RECORD_BYTES:
            raise LocalProtocolError(f"record exceeds {MAX_RECORD_BYTES} bytes")
        return record

    def encode(self) -> bytes:
        return packb({
            "v": _VERSION, "c": self.content_id, "k": self.provider_key,
            "a": list(self.addresses), "h": self.home_server, "x": self.expires,
            "s": self.signature,
        })

    @classmethod
    def decode(cls, data: bytes, *, now: float) -> ProviderRecord:
        """Parse, verify the signature and check expiry against wall-clock `now`.

        Raises RemoteProtocolError with reason "bad_record", "forged_record" or
        "expired_record".
        """
        try:
            f = Fields(unpackb(data, max_bytes=MAX_RECORD_BYTES), "provider record")
            f.int("v", lo=_VERSION, hi=_VERSION)
            record = cls(
                content_id=f.bytes("c", size=CONTENT_ID_LEN),
                provider_key=f.bytes("k", size=PUBLIC_KEY_LEN),
                addresses=f.list("a", _check_address_item, max_items=MAX_ADDRESSES) or (),
                home_server=check_address(f.str("h", max_len=MAX_ADDRESS_LEN)),
                expires=f.int("x", lo=0, hi=2**40),
                signature=f.bytes("s", size=SIGNATURE_LEN),
            )
        except DecodeError as exc:
            raise RemoteProtocolError("bad_record", str(exc)) from None
        try:
            verify(record.provider_key, _CONTEXT, _signed(
                record.content_id, record.provider_key, record.addresses, record.home_server,
                record.expires), record.signature)
        except VerificationError:
            raise RemoteProtocolError("forged_record", "signature does not verify") from None
        if record.expires <= now:
            raise RemoteProtocolError("expired_record", f"expired at {record.expires}")
        if record.expires > now + RECORD_TTL + CLOCK_SKEW:
            raise RemoteProtocolError("bad_record", "expiry beyond the 48 h TTL")
        return record


def _signed(content_id: bytes, key: bytes, addresses: tuple[str, ...], home: str,
            expires: int) -> bytes:
    return packb([_VERSION, content_id, key, list(addresses), home, expires])
