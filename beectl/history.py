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
    tree: torch.Tensor | None = None  # a tree step's parents (-1: follows what came before)


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
                tree = None if chunk.tree is None else chunk.tree[:, :cut]
                if tree is not None and bool((tree == torch.arange(-1, cut - 1)).all()):
                    tree = None  # what was kept is a chain (a speculative round's kept drafts)
                chunk = _Chunk(chunk.position, chunk.hidden[:, :cut], ids, tree)
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
        tree: torch.Tensor | None = None,
    ) -> None:
        self.truncate(position)
        self.chunks.append(_Chunk(position, hidden, position_ids, tree))
        if mask is not None:
            self.attention_mask = mask

    def replay(self) -> list[ReplayStep]:
        """All inputs as steps from position 0 that bring a new server to this hop's state:
        runs of plain steps as one, each tree step (tree_mask: its tokens see their ancestors
        only) on its own after them."""
        runs: list[list[_Chunk]] = []
        for chunk in self.chunks:
            if chunk.tree is None and runs and runs[-1][-1].tree is None:
                runs[-1].append(chunk)
            else:
                runs.append([chunk])
        steps = []
        for run in runs:
            position = run[0].position
            end = run[-1].position + run[-1].hidden.shape[1]
            ids = None
            if any(c.position_ids is not None for c in run):
                ids = torch.cat([_ids_of(c) for c in run], dim=1)
            mask = None if self.attention_mask is None else self.attention_mask[:, :end]
            hidden = torch.cat([c.hidden for c in run], dim=1)
            steps.append(ReplayStep(position, hidden, mask, ids, run[0].tree))
        return steps


@dataclass(frozen=True)
class ReplayStep:
    position: int
    hidden: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    tree: torch.Tensor | None


def _ids_of(chunk: _Chunk) -> torch.Tensor:
    if chunk.position_ids is not None:
        return chunk.position_ids
    batch, tokens = chunk.hidden.shape[:2]
    return torch.arange(chunk.position, chunk.position + tokens).unsqueeze(0).expand(batch, -1)
