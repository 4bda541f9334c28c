"""CUDA serving: beed servers on one GPU against local transformers, and offloaded weights.

    python bench/gpu.py --arch llama-8b --dtype bfloat16 --tokenizer DIR     # decode, batch 1/32
    python bench/gpu.py --part offload                                       # 70B-shaped span
    python bench/gpu.py --arch smollm2-135m --dtype float32 --batch 1        # exactness check

Machines with a GPU cannot download models here, so each model is random-initialised with the
architecture's real shapes (seeded) and saved as a safetensors directory; the work per token is
the real model's. Everything is measured in the same run:

- bounds: HBM bandwidth from a device-to-device copy, PCIe from a pinned host-to-device copy;
  a decode step at batch 1 reads every weight once, so HBM / weight bytes bounds tokens/s;
- part `decode`: local transformers `generate` (eager, and with `cache_implementation="static"`,
  which transformers compiles), then beed with 1 and 2 servers on this GPU (decode graphs on),
  and 2 servers with `--no-cuda-graphs` (beed's eager path: speed and the share of identical
  greedy tokens); batch 1 and `--batch` rows; no per-step logits on either side (the exactness
  run asks for them and reports the largest logit difference);
- part `offload`: a 10-block span of a Llama-3-70B-shaped model with every block offloaded
  (`offload_weights=1.0`), decode steps at batch 64, against the time PCIe needs for its bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
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
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
# Llama-3-70B's block shape; the offload part saves 10 such blocks and no embeddings.
LLAMA_70B_BLOCK = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_theta=500000.0,
    vocab_size=128256,
)


def make_model(arch: str, dtype: torch.dtype, out: Path, tokenizer_dir: Path | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2, **ARCHS[arch]
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    del model
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


def make_70b_span(out: Path, blocks: int) -> Path:
    """A 70B-shaped Llama of `blocks` blocks, block weights only (what a server loads)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    config = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=8192, **LLAMA_70B_BLOCK)
    config.save_pretrained(out)
    index = {}
    torch.manual_seed(0)
    for i in range(blocks):
        with torch.device("cuda"):
            layer = LlamaDecoderLayer(config, i).to(torch.bfloat16)
        tensors = {f"model.layers.{i}.{k}": v.cpu() for k, v in layer.state_dict().items()}
        name = f"block-{i:02d}.safetensors"
        save_file(tensors, out / name)
        index.update(dict.fromkeys(tensors, name))
        del layer, tensors
    import json

    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
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


def bounds() -> tuple[float, float]:
    """(HBM bytes/s from a device copy, PCIe bytes/s from a pinned host-to-device copy)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    b.copy_(a)
    a.copy_(host, non_blocking=True)
    hbm, _ = timed(lambda: b.copy_(a), 10)
    pcie, _ = timed(lambda: a.copy_(host, non_blocking=True), 10)
    return 2 * n / hbm, n / pcie


def versions() -> str:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    import transformers

    return (
        f"{torch.cuda.get_device_name()}, driver {driver}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}"
    )


def profile_start(swarm):
    """Clear the servers' samplers (bench/profiled_server.py) and sample this process."""
    import signal

    from bench.sampler import Sampler

    for server in swarm.servers:
        server.signal(signal.SIGUSR1)
    sampler = Sampler()
    sampler.start()
    return sampler


def profile_dump(swarm, sampler, out: Path, title: str) -> None:
    """The servers append their reports to out/server-PID.txt, this process to client.txt."""
    import signal

    sampler.stop()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "client.txt").open("a") as f:
        f.write(f"# client: {title}\n{sampler.report()}\n\n")
    for server in swarm.servers:
        server.signal(signal.SIGUSR2)
    time.sleep(1.0)


def weight_bytes(path: Path) -> int:
    from beed.models.weights import tensor_bytes

    return tensor_bytes(path, [""])[0]


