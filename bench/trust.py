"""What trust costs on loopback: tokens/s with encrypted links (TLS, the default) and without.

    python bench/trust.py                          # batch 1 and 8, 64 new tokens, 5 rounds
    python bench/trust.py --batches 1 --rounds 9

Two swarms of 2 servers each (blocks 0:15 and 15:30, float32) run side by side, one started
with `beed serve --no-encryption`; the client generates greedily through them in turns (off, on,
off, on, ...: drift of the machine hits both alike) and each row is the median of its rounds.
Ratios are against local transformers `generate` (its own process, same prompts) and against
encryption off; the tokens must equal local transformers'.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference import PROMPT


def local_seconds(path: str, ids: torch.Tensor, mask: torch.Tensor, new: int, rounds: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kw)
    times, out = [], None
    for _ in range(rounds):
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, **kw)
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from beectl import AutoDistributedModelForCausalLM
    from beectl.generation import left_pad
    from beectl.local_swarm import LocalSwarm
    from beed.models.registry import resolve_model

    path = str(resolve_model("smollm2-135m").path)
    tok = AutoTokenizer.from_pretrained(path)
    words = PROMPT.split()
    n = args.new_tokens
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; smollm2-135m float32, 2 servers (0:15, 15:30) per swarm, greedy, "
        f"{n} new tokens per row, median of {args.rounds} rounds (setups in turn)",
        flush=True,
    )
    plain = LocalSwarm(num_servers=2, extra_args=["--no-encryption"])
    encrypted = LocalSwarm(num_servers=2)
    rows = []
    with plain, encrypted:
        models = {
            name: AutoDistributedModelForCausalLM.from_pretrained(
                "smollm2-135m", initial_peers=[f"{h}:{p}" for h, p in swarm.initial_peers]
            )
            for name, swarm in (("off", plain), ("on (TLS 1.3)", encrypted))
        }
        try:
            for batch in [int(b) for b in args.batches.split(",")]:
                # Rows of different lengths: left padding, as a batch of users would send.
                texts = [" ".join(words[: len(words) - 3 * i]) for i in range(batch)]
                ids, mask = left_pad([tok(t).input_ids for t in texts], 0)
                local_s, local_out = local_seconds(path, ids, mask, n, args.rounds)
                kw = dict(eos_token_id=None, pad_token_id=0, speculate="off")
                times: dict[str, list[float]] = {name: [] for name in models}
                same = dict.fromkeys(models, True)
                for model in models.values():
                    model.generate(ids, mask, max_new_tokens=4, **kw)  # connections, caches
                for _ in range(args.rounds):
                    for name, model in models.items():
                        began = time.perf_counter()
                        out = model.generate(ids, mask, max_new_tokens=n, **kw)
                        times[name].append(time.perf_counter() - began)
                        same[name] &= torch.equal(out, local_out)
                rows.append((batch, "local transformers", local_s, local_s, None, True))
                off_s = statistics.median(times["off"])
                for name, runs in times.items():
                    rows.append((batch, name, statistics.median(runs), local_s, off_s, same[name]))
                print(f"# batch {batch} done", file=sys.stderr, flush=True)
        finally:
            for model in models.values():
                model.close()
    print()
    print("| batch | encryption | tok/s | vs local | vs off | same tokens |")
    print("|---:|---|---:|---:|---:|---|")
    for batch, name, seconds, local_s, off_s, same in rows:
        tps = batch * n / seconds
        vs_off = "-" if off_s is None else f"{off_s / seconds:.3f}x"
        print(
            f"| {batch} | {name} | {tps:.2f} | {local_s / seconds:.2f}x | {vs_off} | "
            f"{'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
