"""Per-architecture adapters: build a span of transformers' own decoder blocks and the client's head.

A span `[start, end)` is built as a small model of `end - start` blocks: its config is the model's
config sliced to those blocks, so each block's cache index is local (0..n-1) and transformers' mask
and cache helpers see exactly the layers they would see in the full model. Running a span repeats,
step for step, what the model's own `forward` does between the embeddings and the final norm, so the
distributed result equals the local one.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from protocol.errors import ModelNotFoundError


@dataclass(frozen=True)
class Family:
    """What differs between architectures for block serving and the client's head."""

    model_types: tuple[str, ...]
    block_prefix: str  # state-dict prefix of block i, formatted with {i}
    head_prefixes: tuple[
        str, ...
    ]  # state-dict prefixes the client needs (embeddings, final norm, head)
    logit_softcap_attr: str | None = None  # config attribute of a final logit soft cap


LLAMA = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
)
GEMMA3 = Family(
    model_types=("gemma3_text", "gemma2"),
    block_prefix="model.layers.{i}.",
    head_prefixes=("model.embed_tokens.", "model.norm.", "lm_head."),
    logit_softcap_attr="final_logit_softcapping",
)
FAMILIES = {t: f for f in (LLAMA, GEMMA3) for t in f.model_types}


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
    return sliced


def _rotary_takes_layer_type(rotary: nn.Module) -> bool:
    return "layer_type" in inspect.signature(rotary.forward).parameters


class Span(nn.Module):
    """Blocks `[start, end)` of a model, run exactly as the model's own forward runs them."""

    def __init__(
        self, config: PretrainedConfig, start: int, end: int, device: torch.device
    ) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.config = span_config(config, start, end)
        with torch.device("meta"):
            base = AutoModel.from_config(self.config)
        self.layers: nn.ModuleList = base.layers
        # Rotary tables are non-persistent buffers computed at construction: build them for real.
        self.rotary_emb = type(base.rotary_emb)(config=self.config).to(device)
        self._typed_rotary = _rotary_takes_layer_type(self.rotary_emb)
        self.layer_types: list[str] | None = getattr(self.config, "layer_types", None)

    def load_blocks(self, tensors: dict[str, torch.Tensor], family: Family) -> None:
        """Assign the blocks' weights (keys as in the full model's state dict)."""
        local: dict[str, torch.Tensor] = {}
        for i in range(self.start, self.end):
            prefix = family.block_prefix.format(i=i)
            for name, tensor in tensors.items():
                if name.startswith(prefix):
                    local[f"layers.{i - self.start}.{name[len(prefix) :]}"] = tensor
        missing, unexpected = self.load_state_dict(local, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(
                f"span weights do not match: missing={missing} unexpected={unexpected}"
            )

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "past_key_values": cache,
            "position_ids": position_ids,
        }
        if self.layer_types is None:
            mask_fn: Callable[..., Any] = create_causal_mask
            if getattr(self.config, "sliding_window", None) and self.config.model_type == "mistral":
                mask_fn = create_sliding_window_causal_mask
            mask = mask_fn(**mask_kwargs)
            rotary = self.rotary_emb(hidden, position_ids)
            for layer in self.layers:
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=rotary,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=cache is not None,
                )
            return hidden
        masks: dict[str, Any] = {}
        rotaries: dict[str, Any] = {}
        for kind in set(self.layer_types):
            fn = (
                create_sliding_window_causal_mask
                if kind == "sliding_attention"
                else create_causal_mask
            )
            masks[kind] = fn(**mask_kwargs)
            rotaries[kind] = (
                self.rotary_emb(hidden, position_ids, kind)
                if self._typed_rotary
                else self.rotary_emb(hidden, position_ids)
            )
        for kind, layer in zip(self.layer_types, self.layers, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=rotaries[kind],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden


def build_head_model(config: PretrainedConfig) -> nn.Module:
    """A causal-LM module with zero blocks, on the meta device: embeddings, final norm and head."""
    headless = span_config(config, 0, 0)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(headless)