def decode_part(args) -> None:
    from transformers import AutoModelForCausalLM

    from beectl import AutoDistributedModelForCausalLM
    from beectl.local_swarm import LocalSwarm

    dtype = getattr(torch, args.dtype)
    path = make_model(args.arch, dtype, args.workdir / f"{args.arch}-{args.dtype}", args.tokenizer)
    hbm, pcie = bounds()
    n, exact = args.new_tokens, args.dtype == "float32"
    weights = weight_bytes(path)
    batches = [1] + ([args.batch] if args.batch > 1 else [])
    prompts = {
        b: torch.randint(3, 40000, (b, 32), generator=torch.Generator().manual_seed(b))
        for b in batches
    }
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=n)
    beed_kw = dict(kw, speculate="off")  # the decode path itself (no drafts to accept here)
    rows: list[tuple[str, int, float, str]] = []
    local = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    local.generation_config.eos_token_id = None
    reference = {}
    for b in batches:
        ids = prompts[b].cuda()
        for name, extra in (("eager", {}), ("static cache", {"cache_implementation": "static"})):
            if name == "static cache" and args.no_static:
                continue
            local.generate(ids, **{**kw, **extra})  # warm-up (static: compiles)
            seconds, _ = timed(
                lambda ids=ids, extra=extra, m=local: m.generate(ids, **kw, **extra), args.repeats
            )
            rows.append((f"local transformers, {name}", b, seconds, "-"))
            print(f"# {rows[-1][0]}, batch {b}: {b * n / seconds:.1f} tok/s", flush=True)
            if name == "eager":
                reference[b] = local.generate(
                    ids, **kw, output_logits=True, return_dict_in_generate=True
                )
    num_layers = local.config.num_hidden_layers
    del local
    gc.collect()
    torch.cuda.empty_cache()
    if args.profile is not None:  # where bench/profiled_server.py writes
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ["BEED_PROFILE_DIR"] = str(args.profile.resolve())
    half = num_layers // 2
    fast = ["--torch-compile"] if args.torch_compile else []
    tag = " (compiled)" if args.torch_compile else ""
    setups = [
        (f"beed, 1 server{tag}", [(0, num_layers)], fast),
        (f"beed, 2 servers{tag}", [(0, half), (half, num_layers)], fast),
        ("beed, 2 servers, eager", [(0, half), (half, num_layers)], ["--no-cuda-graphs"]),
    ]
    graph_tokens = {}
    if args.only_two_servers:
        setups = setups[1:2]
    for name, spans, flags in setups:
        extra_args = ["--device", "cuda", "--kv-budget-tokens", "65536", *flags]
        profiled = args.profile is not None and "eager" not in name
        with LocalSwarm(
            model=str(path),
            spans=[] if profiled else spans,
            dtype=args.dtype,
            extra_args=extra_args,
        ) as swarm:
            if profiled:
                servers = [
                    swarm.add_server(f"{a}:{b}", module="bench.profiled_server") for a, b in spans
                ]
                for server in servers:
                    server.wait_ready(600)
            peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
            with AutoDistributedModelForCausalLM.from_pretrained(
                str(path), initial_peers=peers, dtype=dtype, device="cuda"
            ) as model:
                for b in batches:
                    ids = prompts[b]
                    model.generate(ids, **beed_kw)
                    sampler = profile_start(swarm) if profiled else None
                    seconds, _ = timed(
                        lambda ids=ids, m=model: m.generate(ids, **beed_kw), args.repeats
                    )
                    if sampler is not None:
                        profile_dump(swarm, sampler, args.profile, f"{name}, batch {b}")
                    check = model.generate(
                        ids, **beed_kw, output_logits=True, return_dict_in_generate=True
                    )
                    ref = reference[b]
                    same = (check.sequences[:, 32:] == ref.sequences[:, 32:].cpu()).float().mean()
                    note = f"{100 * same.item():.0f}% tokens = local eager"
                    if exact:
                        diff = max(
                            (x - y.float().cpu()).abs().max().item()
                            for x, y in zip(check.logits, ref.logits, strict=True)
                        )
                        note += f", max logit diff {diff:.1e}"
                    if "eager" in name and b in graph_tokens:
                        rate = (check.sequences == graph_tokens[b]).float()[:, 32:].mean().item()
                        note += f", {100 * rate:.0f}% = graphs"
                    elif name.startswith("beed, 2 servers"):
                        graph_tokens[b] = check.sequences
                    rows.append((name, b, seconds, note))
                    print(f"# {name}, batch {b}: {b * n / seconds:.1f} tok/s; {note}", flush=True)
    print(f"# {versions()}")
    print(
        f"# random-init {args.arch} {args.dtype} ({weights / 1e9:.2f} GB of weights); prompt 32 "
        f"tokens, {n} new tokens; median of {args.repeats}; HBM {hbm / 1e12:.2f} TB/s "
        f"(device copy) -> batch-1 bound {hbm / weights:.0f} tok/s; PCIe {pcie / 1e9:.1f} GB/s"
    )
    print(
        f"| {'setup':<34} | batch | {'tok/s':>8} | {'ms/step':>8} | vs eager | vs static | "
        f"of HBM bound | notes |"
    )
    print(
        f"|{'-' * 36}|-------|{'-' * 10}|{'-' * 10}|----------|-----------|--------------|-------|"
    )
    base = {(r[0], r[1]): r[2] for r in rows}
    for name, b, seconds, note in rows:
        eager = base.get(("local transformers, eager", b))
        static = base.get(("local transformers, static cache", b))
        vs_static = f"{static / seconds:.2f}x" if static else "-"
        bound = f"{100 * (b * n / seconds) / (b * hbm / weights):.0f}%" if b == 1 else "-"
        print(
            f"| {name:<34} | {b:>5} | {b * n / seconds:>8.1f} | {1000 * seconds / n:>8.2f} | "
            f"{eager / seconds:>7.2f}x | {vs_static:>9} | {bound:>12} | {note} |"
        )


