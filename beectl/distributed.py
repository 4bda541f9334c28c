"""Distributed models as torch modules: the client's parts (embeddings, final norm, heads,
trainable prompts) are parameters here; the blocks run in the swarm, differentiably.

`model(input_ids=..., attention_mask=..., labels=...)` returns what transformers' own class
returns, and `loss.backward()` fills `.grad` of every client parameter that requires grad, so a
plain PyTorch loop or `transformers.Trainer` trains it. Servers' weights never change.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import BaseModelOutputWithPast, SequenceClassifierOutputWithPast

from beectl.model import RemoteModel
from beectl.runner import LoopThread
from beectl.training.function import BlockRunner, remote_blocks
from beectl.training.prompts import PromptTuning, initial_prompts, load_prompts, prompts_for
from beectl.training.remote import RemoteBlocks
from protocol.errors import BadRequestError


class DistributedModel(nn.Module):
    """The bare transformer: last hidden states (after the final norm), no head."""

    def __init__(
        self,
        remote: RemoteModel,
        loop: LoopThread,
        *,
        tuning_mode: str | None = None,
        num_prompts: int = 0,
        tuned_prompts: Any = None,
    ) -> None:
        super().__init__()
        self._remote = remote
        self._loop = loop
        self.tokenizer = remote.tokenizer
        self.config = copy.copy(remote.head.config)
        self.fingerprint = remote.files.fingerprint
        embed, norm, _ = remote.head.parts
        self.embed_tokens = embed
        self.norm = norm
        self._runner = BlockRunner(RemoteBlocks(remote.swarm, remote.ref, remote.config), loop)
        self.prompts: PromptTuning | None = None
        blocks = remote.files.num_blocks
        if tuned_prompts is not None:
            self.prompts = prompts_for(
                load_prompts(tuned_prompts),
                fingerprint=self.fingerprint,
                hidden_size=remote.head.hidden_size,
                num_blocks=blocks,
            )
        elif tuning_mode is not None:
            if num_prompts < 1:
                raise BadRequestError(f"tuning_mode={tuning_mode!r} needs num_prompts >= 1")
            init = initial_prompts(embed, remote.head.vocab_size, num_prompts)
            self.prompts = PromptTuning(tuning_mode, init, blocks)
        if self.prompts is not None:
            self.prompts.to(remote.head.device)

    @property
    def remote_blocks(self) -> RemoteBlocks:
        return self._runner.blocks

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompts is None else self.prompts.num_prompts

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def save_prompts(self, path: Any) -> None:
        """Save the trained prompts (safetensors) for `tuned_prompts=` / `--tuned-prompts`."""
        if self.prompts is None:
            raise BadRequestError("this model has no prompts (load it with tuning_mode=...)")
        self.prompts.save(path, model=self._remote.files.name, fingerprint=self.fingerprint)

    def _bind_head(self) -> None:
        """The head computes with this module's current parts (which peft may have wrapped
        in LoRA layers since): training and generation use the same modules."""
        head = self._remote.head
        lm_head = getattr(self, "lm_head", None)
        head.use_modules(
            self.embed_tokens, self.norm, head.parts[2] if lm_head is None else lm_head
        )

    def _blocks_output(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last block's output [batch, tokens, hidden] for the real tokens (the prompts'
        positions cut off), before the final norm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        self._bind_head()
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        head = self._remote.head
        hidden = hidden.to(head.device, head.dtype)
        batch = hidden.shape[0]
        deep = None
        if self.prompts is not None:
            prefix = self.prompts.input_prefix(batch).to(hidden.dtype)
            hidden = torch.cat([prefix, hidden], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(batch, self.prompts.num_prompts)
                attention_mask = torch.cat([ones, attention_mask], dim=1)
            deep = self.prompts.block_prompts(batch)
            deep = None if deep is None else deep.to(hidden.dtype)
        if attention_mask is not None and bool((attention_mask != 0).all()):
            attention_mask = None  # nothing masked: as transformers, no mask at all
        out = remote_blocks(hidden, attention_mask, deep, self._runner)
        return out[:, self.num_prompts :]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        ignore_arguments(kwargs)
        hidden = self._blocks_output(input_ids, attention_mask, inputs_embeds)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))

    def close(self) -> None:
        self._loop.run(self._remote.aclose())
        self._loop.close()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DistributedModelForSequenceClassification(DistributedModel):
    """A classification head (`score`, no bias) on the client, pooled at each row's last
    non-padding token as transformers' own `...ForSequenceClassification` pools."""

    def __init__(self, remote: RemoteModel, loop: LoopThread, *, num_labels: int = 2, **kw: Any):
        super().__init__(remote, loop, **kw)
        self.num_labels = num_labels
        self.config.num_labels = num_labels
        head = remote.head
        self.score = nn.Linear(head.hidden_size, num_labels, bias=False)
        std = float(getattr(self.config, "initializer_range", 0.02))
        with torch.no_grad():
            nn.init.normal_(self.score.weight, mean=0.0, std=std)
        self.score.to(head.device, head.dtype)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        ignore_arguments(kwargs)
        hidden = self.norm(self._blocks_output(input_ids, attention_mask, inputs_embeds))
        logits = self.score(hidden)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
        else:
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (positions * non_pad).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels, pooled, self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)


_IGNORED = ("use_cache", "return_dict", "output_attentions", "output_hidden_states")


def ignore_arguments(kwargs: dict[str, Any]) -> None:
    """Arguments transformers' forward takes that change nothing here (Trainer passes some)."""
    unknown = [k for k in kwargs if k not in (*_IGNORED, "num_items_in_batch")]
    if unknown:
        raise TypeError(f"forward() got unsupported arguments: {', '.join(sorted(unknown))}")
