"""Training throughput through the swarm vs local transformers, on the same batch.

    python bench/train.py                         # batch 8 x 128 tokens, float32, CPU
    python bench/train.py --batch 8 --tokens 128 --steps 3 --num-prompts 16

One training step is a forward and a backward of a prompt-tuning loss (16 trainable virtual
tokens; the model's weights frozen) on `batch` rows of `tokens` tokens. Baselines, measured in
this run before the swarm starts (this process alone on the machine):
  - local, prompt tuning: transformers' model, weights frozen, the same prompts and loss
    (the same job the swarm does);
  - local, all weights: the same with every weight requiring grad (what a plain
    `model(**batch).loss.backward()` costs).
Then 2 servers (LocalSwarm, 15 blocks each) and a client in this process: tokens/s of the same
steps through them. Training tokens/s counts the batch's real tokens (prompts not counted).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the beectl CLI sets for the client

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

TEXT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in "
    "Mainz combined a screw press, movable metal type and oil-based ink into one system. "
)


def batch_ids(tokenizer, batch: int, tokens: int) -> torch.Tensor:
    ids = tokenizer(TEXT * 40).input_ids
    rows = [ids[r * 7 : r * 7 + tokens] for r in range(batch)]
    return torch.tensor(rows)


def timed(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def local_step(model, ids: torch.Tensor, prompts: torch.Tensor, all_weights: bool):
    model.requires_grad_(all_weights)
    embed = model.get_input_embeddings()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        prompts.grad = None
        embeds = torch.cat([prompts[None].expand(ids.shape[0], -1, -1), embed(ids)], 1)
        logits = model(inputs_embeds=embeds).logits[:, prompts.shape[0] :].contiguous()
        loss = ForCausalLMLoss(logits, ids, model.config.vocab_size)
        loss.backward()

    return step


def remote_step(model, ids: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beectl.api import AutoDistributedModelForCausalLM
    from beectl.local_swarm import LocalSwarm
    from beed.models.registry import resolve_model

    path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = batch_ids(tokenizer, args.batch, args.tokens)
    real = ids.numel()
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = 0.02 * torch.randn(args.num_prompts, local.config.hidden_size, generator=generator)
    prompts.requires_grad_(True)
    rows: list[tuple[str, float]] = []
    rows.append(
        (
            "local transformers, prompt tuning",
            timed(local_step(local, ids, prompts, False), args.steps),
        )
    )
    rows.append(
        (
            "local transformers, all weights",
            timed(local_step(local, ids, prompts, True), args.steps),
        )
    )
    del local
    with LocalSwarm(model=args.model, spans=[(0, 15), (15, 30)]) as swarm:
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        with AutoDistributedModelForCausalLM.from_pretrained(
            args.model, peers, tuning_mode="ptune", num_prompts=args.num_prompts
        ) as model:
            rows.append(
                ("beed, 2 servers, prompt tuning", timed(remote_step(model, ids), args.steps))
            )
    base = rows[0][1]
    print(
        f"# bench/train.py  batch {args.batch} x {args.tokens} tokens, {args.num_prompts} "
        f"prompts, float32, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"| {'setup':<36} | {'s/step':>7} | {'train tok/s':>11} | {'vs local ptune':>14} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 13}|{'-' * 16}|")
    for name, seconds in rows:
        print(f"| {name:<36} | {seconds:7.3f} | {real / seconds:11.1f} | {base / seconds:13.2f}x |")


if __name__ == "__main__":
    main()
