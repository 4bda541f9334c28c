"""The client's local part of the model: embeddings, final norm and LM head (the one beectl module
that holds weights)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beed.models.adapters import build_head_model, family_of, load_config
from beed.models.weights import load_tensors

log = logging.getLogger(__name__)

SKINNY_ROWS = 8  # up to this many rows, the CPU head multiplies the transposed way (logits())


class LocalHead:
    """Token embeddings in, hidden states out to the swarm; hidden states back, logits out."""

    def __init__(self, model_dir: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.config = load_config(model_dir)
        self.family = family_of(self.config)
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = load_tensors(
            model_dir,
            lambda n: n.startswith(self.family.head_prefixes),
            dtype=dtype,
            device=self.device,
            rename=self.family.canonical_name,
        )
        model: Any = build_head_model(self.config)  # transformers modules: attributes untyped
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        embed, norm, lm_head = self.family.head_modules(model)
        tied = f"{self.family.lm_head_path}.weight"
        if tied in missing and getattr(self.config, "tie_word_embeddings", False):
            tokens = embed[0] if isinstance(embed, nn.Sequential) else embed  # BLOOM: + a norm
            lm_head.weight = tokens.weight
            missing = [m for m in missing if m != tied]
        missing = [m for m in missing if "rotary_emb" not in m]
        if missing or unexpected:
            raise ValueError(
                f"head weights do not match: missing={missing} unexpected={unexpected}"
            )
        model.eval().requires_grad_(False)
        self._embed: nn.Module = embed
        self._norm: nn.Module = norm
        self._lm_head: nn.Module = lm_head
        cap_attr = self.family.logit_softcap_attr
        self._softcap: float | None = getattr(self.config, cap_attr, None) if cap_attr else None
        self._plain_head = isinstance(lm_head, nn.Linear) and lm_head.bias is None
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.config.vocab_size)

    @property
    def parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The embeddings, final norm and LM head modules (frozen until a caller unfreezes
        them: training reaches them through these)."""
        return self._embed, self._norm, self._lm_head

    def use_modules(self, embed: nn.Module, norm: nn.Module, lm_head: nn.Module) -> None:
        """Run with these modules from now on: a caller's model may have wrapped or replaced
        its parts (peft's LoRA layers around the LM head or the embeddings), and generation
        must see what training trained."""
        if (embed, norm, lm_head) == (self._embed, self._norm, self._lm_head):
            return
        self._embed, self._norm, self._lm_head = embed, norm, lm_head
        self._plain_head = isinstance(lm_head, nn.Linear) and lm_head.bias is None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Differentiable `logits`: final norm, LM head, soft cap; float32, on the head's device."""
        logits = self._lm_head(self._norm(hidden.to(self.device, self.dtype)))
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.float()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, tokens] -> hidden states [batch, tokens, hidden]."""
        with torch.inference_mode():
            return self._embed(input_ids.to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last block -> float32 logits over the vocabulary, on the
        head's device (greedy picks run there: only the chosen ids travel to the host)."""
        with torch.inference_mode():
            hidden = self._norm(hidden.to(self.device, self.dtype))
            rows = hidden.shape[0] * hidden.shape[1]
            if hidden.device.type == "cpu" and 1 < rows <= SKINNY_ROWS and self._plain_head:
                # A few rows (a speculative verification): the CPU's product of a tall matrix
                # by a thin one reads the output matrix once, like a single row, where a
                # general matrix product of 2-8 rows took twice as long as one (measured:
                # 16 against 5.6 ms for 2 rows of SmolLM2, one thread).
                flat = hidden.reshape(rows, hidden.shape[-1])
                weight: torch.Tensor = self._lm_head.weight  # type: ignore[assignment]
                logits = torch.mm(weight, flat.T).T
                logits = logits.reshape(*hidden.shape[:-1], -1)
            else:
                logits = self._lm_head(hidden)
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            return logits.float()
