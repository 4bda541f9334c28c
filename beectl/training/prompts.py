"""Trainable prompts, held by the client: virtual tokens before the input (`ptune`) and, with
`deep_ptune`, a prefix added to every block's input at those positions (sent with each request).

Saved as safetensors: `prompts` [num_prompts, hidden] and, for deep prompts, `deep_prompts`
[num_blocks, num_prompts, hidden]; the metadata names the model they were trained for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from protocol.errors import BadRequestError

TUNING_MODES = ("ptune", "deep_ptune")
FORMAT = "beed-prompts-1"


class PromptTuning(nn.Module):
    """`num_prompts` virtual tokens (and, deep, one prefix per block); deep prefixes start at
    zero, so an untrained deep model computes what the shallow one does."""

    def __init__(
        self, mode: str, init: torch.Tensor, num_blocks: int, *, deep: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise BadRequestError(
                f"tuning_mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}"
            )
        self.mode = mode
        self.num_prompts, self.hidden_size = init.shape
        self.num_blocks = num_blocks
        self.prompt_embeddings = nn.Parameter(init.detach().clone())
        self.deep_prompts: nn.Parameter | None = None
        if mode == "deep_ptune":
            start = deep if deep is not None else torch.zeros(num_blocks, *init.shape)
            self.deep_prompts = nn.Parameter(start.detach().clone().to(init.dtype))

    def input_prefix(self, batch: int) -> torch.Tensor:
        """[batch, num_prompts, hidden]: the virtual tokens' embeddings."""
        return self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)

    def block_prompts(self, batch: int) -> torch.Tensor | None:
        """[num_blocks, batch, num_prompts, hidden] for deep prompt tuning, else None."""
        if self.deep_prompts is None:
            return None
        return self.deep_prompts.unsqueeze(1).expand(-1, batch, -1, -1)

    def save(self, path: Path | str, *, model: str, fingerprint: str) -> None:
        tensors = {"prompts": self.prompt_embeddings.detach().cpu().contiguous()}
        if self.deep_prompts is not None:
            tensors["deep_prompts"] = self.deep_prompts.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "tuning_mode": self.mode,
            "model": model,
            "fingerprint": fingerprint,
        }
        save_file(tensors, str(path), metadata=metadata)


@dataclasses.dataclass(frozen=True)
class SavedPrompts:
    mode: str
    model: str
    fingerprint: str
    prompts: torch.Tensor
    deep: torch.Tensor | None


def load_prompts(path: Path | str) -> SavedPrompts:
    """Read a prompts file (BadRequestError if it is not one)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata: dict[str, Any] = f.metadata() or {}
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors' SafetensorError derives from Exception only
        raise BadRequestError(f"{path}: not a prompts file ({exc})") from None
    if metadata.get("format") != FORMAT or "prompts" not in tensors:
        raise BadRequestError(f"{path}: not a prompts file saved by beectl finetune")
    prompts = tensors["prompts"]
    deep = tensors.get("deep_prompts")
    if prompts.dim() != 2 or (deep is not None and deep.shape[1:] != prompts.shape):
        raise BadRequestError(f"{path}: prompts of inconsistent shapes")
    return SavedPrompts(
        metadata.get("tuning_mode", "ptune"),
        metadata.get("model", ""),
        metadata.get("fingerprint", ""),
        prompts,
        deep,
    )


def prompts_for(
    saved: SavedPrompts, *, fingerprint: str, hidden_size: int, num_blocks: int
) -> PromptTuning:
    """A PromptTuning module from a file, if it was trained for this model."""
    if saved.fingerprint and saved.fingerprint != fingerprint:
        raise BadRequestError(
            f"the prompts were trained for {saved.model or 'another model'} (fingerprint "
            f"{saved.fingerprint}), not this one ({fingerprint})"
        )
    if saved.prompts.shape[1] != hidden_size or (
        saved.deep is not None and saved.deep.shape[0] != num_blocks
    ):
        raise BadRequestError("the prompts do not fit this model's hidden size or blocks")
    return PromptTuning(saved.mode, saved.prompts.float(), num_blocks, deep=saved.deep)


def initial_prompts(
    embed: nn.Module, vocab_size: int, num_prompts: int, *, seed: int = 0
) -> torch.Tensor:
    """Initial virtual tokens: the embeddings of `num_prompts` random vocabulary tokens (so
    they start at the scale of real ones)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_prompts,), generator=generator)
    weight: Any = getattr(embed, "weight", None)
    device = weight.device if weight is not None else torch.device("cpu")
    with torch.no_grad():
        return embed(ids.to(device)).float().cpu()
