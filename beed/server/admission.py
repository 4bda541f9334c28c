"""Which connections a server keeps: a cap on all of them and on those of one peer.

A *peer* is what an attacker cannot multiply for free: the remote IPv4 address, or the /64
prefix of an IPv6 address (one home or one VM usually gets a whole /64).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from typing import Any, Protocol

from beed.server.config import PeerLimits
from protocol.errors import BeeError, QuotaExceededError, ServerBusyError

log = logging.getLogger(__name__)


def peer_of(peername: Any) -> str:
    """The peer key of a socket's remote address ("local" for a non-IP socket)."""
    if not isinstance(peername, tuple) or not peername:
        return "local"
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return str(peername[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Admitted(Protocol):
    """What admission needs of a connection."""

    id: int
    peer: str

    @property
    def idle_since(self) -> float | None:
        """Monotonic time since which it has had no session and no request (None: busy)."""

    def abort(self, reason: str) -> None:
        """Close it now (its run loop ends and cleans up)."""


class Admission:
    """The live connections of one server, by peer."""

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self._live: dict[int, Admitted] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.evicted = 0
        self.reader_waits = 0  # compute requests held until their peer read earlier answers
        self.reader_closed = 0  # connections closed for reading nothing (write_timeout_s)

    def __len__(self) -> int:
        return len(self._live)

    def connections_of(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def admit(self, conn: Admitted) -> BeeError | None:
        """Register conn, or the error it is refused with. A full server first closes its oldest
        idle connection to make room (a stranger's idle connections cannot lock honest peers
        out)."""
        limits = self.limits
        if self._per_peer[conn.peer] >= limits.max_connections_per_peer:
            self.refused += 1
            return QuotaExceededError(
                f"peer {conn.peer} already has {self._per_peer[conn.peer]} connections to this "
                f"server (--max-connections-per-peer {limits.max_connections_per_peer})"
            )
        if len(self._live) >= limits.max_connections:
            oldest = self._oldest_idle()
            if oldest is None:
                self.refused += 1
                return ServerBusyError(
                    f"server has {len(self._live)} busy connections "
                    f"(--max-connections {limits.max_connections})"
                )
            self.evicted += 1
            self.leave(oldest)
            oldest.abort("the server is full and this connection was the oldest idle one")
        self._live[conn.id] = conn
        self._per_peer[conn.peer] += 1
        return None

    def leave(self, conn: Admitted) -> None:
        if self._live.pop(conn.id, None) is None:
            return
        left = self._per_peer[conn.peer] - 1
        if left > 0:
            self._per_peer[conn.peer] = left
        else:
            del self._per_peer[conn.peer]

    def _oldest_idle(self) -> Admitted | None:
        best: Admitted | None = None
        best_since = time.monotonic() + 1.0
        for conn in self._live.values():
            since = conn.idle_since
            if since is not None and since < best_since:
                best, best_since = conn, since
        return best
