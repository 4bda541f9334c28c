"""Which span a server should hold (pure): the one that most raises the swarm's weakest coverage.

Coverage of a block is the summed announced throughput (tokens/s per block) of the joining and
online servers holding it, so a fast server counts for more than a slow one. A new server takes
the window that maximises the swarm's minimum coverage once it is added; ties go to the window
leaving the fewest blocks at that minimum, then to the lowest start. A running server moves only
when moving raises the minimum clearly (hysteresis), never to the span it already has.
"""

from __future__ import annotations

from collections.abc import Iterable

from beed.dht.records import ServerRecord, ServerState

MOVE_GAIN = 1.2  # a move must raise the weakest coverage by at least 20%
_EPS = 1e-9


def _weight(server: ServerRecord, default: float) -> float:
    return server.compute_tokens_per_s if server.compute_tokens_per_s > 0 else default


def coverage(
    servers: Iterable[ServerRecord], num_blocks: int, *, default_tps: float = 1.0
) -> list[float]:
    """Throughput of the joining and online servers holding each block."""
    counts = [0.0] * num_blocks
    for s in servers:
        if s.state in (ServerState.JOINING, ServerState.ONLINE):
            for i in range(max(0, s.span_start), min(num_blocks, s.span_end)):
                counts[i] += _weight(s, default_tps)
    return counts


def _score(cov: list[float], start: int, length: int, own: float) -> tuple[float, int]:
    """(swarm minimum, -blocks at it) once `own` throughput is added on [start, start+length)."""
    after = [c + own if start <= i < start + length else c for i, c in enumerate(cov)]
    weakest = min(after)
    return weakest, -sum(1 for c in after if c <= weakest * (1 + 1e-6) + _EPS)


def choose_span(
    servers: Iterable[ServerRecord],
    num_blocks: int,
    length: int,
    *,
    exclude_peer: str = "",
    own_tps: float = 1.0,
) -> tuple[int, int]:
    """The best window of `length` blocks for a server of throughput `own_tps`.

    On an empty swarm this is [0, length); next to a server on [0, 15) of 30 blocks it is
    [15, 30); with both, [0, 15) again.
    """
    if length <= 0:
        raise ValueError(f"a span needs at least one block, got {length}")
    length = min(length, num_blocks)
    others = [s for s in servers if s.peer_id != exclude_peer]
    cov = coverage(others, num_blocks, default_tps=own_tps)
    best_start, best_score = 0, (-1.0, 0)
    for start in range(num_blocks - length + 1):
        score = _score(cov, start, length, own_tps)
        if score > best_score:
            best_start, best_score = start, score
    return best_start, best_start + length


def better_span(
    servers: Iterable[ServerRecord],
    num_blocks: int,
    current: tuple[int, int],
    *,
    self_peer: str,
    own_tps: float,
) -> tuple[int, int] | None:
    """The span this server should move to, or None to stay (the gain must be clear)."""
    others = [s for s in servers if s.peer_id != self_peer]
    length = current[1] - current[0]
    best = choose_span(others, num_blocks, length, own_tps=own_tps)
    if best == current:
        return None
    cov = coverage(others, num_blocks, default_tps=own_tps)
    now, _ = _score(cov, current[0], length, own_tps)
    then, _ = _score(cov, best[0], length, own_tps)
    if then > now * MOVE_GAIN + _EPS:
        return best
    return None
