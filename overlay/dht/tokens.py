"""Return-routability tokens for stores, as BitTorrent's BEP 5 hands them out.

A find reply carries token = keyed BLAKE2b(requester ip, port) under a secret that rotates
every 5 minutes; a store is accepted only with a token made under the current or the
previous secret, so a token lives 5 to 10 minutes. Someone who spoofs a source address
never sees the reply to it and so cannot plant records in that address's name.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

ROTATE_SECONDS = 300.0
TOKEN_LEN = 16
_SECRET_LEN = 32


def _os_secret(size: int) -> bytes:
    return secrets.token_bytes(size)


class TokenIssuer:
    """Issues and checks tokens; `now` is the loop clock, passed in on every call."""

    def __init__(self, now: float,
                 secret_source: Callable[[int], bytes] | None = None) -> None:
        # The secret must be unpredictable to outsiders, so it comes from the OS by default
        # rather than from the node's (possibly seeded) rng. Looked up at each call, not
        # bound at import, so the simulator's seeded entropy covers it in every process.
        self._new_secret = secret_source or _os_secret
        self._current = self._new_secret(_SECRET_LEN)
        self._previous = self._new_secret(_SECRET_LEN)
        self._rotated_at = now

    def _rotate(self, now: float) -> None:
        periods = int((now - self._rotated_at) // ROTATE_SECONDS)
        if periods < 1:
            return
        # On a fixed schedule, however rarely we are asked, so no token outlives 10 minutes.
        self._previous = self._current if periods == 1 else self._new_secret(_SECRET_LEN)
        self._current = self._new_secret(_SECRET_LEN)
        self._rotated_at += periods * ROTATE_SECONDS

    def issue(self, host: str, port: int, now: float) -> bytes:
        """The token for a requester at (host, port)."""
        self._rotate(now)
        return _mac(self._current, host, port)

    def check(self, token: bytes, host: str, port: int, now: float) -> bool:
        """True if `token` was issued to (host, port) within the last 5 to 10 minutes."""
        self._rotate(now)
        return any(hmac.compare_digest(token, _mac(s, host, port))
                   for s in (self._current, self._previous))


def _mac(secret: bytes, host: str, port: int) -> bytes:
    h = hashlib.blake2b(digest_size=TOKEN_LEN, key=secret, person=b"peerpost-token")
    h.update(f"{host}|{port}".encode())
    return h.digest()
