"""The API's shared LM head (beectl/head_batch.py) on a tiny model."""

from __future__ import annotations

import asyncio

import torch

from beectl.head import LocalHead
from beectl.head_batch import HeadBatcher
from tests.tiny_models import make_tiny_llama


async def test_waiting_generations_share_one_product_and_get_their_own_rows(tmp_path):
    head = LocalHead(make_tiny_llama(tmp_path / "llama"))
    batcher = HeadBatcher(head, max_wait_s=5.0)
    rows = [torch.randn(b, 1, 64, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3)]

    async def one(hidden):
        with batcher.member():
            return await batcher.logits(hidden)

    async def members():
        # All three join before any asks: the product runs once all three wait (not after 5 s).
        return await asyncio.wait_for(asyncio.gather(*(one(h) for h in rows)), timeout=2.0)

    outs = await members()
    assert batcher.flushes == 1 and batcher.rows == 6
    for hidden, out in zip(rows, outs, strict=True):
        assert out.shape == (hidden.shape[0], 1, 1000)
        assert (out - head.logits(hidden)).abs().max().item() <= 1e-5
    # Alone, a generation's logits are exactly LocalHead's, without waiting.
    with batcher.member():
        alone = await asyncio.wait_for(batcher.logits(rows[0]), timeout=1.0)
    assert torch.equal(alone, head.logits(rows[0]))


async def test_a_generation_that_is_late_does_not_hold_the_others_past_the_wait(tmp_path):
    head = LocalHead(make_tiny_llama(tmp_path / "llama"))
    batcher = HeadBatcher(head, max_wait_s=0.05)
    hidden = torch.randn(1, 1, 64)
    with batcher.member(), batcher.member():  # two running, only one asks
        out = await asyncio.wait_for(batcher.logits(hidden), timeout=1.0)
    assert torch.equal(out, head.logits(hidden)) and batcher.flushes == 1
