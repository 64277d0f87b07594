"""The built-in defaults of the server limits that `serve` takes as flags, as plain numbers.

`rendezvous.limits.Limits` takes its defaults from here, and `peerpost-rendezvous` shows
them in its help from here, so building its parser loads neither `Limits` (dataclasses,
inspect, socket) nor the server. Why each value is what it is: the field's comment in
rendezvous/limits.py.
"""

from __future__ import annotations

from rendezvous.framing import DEFAULT_MAX_FRAME

DAY = 86400.0

MAX_FRAME = DEFAULT_MAX_FRAME
MAX_ENVELOPE = 64 * 1024
ENVELOPE_TTL = 30 * DAY
QUOTA_COUNT = 10_000
QUOTA_BYTES = 64 * 1024 * 1024
SENDER_QUOTA_COUNT = 1_000
SENDER_QUOTA_BYTES = 8 * 1024 * 1024
REQUEST_RATE = 2_000.0
PUSH_BUFFER_TOTAL = 256 * 1024 * 1024
SESSIONS_PER_DEVICE = 4
SESSIONS_PER_ACCOUNT = 16
SESSIONS_PER_IP = 64
KEEPALIVE_TIMEOUT = 45.0
LINK_RATE = 1_000.0
OUTBOUND_EXPIRY = 5 * DAY
RELAY_RATE = 2_000_000.0
RELAY_DAILY = 2_000_000_000
