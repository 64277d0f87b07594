"""Server limits and the per-connection token bucket that enforces request rates.

Everything that grows with outside input has a bound here.
`TokenBucket` takes `now` from its caller, so tests and the simulator drive its clock.
`source_key` is what every per-address limit (STUN, sessions, the DHT, transfer sessions)
counts a source under, and `SourceLimiter` the bounded table of buckets per source.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass

from rendezvous import defaults
from rendezvous.defaults import DAY as DAY


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the server enforces. Defaults suit a small public server."""

    max_frame: int = defaults.MAX_FRAME
    max_envelope: int = defaults.MAX_ENVELOPE  # sealed location messages are small by design
    max_items_per_send: int = 64
    envelope_ttl: float = defaults.ENVELOPE_TTL
    quota_count: int = defaults.QUOTA_COUNT  # queued envelopes per recipient account
    quota_bytes: int = defaults.QUOTA_BYTES  # queued blob bytes per recipient account
    # Of those, what one sender account may have queued for one recipient account, so
    # one account can't fill another's queue for the whole envelope lifetime.
    sender_quota_count: int = defaults.SENDER_QUOTA_COUNT
    sender_quota_bytes: int = defaults.SENDER_QUOTA_BYTES
    request_rate: float = defaults.REQUEST_RATE  # requests per second per connection...
    request_burst: float = 4_000.0         # ...with this burst
    pipe_bytes_rate: float = 256 * 1024.0  # PIPE payload bytes per second per connection
    max_pipe_payload: int = 16 * 1024
    max_pipe_hold: float = DAY
    pipe_held_per_device: int = 64
    pipe_held_bytes_per_device: int = 256 * 1024
    pipe_held_total_bytes: int = 64 * 1024 * 1024
    # Of a device's hold, what one sender account may use (fair share per sender).
    pipe_held_per_sender: int = 16
    pipe_held_bytes_per_sender: int = 64 * 1024
    max_in_flight: int = 64                # requests being processed per connection
    max_push_buffer: int = 8 * 1024 * 1024  # unsent bytes before a slow reader is dropped
    # Unsent bytes of all sessions together; over it the sessions with the most unsent
    # are dropped first until the total is back under it.
    push_buffer_total: int = defaults.PUSH_BUFFER_TOTAL
    # Live sessions (not relay connections); 0 turns a cap off.
    sessions_per_device: int = defaults.SESSIONS_PER_DEVICE
    sessions_per_account: int = defaults.SESSIONS_PER_ACCOUNT
    sessions_per_ip: int = defaults.SESSIONS_PER_IP
    auth_timeout: float = 30.0             # seconds to authenticate after connecting
    partial_frame_timeout: float = 60.0    # seconds a half-received frame may linger
    # A session whose client announced a PING interval (AUTHORIZATION `keepalive`) is
    # closed after this many seconds without a byte from it (at least twice the interval),
    # so a NAT that dropped its mapping takes the device offline; 0 turns it off. 45 s
    # against the client's default 20 s PING leaves two missed PINGs of slack.
    keepalive_timeout: float = defaults.KEEPALIVE_TIMEOUT
    auth_attempts: int = 3
    # Server links from other domains (rendezvous/federation.py): per linking domain, the
    # envelopes per second it may forward (a token bucket), what it may have queued here
    # from all its senders, and its live links; 0 turns a cap off.
    link_rate: float = defaults.LINK_RATE
    link_burst: float = 10_000.0
    link_quota_count: int = 100_000
    link_quota_bytes: int = 512 * 1024 * 1024
    links_per_domain: int = 8
    # The sending side: how long an envelope for another domain waits before it bounces,
    # and how many one sender may have waiting.
    outbound_expiry: float = defaults.OUTBOUND_EXPIRY
    outbound_per_sender: int = 10_000
    flush_page: int = 128                  # queued envelopes read per page on flush
    max_devices_per_account: int = 16
    max_advertise: int = 1024              # packed bytes of a device's reachability hints
    # The relay of last resort (rendezvous/relay.py). The caller's account pays for both
    # directions of its relayed streams; 0 turns a cap off.
    relay_rate: float = defaults.RELAY_RATE  # relayed bytes per second per account...
    relay_daily: int = defaults.RELAY_DAILY  # ...and per account per UTC day
    relay_accept_timeout: float = 30.0     # seconds the callee has to accept a session
    relay_sessions_per_account: int = 8    # offered or spliced at once
    relay_sessions_total: int = 512        # offered or spliced at once, whole server
    relay_high_water: int = 256 * 1024     # unsent bytes per side before reading pauses


