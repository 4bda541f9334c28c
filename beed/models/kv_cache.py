"""A session's keys and values over a span's blocks: what beed needs of a KV cache.

The server asks four things of a session's cache: how many tokens it holds, to roll back to a
position (Truncate, a step that starts earlier), to snapshot and restore its lengths (a merged
forward that fails puts every session back where it was), and its size per token (the KV budget).
A cache's memory goes back when the last reference to it goes (a step still running on a closed
session's cache keeps it until the step ends).
`SpanCache` is that contract; transformers' layers see the same object as their
`past_key_values` (its `update`, `get_seq_length`, mask sizes).

`DynamicSpanCache` is transformers' `DynamicCache` (tensors that grow by concatenation: right
for CPUs and for any length); `PagedSpanCache` (paged_cache.py), preallocated, is the one CUDA
graphs need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from protocol.errors import BadRequestError


class SpanCache(Protocol):
    """The contract between the server and one session's cache (local block indices)."""

    # transformers' attention modules store a step's keys and values through this (and read
    # back the whole layer's); its arguments differ between transformers versions.
    @property
    def update(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]: ...

    def tokens(self, block: int) -> int:
        """Positions cached in `block` (every block of a session holds the same count)."""

    def rollback(self, blocks: range, position: int, first_block: int = 0) -> None:
        """Forget every cached token at `position` and after, in all blocks; BadRequestError if
        that is not possible (`first_block`: the global index of local block 0, for messages)."""

    def snapshot(self) -> list[int]:
        """Each block's cached length, to `restore` after a failed forward."""

    def restore(self, lengths: list[int]) -> None:
        """Cut every block back to the lengths of a `snapshot`."""


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype, blocks: int) -> int:
    """Keys and values of one token of one sequence over `blocks` blocks."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return int(2 * kv_heads * head_dim * element * blocks)


class DynamicSpanCache(DynamicCache):
    """transformers' DynamicCache, with the SpanCache contract.

    Every block keeps every position, sliding-window blocks included (their masks still see
    only the window): a rollback is never refused, however far back it goes (a speculative
    round's refused drafts, a failover replay), at the cost of the window's memory saving,
    which the KV budget never counted anyway.
    """

    def __init__(self, config: PretrainedConfig, **kwargs: Any) -> None:
        layers = int(config.get_text_config(decoder=True).num_hidden_layers)
        Cache.__init__(self, layers=[DynamicLayer() for _ in range(layers)], **kwargs)

    def tokens(self, block: int) -> int:
        return int(self.get_seq_length(block))

    def rollback(self, blocks: range, position: int, first_block: int = 0) -> None:
        length = self.tokens(blocks[0])
        if position < 0 or position > length:
            raise BadRequestError(
                f"cannot truncate to {position}: the session holds {length} tokens"
            )
        if position < length:
            self.crop(position - length)  # a negative count: the tokens to drop

    def snapshot(self) -> list[int]:
        return [self.tokens(i) for i in range(len(self.layers))]

    def restore(self, lengths: list[int]) -> None:
        layers: list[Any] = list(self.layers)  # transformers types them as a union of kinds
        for layer, length in zip(layers, lengths, strict=True):
            now = layer.get_seq_length()
            if now != length:
                layer.crop(length - now)
