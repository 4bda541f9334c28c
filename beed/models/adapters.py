"""Per-architecture adapters: build a span of transformers' own decoder blocks and the client's head.

A span `[start, end)` is built as a small model of `end - start` blocks: its config is the model's
config sliced to those blocks, so each block's cache index is local (0..n-1) and transformers' mask
and cache helpers see exactly the layers they would see in the full model. Running a span repeats,
step for step, what the model's own `forward` does between the embeddings and the final norm, so the
distributed result equals the local one.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from beed.models.kv_cache import SpanCache
from beed.models.paged_cache import PagedSpanCache
from beed.models.segments import (
    Segment,
    SegmentedCache,
    SegmentedLinears,
    SegmentMasks,
    use_segmented_attention,
)
from beed.models.tree_mask import Tree, as_attention_mask, tree_mask
from protocol.errors import BadRequestError, InternalServerError, ModelNotFoundError


@dataclass(frozen=True)
class Family:
    """What differs between architectures for block serving and the client's head: where the
    weights are in the state dict and where the modules are in transformers' model."""

    model_types: tuple[str, ...]
    block_prefix: str  # state-dict prefix of block i, formatted with {i}
    head_prefixes: tuple[
        str, ...
    ]  # state-dict prefixes the client needs (embeddings, final norm, head)
    logit_softcap_attr: str | None = None  # config attribute of a final logit soft cap
    # Attribute paths in transformers' modules: of the base model (AutoModel), of a decoder
    # layer, and of the causal-LM model (AutoModelForCausalLM) for the head's three parts.
    layers_attr: str = "layers"
    rotary_attr: str = "rotary_emb"
    attention_attr: str = "self_attn"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    # One block's tensors as checkpoints store them (names after the block's prefix) -> as the
    # block's modules hold them (e.g. MoE experts stacked into one 3D tensor); None: as stored.
    convert_block: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # Config attributes that name global block indices, rewritten for a span's local ones.
    slice_config: Callable[[PretrainedConfig, PretrainedConfig, int, int], None] | None = None
    # What the decoder layers take and give: the cache argument's name; whether they have a
    # rotary embedding (rotary_attr on the base model) or ALiBi, and how ALiBi reaches them
    # ("mask": folded into the attention mask, Falcon; "argument": an `alibi` argument, BLOOM).
    cache_argument: str = "past_key_values"
    has_rotary: bool = True
    alibi: str | None = None
    # Attention through transformers' attention interface, so merged batches split it per
    # session (segments.py); otherwise a batch of sessions runs one session at a time.
    merged_batches: bool = True
    # A norm the model applies right after the token embeddings (BLOOM): part of the client's
    # embedding step.
    embed_norm_path: str | None = None
    # Checkpoints saved from the base model name tensors without its prefix (BLOOM's own:
    # "h.0.", "word_embeddings."): stored names are read as if they had it.
    base_prefix: str | None = None

    def canonical_name(self, stored: str) -> str:
        """A stored tensor name as block_prefix and head_prefixes spell it."""
        prefix = self.base_prefix
        if prefix is None or stored.startswith((prefix, self.lm_head_path + ".")):
            return stored
        return prefix + stored

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return _attr(base, self.layers_attr)

    def rotary(self, base: nn.Module) -> nn.Module:
        return _attr(base, self.rotary_attr)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _attr(layer, self.attention_attr)

    def head_modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The embeddings (with the norm after them, where the model has one), final norm
        and LM head of a causal-LM model."""
        embed = _attr(model, self.embed_path)
        if self.embed_norm_path is not None:
            embed = nn.Sequential(embed, _attr(model, self.embed_norm_path))
        return embed, _attr(model, self.norm_path), _attr(model, self.lm_head_path)

    @property
    def takes_trees(self) -> bool:
        """Tree steps give tokens positions by depth; ALiBi biases by key order, which a tree
        does not have: such families refuse tree steps."""
        return self.alibi is None


def _attr(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


LLAMA = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3", "phi3"),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
)


def _stack_experts(
    tensors: dict[str, torch.Tensor], prefix: str, gate: str, up: str, down: str
) -> dict[str, torch.Tensor]:
    """Per-expert Linear weights `{prefix}experts.{e}.{gate|up|down}.weight` (how checkpoints
    store MoE layers) -> the 3D tensors of transformers' experts module: gate_up_proj
    [experts, 2 x inner, hidden] (gate rows first), down_proj [experts, hidden, inner]."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {gate: {}, up: {}, down: {}}
    head = f"{prefix}experts."
    for name, tensor in tensors.items():
        if name.startswith(head):
            index, _, rest = name[len(head) :].partition(".")
            proj = rest.removesuffix(".weight")
            if index.isdigit() and proj in parts and rest.endswith(".weight"):
                parts[proj][int(index)] = tensor
                continue
        out[name] = tensor
    if not parts[gate]:
        return out  # already stacked (a checkpoint saved in transformers' own layout)
    count = len(parts[gate])
    for proj in (gate, up, down):
        if sorted(parts[proj]) != list(range(count)):
            raise ValueError(f"MoE weights incomplete: {head}*.{proj} has {sorted(parts[proj])}")
    out[f"{head}gate_up_proj"] = torch.stack(
        [torch.cat([parts[gate][e], parts[up][e]], 0) for e in range(count)]
    )
    out[f"{head}down_proj"] = torch.stack([parts[down][e] for e in range(count)])
    return out


