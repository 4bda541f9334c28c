"""Tree drafts: several candidate continuations, verified in one tree step.

A draft tree lists its nodes in depth-first order with the main (most likely) branch first, so
node i + 1 is node i's first child along it: when the model keeps the main branch, what it
keeps is a prefix of the step's tokens, already in place in the servers' caches, and the next
step starts after it (as for a linear draft). When it keeps another branch, the part after the
main branch's shared prefix is sent again as the next step's first tokens (their keys and
values were computed at other cache indices); no extra round trip either way.

`parents[r, j]` is node j's parent in row r (< j), or -1 for a child of the last pending token.
Rows of a batch have trees of the same size (a shorter one is padded with extra leaves under the
root: whatever a leaf proposes, it is kept only if the model agrees).

Acceptance walks from the last pending token: greedy follows the child whose token is the
model's choice; sampling tries the children in order, keeping child x with probability p(x) and
otherwise removing x from p (renormalised) before the next child, then draws from what is left:
each node's proposal is a point mass, so this is the rejection rule with several drafts
(SpecInfer, Miao et al. 2023), and the tokens are distributed exactly as plain sampling's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: torch.Tensor  # [batch, nodes] proposed ids
    parents: torch.Tensor  # [batch, nodes]: parent node, -1 = after the last pending token

    @property
    def nodes(self) -> int:
        return int(self.tokens.shape[1])


def flatten(branches: list[list[int]]) -> tuple[list[int], list[int]]:
    """A trie of token branches (the first is the main one) as depth-first (tokens, parents):
    shared prefixes become one node; children keep the order they were first seen in."""
    children: dict[int, list[tuple[int, int]]] = {-1: []}  # node -> [(token, child node)]
    tokens_of: list[int] = []
    for branch in branches:
        node = -1
        for token in branch:
            match = next((c for t, c in children[node] if t == token), None)
            if match is None:
                match = len(tokens_of)
                tokens_of.append(token)
                children[node].append((token, match))
                children[match] = []
            node = match
    tokens: list[int] = []
    parents: list[int] = []

    def visit(node: int, parent: int) -> None:
        index = len(tokens)
        tokens.append(tokens_of[node])
        parents.append(parent)
        for _, child in children[node]:
            visit(child, index)

    for _, top in children[-1]:
        visit(top, -1)
    return tokens, parents


def pad_rows(rows: list[tuple[list[int], list[int]]], filler: int) -> DraftTree:
    """Row trees of different sizes as one DraftTree (extra leaves under the root)."""
    size = max(len(t) for t, _ in rows)
    tokens = [t + [filler] * (size - len(t)) for t, _ in rows]
    parents = [p + [-1] * (size - len(p)) for _, p in rows]
    return DraftTree(
        torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
    )


def step_parents(pending: int, tree: DraftTree) -> torch.Tensor:
    """The parents of a whole tree step [batch, pending + nodes]: the pending tokens as a chain
    (the first follows the cache), then the tree under the last pending token."""
    batch = tree.parents.shape[0]
    chain = torch.arange(-1, pending - 1).expand(batch, -1)
    under = torch.where(tree.parents >= 0, tree.parents + pending, pending - 1)
    return torch.cat([chain, under], dim=1)


def children_of(parents: list[int], node: int) -> list[int]:
    """Children of `node` (-1: the roots), in order."""
    return [j for j, p in enumerate(parents) if p == node]


def _walk(
    tree: DraftTree, pick: Callable[[int, int, list[int]], tuple[int | None, int]]
) -> list[tuple[list[int], int]]:
    """Per row, from the last pending token down: `pick(row, node, child tokens)` gives the
    index of the kept child, or None and the model's own token, which ends the walk."""
    out = []
    for r in range(tree.tokens.shape[0]):
        parents, tokens = tree.parents[r].tolist(), tree.tokens[r].tolist()
        path: list[int] = []
        node = -1
        while True:
            children = children_of(parents, node)
            kept, token = pick(r, node, [tokens[c] for c in children])
            if kept is None:
                out.append((path, token))
                break
            node = children[kept]
            path.append(node)
    return out


def walk_greedy(scores: torch.Tensor, tree: DraftTree) -> list[tuple[list[int], int]]:
    """scores [batch, 1 + nodes, vocab] (position 0: the last pending token, 1 + j: node j) ->
    per row, the kept nodes from the root down and the model's token after them."""
    choice = scores.argmax(dim=-1).cpu()

    def pick(r: int, node: int, tokens: list[int]) -> tuple[int | None, int]:
        want = int(choice[r, node + 1])
        return (tokens.index(want) if want in tokens else None), want

    return _walk(tree, pick)


def walk_rejection(
    probs: torch.Tensor, tree: DraftTree, generator: torch.Generator | None
) -> list[tuple[list[int], int]]:
    """probs [batch, 1 + nodes, vocab] on the host -> as walk_greedy, sampled (module doc)."""

    def pick(r: int, node: int, tokens: list[int]) -> tuple[int | None, int]:
        p = probs[r, node + 1].clone()
        for i, x in enumerate(tokens):
            px = float(p[x])
            if px > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < px:
                return i, x
            p[x] = 0.0
            total = float(p.sum())
            if total <= 0:  # every token the model allows was tried and refused
                break
            p /= total
        if float(p.sum()) <= 0:
            p = probs[r, node + 1]
        return None, int(torch.multinomial(p, 1, generator=generator)[0])

    return _walk(tree, pick)
