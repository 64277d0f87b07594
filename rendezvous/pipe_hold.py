"""The rules of the PIPE hold: messages kept for an offline device until it logs in.

Held messages are signalling (WebRTC offers and the like) that a sender asked the server
to keep for up to `Limits.max_pipe_hold`. They live in the store (`Store.hold_pipe`,
`Store.take_pipes`), so a restart of the server does not lose them; expiry is wall-clock
time for the same reason.

A device's hold is bounded in messages and bytes, and so is the server's. Within one
device's hold, one sender account may use only `pipe_held_per_sender` messages and
`pipe_held_bytes_per_sender` bytes (by default a quarter of the device's hold), so one
sender can't fill it and shut every other sender out until the messages expire.
This module is the policy; the store counts and calls `refusal`.
"""

from __future__ import annotations

from typing import NamedTuple

from rendezvous.limits import Limits
from rendezvous.store import PipeQuota

OVERHEAD = 64  # accounting per message, so empty payloads can't be held without bound


def pipe_quota(limits: Limits) -> PipeQuota:
    """The hold's bounds as `Limits` sets them."""
    return PipeQuota(limits.pipe_held_per_device, limits.pipe_held_bytes_per_device,
                     limits.pipe_held_per_sender, limits.pipe_held_bytes_per_sender,
                     limits.pipe_held_total_bytes)


def cost(payload: bytes) -> int:
    """What one held message counts against the byte bounds."""
    return len(payload) + OVERHEAD


class HoldUsage(NamedTuple):
    """What is held now: for the device, for the device from this sender, in total."""

    device_count: int
    device_bytes: int
    sender_count: int
    sender_bytes: int
    total_bytes: int


def refusal(used: HoldUsage, size: int, quota: PipeQuota) -> str | None:
    """Why a message costing `size` can't be held on top of `used` (None: it can)."""
    if used.sender_count >= quota.per_sender:
        return (f"{used.sender_count} pipe messages from you already held for that device, "
                "the limit")
    if used.sender_bytes + size > quota.bytes_per_sender:
        return "your share of the pipe hold for that device is full"
    if used.device_count >= quota.per_device:
        return f"{used.device_count} pipe messages already held for that device, the limit"
    if used.device_bytes + size > quota.bytes_per_device:
        return "pipe hold for that device is full"
    if used.total_bytes + size > quota.total_bytes:
        return "the server's pipe hold is full"
    return None
