"""The planner (beed/planning/): its chain DP equals brute force on small random swarms, offload
and latency bounds do what the cost model says, and plans tile the model."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from beed.planning.costs import ModelSpec, ServerSpec, link_s, stage_s
from beed.planning.dp import best_chain
from beed.planning.plan import plan

MODEL = ModelSpec(num_blocks=7, block_bytes=200_000_000, activation_bytes_per_token=16_384)


def random_swarm(rng: random.Random, count: int) -> list[ServerSpec]:
    return [
        ServerSpec(
            name=f"s{i}",
            compute_s=rng.uniform(0.2e-3, 3e-3),
            gpu_blocks=rng.randint(1, 5),
            host_blocks=rng.choice([0, 0, 2, 4]),
            pcie_bytes_per_s=rng.choice([0.0, 10e9, 25e9]),
            rtt_s=rng.uniform(0.001, 0.08),
            bandwidth_bytes_per_s=rng.choice([12.5e6, 125e6, 1.25e9]),
        )
        for i in range(count)
    ]


def brute_force(servers, model, tokens, bound):
    """Every subset of servers and every split of the blocks among them: (bottleneck, latency)
    of the best chain within the bound, or None."""
    best = None
    for size in range(1, len(servers) + 1):
        for subset in itertools.combinations(range(len(servers)), size):
            for split in itertools.product(range(1, model.num_blocks + 1), repeat=size):
                if sum(split) != model.num_blocks:
                    continue
                costs = []
                for i, k in zip(subset, split, strict=True):
                    stage = stage_s(servers[i], k, model, tokens)
                    if stage is None:
                        break
                    costs.append((stage, link_s(servers[i], model, tokens)))
                else:
                    latency = sum(s + link for s, link in costs)
                    if latency > bound:
                        continue
                    key = (max(max(s, link) for s, link in costs), latency)
                    best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_chain_dp_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    servers = random_swarm(rng, rng.randint(1, 5))
    tokens = rng.choice([1, 16, 128])
    bound = rng.choice([math.inf, 0.2, 0.5])
    want = brute_force(servers, MODEL, tokens, bound)
    chain = best_chain(servers, MODEL, tokens, bound)
    if want is None:
        assert chain is None
        return
    assert chain is not None
    assert sum(s.blocks for s in chain.stages) == MODEL.num_blocks
    assert len({s.server for s in chain.stages}) == len(chain.stages)
    assert chain.latency_s <= bound
    assert chain.bottleneck_s == pytest.approx(want[0], rel=1e-12)
    assert chain.latency_s == pytest.approx(want[1], rel=1e-9)


def test_offload_and_the_latency_bound_follow_the_cost_model():
    model = ModelSpec(num_blocks=4, block_bytes=1_000_000_000, activation_bytes_per_token=8192)
    small = ServerSpec("small", compute_s=1e-3, gpu_blocks=2, host_blocks=2, pcie_bytes_per_s=50e9)
    tiny = ServerSpec("tiny", compute_s=1e-3, gpu_blocks=1)
    # Only "small" can hold all 4 blocks, by offloading 2: at 64 tokens a block computes in 64 ms
    # and copies in 20 ms, so the copy hides behind compute.
    chain = best_chain([tiny, small], model, 64)
    assert chain is not None
    by_server = {s.server: s for s in chain.stages}
    assert by_server[1].offloaded == max(0, by_server[1].blocks - 2)
    assert stage_s(small, 4, model, 64) == pytest.approx(4 * 64e-3)
    # At 1 token the copy (20 ms) dominates an offloaded block.
    assert stage_s(small, 4, model, 1) == pytest.approx(2 * 1e-3 + 2 * 20e-3)
    assert stage_s(tiny, 2, model, 1) is None  # it cannot hold two blocks
    far = ServerSpec("far", compute_s=1e-4, gpu_blocks=4, rtt_s=1.0)
    assert best_chain([far], model, 1, latency_bound_s=0.4) is None
    assert best_chain([far, small], model, 1, latency_bound_s=0.4).stages[0].server == 1


def test_plans_tile_the_model_with_disjoint_chains():
    rng = random.Random(7)
    servers = random_swarm(rng, 12)
    result = plan(servers, MODEL, latency_bound_s=1.0)
    assert result.chains and result.throughput > 0
    assignments = result.assignments()
    for n in range(len(result.chains)):
        mine = sorted((a.start, a.end) for a in assignments.values() if a.chain == n)
        assert mine[0][0] == 0 and mine[-1][1] == MODEL.num_blocks
        assert all(a[1] == b[0] for a, b in itertools.pairwise(mine))
    used = [s.server for c in result.chains for s in c.stages]
    assert len(used) == len(set(used))
    # More micro-batch sizes to choose from never give a worse plan.
    assert plan(servers, MODEL, tokens=(1,), latency_bound_s=1.0).throughput <= result.throughput


def test_scoring_a_placement_agrees_with_the_plan():
    """evaluate.score of the planner's own spans finds at least the plan's throughput (its
    chains are among those the scorer can take); a span a server cannot hold serves nothing."""
    from beed.planning.evaluate import score

    rng = random.Random(3)
    servers = random_swarm(rng, 10)
    result = plan(servers, MODEL, tokens=(16,), latency_bound_s=1.0)
    spans = {n: (a.start, a.end) for n, a in result.assignments().items()}
    scored = score(servers, spans, MODEL, 16, latency_bound_s=1.0)
    assert scored.throughput >= result.throughput * (1 - 1e-9)
    assert scored.chains >= len(result.chains)
    one = ServerSpec("one", compute_s=1e-3, gpu_blocks=2)
    assert score([one], {"one": (0, 7)}, MODEL, 16).throughput == 0
    whole = ServerSpec("whole", compute_s=1e-3, gpu_blocks=7)
    assert score([whole], {"whole": (0, 7)}, MODEL, 16).throughput == pytest.approx(
        16 / max(stage_s(whole, 7, MODEL, 16), link_s(whole, MODEL, 16))
    )
