"""Announced throughput checked against what the client measures (pure, no I/O).

A record's `compute_tokens_per_s` is the server's own claim, and routing believes it: a server
claiming 1000x its speed would get every route. The client times every hop of its decode steps
(the interval between that hop's answer and the previous one's, less the link part: the client's
round trip for the first hop, half of it after a push) and keeps, per server, the least per-block
time of its recent small steps (queueing and noise only ever add time). Where that is more than
LIE_FACTOR times what the record claims, routing uses the measured time instead and adds a
penalty (beectl/routing.py OVERCLAIM_PENALTY_S) that puts the server behind every honest
alternative: an honest server is never judged by our noisy clock, a liar loses the routes its
claim bought and keeps only those nobody else can serve.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

from beed.dht.records import ServerRecord

LIE_FACTOR = 3.0  # measured per-block time over the claimed one that overrides the claim
SAMPLES = 16  # recent decode steps kept per server
SMALL_STEP_TOKENS = 8  # rows x tokens of a step that counts (a decode step, not a prefill)
MIN_SAMPLES = 3  # before this many, the claim stands


@dataclass
class SpeedCheck:
    """Per-block step times this client measured, by peer id."""

    _times: dict[str, collections.deque[float]] = field(default_factory=dict)

    def observe(self, peer_id: str, blocks: int, rows_x_tokens: int, compute_s: float) -> None:
        """A hop of `blocks` blocks answered a step of `rows_x_tokens` in about `compute_s`
        (its interval, link part removed)."""
        if rows_x_tokens > SMALL_STEP_TOKENS or blocks <= 0 or compute_s <= 0:
            return
        times = self._times.setdefault(peer_id, collections.deque(maxlen=SAMPLES))
        times.append(compute_s / blocks)

    def measured_block_s(self, peer_id: str) -> float | None:
        times = self._times.get(peer_id)
        if times is None or len(times) < MIN_SAMPLES:
            return None
        return min(times)

    def overrides(self, servers: list[ServerRecord]) -> dict[str, float]:
        """Per-block times routing should use instead of the claims, for servers whose claim
        the measurements contradict."""
        out: dict[str, float] = {}
        for server in servers:
            measured = self.measured_block_s(server.peer_id)
            if measured is None or server.compute_tokens_per_s <= 0:
                continue
            if measured > LIE_FACTOR / server.compute_tokens_per_s:
                out[server.peer_id] = measured
        return out


def claimed_block_s(server: ServerRecord, measured: Mapping[str, float], default: float) -> float:
    """The per-block time routing costs a server at: the measured one where it overrides the
    claim, else the claim (or `default` when there is none)."""
    if server.peer_id in measured:
        return measured[server.peer_id]
    return 1.0 / server.compute_tokens_per_s if server.compute_tokens_per_s > 0 else default
