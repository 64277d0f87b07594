"""Finding a mail domain's rendezvous servers and its domain key, the way MX works.

A domain publishes `_peerpost._tcp.DOMAIN` SRV records (several records: several instances,
tried in RFC 2782 order: lowest priority first, weighted random within a priority) and a
TXT record at `_peerpost.DOMAIN` carrying its domain key (rendezvous.domainkey). Everything
that needs a domain's servers asks a `DomainResolver`; `StaticResolver` answers from a
table (the simulator, in-process tests).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from crypto.address import format_hostport, parse_hostport
from crypto.errors import DecodeError
from rendezvous.domainkey import fingerprint, parse_txt


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


# --- RFC 2782 order -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SrvTarget:
    """One SRV record's data: where one instance of the service runs."""

    priority: int
    weight: int
    port: int
    target: str  # host name, without the trailing dot


def rfc2782_order(records: Sequence[SrvTarget], rng: random.Random) -> list[SrvTarget]:
    """The order to try `records` in, as RFC 2782 says: lowest priority first; within one
    priority, repeatedly pick a record with probability proportional to its weight (the
    records of weight 0 placed first, so they have a small chance when others weigh more,
    and keep their place when all weigh 0), until none is left."""
    ordered: list[SrvTarget] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        group = [r for r in group if r.weight == 0] + [r for r in group if r.weight != 0]
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for i, r in enumerate(group):
                running += r.weight
                if running >= pick:
                    ordered.append(group.pop(i))
                    break
    return ordered


# --- DNS ------------------------------------------------------------------------------------

RESOLVER_ENV = "PEERPOST_RESOLVER"
DEFAULT_TIMEOUT = 5.0  # seconds for each query, retries included
MAX_SRV_TARGETS = 32  # the servers of one domain that are looked at
MAX_TXT_RECORDS = 16


def srv_name(domain: str) -> str:
    return f"_peerpost._tcp.{domain}"


def txt_name(domain: str) -> str:
    return f"_peerpost.{domain}"


