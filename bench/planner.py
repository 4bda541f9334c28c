"""The planner's placement against beed's greedy rule and Petals' rule, on simulated swarms.

    python bench/planner.py                       # 100 and 1,000 servers, 3 seeds each
    python bench/planner.py --servers 100 --seeds 5 --latency-bound 10

A 70B-shaped model (80 blocks of 1.75 GB in bfloat16, 16 KiB of activations per token) on
heterogeneous volunteer servers drawn from the distributions below. Three placements of the same
servers, each scored by the same function (beed/planning/evaluate.py: disjoint chains, best
first, in the planner's cost model), with micro-batches of the size the planner chose:

- greedy: beed's rule today (placement.choose_span): servers join in a random order, each with the
  span that fits its GPU, at the window that most raises the weakest throughput-weighted coverage;
- petals: Petals' rule (a window of the span that fits, the one whose sorted per-block throughputs
  are smallest), in the same order;
- planner: beed/planning/plan.py (spans, offload and micro-batch size); servers it leaves out of
  every chain take spans by the greedy rule after it.

Server distributions (each server independently):
- GPU: 24 GB (45%), 48 GB (35%) or 80 GB (20%); blocks that fit = (GPU - 4 GB) / 1.75 GB;
- compute: 0.60, 0.35 or 0.15 ms per block per token for those classes, times U(0.7, 1.3);
- host memory for offload: 0, 16, 64 or 128 GB (equally likely), PCIe U(10, 25) GB/s;
- round trip U(10, 200) ms; bandwidth 100 Mbit/s (40%), 500 Mbit/s (40%) or 1 Gbit/s (20%).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beed.dht.records import ServerRecord, ServerState  # noqa: E402
from beed.planning.costs import ModelSpec, ServerSpec  # noqa: E402
from beed.planning.evaluate import score  # noqa: E402
from beed.planning.plan import plan  # noqa: E402
from beed.server.placement import choose_span  # noqa: E402

GB = 1e9
MODEL = ModelSpec(num_blocks=80, block_bytes=int(1.75 * GB), activation_bytes_per_token=16384)
CLASSES = [(24, 0.60e-3, 0.45), (48, 0.35e-3, 0.35), (80, 0.15e-3, 0.20)]


def swarm(rng: random.Random, count: int) -> list[ServerSpec]:
    servers = []
    for i in range(count):
        gpu, compute, _ = rng.choices(CLASSES, weights=[c[2] for c in CLASSES])[0]
        host = rng.choice([0, 16, 64, 128])
        servers.append(
            ServerSpec(
                name=f"s{i}",
                compute_s=compute * rng.uniform(0.7, 1.3),
                gpu_blocks=max(1, int((gpu - 4) * GB / MODEL.block_bytes)),
                host_blocks=int(host * GB / MODEL.block_bytes),
                pcie_bytes_per_s=rng.uniform(10, 25) * GB if host else 0.0,
                rtt_s=rng.uniform(0.010, 0.200),
                bandwidth_bytes_per_s=rng.choices([12.5e6, 62.5e6, 125e6], [0.4, 0.4, 0.2])[0],
            )
        )
    return servers


def _record(server: ServerSpec, span: tuple[int, int]) -> ServerRecord:
    return ServerRecord(
        peer_id=server.name,
        state=ServerState.ONLINE,
        span_start=span[0],
        span_end=span[1],
        host="192.0.2.1",
        port=1,
        model_fingerprint="f",
        model_name="m",
        num_blocks=MODEL.num_blocks,
        compute_tokens_per_s=1.0 / server.compute_s,
    )


def greedy(servers: list[ServerSpec], order: list[int], placed=None) -> dict[str, tuple[int, int]]:
    spans = dict(placed or {})
    by_name = {s.name: s for s in servers}
    for i in order:
        server = servers[i]
        if server.name in spans:
            continue
        records = [_record(by_name[n], sp) for n, sp in spans.items()]
        length = min(server.gpu_blocks, MODEL.num_blocks)
        spans[server.name] = choose_span(
            records, MODEL.num_blocks, length, own_tps=1.0 / server.compute_s
        )
    return spans


def petals(servers: list[ServerSpec], order: list[int]) -> dict[str, tuple[int, int]]:
    throughput = [0.0] * MODEL.num_blocks
    spans = {}
    for i in order:
        server = servers[i]
        length = min(server.gpu_blocks, MODEL.num_blocks)
        windows = range(MODEL.num_blocks - length + 1)
        start = min(windows, key=lambda s: (sorted(throughput[s : s + length]), s))
        spans[server.name] = (start, start + length)
        for b in range(start, start + length):
            throughput[b] += 1.0 / server.compute_s
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="100,1000")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--latency-bound", type=float, default=math.inf, help="seconds per micro-batch"
    )
    parser.add_argument(
        "--no-offload", action="store_true", help="servers have no host memory to offload to"
    )
    args = parser.parse_args()
    print(
        f"# bench/planner.py  70B-shaped model, latency bound {args.latency_bound} s per micro-batch"
    )
    print(
        "| servers | seed | micro-batch | greedy tok/s | petals tok/s | planner tok/s | planner / greedy | planner / petals | plan time s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in (int(c) for c in args.servers.split(",")):
        for seed in range(args.seeds):
            rng = random.Random(seed)
            servers = swarm(rng, count)
            if args.no_offload:
                servers = [dataclasses.replace(s, host_blocks=0) for s in servers]
            order = list(range(count))
            rng.shuffle(order)
            began = time.perf_counter()
            planned = plan(servers, MODEL, tokens=(8, 32, 128), latency_bound_s=args.latency_bound)
            spans = {n: (a.start, a.end) for n, a in planned.assignments().items()}
            spans = greedy(servers, order, spans)  # the servers the plan left out
            took = time.perf_counter() - began
            tokens = planned.tokens or 32
            results = [
                score(servers, placement, MODEL, tokens, args.latency_bound).throughput
                for placement in (greedy(servers, order), petals(servers, order), spans)
            ]
            g, p, ours = results
            print(
                f"| {count} | {seed} | {tokens} | {g:.0f} | {p:.0f} | {ours:.0f} | "
                f"{ours / g if g else math.inf:.2f}x | {ours / p if p else math.inf:.2f}x | {took:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
