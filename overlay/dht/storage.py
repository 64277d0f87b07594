"""Bounded storage of provider records, behind the package's `IStorage` interface.

`kademlia.storage.ForgetfulStorage` keeps one unchecked value per key, unbounded, aged by
`time.monotonic()`. Here a key (content id) holds up to `max_per_key` records, one per
provider, the whole store up to `max_total`; only verified `ProviderRecord`s go in, and
they leave when their signed wall-clock expiry passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kademlia.storage import IStorage

from overlay.dht.errors import LocalProtocolError
from overlay.dht.ranking import rank_providers
from overlay.dht.records import RECORD_TTL, ProviderRecord

MAX_PER_KEY = 64
MAX_TOTAL = 50_000


class ProviderStore(IStorage):  # type: ignore[misc]
    """content id -> {provider peer id -> record}; `wall()` gives unix seconds."""

    def __init__(self, wall: Callable[[], float], *, max_per_key: int = MAX_PER_KEY,
                 max_total: int = MAX_TOTAL) -> None:
        if max_per_key < 1 or max_total < 1:
            raise LocalProtocolError("storage limits must be positive")
        self._wall = wall
        self._max_per_key = max_per_key
        self._max_total = max_total
        self._data: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, record: ProviderRecord) -> bool:
        """Keep `record` (already verified). False if refused for lack of room."""
        now = self._wall()
        if record.expires <= now:
            return False
        per_key = self._data.setdefault(record.content_id, {})
        old = per_key.get(record.peer_id)
        if old is not None:
            if old.expires <= record.expires:
                per_key[record.peer_id] = record
            return True
        if len(per_key) >= self._max_per_key:
            self._cull_key(record.content_id, now)
        if len(per_key) >= self._max_per_key:
            # Full of live records: the one that would lapse first makes way for a longer one.
            soonest = min(per_key.values(), key=lambda r: r.expires)
            if soonest.expires >= record.expires:
                return False
            del per_key[soonest.peer_id]
            self._count -= 1
        if self._count >= self._max_total:
            self.cull()
            if self._count >= self._max_total:
                if not per_key:
                    del self._data[record.content_id]
                return False
        per_key[record.peer_id] = record
        self._count += 1
        return True

    def providers(self, content_id: bytes, limit: int) -> list[ProviderRecord]:
        """Up to `limit` live records for `content_id`, best first (`ranking`: diverse
        networks, then direct addresses, then the longest-lived)."""
        now = self._wall()
        self._cull_key(content_id, now)
        return rank_providers(self._data.get(content_id, {}).values(), limit)

    def remove(self, content_id: bytes, peer_id: bytes) -> None:
        """Forget one provider's record (our own, on withdraw)."""
        per_key = self._data.get(content_id)
        if per_key is not None and per_key.pop(peer_id, None) is not None:
            self._count -= 1
            if not per_key:
                del self._data[content_id]

    def cull(self) -> None:
        """Drop every expired record."""
        now = self._wall()
        for content_id in list(self._data):
            self._cull_key(content_id, now)

    def _cull_key(self, content_id: bytes, now: float) -> None:
        per_key = self._data.get(content_id)
        if per_key is None:
            return
        for peer_id in [p for p, r in per_key.items() if r.expires <= now]:
            del per_key[peer_id]
            self._count -= 1
        if not per_key:
            del self._data[content_id]

    # --- kademlia.storage.IStorage ------------------------------------------------------

    def __setitem__(self, key: bytes, value: ProviderRecord) -> None:
        if not isinstance(value, ProviderRecord) or value.content_id != key:
            raise LocalProtocolError("store ProviderRecords under their own content id")
        self.put(value)

    def __getitem__(self, key: bytes) -> list[ProviderRecord]:
        found = self.providers(key, self._max_per_key)
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.providers(key, self._max_per_key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, ProviderRecord]]:
        # A record's age is how much of its TTL it has used up.
        now = self._wall()
        return [(cid, r) for cid, r in self if RECORD_TTL - (r.expires - now) >= seconds_old]

    def __iter__(self) -> Iterator[tuple[bytes, ProviderRecord]]:
        self.cull()
        return iter([(cid, r) for cid, per_key in self._data.items() for r in per_key.values()])
