"""Greedy decoding speed: local transformers `generate` vs beed with 1, 2 and 3 servers on loopback.

    python bench/inference.py                       # float32, 128 new tokens, servers 1,2,3
    python bench/inference.py --dtype bfloat16 --servers 2 --new-tokens 64

Prints a table with tokens/s, ms per token and the ratio to local transformers measured in the
same run; also checks that the distributed tokens equal the local ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The client in this process gets the spin setting the beectl CLI uses (servers get it from the
# beed CLI); the local baseline runs in its own process with the library defaults.
_BASELINE_ENV = dict(os.environ)
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import torch  # noqa: E402

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years"
)


def local_run(path: str, ids: torch.Tensor, new_tokens: int, dtype: torch.dtype, repeats: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4})  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def local_in_subprocess(args: argparse.Namespace, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The baseline in its own process, so neither side shares torch threads with the other."""
    cmd = [
        sys.executable,
        __file__,
        "--local-only",
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_BASELINE_ENV)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return data["seconds"], torch.tensor(data["sequences"])


def beed_run(swarm_peers, model_name, ids, new_tokens, dtype, repeats):
    from beectl import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_name, initial_peers=swarm_peers, dtype=dtype
    )
    try:
        kwargs = dict(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        model.generate(ids, **{**kwargs, "max_new_tokens": 4})  # warm-up: connections, caches
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, return_dict_in_generate=True, **kwargs)
            runs.append((time.perf_counter() - t0, out))
        total, out = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        return total, out
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--servers", default="1,2,3", help="comma-separated server counts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the server processes (repeatable)",
    )
    parser.add_argument("--local-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from beectl.local_swarm import LocalSwarm
    from beed.models.registry import resolve_model

    dtype = getattr(torch, args.dtype)
    path = str(resolve_model(args.model).path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    n = args.new_tokens
    if args.local_only:
        seconds, out = local_run(path, ids, n, dtype, args.repeats)
        print(json.dumps({"seconds": seconds, "sequences": out.tolist()}))
        return
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {args.model} {args.dtype}; prompt {ids.shape[1]} tokens, "
        f"{n} new tokens, batch 1, median of {args.repeats}",
        flush=True,
    )
    local_s, local_out = local_in_subprocess(args, ids)
    rows = [("local transformers", local_s, None, True)]
    for count in [int(c) for c in args.servers.split(",")]:
        swarm = LocalSwarm(model=args.model, num_servers=count, dtype=args.dtype)
        swarm.env.update(dict(kv.split("=", 1) for kv in args.server_env))
        with swarm:
            peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
            total, out = beed_run(peers, args.model, ids, n, dtype, args.repeats)
        same = torch.equal(out.sequences, local_out)
        rows.append((f"beed, {count} server{'s' if count > 1 else ''}", total, out, same))
    print()
    print(
        f"| {'setup':<22} | {'total s':>8} | {'tok/s':>7} | {'ms/token':>8} | {'vs local':>8} | same tokens |"
    )
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 10}|-------------|")
    local_tps = n / local_s
    for name, total, _out, same in rows:
        tps = n / total
        print(
            f"| {name:<22} | {total:>8.3f} | {tps:>7.2f} | {1000 * total / n:>8.2f} | "
            f"{tps / local_tps:>7.2f}x | {'yes' if same else 'NO'} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