def offload_part(args) -> None:
    from beed.server.backend import BlockBackend

    blocks, batch = args.offload_blocks, args.offload_batch
    path = make_70b_span(args.workdir / f"llama-70b-span-{blocks}", blocks)
    _, pcie = bounds()
    streamed = weight_bytes(path)
    began = time.perf_counter()
    backend = BlockBackend(path, 0, blocks, dtype="bfloat16", device="cuda", offload_weights=1.0)
    load_s = time.perf_counter() - began
    backend.allocate_kv(batch * 512)
    assert backend.streamer is not None
    span = backend.blocks(0, blocks)
    cache = backend.new_cache()
    hidden = torch.randn(batch, 32, 8192, generator=torch.Generator().manual_seed(0))
    backend.step(cache, span, hidden, 0)
    one = torch.randn(batch, 1, 8192, generator=torch.Generator().manual_seed(1))
    position = 32
    backend.step(cache, span, one, position)
    times = []
    for _ in range(args.repeats + 2):
        position += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.step(cache, span, one, position)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    bound = streamed / pcie
    print(f"# {versions()}")
    print(
        f"# Llama-3-70B-shaped span of {blocks} blocks, bf16, every block offloaded "
        f"({streamed / 1e9:.1f} GB streamed per step; loaded in {load_s:.0f} s); decode steps "
        f"at batch {batch}; PCIe {pcie / 1e9:.1f} GB/s (pinned copy); median of {len(times)}"
    )
    print("| setup | batch | ms/step | tok/s | PCIe bound ms/step | of PCIe bound |")
    print("|-------|-------|---------|-------|--------------------|---------------|")
    print(
        f"| offloaded span, {blocks} blocks | {batch} | {1000 * step:.0f} | {batch / step:.0f} | "
        f"{1000 * bound:.0f} | {100 * bound / step:.0f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="decode", choices=["decode", "offload"])
    parser.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="second batch size (1: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache baseline")
    parser.add_argument(
        "--torch-compile", action="store_true", help="servers fuse their graphs with inductor"
    )
    parser.add_argument(
        "--only-two-servers", action="store_true", help="of beed, run the 2-server setup only"
    )
    parser.add_argument("--offload-blocks", type=int, default=10)
    parser.add_argument("--offload-batch", type=int, default=64)
    parser.add_argument("--tokenizer", type=Path, default=None, help="directory of tokenizer files")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample where the client's and the servers' threads spend their time, into DIR",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/beed-gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    (decode_part if args.part == "decode" else offload_part)(args)


if __name__ == "__main__":
    main()
