"""CUDA path: beed servers with --device cuda against local transformers on the same GPU.

    python bench/gpu.py --arch smollm2-135m --dtype float32 --new-tokens 64
    python bench/gpu.py --arch llama-1b --dtype bfloat16

Machines with a GPU cannot download models here, so the model is random-initialised with the
architecture's real shapes (seeded) and saved as a safetensors directory; compute cost is that of
the real model. Checks that the greedy tokens are identical and reports the largest logit
difference, then prints tokens/s of local transformers vs beed with 1 and 2 servers on this GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

ARCHS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}


def make_model(arch: str, dtype: torch.dtype, out: Path, tokenizer_dir: Path | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **ARCHS[arch],
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="directory with tokenizer files"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/beed-gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")

    from transformers import AutoModelForCausalLM

    from beectl import AutoDistributedModelForCausalLM
    from beectl.local_swarm import LocalSwarm

    dtype = getattr(torch, args.dtype)
    path = make_model(args.arch, dtype, args.workdir / f"{args.arch}-{args.dtype}", args.tokenizer)
    n = args.new_tokens
    ids = torch.randint(3, 40000, (1, 32), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    local.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0)
    local.generate(ids.cuda(), **{**kw, "max_new_tokens": 4})

    def run_local(model=local):
        return model.generate(ids.cuda(), output_logits=True, return_dict_in_generate=True, **kw)

    local_s, ref = timed(run_local, args.repeats)
    num_layers = local.config.num_hidden_layers
    local = None  # free the GPU memory before the servers load
    torch.cuda.empty_cache()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; random-init {args.arch} "
        f"{args.dtype}; prompt 32 tokens, {n} new tokens, batch 1, median of {args.repeats}"
    )
    rows = [("local transformers (cuda)", local_s, "-", "-")]
    half = num_layers // 2
    for spans in ([(0, num_layers)], [(0, half), (half, num_layers)]):
        with LocalSwarm(
            model=str(path), spans=spans, dtype=args.dtype, extra_args=["--device", "cuda"]
        ) as swarm:
            peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
            with AutoDistributedModelForCausalLM.from_pretrained(
                str(path), initial_peers=peers, dtype=dtype, device="cuda"
            ) as model:
                gen = dict(max_new_tokens=n, eos_token_id=None, pad_token_id=0)
                model.generate(ids, **{**gen, "max_new_tokens": 4})

                def run_beed(model=model, gen=gen):
                    return model.generate(
                        ids, return_dict_in_generate=True, output_logits=True, **gen
                    )

                total, out = timed(run_beed, args.repeats)
        same = torch.equal(out.sequences, ref.sequences.cpu())
        diff = max(
            (a - b.float().cpu()).abs().max().item()
            for a, b in zip(out.logits, ref.logits, strict=True)
        )
        rows.append(
            (f"beed, {len(spans)} server(s) (cuda)", total, "yes" if same else "NO", f"{diff:.2e}")
        )
    print(
        f"| {'setup':<28} | {'tok/s':>8} | {'ms/token':>8} | {'vs local':>8} | same tokens | max logit diff |"
    )
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|-------------|----------------|")
    for name, seconds, same, diff in rows:
        print(
            f"| {name:<28} | {n / seconds:>8.1f} | {1000 * seconds / n:>8.2f} | "
            f"{local_s / seconds:>7.2f}x | {same:>11} | {diff:>14} |"
        )


if __name__ == "__main__":
    main()
