"""A plan for a whole swarm: disjoint chains, spans and offload per server, the micro-batch size.

For each candidate micro-batch size, chains are taken one at a time: the best chain among the
servers left (dp.best_chain, exact), then the best among those still left, until no chain fits
the latency bound. The swarm's throughput is the sum of its chains'. The micro-batch size of the
highest total wins.

Where this approximates: taking the best chain first is greedy (a partition of the servers into
chains that is better overall may exist: it is a bin-packing problem); chains are disjoint (in
the running swarm, routes also cross between chains where spans overlap, which can only add
throughput); servers left out of every chain hold no span in the plan (they can replicate the
busiest spans: placement.py's rule decides for them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from beed.planning.costs import ModelSpec, ServerSpec
from beed.planning.dp import Chain, best_chain

DEFAULT_TOKENS = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class Assignment:
    start: int
    end: int
    offloaded: int  # blocks of the span kept in host memory
    chain: int  # which chain of the plan


@dataclass(frozen=True)
class Plan:
    tokens: int  # micro-batch size
    chains: tuple[Chain, ...]  # stages index the servers given to plan()
    names: tuple[str, ...]  # server names, as given

    @property
    def throughput(self) -> float:
        return sum(c.throughput for c in self.chains)

    def assignments(self) -> dict[str, Assignment]:
        """Each server's span in its chain (servers in no chain are absent)."""
        out = {}
        for n, chain in enumerate(self.chains):
            start = 0
            for stage in chain.stages:
                end = start + stage.blocks
                out[self.names[stage.server]] = Assignment(start, end, stage.offloaded, n)
                start = end
        return out


def chains_for(
    servers: Sequence[ServerSpec], model: ModelSpec, tokens: int, latency_bound_s: float
) -> list[Chain]:
    """Disjoint chains, best first, each exact among the servers left (indices into servers)."""
    left = list(range(len(servers)))
    chains: list[Chain] = []
    while left:
        chain = best_chain([servers[i] for i in left], model, tokens, latency_bound_s)
        if chain is None:
            break
        stages = tuple(
            type(s)(left[s.server], s.blocks, s.offloaded, s.stage_s, s.link_s)
            for s in chain.stages
        )
        chains.append(Chain(stages, tokens))
        used = {s.server for s in stages}
        left = [i for i in left if i not in used]
    return chains


def plan(
    servers: Sequence[ServerSpec],
    model: ModelSpec,
    *,
    tokens: Iterable[int] = DEFAULT_TOKENS,
    latency_bound_s: float = math.inf,
) -> Plan:
    """The plan of highest total throughput over the candidate micro-batch sizes."""
    names = tuple(s.name for s in servers)
    best = Plan(0, (), names)
    for size in tokens:
        candidate = Plan(size, tuple(chains_for(servers, model, size, latency_bound_s)), names)
        if candidate.throughput > best.throughput:
            best = candidate
    return best
