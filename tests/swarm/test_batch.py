"""Batches of prompts of different lengths through real daemons equal local transformers."""

from __future__ import annotations

import json

import torch

from beectl import AutoDistributedModelForCausalLM
from tests.conftest import peers_of
from tests.swarm.test_user_errors import beectl

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3,",
    "Water boils at",
    "A",
    "The quick brown fox jumps over the lazy dog because",
    "Why",
]


def test_left_padded_batch_equals_local_batched_generate(swarm2, local_model, tokenizer, tmp_path):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = local_model.generate(
        **enc,
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm2)
    ) as model:
        out = model.generate(
            enc.input_ids,
            enc.attention_mask,
            max_new_tokens=20,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        texts = model.generate_batch(PROMPTS, max_new_tokens=12)
    assert torch.equal(out.sequences, ref.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
    assert worst <= 1e-4

    # The CLI's --prompts FILE runs the same batch and prints one JSON line per prompt, in order.
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    result = beectl(
        "generate",
        "--prompts",
        str(path),
        "--raw",
        "--max-new-tokens",
        "12",
        "--initial-peers",
        peers_of(swarm2)[0],
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS
    assert [line["text"] for line in lines] == texts
    assert all(line["new_tokens"] <= 12 for line in lines)
