"""Model families and quantized blocks: decode through 2 servers against local transformers.

    python bench/models.py                        # every family (tiny) and SmolLM2 quantized
    python bench/models.py --families llama,bloom --new-tokens 32 --skip-quant

Families: each a tiny random model (4 blocks, hidden 64; tests/tiny_models.py) with SmolLM2's
tokenizer, served by 2 servers (blocks 0:2 and 2:4) on this machine. Per family: greedy decode at
batch 1 (speculation off), tokens/s after the first token, beed against local transformers'
`generate` on the same model in this process; and whether the tokens are identical. Tiny shapes
measure what beed adds per token (two hops, the head on the client), not the blocks' compute.

Quantization: SmolLM2-135M through 2 servers (15 blocks each) with `--quant none|int8|nf4`: the
servers' resident weight bytes (GetInfo), decode tokens/s, the prefill's largest logit
difference against local float32 transformers (absolute and as a share of the largest logit),
and how many of the greedy tokens equal float32's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from relay import Clock  # noqa: E402

from beectl import AutoDistributedModelForCausalLM  # noqa: E402
from beectl.local_swarm import LocalSwarm  # noqa: E402
from beed.models.registry import resolve_model  # noqa: E402
from tests.swarm.test_faults import server_info  # noqa: E402
from tests.tiny_models import FAMILIES, make_tiny  # noqa: E402

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def rate(stamps: list[float]) -> float:
    """Tokens per second after the first new token."""
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])


def local_run(path: Path, ids: torch.Tensor, new_tokens: int, runs: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rates, out = [], None
    for _ in range(runs):
        clock = Clock()
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
            output_logits=True,
            return_dict_in_generate=True,
        )
        rates.append(rate(clock.stamps))
    return statistics.median(rates), out


def beed_run(model: str, peers: list[str], ids: torch.Tensor, new_tokens: int, runs: int):
    rates, out = [], None
    with AutoDistributedModelForCausalLM.from_pretrained(model, peers) as distributed:
        for _ in range(runs):
            clock = Clock()
            out = distributed.generate(
                ids,
                max_new_tokens=new_tokens,
                eos_token_id=None,
                speculate="off",
                streamer=clock,
                output_logits=True,
                return_dict_in_generate=True,
            )
            rates.append(rate(clock.stamps))
    return statistics.median(rates), out


def families(names: list[str], new_tokens: int, runs: int, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt").input_ids
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in names:
            path = make_tiny(family, Path(tmp) / family, tokenizer_from=tokenizer_dir)
            local, want = local_run(path, ids, new_tokens, runs)
            with LocalSwarm(model=str(path), spans=[(0, 2), (2, 4)]) as swarm:
                peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
                ours, got = beed_run(str(path), peers, ids, new_tokens, runs)
            same = torch.equal(got.sequences, want.sequences)
            rows.append((family, local, ours, same))
            print(f"  {family}: local {local:.1f} tok/s, beed {ours:.1f} tok/s", flush=True)
    print("\n| family | local tok/s | beed 2 servers tok/s | beed / local | tokens identical |")
    print("|---|---:|---:|---:|---|")
    for family, local, ours, same in rows:
        print(
            f"| {family} | {local:.1f} | {ours:.1f} | {ours / local:.2f}x | {'yes' if same else 'NO'} |"
        )


def quantization(new_tokens: int, runs: int) -> None:
    path = resolve_model("smollm2-135m").path
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    local, want = local_run(path, ids, new_tokens, runs)
    largest = want.logits[0].abs().max().item()
    rows = []
    for quant in ("none", "int8", "nf4"):
        with LocalSwarm(spans=[], num_threads=1) as swarm:
            for span in ("0:15", "15:30"):
                swarm.add_server(span, extra_args=["--quant", quant])
            for server in swarm.servers:
                server.wait_ready(180.0)
            weights = sum(server_info(s.address)["weight_bytes"] for s in swarm.servers)
            peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
            ours, got = beed_run("smollm2-135m", peers, ids, new_tokens, runs)
        diff = (got.logits[0] - want.logits[0]).abs().max().item()
        new = got.sequences[0, ids.shape[1] :]
        same = int((new == want.sequences[0, ids.shape[1] :]).sum())
        first = next(
            (
                i
                for i, (a, b) in enumerate(
                    zip(new.tolist(), want.sequences[0, ids.shape[1] :].tolist(), strict=True)
                )
                if a != b
            ),
            len(new),
        )
        rows.append((quant, weights, ours, diff, same, first))
        print(
            f"  {quant}: {weights / 2**20:.0f} MiB, {ours:.1f} tok/s, logit diff {diff:.4f}",
            flush=True,
        )
    base_bytes, base_rate = rows[0][1], rows[0][2]
    print(f"\nlocal transformers float32: {local:.1f} tok/s; largest prefill logit {largest:.2f}")
    print(
        "| quant | block weights (2 servers) | vs float32 | beed tok/s | vs float32 | max logit diff | diff / largest logit | greedy tokens equal | first different |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for quant, weights, ours, diff, same, first in rows:
        print(
            f"| {quant} | {weights / 2**20:.0f} MiB | {base_bytes / weights:.2f}x smaller | {ours:.1f} | "
            f"{ours / base_rate:.2f}x | {diff:.4f} | {diff / largest:.3f} | {same}/{new_tokens} | {first} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-families", action="store_true")
    parser.add_argument("--skip-quant", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    print(
        f"# bench/models.py  {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.new_tokens} new tokens, median of {args.runs}"
    )
    if not args.skip_families:
        families(
            args.families.split(","), args.new_tokens, args.runs, resolve_model("smollm2-135m").path
        )
    if not args.skip_quant:
        quantization(args.new_tokens, args.runs)


if __name__ == "__main__":
    main()
