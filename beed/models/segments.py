"""Several sessions' tokens through transformers' own decoder blocks in one forward.

Continuous batching without padding (Orca's "selective batching"): the new tokens of every
session in a batch are laid end to end as one sequence `[1, N, hidden]`, so the norms, the
q/k/v/o projections and the MLP run once over all of them, while attention runs per session,
against that session's own cache and mask, with exactly the shapes it would have alone.

Two hooks make transformers' unmodified layers do this:
- the cache passed to the layers is a `SegmentedCache`: its `update` splits the new keys and
  values by session, extends each session's own cache, and returns per-session lists;
- the attention modules call the `beed-segments` attention function (registered with
  transformers' AttentionInterface), which splits the queries the same way and runs the model's
  real attention function (sdpa, eager, ...) once per session.

A batch of one session takes the plain path (`Span.forward`): nothing changes for a lone client.

Shared matrix products are not bit-identical to a session's own: a float32 GEMM over 16 rows sums
each row in another order than the same product over one row (MKL measured ~1e-5 apart per
product, up to ~1.1e-4 on SmolLM2's logits after 30 blocks). `SegmentedLinears` therefore runs
the linear layers once per session when asked (the default in float32, where beed promises the
local model's logits): each session's rows get the very product they would get alone, and the
merged forward is bit-identical to the lone one. In bf16/fp16 the products are shared.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from beed.models.kv_cache import SpanCache

ATTENTION_NAME = "beed-segments"
INNER_ATTR = "_beed_inner_attention"  # attention config attribute: the model's real attention


@dataclass(frozen=True)
class Segment:
    """One session's rows in the flattened batch: tokens [start, stop) are its [batch, tokens]."""

    start: int
    stop: int
    batch: int
    tokens: int

    def take(self, states: torch.Tensor) -> torch.Tensor:
        """This session's part of `states` [1, heads, N, dim], as [batch, heads, tokens, dim].

        The result has the strides the same tensor would have had alone (a view of the
        [1, N, heads, dim] projection output, transposed), so kernels see the same layout.
        """
        heads, dim = states.shape[1], states.shape[3]
        rows = states.transpose(1, 2)[0, self.start : self.stop]
        return rows.reshape(self.batch, self.tokens, heads, dim).transpose(1, 2)


class SegmentMasks:
    """The attention masks of a batch's sessions (one per session, any mask format)."""

    def __init__(self, segments: Sequence[Segment], masks: Sequence[Any]) -> None:
        self.segments = segments
        self.masks = list(masks)


class SegmentedCache:
    """Looks like a transformers cache to the attention modules; holds one cache per session."""

    def __init__(self, segments: Sequence[Segment], caches: Sequence[SpanCache]) -> None:
        self.segments = segments
        self.caches = caches

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each session's keys and values; extra arguments go to each session's cache as given
        (transformers 4.x passes cache_kwargs positionally, 5.x `kwargs=` by name)."""
        keys, values = [], []
        for segment, cache in zip(self.segments, self.caches, strict=True):
            k, v = cache.update(
                segment.take(key_states), segment.take(value_states), layer_idx, *args, **kwargs
            )
            keys.append(k)
            values.append(v)
        return keys, values


def segmented_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of every session of a flattened batch, each with its own keys, values and mask.

    Called with plain tensors (a lone session or a stateless forward), it is the model's own
    attention function unchanged.
    """
    inner = _inner_attention(module)
    if not isinstance(attention_mask, SegmentMasks):
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        return out, weights
    outputs = []
    heads, dim = query.shape[1], query.shape[3]
    parts = zip(attention_mask.segments, key, value, attention_mask.masks, strict=True)
    for segment, k, v, mask in parts:
        out, _ = inner(module, segment.take(query), k, v, mask, **kwargs)
        # Attention functions answer [batch, tokens, heads, dim]; lay the rows end to end again.
        outputs.append(out.reshape(1, segment.batch * segment.tokens, heads, dim))
    return torch.cat(outputs, dim=1), None


def _inner_attention(module: torch.nn.Module) -> Callable[..., Any]:
    name = getattr(module.config, INNER_ATTR, "sdpa")
    if name == "sdpa":
        return sdpa_attention_forward
    if name == "eager":  # each family's module defines its own, next to the attention class
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, segmented_attention)


def use_segmented_attention(attention_modules: Sequence[torch.nn.Module], config: Any) -> None:
    """Point the attention modules at `segmented_attention` (their config is copied, so masks
    are still built for the model's real attention implementation)."""
    attention_config = copy.copy(config)
    setattr(attention_config, INNER_ATTR, config._attn_implementation or "sdpa")
    attention_config._attn_implementation = ATTENTION_NAME
    for module in attention_modules:
        module.config = attention_config


class SegmentedLinears:
    """Makes a span's linear layers run once per session during a merged forward.

    `install` replaces each `nn.Linear`'s forward with one that reads `segments`: None (a lone
    session, a stateless forward, shared products) is the plain product; otherwise the rows
    `[1, N, in]` are split by segment and each part is multiplied alone, exactly as that
    session's forward would multiply it.
    """

    def __init__(self) -> None:
        self.segments: Sequence[Segment] | None = None

    def install(self, modules: Sequence[nn.Module]) -> None:
        for root in modules:
            for module in root.modules():
                if isinstance(module, nn.Linear):  # subclasses too (Falcon's FalconLinear)
                    module.forward = self._forward_of(module)  # type: ignore[method-assign,assignment]

    def _forward_of(self, module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        product = module.forward  # the module's own (nn.Linear's is F.linear)

        def forward(x: torch.Tensor) -> torch.Tensor:
            segments = self.segments
            if segments is None or x.dim() != 3 or x.shape[1] != segments[-1].stop:
                return product(x)
            parts = [product(x[:, s.start : s.stop]) for s in segments]
            return torch.cat(parts, dim=1)

        return forward