MIN_WAIT = 1e-9  # seconds: a shorter token-bucket debt is float rounding, not a wait


class TokenBucket:
    """Classic token bucket: `take(n, now)` is True while the rate/burst allows.

    `spend(n, now)` is the other way to use it: it always debits (the balance may go
    negative) and returns how long to wait until it is non-negative again. A relay pauses
    reading that long; a node's upload cap waits that long before sending a chunk, so a
    large chunk is never starved by small ones and the long-run rate holds exactly.
    Rate 0 is a fixed allowance of `burst` that never refills.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError("a token bucket needs rate >= 0 and burst > 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Spend `amount` tokens if available at time `now`; report whether it was."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def spend(self, amount: float, now: float) -> float:
        """Debit `amount` unconditionally; seconds until the balance is back to zero.

        A debt shorter than `MIN_WAIT` is none: it is rounding left over from the last
        refill, and waiting it out could not move a clock (150 + 1e-15 == 150 in floats),
        so a caller that checks again after the wait would find it forever, as the relay's
        splice did in the simulator's virtual time.
        """
        self._refill(now)
        self._tokens -= amount
        if self._tokens >= 0:
            return 0.0
        if not self.rate:
            return float("inf")
        wait = -self._tokens / self.rate
        return wait if wait >= MIN_WAIT else 0.0


_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 section 2.5.5.2)


def source_key(host: str) -> str:
    """The key a per-address limit counts the source `host` (an IP literal) under.

    An IPv4 address is itself. An IPv6 address counts as its /64: an end site gets a /64 at
    the least (RFC 6177; a home line, a cheap VPS or a phone usually gets a whole one) and
    picks any address in it at will (RFC 4941, RFC 8981), so a limit per IPv6 address would
    be multiplied by 2^64 for anyone who takes a fresh source address per request, and a
    flood through fresh addresses could evict everyone else from a bounded table. One /64
    is roughly what one public IPv4 address is: one household or one host. An IPv4-mapped
    address (`::ffff:192.0.2.1`, what a dual-stack socket reports for an IPv4 peer) is the
    IPv4 address, or every IPv4 client would share `::ffff:0:0/64`. `[brackets]` are
    removed; a zone (`fe80::1%eth0`) stays in the key, since two links are two networks.
    Text that is not an IP literal (a host name, HOST:PORT) raises ValueError.
    """
    # inet_pton/inet_ntop, not the ipaddress module: this runs for every STUN and DHT
    # datagram, and they take 1 us where ipaddress took 10 (tests check they agree).
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    addr, pct, zone = text.partition("%")
    try:
        if ":" not in addr and not pct:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, addr))
        if pct and (not zone or "/" in zone or "%" in zone):
            raise OSError("bad zone")
        packed = socket.inet_pton(socket.AF_INET6, addr)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise ValueError(f"not an IP address: {host!r}") from None
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    net = socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
    return f"{net}%{zone}" if zone else net


def source_of(host: str) -> str:
    """`source_key(host)`, or `host` itself where it is no IP literal (a Unix socket's empty
    peer name): a limit counts every source somewhere, and a peer we can't place is one."""
    try:
        return source_key(host)
    except ValueError:
        return host


def source_label(key: str) -> str:
    """What a refusal tells the source whose key is `key`: its IP address or its /64."""
    return "your network (IPv6 /64)" if "/" in key else "your IP address"


class SourceLimiter:
    """`allow(host, now)`: whether one more request from `host` (an IP literal) is within
    its source's token bucket (`rate` per second, `burst`), keyed by `source_key`.

    The table keeps the `max_sources` most recently heard sources; the least recently heard
    one makes way for a new one, so a flood from many (spoofed) sources costs memory up to
    the bound and at worst hands an evicted source a fresh burst, which errs towards
    answering.
    """

    def __init__(self, rate: float, burst: float, max_sources: int) -> None:
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        """Spend one token of `host`'s source; whether there was one."""
        return self.allow_key(source_of(host), now)

    def allow_key(self, key: str, now: float) -> bool:
        """Spend one token of the source named `key` as it is (a peer's address and device,
        where the source is not an IP address); whether there was one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(1.0, now)
