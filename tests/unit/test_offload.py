"""Weights offloading (beed/models/offload.py): an offloaded span computes exactly what a resident
one does (on a CPU the copies are synchronous, the bookkeeping is the same), and the start-up
memory plan refuses what cannot fit."""

from __future__ import annotations

import pytest
import torch

from beed.models import offload as offload_module
from beed.models.offload import auto_offload_count, offload_count, spread
from beed.server.backend import BlockBackend
from protocol.errors import BadRequestError
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")


def hidden(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fraction", [1.0, 0.75])
def test_an_offloaded_span_equals_the_resident_one_bit_for_bit(model, fraction):
    resident = BlockBackend(model, 0, 4)
    offloaded = BlockBackend(model, 0, 4, offload_weights=fraction)
    streamer = offloaded.streamer
    assert resident.streamer is None and streamer is not None
    assert len(streamer.order) == (4 if fraction == 1.0 else 3)
    blocks = range(4)
    a, b = resident.new_cache(), offloaded.new_cache()
    assert torch.equal(
        resident.step(a, blocks, hidden(9, 1), 0), offloaded.step(b, blocks, hidden(9, 1), 0)
    )
    for pos in range(9, 14):
        x = hidden(1, pos)
        assert torch.equal(resident.step(a, blocks, x, pos), offloaded.step(b, blocks, x, pos))
    # Each step streams offloaded blocks through the two slots again (with 3, one of them stays:
    # blocks 0 and 2 alternate in one slot).
    assert streamer.loads >= 6 * (4 if fraction == 1.0 else 2)
    x, grad = hidden(6, 7), hidden(6, 8)
    assert torch.equal(resident.forward(blocks, x), offloaded.forward(blocks, x))
    assert torch.equal(
        resident.backward(blocks, x, grad)[0], offloaded.backward(blocks, x, grad)[0]
    )
    # A sub-span (a session over some of the blocks) loads what it runs.
    assert torch.equal(resident.forward(range(1, 3), x), offloaded.forward(range(1, 3), x))


def test_the_plan_counts_and_spreads_offloaded_blocks():
    assert offload_count(0.5, 5) == 3 and offload_count(1.0, 4) == 4 and offload_count(0, 4) == 0
    with pytest.raises(ValueError):
        offload_count(1.5, 4)
    assert spread(3, 10) == [0, 3, 6] and spread(10, 10) == list(range(10)) and spread(0, 3) == []
    blocks = [10] * 10
    assert auto_offload_count(blocks, 100) == 0  # it all fits
    assert auto_offload_count(blocks, 95) == 3  # 7 resident + 2 slots = 90
    assert auto_offload_count(blocks, 20) == 10  # 2 slots only
    assert auto_offload_count(blocks, 19) is None


def test_a_span_that_cannot_fit_is_refused_at_start_with_the_numbers(model, monkeypatch):
    monkeypatch.setattr(offload_module, "MEMORY_HEADROOM", 1 - 1e-12)
    with pytest.raises(BadRequestError, match=r"weights take .* GiB .* serve fewer blocks"):
        BlockBackend(model, 0, 4)
    with pytest.raises(BadRequestError, match="still needs"):
        BlockBackend(model, 0, 4, offload_weights=0.5)
    with pytest.raises(BadRequestError, match="two blocks must fit"):
        BlockBackend(model, 0, 4, offload_weights="auto")
