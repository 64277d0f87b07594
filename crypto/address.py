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


def format_hostport(host: str, port: int) -> str:
    """HOST:PORT text for a human or a peer to read back with `parse_hostport`: an IPv6
    host in brackets ([::1]:8470), since in ::1:8470 the port could be the last group."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, *, what: str = "address",
                   default_host: str | None = None) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT) into host and port, or raise DecodeError (a
    ValueError) whose text names `what`. An empty host is `default_host` where one is
    given (`:4500` for a listener on every interface), else an error."""
    if not isinstance(text, str):
        raise DecodeError(f"{what} must be HOST:PORT text")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host and sep and default_host is not None:
        host = default_host
    if not sep or not host:
        raise DecodeError(f"{what} must be HOST:PORT, got {text!r}")
    if not port.isdigit() or len(port) > 5:
        raise DecodeError(f"{what} port must be a number, got {port!r}")
    p = int(port)
    if p > 65535:
        raise DecodeError(f"{what} port must be 0..65535, got {p}")
    return host, p
