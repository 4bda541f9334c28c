"""Which servers the client avoids for now, and which failures are worth a retry elsewhere (pure).

The one place where the client decides about retries and bans: a server that failed is banned
for `base_s × 2^(failures − 1)` (capped), so a flapping server is tried less and less often, and a
ban always ends, so the only server of a block is never shut out for good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol.errors import BadRequestError, BeeError, NoRouteError, RemoteError


def is_server_failure(exc: BaseException) -> bool:
    """Failures of one server that another server (or the same one later) may not have.

    A BadRequestError is a bug on our side and would fail anywhere: no retry. Everything else a
    server says or does wrong (it died, timed out, lost the session, is full, draining, moved its
    blocks, has other weights, broke the protocol) is handled by banning it and re-routing.
    """
    if isinstance(exc, BadRequestError) or (
        isinstance(exc, RemoteError) and exc.remote_code == 202
    ):
        return False
    if isinstance(exc, NoRouteError):
        return False  # not one server's fault; the caller waits for the swarm instead
    return isinstance(exc, BeeError)


@dataclass
class BanList:
    """Servers to leave out of routes until their ban expires."""

    base_s: float = 5.0  # first ban (longer than a DHT lookup that waits for a dead node)
    max_s: float = 60.0  # longest ban
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def ban(self, peer_id: str, *, seconds: float | None = None, now: float | None = None) -> float:
        """Ban `peer_id` (longer each time it fails again); returns the ban's length."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        length = (
            seconds if seconds is not None else min(self.base_s * 2 ** (failures - 1), self.max_s)
        )
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), now + length)
        return length

    def succeeded(self, peer_id: str) -> None:
        """A server that answered well starts from a short ban again next time."""
        self._failures.pop(peer_id, None)

    def banned(self, now: float | None = None) -> frozenset[str]:
        now = time.monotonic() if now is None else now
        for peer_id in [p for p, until in self._until.items() if until <= now]:
            del self._until[peer_id]
        return frozenset(self._until)

    def next_expiry(self, now: float | None = None) -> float | None:
        """Seconds until the earliest ban ends (None without bans)."""
        now = time.monotonic() if now is None else now
        pending = [until - now for until in self._until.values() if until > now]
        return min(pending) if pending else None
