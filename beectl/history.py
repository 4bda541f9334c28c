"""What a client sent one hop: every step's input, so another server can be brought to its state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Chunk:
    """One step's input to a hop: tokens [position, position + hidden.shape[1])."""

    position: int
    hidden: torch.Tensor
    position_ids: torch.Tensor | None


@dataclass
class History:
    """Everything a hop was sent, so that another server can be brought to the same state."""

    chunks: list[_Chunk] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None  # the last step's mask covers all positions

    def truncate(self, position: int) -> None:
        if self.chunks:
            last = self.chunks[-1]
            if last.position + last.hidden.shape[1] <= position:  # nothing to cut (each step)
                if self.attention_mask is not None:
                    self.attention_mask = self.attention_mask[:, :position]
                return
        kept: list[_Chunk] = []
        for chunk in self.chunks:
            if chunk.position >= position:
                break
            cut = position - chunk.position
            if cut < chunk.hidden.shape[1]:
                ids = None if chunk.position_ids is None else chunk.position_ids[:, :cut]
                chunk = _Chunk(chunk.position, chunk.hidden[:, :cut], ids)
            kept.append(chunk)
        self.chunks = kept
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :position]

    def add(
        self,
        position: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> None:
        self.truncate(position)
        self.chunks.append(_Chunk(position, hidden, position_ids))
        if mask is not None:
            self.attention_mask = mask

    def replay(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """All inputs as one step from position 0: hidden, attention mask, position ids."""
        hidden = torch.cat([c.hidden for c in self.chunks], dim=1)
        ids = None
        if any(c.position_ids is not None for c in self.chunks):
            ids = torch.cat([_ids_of(c) for c in self.chunks], dim=1)
        return hidden, self.attention_mask, ids


def _ids_of(chunk: _Chunk) -> torch.Tensor:
    if chunk.position_ids is not None:
        return chunk.position_ids
    batch, tokens = chunk.hidden.shape[:2]
    return torch.arange(chunk.position, chunk.position + tokens).unsqueeze(0).expand(batch, -1)
