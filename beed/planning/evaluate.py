"""The throughput of a given placement, in the planner's cost model (pure): how plans compare.

A placement gives each server a span; a server keeps what fits on its GPU and offloads the rest
(costs.offloaded), and may serve any part of its span in a chain, at its span's average cost per
block (its offloaded blocks spread evenly). Chains are taken best first among the servers not yet
in one, as plan.py does, so a placement chosen by the planner scores at least what the planner
estimated for it, and other placements (beed's greedy rule, Petals') are scored the same way.

Each chain is the best path over block positions (a DAG: a stage goes from its first block to
one past its last) for a bottleneck bound, bisected over the stage costs, with the least latency
among those. A path may use one server twice (two parts of its span): such a chain is scored as
it would run, the server's parts adding up in one stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from beed.planning.costs import ModelSpec, ServerSpec, link_s, offloaded, stage_s
from protocol.errors import InternalServerError

# Per start position: the stages from it (server, end, bottleneck cost, latency), as arrays.
Options = list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Scored:
    throughput: float  # tokens per second, all chains together
    chains: int
    servers_used: int


def _per_block_s(server: ServerSpec, span_blocks: int, model: ModelSpec, tokens: int) -> float:
    total = stage_s(server, span_blocks, model, tokens)
    if total is None:  # _options leaves out spans a server cannot hold
        raise InternalServerError(f"{server.name} cannot hold {span_blocks} blocks")
    return total / span_blocks


def _options(
    servers: Sequence[ServerSpec],
    spans: Mapping[int, tuple[int, int]],
    model: ModelSpec,
    tokens: int,
) -> Options:
    """Per start position: (server, end, bottleneck cost, latency) of every stage from it."""
    rows: list[list[tuple[int, int, float, float]]] = [[] for _ in range(model.num_blocks)]
    for i, (start, end) in spans.items():
        server = servers[i]
        if offloaded(server, end - start) is None:
            continue  # it cannot hold that span: it serves nothing
        per_block = _per_block_s(server, end - start, model, tokens)
        link = link_s(server, model, tokens)
        for b in range(start, end):
            for e in range(b + 1, end + 1):
                stage = per_block * (e - b)
                rows[b].append((i, e, max(stage, link), stage + link))
    out = []
    for row in rows:
        array = np.array(row, dtype=np.float64).reshape(-1, 4)
        out.append(
            (array[:, 0].astype(np.int64), array[:, 1].astype(np.int64), array[:, 2], array[:, 3])
        )
    return out


def _path(
    options: Options, blocks: int, tau: float, allowed: np.ndarray
) -> tuple[float, list[tuple[int, int]]]:
    """Least latency to each position with stage costs <= tau, and the stage that reached it."""
    lat = np.full(blocks + 1, math.inf)
    lat[0] = 0.0
    came = [(-1, -1)] * (blocks + 1)  # (server, from position)
    for b in range(blocks):
        if not math.isfinite(lat[b]):
            continue
        server, end, cost, latency = options[b]
        keep = (cost <= tau) & allowed[server]
        for s, e, value in zip(server[keep], end[keep], lat[b] + latency[keep], strict=True):
            if value < lat[e]:
                lat[e], came[e] = value, (int(s), b)
    return float(lat[blocks]), came


def _best_chain(
    options: Options, model: ModelSpec, allowed: np.ndarray, bound: float
) -> dict[int, int] | None:
    costs = sorted({float(c) for _, _, cost, _ in options for c in cost})
    blocks = model.num_blocks

    def feasible(tau: float) -> bool:
        latency = _path(options, blocks, tau, allowed)[0]
        return math.isfinite(latency) and latency <= bound

    if not costs or not feasible(costs[-1]):
        return None
    low, high = 0, len(costs) - 1
    while low < high:
        mid = (low + high) // 2
        if feasible(costs[mid]):
            high = mid
        else:
            low = mid + 1
    _, came = _path(options, blocks, costs[low], allowed)
    parts: dict[int, int] = {}
    b = blocks
    while b > 0:
        server, start = came[b]
        parts[server] = parts.get(server, 0) + b - start
        b = start
    return parts


def score(
    servers: Sequence[ServerSpec],
    spans: Mapping[str, tuple[int, int]],
    model: ModelSpec,
    tokens: int,
    latency_bound_s: float = math.inf,
) -> Scored:
    """Throughput of the placement `spans` (by server name) with micro-batches of `tokens`."""
    index = {s.name: i for i, s in enumerate(servers)}
    placed = {index[name]: span for name, span in spans.items()}
    options = _options(servers, placed, model, tokens)
    allowed = np.ones(len(servers), dtype=bool)
    total, chains, used = 0.0, 0, 0
    while True:
        parts = _best_chain(options, model, allowed, latency_bound_s)
        if parts is None:
            break
        bottleneck = 0.0
        for i, blocks in parts.items():
            start, end = placed[i]
            stage = _per_block_s(servers[i], end - start, model, tokens) * blocks
            bottleneck = max(bottleneck, stage, link_s(servers[i], model, tokens))
            allowed[i] = False
        total += tokens / bottleneck
        chains += 1
        used += len(parts)
    return Scored(total, chains, used)
