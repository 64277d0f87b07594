"""User addresses, `name@domain`, as the rendezvous server of `domain` binds them."""

from __future__ import annotations

import re

from crypto.errors import DecodeError

MAX_ADDRESS_LEN = 254  # as for e-mail (RFC 5321 path limit)
_ADDRESS = re.compile(
    r"^[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?@"
    r"(?=.{1,190}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def normalize_address(text: str) -> str:
    """Lower-case and check `name@domain`; raise DecodeError with the reason otherwise."""
    if not isinstance(text, str):
        raise DecodeError("an address is text")
    addr = text.strip().lower()
    if len(addr) > MAX_ADDRESS_LEN or not _ADDRESS.match(addr):
        raise DecodeError(f"not a valid address (name@domain): {text!r}")
    return addr


def domain_of(address: str) -> str:
    return address.rsplit("@", 1)[1]