def _qwen_moe_block(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _stack_experts(tensors, "mlp.", "gate_proj", "up_proj", "down_proj")


def _mixtral_block(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {n.replace("block_sparse_moe.", "mlp.", 1): t for n, t in tensors.items()}
    return _stack_experts(renamed, "mlp.", "w1", "w3", "w2")


def _slice_sparse_layers(
    config: PretrainedConfig, sliced: PretrainedConfig, start: int, end: int
) -> None:
    """Qwen-MoE picks a block's MLP (sparse or dense) from its global index
    (`mlp_only_layers`, `decoder_sparse_step`): name the span's dense blocks by local index."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    experts = int(getattr(config, "num_experts", 0) or 0)
    sliced.mlp_only_layers = [
        i - start
        for i in range(start, end)
        if i in dense or not (experts > 0 and (i + 1) % step == 0)
    ]
    sliced.decoder_sparse_step = 1


QWEN_MOE = Family(
    model_types=("qwen3_moe",),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
    convert_block=_qwen_moe_block,
    slice_config=_slice_sparse_layers,
)
MIXTRAL = Family(
    model_types=("mixtral",),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
    convert_block=_mixtral_block,
)
GEMMA3 = Family(
    model_types=("gemma3_text", "gemma2"),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
    logit_softcap_attr="final_logit_softcapping",
)
FALCON = Family(
    model_types=("falcon",),
    block_prefix="transformer.h.{i}.",
    head_prefixes=("transformer.word_embeddings.", "transformer.ln_f.", "lm_head."),
    layers_attr="h",
    attention_attr="self_attention",
    embed_path="transformer.word_embeddings",
    norm_path="transformer.ln_f",
    cache_argument="layer_past",
    alibi="mask",  # only where config.alibi (Span checks): Falcon-RW; rotary otherwise
)
BLOOM = Family(
    model_types=("bloom",),
    block_prefix="transformer.h.{i}.",
    head_prefixes=(
        "transformer.word_embeddings.",
        "transformer.word_embeddings_layernorm.",
        "transformer.ln_f.",
        "lm_head.",
    ),
    layers_attr="h",
    attention_attr="self_attention",
    embed_path="transformer.word_embeddings",
    embed_norm_path="transformer.word_embeddings_layernorm",
    norm_path="transformer.ln_f",
    cache_argument="layer_past",
    base_prefix="transformer.",
    has_rotary=False,
    alibi="argument",
    merged_batches=False,  # its attention is its own code, not the attention interface
)
FAMILIES = {t: f for f in (LLAMA, QWEN_MOE, MIXTRAL, GEMMA3, FALCON, BLOOM) for t in f.model_types}


def load_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config(decoder=True)


def family_of(config: PretrainedConfig) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelNotFoundError(
            f"architecture {config.model_type!r} is not supported yet (supported: {supported})"
        )
    if family is FALCON and not getattr(config, "alibi", False):
        return dataclasses.replace(FALCON, alibi=None)  # rotary Falcon (7B, 40B, 180B)
    return family


def num_blocks(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a model made of blocks `[start, end)` only."""
    sliced = copy.deepcopy(config)
    sliced.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliced.layer_types = list(layer_types[start:end])
    family = FAMILIES.get(config.model_type)
    if family is not None and family.slice_config is not None:
        family.slice_config(config, sliced, start, end)
    return sliced


def _rotary_takes_layer_type(rotary: nn.Module) -> bool:
    return "layer_type" in inspect.signature(rotary.forward).parameters


@dataclass(frozen=True)
class SpanInput:
    """One session's part of a batched step: new tokens, their positions, its cache and mask."""

    hidden: torch.Tensor  # [batch, tokens, hidden_size]
    position_ids: torch.Tensor  # [batch, tokens]
    cache: SpanCache
    mask: torch.Tensor | None = None  # [batch, past + tokens] or None
    tree: Tree | None = None  # a tree step's structure (tree_mask.py); None: causal


class Span(nn.Module):
    """Blocks `[start, end)` of a model, run exactly as the model's own forward runs them."""

    def __init__(
        self, config: PretrainedConfig, start: int, end: int, device: torch.device
    ) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.family = family_of(config)
        self.config = span_config(config, start, end)
        # Parameters on the meta device (the blocks' weights are assigned later, the embeddings
        # never exist here); buffers such as rotary tables are computed on the CPU as usual.
        with init_empty_weights(include_buffers=False):
            base = AutoModel.from_config(self.config)
        self.layers: nn.ModuleList = self.family.layers(base)
        self.rotary_emb = self.family.rotary(base).to(device) if self.family.has_rotary else None
        self._typed_rotary = self.rotary_emb is not None and _rotary_takes_layer_type(
            self.rotary_emb
        )
        self.layer_types: list[str] | None = getattr(self.config, "layer_types", None)
        # Masks are built for the model's real attention; the attention modules go through
        # segmented_attention, which is that same attention for one session at a time.
        self.config._attn_implementation = base.config._attn_implementation
        if self.family.merged_batches:
            attention = [self.family.attention(layer) for layer in self.layers]
            use_segmented_attention(attention, self.config)
        self._linears = SegmentedLinears()
        self._linears.install(list(self.layers))

    @property
    def kinds(self) -> list[str]:
        """The attention kind of each block ("full_attention", "sliding_attention")."""
        return self.layer_types or ["full_attention"] * len(self.layers)

    def load_blocks(self, tensors: dict[str, torch.Tensor], family: Family) -> None:
        """Assign the blocks' weights (keys as in the full model's state dict)."""
        local: dict[str, torch.Tensor] = {}
        for i in range(self.start, self.end):
            prefix = family.block_prefix.format(i=i)
            block = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
            if family.convert_block is not None:
                block = family.convert_block(block)
            local |= {f"layers.{i - self.start}.{n}": t for n, t in block.items()}
        missing, unexpected = self.load_state_dict(local, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        missing += [n for n, p in self.named_parameters() if p.is_meta and n not in missing]
        if missing or unexpected:
            raise ValueError(
                f"span weights do not match: missing={missing} unexpected={unexpected}"
            )

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: SpanCache | None,
        attention_mask: torch.Tensor | None = None,
        blocks: range | None = None,
        tree: Tree | None = None,
    ) -> torch.Tensor:
        """Run `hidden` through the span's blocks (or the local block indices in `blocks`);
        `tree`: each token sees only its ancestors among the new ones (tree_mask.py)."""
        blocks = blocks if blocks is not None else range(len(self.layers))
        kinds = self.kinds
        masks: dict[str, Any] = {}
        rotaries: dict[str, Any] = {}
        for i in blocks:
            kind = kinds[i]
            if kind in masks:
                continue
            # Size each mask against the first cache layer of its kind that this run fills.
            masks[kind] = self._mask(kind, i, hidden, attention_mask, cache, position_ids, tree)
            rotaries[kind] = self.rotary(kind, hidden, position_ids)
        return self.run_layers(hidden, blocks, kinds, masks, rotaries, position_ids, cache)

    def forward_many(
        self, items: Sequence[SpanInput], blocks: range, *, shared_matmul: bool = False
    ) -> list[torch.Tensor]:
        """Run several sessions' new tokens through `blocks` in one batched forward.

        Attention runs per item with the shapes it has alone. The linear layers run per item
        too (each result bit-identical to `forward` for it alone), or with `shared_matmul` once
        over all rows (equal up to the rounding of the batched products; faster where weights
        are read from memory for every product).
        """
        if len(items) == 1 or not self.family.merged_batches:
            return [
                self.forward(
                    item.hidden, item.position_ids, item.cache, item.mask, blocks, item.tree
                )
                for item in items
            ]
        kinds = self.kinds
        segments: list[Segment] = []
        offset = 0
        for item in items:
            batch, tokens = item.hidden.shape[:2]
            segments.append(Segment(offset, offset + batch * tokens, batch, tokens))
            offset += batch * tokens
        masks: dict[str, SegmentMasks] = {}
        rotaries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in blocks:
            kind = kinds[i]
            if kind in masks:
                continue
            masks[kind] = SegmentMasks(
                segments,
                [
                    self._mask(
                        kind, i, item.hidden, item.mask, item.cache, item.position_ids, item.tree
                    )
                    for item in items
                ],
            )
            if self.rotary_emb is None:
                continue
            parts = [self.rotary_of(kind, item.hidden, item.position_ids) for item in items]
            rotaries[kind] = (
                torch.cat([cos.reshape(1, -1, cos.shape[-1]) for cos, _ in parts], dim=1),
                torch.cat([sin.reshape(1, -1, sin.shape[-1]) for _, sin in parts], dim=1),
            )
        hidden = torch.cat([item.hidden.reshape(1, -1, item.hidden.shape[-1]) for item in items], 1)
        position_ids = torch.cat([item.position_ids.reshape(1, -1) for item in items], dim=1)
        cache = SegmentedCache(segments, [item.cache for item in items])
        self._linears.segments = None if shared_matmul else segments
        try:
            hidden = self.run_layers(hidden, blocks, kinds, masks, rotaries, position_ids, cache)
        finally:
            self._linears.segments = None
        return [hidden[0, s.start : s.stop].reshape(s.batch, s.tokens, -1) for s in segments]

    def run_layers(
        self,
        hidden: torch.Tensor,
        blocks: range,
        kinds: Sequence[str],
        masks: Mapping[str, Any],
        rotaries: Mapping[str, Any],
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """transformers' own decoder layers `blocks`, in order, as the model's forward calls
        them (each with the mask and rotary embedding of its attention kind; BLOOM's with its
        ALiBi tensor, which `masks` holds beside the mask)."""
        cache_argument = self.family.cache_argument
        for i in blocks:
            kwargs: dict[str, Any] = {
                "position_ids": position_ids,
                cache_argument: cache,
                "use_cache": cache is not None,
            }
            mask = masks[kinds[i]]
            if self.family.alibi == "argument":
                kwargs["alibi"], mask = mask
            if self.rotary_emb is not None:
                kwargs["position_embeddings"] = rotaries[kinds[i]]
            out = self.layers[i](hidden, attention_mask=mask, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # Falcon and BLOOM: (out, attn)
        return hidden

    def _mask(
        self,
        kind: str,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        position_ids: torch.Tensor,
        tree: Tree | None = None,
    ) -> Any:
        """The attention mask of one kind, as the model's own forward builds it (for ALiBi
        families with the bias: folded in, or as (alibi, mask) for BLOOM)."""
        if tree is not None and not self.family.takes_trees:
            raise BadRequestError(
                f"{self.config.model_type} (ALiBi) blocks cannot run tree steps; send drafts "
                "as one branch"
            )
        if self.family.alibi is not None:
            return self._alibi_mask(layer_idx, hidden, attention_mask, cache, position_ids)
        if tree is not None:
            allowed = tree_mask(
                tree, hidden.shape[1], attention_mask, self.window(kind), hidden.device
            )
            return as_attention_mask(allowed, self.config._attn_implementation, hidden.dtype)
        if isinstance(cache, PagedSpanCache):  # its own boolean mask (transformers' helpers
            # know transformers' cache classes only)
            return cache.mask(layer_idx, hidden.shape[1], attention_mask, self.window(kind))
        return self._mask_fn(kind)(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=layer_idx if cache is not None else None,
        )

    def _alibi_mask(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        position_ids: torch.Tensor,
    ) -> Any:
        """Falcon's and BLOOM's mask and ALiBi bias, as their own forwards build them: the
        bias grows with each key's position among the row's real tokens (the 2D mask's
        cumulative sum), so left padding does not shift it. Sized against the cache of the
        first block this run fills (a route may use a server's later blocks only)."""
        batch, tokens = hidden.shape[:2]
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        keys = attention_mask
        if keys is None:
            keys = torch.ones(batch, past + tokens, dtype=torch.long, device=hidden.device)
        heads = int(self.config.num_attention_heads)
        causal = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=layer_idx if cache is not None else None,
            allow_is_causal_skip=False,
        )
        if self.family.alibi == "argument":  # BLOOM: the bias beside an additive mask
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            return build_alibi_tensor(keys, heads, dtype=hidden.dtype), causal
        from transformers.models.falcon.modeling_falcon import (
            build_alibi_tensor as falcon_alibi,
        )

        smallest = torch.finfo(hidden.dtype).min
        if causal.dtype == torch.bool:
            zero = torch.full((), 0.0, device=causal.device, dtype=hidden.dtype)
            causal = torch.where(causal, zero, smallest)
        alibi = falcon_alibi(keys, heads, dtype=hidden.dtype).reshape(batch, heads, 1, -1)
        head_dim = int(self.config.hidden_size) // heads
        return torch.masked_fill(alibi / math.sqrt(head_dim), causal < -1, smallest)

    def rotary(
        self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin of the positions (None: the family has no rotary embedding)."""
        return None if self.rotary_emb is None else self.rotary_of(kind, hidden, position_ids)

    def rotary_of(
        self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary_emb is None:
            raise InternalServerError(f"{self.config.model_type} blocks have no rotary embedding")
        if self._typed_rotary:
            return self.rotary_emb(hidden, position_ids, kind)
        return self.rotary_emb(hidden, position_ids)

    def window(self, kind: str) -> int | None:
        """The sliding window of blocks of this attention kind (None: full attention)."""
        if self._mask_fn(kind) is create_sliding_window_causal_mask:
            return int(self.config.sliding_window)
        return None

    def _mask_fn(self, kind: str) -> Callable[..., Any]:
        if kind == "sliding_attention":
            return create_sliding_window_causal_mask
        if self.layer_types is None and getattr(self.config, "sliding_window", None):
            return create_sliding_window_causal_mask  # Mistral-style: one sliding type for all
        return create_causal_mask


def build_head_model(config: PretrainedConfig) -> nn.Module:
    """A causal-LM module with zero blocks: parameters on the meta device (to be assigned), buffers
    computed on the CPU (e.g. Gemma's embedding scale)."""
    headless = span_config(config, 0, 0)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(headless)
