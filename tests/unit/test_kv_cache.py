"""The session cache contract (beed/models/kv_cache.py) on transformers' dynamic cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from beed.models.kv_cache import DynamicSpanCache, kv_bytes_per_token
from beed.server.backend import BlockBackend
from protocol.errors import BadRequestError
from tests.tiny_models import make_tiny_llama
from tests.unit.test_models import make_tiny_gemma3


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def backend(request, tmp_path_factory) -> BlockBackend:
    path = tmp_path_factory.mktemp(request.param) / request.param
    (make_tiny_llama if request.param == "llama" else make_tiny_gemma3)(path)
    return BlockBackend(path, 0, 4)


def hidden(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed))


def test_length_rollback_and_the_same_output_after_it(backend: BlockBackend):
    blocks = range(4)
    cache = backend.new_cache()
    assert isinstance(cache, DynamicSpanCache) and cache.tokens(0) == 0
    backend.step(cache, blocks, hidden(5, 1), 0)
    first = backend.step(cache, blocks, hidden(1, 2), 5)
    assert [cache.tokens(i) for i in blocks] == [6] * 4
    cache.rollback(blocks, 5)
    assert cache.snapshot() == [5] * 4
    again = backend.step(cache, blocks, hidden(1, 2), 5)
    assert torch.equal(first, again)  # what was cut is gone; what stayed is untouched
    with pytest.raises(BadRequestError, match="cannot truncate to 9"):
        cache.rollback(blocks, 9)


def test_snapshot_and_restore(backend: BlockBackend):
    blocks = range(4)
    cache = backend.new_cache()
    backend.step(cache, blocks, hidden(3, 3), 0)
    saved = cache.snapshot()
    backend.step(cache, blocks, hidden(2, 4), 3)
    cache.restore(saved)
    assert cache.snapshot() == saved == [3] * 4
    fresh = backend.new_cache()
    backend.step(fresh, blocks, hidden(3, 3), 0)
    assert torch.equal(
        backend.step(cache, blocks, hidden(1, 5), 3), backend.step(fresh, blocks, hidden(1, 5), 3)
    )


def test_rollback_past_a_sliding_window_is_exact(backend: BlockBackend):
    """Sliding-window blocks keep every position: a rollback far behind the window (refused
    speculative drafts) leaves the cache as if the cut tokens had never been sent."""
    blocks = range(4)
    cache = backend.new_cache()
    backend.step(cache, blocks, hidden(10, 6), 0)  # past gemma's window of 8
    backend.step(cache, blocks, hidden(6, 7), 10)
    cache.rollback(blocks, 4, first_block=10)
    assert cache.snapshot() == [4] * 4
    after = backend.step(cache, blocks, hidden(12, 8), 4)
    fresh = backend.new_cache()
    backend.step(fresh, blocks, hidden(10, 6)[:, :4], 0)
    # Equal up to float32 rounding (the cropped layer's keys are laid out differently).
    torch.testing.assert_close(
        after, backend.step(fresh, blocks, hidden(12, 8), 4), rtol=1e-5, atol=1e-5
    )


def test_bytes_per_token(tmp_path: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv_bytes_per_token(config, torch.float32, 3) == 2 * heads * head_dim * 4 * 3
    assert kv_bytes_per_token(config, torch.bfloat16, 3) == 2 * heads * head_dim * 2 * 3
