"""Route choice: the cheapest chain of servers covering blocks [start, end) (pure, no I/O).

Blocks are graph nodes 0..N; a server announcing span [a, b) gives edges s -> e for every
breakpoint a <= s < e <= b (breakpoints are the starts and ends of all candidate spans, so a route
may use a sub-span of a server). An edge costs the expected time of one decode step through that
hop: the measured round trip to the server plus the announced per-block compute time for the
blocks used, plus a penalty when the server is low on free KV cache. Dijkstra finds the route with
the least total; ties go to fewer hops.

Two modes: "latency" (the default) takes the fastest chain for this session alone. "throughput"
spreads independent sessions over replicas: a server's compute time counts once more for every
session this client already runs there, and each route draws a random ±`jitter` factor per
server, so that clients who know nothing of each other still split between equal replicas.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from beed.dht.records import ServerRecord, ServerState
from protocol.errors import NoRouteError

DEFAULT_RTT_S = 0.005  # assumed round trip to a server we have not measured yet
DEFAULT_BLOCK_TIME_S = 0.002  # assumed per-block step time when a server announces no throughput
LOW_KV_PENALTY_S = 1.0  # added to a hop whose server cannot hold this session's cache
MODES = ("latency", "throughput")
THROUGHPUT_JITTER = 0.25  # ± share of a server's compute time drawn per route in throughput mode


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) of the route, served by `server`."""

    server: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def _hop_cost(
    server: ServerRecord,
    blocks: int,
    rtt_s: Mapping[str, float],
    needed_kv_tokens: int,
    weight: float = 1.0,
) -> float:
    rtt = rtt_s.get(server.peer_id, DEFAULT_RTT_S)
    per_block = (
        1.0 / server.compute_tokens_per_s
        if server.compute_tokens_per_s > 0
        else DEFAULT_BLOCK_TIME_S
    )
    cost = rtt + blocks * per_block * weight
    if server.free_kv_tokens < needed_kv_tokens:
        cost += LOW_KV_PENALTY_S
    return cost


def usable(server: ServerRecord, banned: Iterable[str] = ()) -> bool:
    """A server a new route may use: online, not banned."""
    return server.state == ServerState.ONLINE and server.peer_id not in set(banned)


def find_route(
    servers: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    rtt_s: Mapping[str, float] | None = None,
    banned: Iterable[str] = (),
    needed_kv_tokens: int = 0,
    mode: str = "latency",
    load: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering [start, end); NoRouteError naming the gap if none.

    `load` (throughput mode): sessions this client runs on each server now; `rng` draws the
    per-route jitter (a fresh one when not given)."""
    if mode not in MODES:
        raise ValueError(f"routing mode must be one of {', '.join(MODES)}, got {mode!r}")
    banned_set = set(banned)
    rtt_s = rtt_s or {}
    candidates = [
        s for s in servers if usable(s, banned_set) and s.span_start < end and start < s.span_end
    ]
    weights = {s.peer_id: 1.0 for s in candidates}
    if mode == "throughput":
        load = load or {}
        rng = rng or random.Random()
        for peer_id in weights:
            jitter = rng.uniform(1 - THROUGHPUT_JITTER, 1 + THROUGHPUT_JITTER)
            weights[peer_id] = (1 + load.get(peer_id, 0)) * jitter
    points = sorted(
        {start, end}
        | {min(max(s.span_start, start), end) for s in candidates}
        | {min(max(s.span_end, start), end) for s in candidates}
    )
    # Dijkstra over breakpoints; cost is (seconds, hops) so equal times prefer fewer hops.
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    back: dict[int, Hop] = {}
    queue: list[tuple[float, int, int]] = [(0.0, 0, start)]
    while queue:
        cost, hops, node = heapq.heappop(queue)
        if node == end:
            break
        if (cost, hops) > best.get(node, (math.inf, 0)):
            continue
        for server in candidates:
            if not server.span_start <= node < server.span_end:
                continue
            for point in points:
                if point <= node or point > min(server.span_end, end):
                    continue
                hop_cost = _hop_cost(
                    server, point - node, rtt_s, needed_kv_tokens, weights[server.peer_id]
                )
                new = (cost + hop_cost, hops + 1)
                if new < best.get(point, (math.inf, 0)):
                    best[point] = new
                    back[point] = Hop(server, node, point)
                    heapq.heappush(queue, (new[0], new[1], point))
    if end not in best:
        reachable = max(best)
        raise NoRouteError(
            f"no online server covers block {reachable} (blocks {start}:{end} needed; "
            f"{len(candidates)} usable servers)"
        )
    route: list[Hop] = []
    node = end
    while node != start:
        hop = back[node]
        route.append(hop)
        node = hop.start
    route.reverse()
    return route


def uncovered_blocks(servers: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """Blocks that no online server announces (for error messages and `beectl swarm`)."""
    covered = [False] * num_blocks
    for s in servers:
        if s.state == ServerState.ONLINE:
            for i in range(max(0, s.span_start), min(num_blocks, s.span_end)):
                covered[i] = True
    return [i for i, c in enumerate(covered) if not c]
