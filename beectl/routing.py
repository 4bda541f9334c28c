"""Route choice: the cheapest chain of servers covering blocks [start, end) (pure, no I/O).

Blocks are graph nodes 0..N; a server announcing span [a, b) gives edges s -> e for every
breakpoint a <= s < e <= b (breakpoints are the starts and ends of all candidate spans, so a route
may use a sub-span of a server). A route costs the expected time of one decode step through it:
the announced per-block compute time for the blocks each server runs (or, for a server whose claim
this client's measurements contradict, the measured one plus a penalty that puts it behind every
honest alternative: beectl/speeds.py), a penalty when a server is low on free KV cache, and the
links the step crosses:

- relayed (the client sends every hop its input): the client's round trip to each server;
- push (each server sends its output to the next): half the client's round trip to the first
  server, the one-way delay between consecutive servers (half the round trip the upstream
  server announced for that pair, or half the mean of the client's round trips to both when it
  announced none), and half the round trip from the last server back to the client.

Because a push link depends on the previous server, Dijkstra runs over (block, last server)
states; ties go to fewer hops.

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

from beectl.speeds import claimed_block_s
from beed.dht.records import ServerRecord, ServerState
from protocol.errors import NoRouteError

DEFAULT_RTT_S = 0.005  # assumed round trip to a server we have not measured yet
DEFAULT_BLOCK_TIME_S = 0.002  # assumed per-block step time when a server announces no throughput
LOW_KV_PENALTY_S = 1.0  # added to a hop whose server cannot hold this session's cache
# Added to a hop whose server was caught overclaiming its speed: a liar is costed at its measured
# speed *and* placed behind every honest alternative, so its lie cannot win a route by luck of
# timing (honest claims are measured at start-up, often under load, and can be slower than a
# liar's best measured step).
OVERCLAIM_PENALTY_S = 1.0
RELAY_LINKS = 2  # an unmeasured server behind a relay: client -> relay -> server
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


def _compute_cost(
    server: ServerRecord,
    blocks: int,
    needed_kv_tokens: int,
    weight: float = 1.0,
    measured: Mapping[str, float] | None = None,
) -> float:
    per_block = claimed_block_s(server, measured or {}, DEFAULT_BLOCK_TIME_S)
    cost = blocks * per_block * weight
    if measured and server.peer_id in measured:
        cost += OVERCLAIM_PENALTY_S
    if server.free_kv_tokens < needed_kv_tokens:
        cost += LOW_KV_PENALTY_S
    return cost


def _one_way_s(prev: ServerRecord, server: ServerRecord, rtt_s: Mapping[str, float]) -> float:
    """Expected one-way delay of a push from `prev` to `server`."""
    announced = dict(prev.next_rtt_ms).get(server.peer_id)
    if announced is not None:
        return announced / 2000.0
    return (_rtt(prev, rtt_s) + _rtt(server, rtt_s)) / 4.0


def _rtt(server: ServerRecord, rtt_s: Mapping[str, float]) -> float:
    """The client's round trip to `server`: measured (through its relay, if it has one), or
    assumed; a server behind NAT is reached through a relay, two links instead of one."""
    measured = rtt_s.get(server.peer_id)
    if measured is not None:
        return measured
    return DEFAULT_RTT_S * (RELAY_LINKS if server.dial_relays else 1)


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
    push: bool = False,
    measured_block_s: Mapping[str, float] | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering [start, end); NoRouteError naming the gap if none.

    `rtt_s`: the client's measured round trips by peer id; `push`: cost links as a pushed
    chain (see the module docstring). `load` (throughput mode): sessions this client runs on
    each server now; `rng` draws the per-route jitter (a fresh one when not given);
    `measured_block_s`: per-block times that replace the claims of servers caught
    overclaiming (beectl/speeds.py)."""
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

    def link_cost(prev: ServerRecord | None, server: ServerRecord, last: bool) -> float:
        rtt = _rtt(server, rtt_s)
        if not push:
            return rtt
        cost = rtt / 2 if prev is None else _one_way_s(prev, server, rtt_s)
        return cost + (rtt / 2 if last else 0.0)

    # Dijkstra over (breakpoint, last server) states; cost is (seconds, hops).
    State = tuple[int, str]
    origin: State = (start, "")
    best: dict[State, tuple[float, int]] = {origin: (0.0, 0)}
    back: dict[State, tuple[State, Hop]] = {}
    by_id = {s.peer_id: s for s in candidates}
    queue: list[tuple[float, int, int, str]] = [(0.0, 0, start, "")]
    goal: State | None = None
    while queue:
        cost, hops, node, prev_id = heapq.heappop(queue)
        state = (node, prev_id)
        if node == end:
            goal = state
            break
        if (cost, hops) > best.get(state, (math.inf, 0)):
            continue
        prev = by_id.get(prev_id)
        for server in candidates:
            if not server.span_start <= node < server.span_end:
                continue
            for point in points:
                if point <= node or point > min(server.span_end, end):
                    continue
                step = _compute_cost(
                    server,
                    point - node,
                    needed_kv_tokens,
                    weights[server.peer_id],
                    measured_block_s,
                ) + link_cost(prev, server, point == end)
                new = (cost + step, hops + 1)
                target = (point, server.peer_id)
                if new < best.get(target, (math.inf, 0)):
                    best[target] = new
                    back[target] = (state, Hop(server, node, point))
                    heapq.heappush(queue, (new[0], new[1], point, server.peer_id))
    if goal is None:
        reachable = max(node for node, _ in best)
        raise NoRouteError(
            f"no online server covers block {reachable} (blocks {start}:{end} needed; "
            f"{len(candidates)} usable servers)"
        )
    route: list[Hop] = []
    state = goal
    while state != origin:
        state, hop = back[state]
        route.append(hop)
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
