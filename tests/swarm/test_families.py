"""Every model family through real daemons: a left-padded batch with drafts (rollbacks) equals
local transformers' batched generate; for MoE, a server killed mid-generation is replaced with
the same output."""

from __future__ import annotations

import signal

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from tests.conftest import peers_of
from tests.swarm.test_failover import Trigger, server_on_route
from tests.tiny_models import FAMILIES, make_tiny

PROMPTS = ["The capital of France is", "Hi", "1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3,"]
NEW_TOKENS = 16


def reference(path, enc, pad: int):
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return local.generate(
        **enc,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )


def assert_same(out, ref, family: str) -> None:
    assert torch.equal(out.sequences, ref.sequences), family
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
    assert worst <= 1e-4, (family, worst)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_with_drafts_equals_local(family, model_path, tokenizer, tmp_path):
    path = make_tiny(family, tmp_path / family, tokenizer_from=model_path)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = reference(path, enc, tokenizer.pad_token_id)
    with LocalSwarm(model=str(path), spans=[(0, 1), (1, 4)]) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(str(path), peers_of(swarm)) as model:
            out = model.generate(
                enc.input_ids,
                enc.attention_mask,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=True,
                speculate=3,  # drafts every round: most are refused, so caches roll back
            )
    assert_same(out, ref, family)


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_moe_failover_gives_the_same_output(family, model_path, tokenizer, tmp_path):
    path = make_tiny(family, tmp_path / family, tokenizer_from=model_path)
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    ref = reference(path, enc, tokenizer.pad_token_id)
    with LocalSwarm(model=str(path), spans=[(0, 4), (1, 4), (0, 1)]) as swarm:

        def kill(route) -> None:
            server_on_route(swarm, route, route[-1].start).process.send_signal(signal.SIGKILL)

        trigger = Trigger(NEW_TOKENS // 2, kill)
        with AutoDistributedModelForCausalLM.from_pretrained(
            str(path), peers_of(swarm), failover_timeout_s=60.0
        ) as model:
            with model.inference_session(max_length=enc.input_ids.shape[1] + NEW_TOKENS) as s:
                trigger.session = s
                out = model.generate(
                    enc.input_ids,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=None,
                    session=s,
                    streamer=trigger,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
                assert s.inner.recoveries >= 1
    assert_same(out, ref, family)
