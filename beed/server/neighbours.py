"""Round trips from a server to the servers that serve the blocks after its span (push hops)."""

from __future__ import annotations

import asyncio
import logging

from beed.dht.records import MAX_NEXT_RTTS, ServerRecord, ServerState
from beed.server.push import NextHop, Pusher
from protocol.errors import BeeError

log = logging.getLogger(__name__)

PROBES = 3  # pings per server; the least counts


def followers(me: ServerRecord, servers: list[ServerRecord]) -> list[ServerRecord]:
    """Online servers a route may push to from `me` (at most MAX_NEXT_RTTS)."""
    return [
        s
        for s in servers
        if s.peer_id != me.peer_id
        and s.state == ServerState.ONLINE
        and (
            s.span_start <= me.span_end < s.span_end  # serves the block after ours
            or me.span_start < s.span_start <= me.span_end  # takes over inside our span
        )
    ][:MAX_NEXT_RTTS]


async def measure_next_rtts(
    pusher: Pusher, me: ServerRecord, servers: list[ServerRecord]
) -> tuple[tuple[str, float], ...]:
    """(peer id, round trip in ms) of every follower that answered, sorted by peer id."""

    async def one(server: ServerRecord) -> tuple[str, float] | None:
        hop = NextHop(
            server.host, server.port, server.peer_id, "0" * 32, server.tls, server.dial_relays
        )
        try:
            async with asyncio.timeout(5.0):
                conn = await pusher.connection(hop)
                return server.peer_id, 1000 * min([await conn.ping(2.0) for _ in range(PROBES)])
        except (BeeError, TimeoutError) as exc:
            log.debug("next_rtt.unreachable peer=%s error=%s", server.peer_id[:8], exc)
            return None

    found = await asyncio.gather(*(one(s) for s in followers(me, servers)))
    return tuple(sorted((peer, round(ms, 2)) for peer, ms in (r for r in found if r is not None)))


def rtts_changed(old: tuple[tuple[str, float], ...], new: tuple[tuple[str, float], ...]) -> bool:
    """Worth a new announcement: other servers, or a round trip moved by 20% (and 1 ms)."""
    before = dict(old)
    return set(before) != {p for p, _ in new} or any(
        abs(before[p] - ms) > max(1.0, 0.2 * before[p]) for p, ms in new
    )
