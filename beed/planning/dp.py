"""The best chain of servers for all blocks, by dynamic programming over blocks (exact).

A chain is a set of servers, each holding a number of consecutive blocks, together covering the
model once; a micro-batch of `tokens` flows through it as a pipeline. Its throughput is `tokens`
over its bottleneck (the slowest stage or link: costs.py), its latency the sum of all stages and
links. `best_chain` returns the chain of highest throughput whose latency is within a bound, the
one of least latency among those.

Because a stage's cost depends only on its server and its number of blocks (costs.py), a chain's
bottleneck and latency do not depend on the order of its servers, so chains are searched with
servers in a fixed order and each server used at most once, exactly:

- for a bottleneck bound `tau`, `min_latency` is a 0/1 knapsack over servers: state = blocks
  covered so far, over the servers seen so far (the last server decides how many blocks it
  adds), value = the least latency, keeping only stages whose cost is at most `tau`;
- the least latency only falls as `tau` grows, so the smallest feasible `tau` (the best
  throughput) is found by bisection over the finitely many stage and link costs.

Cost: O(servers x blocks x span lengths) array operations per bound, times log(candidates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from beed.planning.costs import ModelSpec, ServerSpec, link_s, offloaded, stage_s
from protocol.errors import InternalServerError


@dataclass(frozen=True)
class Stage:
    server: int  # index into the servers given
    blocks: int
    offloaded: int
    stage_s: float
    link_s: float

    @property
    def cost_s(self) -> float:
        """What this stage adds to the pipeline's bottleneck."""
        return max(self.stage_s, self.link_s)


@dataclass(frozen=True)
class Chain:
    stages: tuple[Stage, ...]
    tokens: int  # micro-batch size

    @property
    def bottleneck_s(self) -> float:
        return max(s.cost_s for s in self.stages)

    @property
    def throughput(self) -> float:
        """Tokens per second once the pipeline is full."""
        return self.tokens / self.bottleneck_s

    @property
    def latency_s(self) -> float:
        """Seconds for one micro-batch through the whole chain."""
        return sum(s.stage_s + s.link_s for s in self.stages)


def _options(
    servers: Sequence[ServerSpec], model: ModelSpec, tokens: int
) -> list[list[tuple[int, float, float]]]:
    """Per server: (blocks, bottleneck cost, latency) of every span length it can hold."""
    out = []
    for server in servers:
        link = link_s(server, model, tokens)
        rows = []
        for k in range(1, min(server.max_blocks(), model.num_blocks) + 1):
            stage = stage_s(server, k, model, tokens)
            if stage is not None:
                rows.append((k, max(stage, link), stage + link))
        out.append(rows)
    return out


def _min_latency(
    options: list[list[tuple[int, float, float]]], blocks: int, tau: float
) -> tuple[float, np.ndarray]:
    """Least latency over chains covering `blocks` with every stage cost <= tau, and the
    choices (choice[i, b]: blocks server i adds to reach b; 0 = not used)."""
    lat = np.full(blocks + 1, math.inf)
    lat[0] = 0.0
    choice = np.zeros((len(options), blocks + 1), dtype=np.int64)
    for i, rows in enumerate(options):
        new = lat.copy()
        for k, cost, latency in rows:
            if cost > tau or k > blocks:
                continue
            candidate = lat[: blocks + 1 - k] + latency
            better = candidate < new[k:]
            if better.any():
                new[k:] = np.where(better, candidate, new[k:])
                choice[i, k:][better] = k
        lat = new
    return float(lat[blocks]), choice


def best_chain(
    servers: Sequence[ServerSpec],
    model: ModelSpec,
    tokens: int,
    latency_bound_s: float = math.inf,
) -> Chain | None:
    """The chain of highest throughput within the latency bound (then least latency), or None
    if no chain covers the model within it."""
    options = _options(servers, model, tokens)
    candidates = sorted({cost for rows in options for _, cost, _ in rows})
    if not candidates:
        return None
    blocks = model.num_blocks

    def feasible(tau: float) -> bool:
        latency = _min_latency(options, blocks, tau)[0]
        return math.isfinite(latency) and latency <= latency_bound_s

    if not feasible(candidates[-1]):
        return None
    low, high = 0, len(candidates) - 1  # the smallest feasible candidate is in [low, high]
    while low < high:
        mid = (low + high) // 2
        if feasible(candidates[mid]):
            high = mid
        else:
            low = mid + 1
    tau = candidates[low]
    _, choice = _min_latency(options, blocks, tau)
    stages: list[Stage] = []
    b = blocks
    for i in reversed(range(len(servers))):
        k = int(choice[i, b])
        if k:
            server = servers[i]
            stage = stage_s(server, k, model, tokens)
            off = offloaded(server, k)
            if stage is None or off is None:  # the DP only chooses spans a server holds
                raise InternalServerError(f"planned a span of {k} blocks {server.name} cannot hold")
            stages.append(Stage(i, k, off, stage, link_s(server, model, tokens)))
            b -= k
    if b != 0:
        raise InternalServerError(f"planned chain leaves blocks 0:{b} uncovered")
    return Chain(tuple(reversed(stages)), tokens)
