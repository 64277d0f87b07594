"""Finding a mail domain's rendezvous servers and its domain key, the way MX works.

A domain publishes `_peerpost._tcp.DOMAIN` SRV records (several records: several instances,
tried in RFC 2782 order: lowest priority first, weighted random within a priority) and a
TXT record at `_peerpost.DOMAIN` carrying its domain key (rendezvous.domainkey). Everything
that needs a domain's servers asks a `DomainResolver`; `StaticResolver` answers from a
table (the simulator, in-process tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class DomainLookupError(Exception):
    """The domain's records are missing or unusable; the text names the record."""


@dataclass(frozen=True, slots=True)
class DomainRecords:
    """What a domain publishes: its servers in the order to try, and its domain key."""

    domain: str
    servers: tuple[tuple[str, int], ...]  # (host, port), in RFC 2782 order
    key: bytes  # the Ed25519 public key of the domain (32 bytes)


class DomainResolver(Protocol):
    async def resolve(self, domain: str) -> DomainRecords:
        """The domain's records; raises DomainLookupError naming what is missing."""
        ...


class StaticResolver:
    """A `DomainResolver` that answers from a table."""

    def __init__(self, table: Mapping[str, DomainRecords]) -> None:
        self._table = dict(table)

    def add(self, records: DomainRecords) -> None:
        self._table[records.domain] = records

    async def resolve(self, domain: str) -> DomainRecords:
        found = self._table.get(domain)
        if found is None:
            raise DomainLookupError(f"no _peerpost._tcp.{domain} SRV record")
        return found
