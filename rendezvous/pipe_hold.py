"""PIPE messages held for offline devices (the seed's tunnel that keeps requests for
subscribers), in memory, bounded per device and in total, each with its own expiry.

Held messages are signalling (WebRTC offers and the like): worthless after a restart or
after their hold time, so they are not persisted. Time comes in as `now` (loop clock).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from rendezvous.limits import Limits
from rendezvous.messages import PipeMessage

_OVERHEAD = 64  # accounting per message, so empty payloads can't be held without bound


class _Held(NamedTuple):
    expires: float
    message: PipeMessage
    cost: int


class PipeHold:
    """Per-device FIFO of held PIPE messages."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._by_device: dict[bytes, deque[_Held]] = {}
        self._device_bytes: dict[bytes, int] = {}
        self.total_bytes = 0
        self.count = 0

    def hold(self, device: bytes, message: PipeMessage, expires: float, now: float) -> str | None:
        """Keep `message` for `device` until `expires`; return a refusal text if full."""
        self._expire_device(device, now)
        cost = len(message.payload) + _OVERHEAD
        q = self._by_device.get(device)
        if q is not None and len(q) >= self.limits.pipe_held_per_device:
            return f"{len(q)} pipe messages already held for that device, the limit"
        if self._device_bytes.get(device, 0) + cost > self.limits.pipe_held_bytes_per_device:
            return "pipe hold for that device is full"
        if self.total_bytes + cost > self.limits.pipe_held_total_bytes:
            return "the server's pipe hold is full"
        if q is None:
            q = self._by_device[device] = deque()
        q.append(_Held(expires, message, cost))
        self._device_bytes[device] = self._device_bytes.get(device, 0) + cost
        self.total_bytes += cost
        self.count += 1
        return None

    def take(self, device: bytes, now: float) -> list[PipeMessage]:
        """Remove and return the unexpired messages held for `device`, oldest first."""
        q = self._by_device.pop(device, None)
        if q is None:
            return []
        self._forget(device, q)
        return [h.message for h in q if h.expires > now]

    def expire(self, now: float) -> int:
        """Drop every expired message; return how many."""
        before = self.count
        for device in list(self._by_device):
            self._expire_device(device, now)
        return before - self.count

    def _expire_device(self, device: bytes, now: float) -> None:
        q = self._by_device.get(device)
        if q is None:
            return
        # Holds differ per message, so scan rather than pop from the left only.
        keep = deque(h for h in q if h.expires > now)
        if len(keep) == len(q):
            return
        self._forget(device, q)
        if keep:
            self._by_device[device] = keep
            cost = sum(h.cost for h in keep)
            self._device_bytes[device] = cost
            self.total_bytes += cost
            self.count += len(keep)
        else:
            del self._by_device[device]

    def _forget(self, device: bytes, q: deque[_Held]) -> None:
        self.total_bytes -= self._device_bytes.pop(device, 0)
        self.count -= len(q)
