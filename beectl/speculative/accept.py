"""Which drafted tokens to keep: the longest prefix the model agrees with, plus one of its own.

`scores` are the model's processed scores at the k + 1 positions of a verification step (the
pending token, then each draft): position j predicts the token after draft j. Greedy keeps a
draft while it equals the model's argmax; sampling keeps draft x with probability
min(1, p(x) / q(x)) and, at the first refusal, draws from max(p - q, 0) renormalised; when every
draft is kept, one more token is drawn from the last position. That is the standard rejection
rule (Leviathan et al. 2023; Chen et al. 2023): the tokens produced are distributed exactly as
tokens sampled one by one from p.

A batch keeps the same number of tokens in every row (the session's cache has one length): a row
that accepted more gives the extra back. Truncating a correctly distributed continuation keeps
it correctly distributed, and how far it is cut depends only on the other rows' draws.
"""

from __future__ import annotations

import torch


def greedy(scores: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [batch, k + 1, vocab], drafts [batch, k] -> (accepted drafts per row [batch],
    the model's tokens [batch, k + 1]). Row r produces drafts[r, :n] then tokens[r, n]; its
    tokens[r, :accepted[r]] equal its drafts."""
    tokens = scores.argmax(dim=-1).cpu()
    agree = (tokens[:, :-1] == drafts).long()
    accepted = agree.cumprod(dim=1).sum(dim=1)
    return accepted, tokens


def rejection(
    probs: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [batch, k + 1, vocab] (the model's distributions, on the host), drafts [batch, k],
    draft_probs [batch, k, vocab] or None (deterministic drafts: q is a point mass) ->
    (accepted drafts per row [batch], tokens [batch, k + 1]): row r produces drafts[r, :n] and
    then tokens[r, n], for any n <= accepted[r]."""
    batch, width, _vocab = probs.shape
    k = width - 1
    tokens = torch.zeros(batch, width, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    uniforms = torch.rand(batch, k, generator=generator, dtype=torch.float64)
    for r in range(batch):
        n = 0
        while n < k:
            x = int(drafts[r, n])
            p = probs[r, n]
            q = None if draft_probs is None else draft_probs[r, n]
            px = float(p[x])
            qx = 1.0 if q is None else float(q[x])
            if qx > 0 and float(uniforms[r, n]) * qx < px:  # u < p(x) / q(x)
                tokens[r, n] = x
                n += 1
                continue
            residual = p.clone()
            if q is None:
                residual[x] = 0.0
            else:
                residual = (residual - q).clamp_min(0.0)
            total = float(residual.sum())
            if total <= 0:  # p == q up to rounding: any draw from p is exact
                residual, total = p, float(p.sum())
            tokens[r, n] = torch.multinomial(residual / total, 1, generator=generator)[0]
            break
        if n == k:
            tokens[r, k] = torch.multinomial(probs[r, k], 1, generator=generator)[0]
        accepted[r] = n
    return accepted, tokens