class DnsResolver:
    """A `DomainResolver` asking DNS (dnspython's asyncio resolver).

    It asks the name server `resolver` (HOST:PORT), else the one in `PEERPOST_RESOLVER`,
    else the system's (/etc/resolv.conf). The addresses of the SRV targets are asked of the
    same name server, so a private one can answer for names nobody else knows. `servers`
    lists every address of every target, targets in RFC 2782 order (`rng` draws the
    weighted choice), A before AAAA within a target."""

    def __init__(self, resolver: str | None = None, *, rng: random.Random | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        spec = resolver or env.get(RESOLVER_ENV) or None
        self._rng = rng or random.Random()
        self._timeout = timeout
        self._nameserver: tuple[str, int] | None = None
        if spec is not None:
            try:
                what = "resolver" if resolver else RESOLVER_ENV
                self._nameserver = parse_hostport(spec, what=what)
            except DecodeError as exc:
                raise DomainLookupError(str(exc)) from None
        self._resolver: dns.asyncresolver.Resolver | None = None

    @property
    def nameserver_text(self) -> str:
        """Who is asked, for error texts."""
        if self._nameserver is not None:
            return format_hostport(*self._nameserver)
        r = self._get_resolver()
        shown = [format_hostport(str(ns), r.port) for ns in r.nameservers]
        return ", ".join(shown) or "(none configured)"

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self._nameserver is not None:
                r = dns.asyncresolver.Resolver(configure=False)
                try:
                    r.nameservers = [self._nameserver[0]]
                except ValueError:
                    raise DomainLookupError(
                        f"name server {self.nameserver_text}: give its IP address, "
                        "not a name") from None
                r.port = self._nameserver[1]
            else:
                try:
                    r = dns.asyncresolver.Resolver()
                except dns.resolver.NoResolverConfiguration as exc:
                    raise DomainLookupError(
                        f"no name server configured ({exc}); set {RESOLVER_ENV}=HOST:PORT")\
                        from None
            r.lifetime = self._timeout
            r.timeout = min(self._timeout, 2.0)
            self._resolver = r
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None if the name or the type has no record."""
        r = self._get_resolver()
        try:
            return await r.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout:
            raise DomainLookupError(f"name server {self.nameserver_text} did not answer "
                                    f"(asking {rdtype} {name}, {self._timeout:g} s)") from None
        except dns.resolver.NoNameservers as exc:
            raise DomainLookupError(f"name server {self.nameserver_text} failed to answer "
                                    f"{rdtype} {name}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DomainLookupError(f"looking up {rdtype} {name}: {exc}") from None

    async def resolve(self, domain: str) -> DomainRecords:
        domain = domain.strip().rstrip(".").lower()
        try:
            dns.name.from_text(srv_name(domain))
        except dns.exception.DNSException as exc:
            raise DomainLookupError(f"{domain!r} is not a domain name: {exc}") from None
        targets = await self.srv_targets(domain)
        key = await self.domain_key(domain)
        servers: list[tuple[str, int]] = []
        unresolved: list[str] = []
        failures: list[DomainLookupError] = []
        for t in targets:
            try:
                found = await self.addresses(t.target)
            except DomainLookupError as exc:  # the next target may still be found
                failures.append(exc)
                continue
            if not found:
                unresolved.append(t.target)
            for addr in found:
                if (addr, t.port) not in servers:
                    servers.append((addr, t.port))
        if not servers:
            if failures:
                raise failures[0]
            raise DomainLookupError(
                f"no A/AAAA record for {', '.join(unresolved)} (the target of the "
                f"{srv_name(domain)} SRV record)")
        return DomainRecords(domain, tuple(servers), key)

    async def srv_targets(self, domain: str) -> list[SrvTarget]:
        """The domain's SRV targets in RFC 2782 order."""
        name = srv_name(domain)
        answer = await self._query(name, "SRV")
        if answer is None:
            raise DomainLookupError(f"no {name} SRV record")
        records: list[SrvTarget] = []
        for rdata in list(answer)[:MAX_SRV_TARGETS]:
            target = rdata.target.to_text(omit_final_dot=True)
            if target in ("", "."):
                continue
            records.append(SrvTarget(int(rdata.priority), int(rdata.weight), int(rdata.port),
                                     target.lower()))
        if not records:
            raise DomainLookupError(f"the {name} SRV record has target \".\": the domain "
                                    "says it offers no peerpost service")
        return rfc2782_order(records, self._rng)

    async def domain_key(self, domain: str) -> bytes:
        """The domain key published in the `_peerpost.DOMAIN` TXT record."""
        name = txt_name(domain)
        answer = await self._query(name, "TXT")
        if answer is None:
            raise DomainLookupError(f"no {name} TXT record (the domain key)")
        keys: list[bytes] = []
        errors: list[str] = []
        for rdata in list(answer)[:MAX_TXT_RECORDS]:
            raw = b"".join(rdata.strings)
            try:
                keys.append(parse_txt(raw.decode("ascii")))
            except UnicodeDecodeError:
                errors.append("TXT value is not ASCII")
            except DecodeError as exc:
                errors.append(str(exc))
        distinct = sorted(set(keys))
        if not distinct:
            raise DomainLookupError(f"the {name} TXT record is not a peerpost key: "
                                    f"{'; '.join(errors)}")
        if len(distinct) > 1:
            raise DomainLookupError(f"the {name} TXT records publish {len(distinct)} "
                                    "different peerpost keys; a domain has one")
        return distinct[0]

    async def addresses(self, host: str) -> list[str]:
        """The A then AAAA addresses of `host`, asked of the same name server. A type it
        fails to answer (refused, timed out) costs only that type's addresses: RFC 4074
        describes name servers that answer A and drop or refuse AAAA queries. The failure
        is raised when neither type gave an address."""
        found: list[str] = []
        failure: DomainLookupError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except DomainLookupError as exc:
                failure = failure or exc
                continue
            if answer is not None:
                found.extend(str(rdata.address) for rdata in answer)
        if not found and failure is not None:
            raise failure
        return found


# --- a server's own records -----------------------------------------------------------------

PUBLISH_HINT = "publish what `peerpost-rendezvous dns-records` prints"


async def own_records_problem(resolver: DomainResolver, domain: str, key: bytes,
                              port: int) -> tuple[bool, str]:
    """What DNS says of a server's own domain, as (a problem?, one line): missing records
    or another domain key mean that nodes finding their server through DNS, and other
    domains' servers, cannot reach this one or refuse it. A port the SRV records do not
    name is only noted: a port forward may stand between them."""
    try:
        found = await resolver.resolve(domain)
    except DomainLookupError as exc:
        return True, (f"{exc}: nodes that find {domain}'s server through DNS, and other "
                      f"domains' servers, cannot reach this one; {PUBLISH_HINT}")
    if found.key != key:
        return True, (f"_peerpost.{domain} TXT publishes domain key {fingerprint(found.key)}, "
                      f"but this server's is {fingerprint(key)}: nodes and other domains' "
                      f"servers will refuse it; {PUBLISH_HINT}")
    servers = ", ".join(format_hostport(h, p) for h, p in found.servers)
    if all(p != port for _, p in found.servers):
        return False, (f"DNS names {servers} for {domain} and this server listens on port "
                       f"{port}: right only if a port forward leads there")
    return False, f"DNS publishes this server's key and {servers} for {domain}"
