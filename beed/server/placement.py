"""Which span a new server should take (pure): the one that most improves the weakest coverage."""

from __future__ import annotations

from collections.abc import Iterable

from beed.dht.records import ServerRecord, ServerState


def coverage(servers: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """How many joining/online servers hold each block."""
    counts = [0] * num_blocks
    for s in servers:
        if s.state in (ServerState.JOINING, ServerState.ONLINE):
            for i in range(max(0, s.span_start), min(num_blocks, s.span_end)):
                counts[i] += 1
    return counts


def choose_span(
    servers: Iterable[ServerRecord], num_blocks: int, length: int, *, exclude_peer: str = ""
) -> tuple[int, int]:
    """The window of `length` blocks holding the most blocks at the swarm's lowest coverage.

    On an empty swarm this is [0, length); next to a server on [0, 15) of 30 blocks it is
    [15, 30). Ties go to the lowest start, so servers started one by one fill the model in order.
    """
    if length <= 0:
        raise ValueError(f"a span needs at least one block, got {length}")
    length = min(length, num_blocks)
    counts = coverage((s for s in servers if s.peer_id != exclude_peer), num_blocks)
    weakest = min(counts)
    at_min = [1 if c == weakest else 0 for c in counts]
    best_start, best_score = 0, -1
    window = sum(at_min[:length])
    for start in range(num_blocks - length + 1):
        if start:
            window += at_min[start + length - 1] - at_min[start - 1]
        if window > best_score:
            best_start, best_score = start, window
    return best_start, best_start + length
