"""Draft proposers: guesses of the next tokens, made on the client, for the swarm to verify.

A drafter proposes up to `k` tokens for each row of a batch. `PromptLookup` copies what followed
the last occurrence of the text's final n-gram (no model; strong wherever the answer repeats its
context: edits, summaries, code, RAG). `DraftModel` runs a small local model with the same
tokenizer. Drafts carry their proposal distributions when they were sampled (rejection sampling
needs them); deterministic drafts carry none (a point mass on the proposed token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import LogitsProcessorList

from beectl.speculative.tree import DraftTree, flatten, pad_rows


@dataclass(frozen=True)
class Draft:
    tokens: torch.Tensor  # [batch, k] proposed ids, k >= 1
    probs: torch.Tensor | None = None  # [batch, k, vocab] proposal distributions (sampled drafts)


class Drafter(Protocol):
    def propose(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int
    ) -> Draft | None:
        """Up to k tokens after `sequences` [batch, length] (`mask`: 0 on left padding) for the
        rows where `active` is True; None when there is nothing worth proposing."""

    def propose_tree(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int, width: int
    ) -> DraftTree | None:
        """Up to `width` branches of up to k tokens per active row, as one tree (tree.py)."""

    def commit(self, length: int) -> None:
        """The first `length` positions of the sequences are final (rejected drafts dropped)."""


class PromptLookup:
    """Proposes what followed the most recent earlier occurrence of the last n tokens (n from
    `max_ngram` down to `min_ngram`); rows without a match propose nothing, and a batch
    proposes only as far as every active row can."""

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def row(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """The proposal for one row of real (unpadded) tokens [length]."""
        found = self.branches(tokens, k, 1)
        return torch.tensor(found[0], dtype=tokens.dtype) if found else tokens[:0]

    def branches(self, tokens: torch.Tensor, k: int, width: int) -> list[list[int]]:
        """Up to `width` different continuations of up to k tokens: what followed earlier
        occurrences of the last n tokens, longest n first, most recent first."""
        length = int(tokens.shape[0])
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = tokens[length - n :]
            windows = tokens[: length - 1].unfold(0, n, 1)  # every earlier start, not the suffix
            hits = (windows == pattern).all(dim=1).nonzero().flatten().tolist()
            for hit in reversed(hits):
                proposal = tokens[hit + n : hit + n + k].tolist()
                if proposal and proposal not in found:
                    found.append(proposal)
                    if len(found) == width:
                        return found
        return found

    def propose_tree(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int, width: int
    ) -> DraftTree | None:
        if k <= 0 or not bool(active.any()):
            return None
        rows: list[tuple[list[int], list[int]]] = []
        for r in range(sequences.shape[0]):
            if not bool(active[r]):
                rows.append(([], []))
                continue
            found = self.branches(sequences[r][mask[r].bool()], k, width)
            if not found:
                return None  # the batch keeps what its least lucky row keeps: nothing
            rows.append(flatten(found))
        return pad_rows(rows, int(sequences[0, -1]))

    def propose(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int
    ) -> Draft | None:
        if k <= 0 or not bool(active.any()):
            return None
        rows: list[torch.Tensor] = []
        for r in range(sequences.shape[0]):
            if bool(active[r]):
                rows.append(self.row(sequences[r][mask[r].bool()], k))
        width = min(int(p.shape[0]) for p in rows)
        if width == 0:
            return None
        out = sequences[:, -1:].repeat(1, width)  # finished rows: any filler, never kept
        it = iter(rows)
        for r in range(sequences.shape[0]):
            if bool(active[r]):
                out[r] = next(it)[:width]
        return Draft(out)

    def commit(self, length: int) -> None:
        return None


class DraftModel:
    """A small local model with the same tokenizer, loaded once; `drafter()` gives one
    generation its own drafting state."""

    def __init__(
        self, model_dir: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model: Any = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    def drafter(
        self,
        processors: LogitsProcessorList,
        *,
        sample: bool,
        generator: torch.Generator | None,
    ) -> ModelDrafter:
        return ModelDrafter(self, processors, sample=sample, generator=generator)


class ModelDrafter:
    """Drafts k tokens one by one with a DraftModel, greedy or sampled with the same logits
    processors as the real model; keeps its own KV cache, cut back to what was accepted after
    each round."""

    def __init__(
        self,
        draft: DraftModel,
        processors: LogitsProcessorList,
        *,
        sample: bool,
        generator: torch.Generator | None,
    ) -> None:
        from transformers import DynamicCache

        self.draft = draft
        self.processors, self.sample, self.generator = processors, sample, generator
        self.cache: Any = DynamicCache()
        self.cached = 0  # positions in self.cache

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.draft.device
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1] :]
        out = self.draft.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cached += ids.shape[1]
        return out.logits[:, -1, :].float().cpu()

    @torch.inference_mode()
    def propose(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int
    ) -> Draft | None:
        if k <= 0 or not bool(active.any()):
            return None
        if self.cached > sequences.shape[1] - 1:  # not committed (a failed round): start over
            self.cache = type(self.cache)()
            self.cached = 0
        seq, msk = sequences, mask
        logits = self._forward(seq[:, self.cached :], msk)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            scores = self.processors(seq, logits) if self.processors else logits  # type: ignore[arg-type]
            if self.sample:
                p = torch.softmax(scores, dim=-1)
                token = torch.multinomial(p, 1, generator=self.generator).squeeze(1)
                probs.append(p)
            else:
                token = scores.argmax(dim=-1)
            tokens.append(token)
            seq = torch.cat([seq, token[:, None]], dim=1)
            msk = torch.cat([msk, torch.ones_like(msk[:, :1])], dim=1)
            if i + 1 < k:
                logits = self._forward(token[:, None], msk)
        return Draft(torch.stack(tokens, dim=1), torch.stack(probs, dim=1) if probs else None)

    @torch.inference_mode()
    def propose_tree(
        self, sequences: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, k: int, width: int
    ) -> DraftTree | None:
        """The draft model's greedy chain of k tokens, and at each depth its next `width - 1`
        choices as leaves (they cost no extra forward)."""
        if k <= 0 or not bool(active.any()):
            return None
        if self.cached > sequences.shape[1] - 1:
            self.cache = type(self.cache)()
            self.cached = 0
        seq, msk = sequences, mask
        logits = self._forward(seq[:, self.cached :], msk)
        ranked: list[torch.Tensor] = []  # per depth [batch, width]: the chain's token first
        for i in range(k):
            scores = self.processors(seq, logits) if self.processors else logits  # type: ignore[arg-type]
            top = scores.topk(width, dim=-1).indices
            ranked.append(top)
            seq = torch.cat([seq, top[:, :1]], dim=1)
            msk = torch.cat([msk, torch.ones_like(msk[:, :1])], dim=1)
            if i + 1 < k:
                logits = self._forward(top[:, :1], msk)
        rows = []
        for r in range(sequences.shape[0]):
            chain = [int(t[r, 0]) for t in ranked]
            branches = [chain] + [
                [*chain[:d], int(ranked[d][r, j])] for d in range(k) for j in range(1, width)
            ]
            rows.append(flatten(branches))
        return pad_rows(rows, int(sequences[0, -1]))

    def commit(self, length: int) -> None:
        if self.cached > length:
            self.cache.crop(length - self.cached)  # a negative count: the tokens to drop
            self.cached = length
