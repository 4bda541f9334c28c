"""Tree steps: several candidate continuations in one step, each token seeing only its ancestors.

A Step may carry `tree` [batch, tokens]: the parent of each of its tokens as an index into the
step (< the token's own), or -1 for a root, which follows the session's cached tokens. A token
attends to the cached tokens and to itself and its ancestors in the step, never to a sibling
branch; it sits at the position its depth gives (`position + depth`), so each branch is computed
exactly as if it alone had followed the cache. Plain steps are the chain `parents[j] = j - 1`.

The mask is built over cache indices, as transformers builds its own: query `i` of the step is
at index `start + depth(i)` for the sliding window, the index its token will have once its
branch is the one kept. The step's tokens occupy the cache at `start + j` meanwhile; the next
step rolls back whatever of them was not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.errors import BadRequestError

MAX_TREE_TOKENS = 1024  # the ancestor table is tokens x tokens booleans per sequence


@dataclass(frozen=True)
class Tree:
    """A tree step's structure; `start` is the cache index of its first token, `begin` the first
    token of the part being run (a prefill chunk of a long tree step runs the rest later)."""

    ancestors: torch.Tensor  # [batch, tokens, tokens] bool: j is i or an ancestor of i
    depth: torch.Tensor  # [batch, tokens] long
    start: int
    begin: int = 0

    def chunk(self, begin: int) -> Tree:
        return Tree(self.ancestors, self.depth, self.start, begin)

    def position_ids(self, tokens: int) -> torch.Tensor:
        """Default positions of the part [begin, begin + tokens): start + depth."""
        return self.start + self.depth[:, self.begin : self.begin + tokens]


def check_parents(parents: torch.Tensor, batch: int, tokens: int) -> None:
    """BadRequestError unless `parents` is [batch, tokens] integers with -1 <= p[j] < j."""
    if parents.dim() != 2 or tuple(parents.shape) != (batch, tokens):
        raise BadRequestError(
            f"tree must be of shape [{batch}, {tokens}], got {list(parents.shape)}"
        )
    if parents.is_floating_point() or parents.is_complex() or parents.dtype == torch.bool:
        raise BadRequestError(f"tree must hold integers, got {parents.dtype}")
    if tokens > MAX_TREE_TOKENS:
        raise BadRequestError(f"a tree step holds at most {MAX_TREE_TOKENS} tokens, got {tokens}")
    index = torch.arange(tokens)
    p = parents.to(torch.long)
    if bool(((p < -1) | (p >= index)).any()):
        raise BadRequestError("tree parents must satisfy -1 <= parent[j] < j")


def build_tree(parents: torch.Tensor, start: int) -> Tree:
    """The ancestor table and depths of checked `parents` [batch, tokens]."""
    batch, tokens = parents.shape
    p = parents.to(torch.long)
    ancestors = torch.zeros(batch, tokens, tokens, dtype=torch.bool)
    rows = torch.arange(batch)
    for j in range(tokens):
        parent = p[:, j]
        has = parent >= 0
        if bool(has.any()):
            ancestors[rows[has], j] = ancestors[rows[has], parent[has]]
        ancestors[:, j, j] = True
    depth = ancestors.sum(dim=-1) - 1
    return Tree(ancestors, depth, start)


def tree_mask(
    tree: Tree,
    tokens: int,
    attention_mask: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """`[batch, 1, tokens, start + begin + tokens]` booleans for the step's tokens
    [begin, begin + tokens): every cached key before the step (within the padding mask and the
    sliding window), and the query's own ancestors in the step. A query that may see nothing
    sees every key, as transformers does for sdpa (no all -inf row)."""
    start, begin = tree.start, tree.begin
    end = begin + tokens
    batch = tree.depth.shape[0]
    allowed = torch.zeros(batch, tokens, start + end, dtype=torch.bool)
    allowed[:, :, :start] = True
    allowed[:, :, start:] = tree.ancestors[:, begin:end, :end]
    if window is not None:
        query = start + tree.depth[:, begin:end]  # [batch, tokens]
        key = torch.cat(
            [torch.arange(start).expand(batch, -1), start + tree.depth[:, :end]], dim=1
        )  # [batch, start + end]
        allowed &= key[:, None, :] > query[:, :, None] - window
    if attention_mask is not None:
        allowed &= attention_mask[:, None, : start + end].to("cpu", torch.bool)
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None].to(device)


def as_attention_mask(
    allowed: torch.Tensor, implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """A boolean mask in the form the model's attention takes: sdpa booleans as they are, eager
    an additive mask (0 where allowed, the dtype's minimum elsewhere)."""
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise BadRequestError(
        f"tree steps need sdpa or eager attention; this server runs {implementation!r}"
    )
