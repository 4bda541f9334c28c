"""Throughput with many sequences: batched generation, and many independent clients at once.

    python bench/batch.py                               # both tables, float32, 2 servers
    python bench/batch.py --part scaling --sizes 1,8,64
    python bench/batch.py --part clients --clients 1,4,16
    python bench/batch.py --model /tmp/beed-gpu/llama-1b-bfloat16 --dtype bfloat16 --device cuda

(a) scaling: one client generates for a batch of B prompts of different lengths (left padded)
    through a 2-server chain; the baseline is local transformers' batched `generate` on the same
    batch, measured in the same run (in its own process). Tokens must match.
(b) clients: C independent clients (each its own DHT node, connections and session; they share
    the read-only head weights in this process) each generate for one prompt at the same time,
    against a 2-server chain with continuous batching on, then off. Aggregate tokens/s and the
    p50/p95 time between a client's consecutive tokens; the ratio is to 1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_BASELINE_ENV = dict(os.environ)
os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the beectl CLI sets for the client

import torch  # noqa: E402

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Water boils at",
    "List three colours:",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "The capital of France is",
    "In 1969, the first people to walk on the Moon",
    "Why is the sky blue? Because",
]


def batch_ids(tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    enc = tokenizer(
        [PROMPTS[i % len(PROMPTS)] for i in range(size)], return_tensors="pt", padding=True
    )
    return enc.input_ids, enc.attention_mask


def local_scaling(
    path: str, sizes: list[int], new_tokens: int, dtype: str, device: str
) -> dict[int, tuple[float, list]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.generation_config.eos_token_id = None
    results = {}
    for size in sizes:
        ids, mask = (t.to(device) for t in batch_ids(tokenizer, size))
        kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)  # warm-up
        began = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kwargs)
        if device != "cpu":
            torch.cuda.synchronize()
        results[size] = (time.perf_counter() - began, out.tolist())
    return results


def local_in_subprocess(
    args: argparse.Namespace, sizes: list[int]
) -> dict[int, tuple[float, list]]:
    cmd = [
        sys.executable,
        __file__,
        "--local-only",
        "--model",
        args.model,
        "--sizes",
        ",".join(map(str, sizes)),
        "--new-tokens",
        str(args.new_tokens),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_BASELINE_ENV)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return {int(k): (v[0], v[1]) for k, v in data.items()}


def scaling(args: argparse.Namespace, path: str) -> None:
    from transformers import AutoTokenizer

    from beectl import AutoDistributedModelForCausalLM
    from beectl.local_swarm import LocalSwarm

    sizes = [int(s) for s in args.sizes.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = local_in_subprocess(args, sizes)
    rows = []
    with LocalSwarm(
        model=args.model, num_servers=2, dtype=args.dtype, extra_args=["--device", args.device]
    ) as swarm:
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        with AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=peers, dtype=getattr(torch, args.dtype), device=args.device
        ) as model:
            for size in sizes:
                ids, mask = batch_ids(tokenizer, size)
                kwargs = dict(eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
                model.generate(ids, mask, max_new_tokens=2, **kwargs)  # warm-up
                began = time.perf_counter()
                out = model.generate(ids, mask, max_new_tokens=args.new_tokens, **kwargs)
                seconds = time.perf_counter() - began
                local_s, local_seq = local[size]
                rows.append((size, local_s, seconds, out.tolist() == local_seq))
    tokens = args.new_tokens
    print(f"\n(a) batch scaling: {tokens} new tokens per row, 2 servers, left-padded prompts\n")
    print(
        "| batch | tokens | local s | local tok/s | beed s | beed tok/s | vs local | same tokens |"
    )
    print(
        "|------:|-------:|--------:|------------:|-------:|-----------:|---------:|-------------|"
    )
    for size, local_s, seconds, same in rows:
        n = size * tokens
        print(
            f"| {size:>5} | {n:>6} | {local_s:>7.2f} | {n / local_s:>11.1f} | {seconds:>6.2f} | "
            f"{n / seconds:>10.1f} | {local_s / seconds:>7.2f}x | {'yes' if same else 'NO'} |"
        )
    sys.stdout.flush()


async def run_clients(args: argparse.Namespace, peers: list[str], count: int):
    """`count` independent clients generating at once; (wall s, per-token gaps, sequences)."""
    from transformers import AutoTokenizer

    from beectl.config import ClientConfig
    from beectl.generation import SamplingConfig, generate
    from beectl.head import LocalHead
    from beectl.model import RemoteModel, load_model_files
    from beectl.swarm import Swarm
    from beed.dht.peers import parse_initial_peers

    config = ClientConfig(initial_peers=tuple(parse_initial_peers(peers)))
    new_tokens = args.new_tokens
    files = load_model_files(args.model)
    head = LocalHead(files.path, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(files.path)
    models = []
    for _ in range(count):
        swarm = Swarm(config)
        await swarm.start()
        models.append(RemoteModel(files, head, tokenizer, swarm, config))
    gaps: list[float] = []

    async def one(i: int, model: RemoteModel) -> list[int]:
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids
        stamps: list[float] = []
        async with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
            out = await generate(
                head,
                session,
                ids,
                SamplingConfig(max_new_tokens=new_tokens),
                on_tokens=lambda _t: stamps.append(time.perf_counter()),
            )
        gaps.extend(b - a for a, b in itertools.pairwise(stamps))
        return out.sequences[0].tolist()

    try:
        await asyncio.gather(*(one(i, m) for i, m in enumerate(models[:1])))  # warm-up
        gaps.clear()
        began = time.perf_counter()
        sequences = await asyncio.gather(*(one(i, m) for i, m in enumerate(models)))
        return time.perf_counter() - began, gaps, sequences
    finally:
        await asyncio.gather(*(m.aclose() for m in models))


def clients(args: argparse.Namespace) -> None:
    from beectl.local_swarm import LocalSwarm
    from beectl.runner import new_event_loop

    counts = [int(c) for c in args.clients.split(",")]
    results = {}
    for batching in (True, False):
        extra = ["--device", args.device] + ([] if batching else ["--no-continuous-batching"])
        # Every client here is one more connection from 127.0.0.1: lift the per-address caps
        # a public server keeps against strangers (docs/security.md, "Strangers").
        extra += ["--max-connections-per-peer", "1024", "--max-kv-share-per-peer", "1"]
        if args.threads:
            extra += ["--num-threads", str(args.threads)]
        extra += args.server_arg
        with LocalSwarm(
            model=args.model, num_servers=2, dtype=args.dtype, extra_args=extra
        ) as swarm:
            peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
            for count in counts:
                loop = new_event_loop()
                try:
                    results[batching, count] = loop.run_until_complete(
                        run_clients(args, peers, count)
                    )
                finally:
                    loop.close()
    tokens = args.new_tokens
    print(f"\n(b) independent clients, one prompt each, {tokens} new tokens, 2 servers\n")
    print(
        "| clients | batching | wall s | tok/s total | vs 1 client | p50 ms/token | p95 ms/token | same tokens |"
    )
    print(
        "|--------:|----------|-------:|------------:|------------:|-------------:|-------------:|-------------|"
    )
    for batching in (True, False):
        one_tps = counts[0] * tokens / results[batching, counts[0]][0]
        for count in counts:
            wall, gaps, sequences = results[batching, count]
            same = sequences == results[True, count][2]
            tps = count * tokens / wall
            q = statistics.quantiles(gaps, n=20)
            print(
                f"| {count:>7} | {'on' if batching else 'off':<8} | {wall:>6.2f} | {tps:>11.1f} | "
                f"{tps / one_tps:>10.2f}x | {1000 * statistics.median(gaps):>12.1f} | "
                f"{1000 * q[18]:>12.1f} | {'yes' if same else 'NO'} |"
            )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--part", choices=["scaling", "clients", "both"], default="both")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="servers, client head and baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="(b) torch threads of each server and of the clients' process (default: torch's)",
    )
    parser.add_argument(
        "--client-threads", type=int, default=None, help="(b) torch threads of the clients"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="(b) extra `beed serve` argument"
    )
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from beed.models.registry import resolve_model

    path = str(resolve_model(args.model).path)
    if args.local_only:
        sizes = [int(s) for s in args.sizes.split(",")]
        print(json.dumps(local_scaling(path, sizes, args.new_tokens, args.dtype, args.device)))
        return
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"model {args.model} {args.dtype} on {args.device}, greedy",
        flush=True,
    )
    if args.part in ("scaling", "both"):
        scaling(args, path)
    if args.part in ("clients", "both"):
        if args.client_threads or args.threads:
            torch.set_num_threads(args.client_threads or args.threads)
        clients(args)


if __name__ == "__main__":
    main()
