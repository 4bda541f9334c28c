"""A token bucket of bytes per second shared by every stream a relay splices."""

from __future__ import annotations

import asyncio
import time


class Bandwidth:
    """`take(n)` waits until n bytes fit under `bytes_per_s` (0: no cap); bursts of up to a
    quarter second's bytes (at least 256 KiB) pass at once."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self.burst = max(256 * 1024, bytes_per_s / 4)
        self._tokens = self.burst
        self._at = time.monotonic()
        self.total = 0  # bytes passed

    async def take(self, n: int) -> None:
        self.total += n
        if self.bytes_per_s <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.bytes_per_s)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.bytes_per_s)
