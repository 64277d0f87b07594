"""Another server of the node's own domain when the configured one cannot be reached.

A domain may run several rendezvous servers, published as `_peerpost._tcp.DOMAIN` SRV
records. A node whose server was found that way at `init` (config `srv`) and whose
configured server does not answer at login, or answers it with a server error or a session
cap (5xx: its store or disk broken; 429: full), looks the records up again and tries the
other targets in RFC 2782 order, before waiting out its backoff step; while none takes it,
each is tried once per step. It accepts only a server that proves the domain key pinned in
its config (never a new key, whatever the TXT record says now); the server it logs in to
becomes the config's `server`. The name server asked is `$PEERPOST_RESOLVER`, else the
config's `resolver` (`init --resolver`), else the system's: the environment wins, as for
the other environment overrides. A node set up with `--server` never looks in DNS.

The same holds on a reconnect: when the server a running node was logged in to dies or
fails its login (an instance of a domain that runs several on one database), the
session's reconnect tries the other SRV targets within its backoff (`servers` is the
client's `alternates`, `record` its `on_failover`), and the instance it lands on flushes
the same queue.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from crypto.address import domain_of, format_hostport, parse_hostport
from crypto.errors import DecodeError
from overlay.app.config import NodeConfig
from overlay.app.home import NodeHome
from rendezvous.client import RendezvousClient
from rendezvous.client_core import ServerIdentityError
from rendezvous.dns import RESOLVER_ENV, DnsResolver, DomainLookupError, DomainResolver, srv_name
from rendezvous.domainkey import fingerprint
from rendezvous.errors import RendezvousError

log = logging.getLogger("peerpost.node")


def resolver_spec(config: NodeConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The name server to ask (HOST:PORT), or None for the system's."""
    env = os.environ if environ is None else environ
    return env.get(RESOLVER_ENV) or config.resolver or None


class ServerFailover:
    """Finds and logs in to another server of the node's domain (see the module text)."""

    def __init__(self, home: NodeHome, config: NodeConfig,
                 resolver: DomainResolver | None = None) -> None:
        self.home = home
        self.config = config
        self.domain = domain_of(config.address)
        self._resolver = resolver

    @property
    def enabled(self) -> bool:
        """Only for a node whose server came from SRV, with a pinned key, over TLS."""
        return self.config.srv and bool(self.config.server_key) and not self.config.plaintext

    async def servers(self) -> list[tuple[str, int]]:
        """The domain's SRV targets in RFC 2782 order ([] unless `enabled`)."""
        if not self.enabled:
            return []
        try:
            return list((await self._get_resolver().resolve(self.domain)).servers)
        except DomainLookupError as exc:
            log.warning("cannot look for another server of %s: %s", self.domain, exc)
            return []

    def record(self, host: str, port: int) -> None:
        """The session failed over to host:port: it becomes the config's `server`."""
        where = format_hostport(host, port)
        log.warning("failed over from %s to %s (reconnect); recorded in %s",
                    self.config.server, where, self.home.config_path)
        self._remember(where)

    def _remember(self, where: str) -> None:
        """Make `where` the config's `server`. A config that can't be written (a full disk)
        leaves the session where it is: only the next start tries the old server first."""
        self.config.server = where
        try:
            self.home.save_config(self.config)
        except OSError as exc:
            log.error("cannot record the server %s in %s (%s): this session stays on it, "
                      "the next start tries %s's servers again", where,
                      self.home.config_path, exc.strerror or exc, self.domain)

    def _get_resolver(self) -> DomainResolver:
        if self._resolver is None:
            self._resolver = DnsResolver(resolver_spec(self.config))
        return self._resolver

    async def login_elsewhere(self, client: RendezvousClient,
                              why: str = "not reachable") -> str | None:
        """Start `client` at the first other SRV target that proves the pinned key; its
        HOST:PORT (saved as the config's `server`), or None with `client` pointed back at
        the configured server. `why`: what is wrong with the configured one, for the log."""
        pinned = self.config.pinned_key()
        if not self.enabled or pinned is None:
            return None
        try:
            current = parse_hostport(self.config.server, what="server")
            records = await self._get_resolver().resolve(self.domain)
        except (DomainLookupError, DecodeError) as exc:
            log.warning("cannot look for another server of %s: %s", self.domain, exc)
            return None
        if records.key != pinned:
            log.warning("the _peerpost.%s TXT record publishes the key %s, not the pinned %s: "
                        "only a server proving the pinned key is accepted", self.domain,
                        fingerprint(records.key), fingerprint(pinned))
        others = [s for s in records.servers if s != current]
        if not others:
            return None
        log.warning("server %s %s; trying the other %d server(s) of %s (%s SRV)",
                    self.config.server, why, len(others), self.domain, srv_name(self.domain))
        for host, port in others:
            where = format_hostport(host, port)
            client.host, client.port = host, port
            try:
                await client.start()
            except ServerIdentityError as exc:
                log.warning("refusing the server at %s: %s", where, exc.text)
                continue
            except RendezvousError as exc:
                log.warning("server %s of %s: %s", where, self.domain, exc.text or exc)
                continue
            except OSError as exc:
                log.warning("server %s of %s: %s", where, self.domain, exc)
                continue
            log.warning("failed over from %s to %s, which proves the pinned key %s of %s; "
                        "recorded in %s", self.config.server, where, fingerprint(pinned),
                        self.domain, self.home.config_path)
            self._remember(where)
            return where
        client.host, client.port = current
        return None
