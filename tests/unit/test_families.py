"""Every model family beed serves, on tiny random models: spans on two overlapping backends and
the client's head equal the whole transformers model (chunked prefill, decode steps, rollback),
merged batches equal each session alone, and a Backward equals autograd through the span."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from beectl.head import LocalHead
from beed.models.adapters import load_config
from beed.server.backend import BlockBackend, StepRequest
from protocol.errors import BadRequestError, ModelNotFoundError
from tests.tiny_models import FAMILIES, make_tiny

MOE = {"qwen3_moe", "mixtral"}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, make_tiny(family, tmp_path_factory.mktemp(family) / family)


def test_spans_and_head_equal_the_whole_model(tiny):
    from transformers import AutoModelForCausalLM, DynamicCache

    family, path = tiny
    total = load_config(path).num_hidden_layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = LocalHead(path)
    # Overlapping servers: the route uses a's blocks 0:2 and b's blocks 2:4; b holds 1:4, so its
    # local block indices are not the model's (MoE layers chosen by index must not move).
    a, b = BlockBackend(path, 0, 3), BlockBackend(path, 1, total)
    hops = [(a, a.blocks(0, 2)), (b, b.blocks(2, total))]
    caches = [backend.new_cache() for backend, _ in hops]
    ids = torch.randint(3, 900, (1, 20), generator=torch.Generator().manual_seed(1))
    ref_cache = DynamicCache(config=model.config)
    position, chunks = 0, [ids[:, :12], ids[:, 12:13], ids[:, 13:14], ids[:, 14:20]]
    for chunk in chunks:  # 20 tokens: past the sliding windows of 8
        with torch.no_grad():
            ref = model(chunk, past_key_values=ref_cache, use_cache=True).logits
        hidden = head.embed(chunk)
        for (backend, blocks), cache in zip(hops, caches, strict=True):
            hidden = backend.step(cache, blocks, hidden, position)
        assert (head.logits(hidden) - ref).abs().max().item() < 1e-5, family
        position += chunk.shape[1]
    # Rollback: the last chunk again from its position gives the same logits again.
    hidden = head.embed(chunks[-1])
    for (backend, blocks), cache in zip(hops, caches, strict=True):
        hidden = backend.step(cache, blocks, hidden, 14)
    assert (head.logits(hidden) - ref).abs().max().item() < 1e-5, family
    with pytest.raises(BadRequestError, match="cannot truncate"):
        a.step(caches[0], hops[0][1], head.embed(ids[:, :1]), 25)
    with pytest.raises(BadRequestError, match="not inside"):
        a.blocks(0, total)


def test_merged_batches_equal_each_session_alone(tiny):
    """Continuous batching: sessions of different lengths, one left-padded, in one forward.
    Float32 dense blocks multiply each session's rows alone (bit-identical); MoE experts
    multiply the tokens routed to them from all sessions at once (equal up to rounding)."""
    family, path = tiny
    backend = BlockBackend(path, 0, 4)
    blocks = range(4)
    gen = torch.Generator().manual_seed(2)

    def rand(rows: int, tokens: int) -> torch.Tensor:
        return torch.randn(rows, tokens, 64, generator=gen)

    mask = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    steps = [
        [(rand(1, 11), None, None), (rand(1, 1), None, None)],
        [
            (rand(2, 12), mask, pos),
            (rand(2, 1), torch.cat([mask, mask[:, :1] * 0 + 1], 1), pos[:, -1:] + 1),
        ],
    ]
    requests = []
    for session in steps:
        cache, position, rows = backend.new_cache(), 0, []
        for h, m, p in session:
            rows.append(StepRequest(cache, blocks, h, position, m, p))
            position += h.shape[1]
        requests.append(rows)
    expected = []
    for rows in requests:
        cache = backend.new_cache()
        expected.append(
            [
                backend.step(cache, blocks, r.hidden, r.position, r.attention_mask, r.position_ids)
                for r in rows
            ]
        )
    for step in range(2):
        outs = backend.step_many([rows[step] for rows in requests])
        for out, want in zip(outs, expected, strict=True):
            assert isinstance(out, torch.Tensor), out
            if family in MOE:
                assert (out - want[step]).abs().max().item() < 1e-5
            else:
                assert torch.equal(out, want[step]), family
    assert backend.batch_fallbacks == 0


def test_backward_equals_autograd_through_the_span(tiny):
    family, path = tiny
    backend = BlockBackend(path, 1, 4)
    blocks = range(3)
    gen = torch.Generator().manual_seed(3)
    h, g = torch.randn(2, 6, 64, generator=gen), torch.randn(2, 6, 64, generator=gen)
    x = h.clone().requires_grad_(True)
    positions = torch.arange(6).unsqueeze(0).expand(2, -1)
    with torch.enable_grad():
        (want,) = torch.autograd.grad(backend.span(x, positions, None, None, blocks), x, g)
    grad, _ = backend.backward(blocks, h, g)
    assert torch.allclose(grad, want, atol=1e-6), family


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        ModelNotFoundError, match=r"'gpt2' is not supported yet \(supported: .*llama.*mixtral"
    ):
        BlockBackend(tmp_path / "gpt2", 0, 2)


def test_a_checkpoint_saved_from_the_base_model_loads(tmp_path: Path):
    """BLOOM's own checkpoints were saved from BloomModel: tensors named "h.0.", not
    "transformer.h.0."; servers and the head read them under the full names."""
    from transformers import AutoModelForCausalLM

    full = make_tiny("bloom", tmp_path / "full")
    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    bare = tmp_path / "bare"
    model.transformer.save_pretrained(bare)  # the base model: no prefix, no lm_head
    from safetensors import safe_open

    with safe_open(bare / "model.safetensors", framework="pt") as fh:
        assert "h.0.input_layernorm.weight" in set(fh.keys())
    head = LocalHead(bare)
    a, b = BlockBackend(bare, 0, 2), BlockBackend(bare, 2, 4)
    ids = torch.randint(3, 900, (1, 9), generator=torch.Generator().manual_seed(4))
    hidden = b.step(b.new_cache(), range(2), a.step(a.new_cache(), range(2), head.embed(ids), 0), 0)
    with torch.no_grad():
        want = model(ids).logits
    assert (head.logits(hidden) - want).abs().max().item() < 1e-5
