"""Which provider records a node hands out, and in what order.

Sorting by expiry alone lets whoever republishes most often, or signs the most keys from
one network, fill every reply. The order here, best first:

1. Diversity: at most `per_group` records from one group before any group gets more. A
   record's group is the /24 (IPv4) or /48 (IPv6) of its first direct address; a record
   with no direct address is grouped by its home server, through which it is reached.
   Records beyond a group's share come after every group's share, in the same order, so
   nothing is lost when one network holds all the providers.
2. Reachability: a record with a direct address (a global IP literal or a DNS name)
   before one whose addresses are all private, loopback or link-local (a NAT'd peer,
   reached through its home server or a relay).
3. Freshness: the later expiry first (a record republished more recently).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

from crypto.address import parse_hostport
from crypto.errors import DecodeError
from overlay.dht.records import ProviderRecord

PER_GROUP = 3


def _direct_group(address: str) -> str | None:
    """The network group of a directly reachable address, or None if it is not one."""
    try:
        host, _ = parse_hostport(address, what="address")
    except DecodeError:
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"dns:{host.lower()}"  # a name: reachable as far as we can tell
    if not ip.is_global:
        return None
    prefix = 24 if ip.version == 4 else 48
    return f"ip:{ipaddress.ip_network(f'{ip}/{prefix}', strict=False)}"


def group_of(record: ProviderRecord) -> tuple[str, bool]:
    """(diversity group, has a direct address)."""
    for address in record.addresses:
        group = _direct_group(address)
        if group is not None:
            return group, True
    return f"home:{record.home_server.lower()}", False


def rank_providers(records: Iterable[ProviderRecord], limit: int, *,
                   per_group: int = PER_GROUP) -> list[ProviderRecord]:
    """Up to `limit` of `records`, best first, in the order the module docstring gives."""
    keyed = [(group_of(r), r) for r in records]
    keyed.sort(key=lambda gr: (not gr[0][1], -gr[1].expires))
    first: list[ProviderRecord] = []
    rest: list[ProviderRecord] = []
    taken: Counter[str] = Counter()
    for (group, _), record in keyed:
        if taken[group] < per_group:
            taken[group] += 1
            first.append(record)
        else:
            rest.append(record)
    return (first + rest)[:limit]
