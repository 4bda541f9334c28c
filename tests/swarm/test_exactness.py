"""Distributed generation equals local transformers (float32, greedy), through real daemons."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from tests.conftest import STORY, peers_of
from tests.swarm.test_faults import server_info

NEW_TOKENS = 64


def reference(local_model, ids: torch.Tensor, new_tokens: int):
    return local_model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


def check_same(
    local_model, tokenizer, peers: list[str], speculate: str = "auto", **client: Any
) -> None:
    """Greedy generation through the swarm equals local transformers (`client`: ClientConfig
    fields)."""
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = reference(local_model, ids, NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers, **client
    ) as model:
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            return_dict_in_generate=True,
            output_logits=True,
            speculate=speculate,
        )
    assert out.sequences.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == NEW_TOKENS
    # The first logits come from the prefill, the others from single-token decode steps.
    for step, (ours, theirs) in enumerate(zip(out.logits, ref.logits, strict=True)):
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-4, f"step {step}: logits differ by {diff}"


def test_two_daemons_equal_local(swarm2, local_model, tokenizer):
    check_same(local_model, tokenizer, peers_of(swarm2))


def test_three_daemons_with_paged_caches_and_offloaded_weights_equal_local(local_model, tokenizer):
    """The preallocated paged KV cache, and half of each span's blocks streamed in from host
    memory per step (synchronous copies on a CPU: the GPU path's bookkeeping)."""
    paged = ["--kv-cache", "paged", "--kv-budget-tokens", "4096", "--offload-weights", "0.5"]
    with LocalSwarm(spans=[(0, 7), (7, 19), (19, 30)], extra_args=paged) as swarm:
        check_same(local_model, tokenizer, peers_of(swarm))
        for server in swarm.servers:
            stats = server_info(server.address)
            assert stats["kv_cache"] == "paged" and stats["offloaded_blocks"] >= 3
            assert stats["offload_bytes_loaded"] > 0


def test_reused_session_equals_one_long_generation(swarm2, local_model, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = reference(local_model, ids, 2 * 20)
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm2)
    ) as model:
        with model.inference_session(max_length=ids.shape[1] + 64) as session:
            first = model.generate(ids, max_new_tokens=20, eos_token_id=None, session=session)
            # The second call sends only what the servers have not cached yet.
            assert session.position == first.shape[1] - 1
            second = model.generate(first, max_new_tokens=20, eos_token_id=None, session=session)
        assert torch.equal(second, ref.sequences)
        with pytest.raises(Exception, match="continue the session"):
            with model.inference_session(max_length=200) as session:
                model.generate(ids, max_new_tokens=2, eos_token_id=None, session=session)
                model.generate(ids.flip(1), max_new_tokens=2, eos_token_id=None, session=session)
