"""Speculative decoding's parts on their own: prompt lookup, the acceptance rules, the draft
length controller (beectl/speculative/)."""

from __future__ import annotations

import torch

from beectl.speculative.accept import greedy, rejection
from beectl.speculative.adaptive import DraftLength, SpeculationConfig
from beectl.speculative.drafts import PromptLookup


def test_prompt_lookup_copies_what_followed_the_last_match():
    lookup = PromptLookup()
    tokens = torch.tensor([5, 6, 7, 8, 9, 1, 2, 6, 7, 3, 4, 0, 6, 7])
    # "6 7" last occurred before "3 4 0": the most recent earlier occurrence wins.
    assert lookup.row(tokens, 3).tolist() == [3, 4, 0]
    assert lookup.row(torch.tensor([1, 2, 3]), 4).tolist() == []  # nothing repeats
    seq = torch.tensor([[0, 0, 1, 2, 1], [3, 1, 2, 3, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    draft = lookup.propose(seq, mask, torch.tensor([True, True]), 2)
    assert draft is not None and draft.tokens.tolist() == [[2, 1], [2, 3]]
    # A batch drafts only as far as every active row can; a finished row does not count.
    seq = torch.tensor([[1, 2, 1], [4, 5, 6]])
    assert lookup.propose(seq, torch.ones_like(seq), torch.tensor([True, True]), 2) is None
    draft = lookup.propose(seq, torch.ones_like(seq), torch.tensor([True, False]), 2)
    assert draft is not None and draft.tokens[0].tolist() == [2, 1]


def test_greedy_keeps_the_agreeing_prefix():
    scores = torch.zeros(2, 4, 10)
    for r, targets in enumerate([[3, 4, 5, 6], [3, 9, 5, 6]]):
        for j, t in enumerate(targets):
            scores[r, j, t] = 1.0
    accepted, tokens = greedy(scores, torch.tensor([[3, 4, 5], [3, 4, 5]]))
    assert accepted.tolist() == [3, 1]
    assert tokens[0].tolist() == [3, 4, 5, 6] and tokens[1, 1] == 9


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_rejection_sampling_produces_the_models_distribution():
    """Whatever the drafts, the first token follows p and the second follows p's next
    distribution: point-mass drafts (prompt lookup) and sampled drafts (a draft model)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]])
    draws = 20000
    probs = p.expand(draws, -1, -1)
    for draft_probs in (None, q.expand(draws, -1, -1)):
        if draft_probs is None:
            drafts = torch.ones(draws, 2, dtype=torch.long)  # always propose token 1
        else:
            drafts = torch.stack(
                [torch.multinomial(q[j], draws, replacement=True, generator=g) for j in range(2)],
                dim=1,
            )
        accepted, tokens = rejection(probs, drafts, draft_probs, g)
        first = torch.bincount(tokens[:, 0], minlength=4).float()
        assert chi_square(first, p[0]) < 16.3  # df 3, p = 0.001
        # The second token exists where the first draft was accepted; it follows p[1] there.
        second = torch.bincount(tokens[accepted >= 1, 1], minlength=4).float()
        assert chi_square(second, p[1]) < 16.3
        assert 0 < int((accepted == 2).sum()) < draws


def test_the_draft_length_follows_cost_and_acceptance():
    lengths = DraftLength(SpeculationConfig.parse("auto"))
    assert lengths.choose(8) == 0  # first, a plain round to measure
    lengths.record(0, 0, 0.100)
    # A long link: a round costs the same whatever it carries; drafts are mostly accepted.
    for _ in range(5):
        k = lengths.choose(8)
        lengths.record(k, k - 1 if k else 0, 0.101)
    assert lengths.choose(8) == 8
    assert lengths.choose(3) == 3  # never more than the generation may still add
    # Compute-bound: each draft costs as much as a round, and most are refused.
    steep = DraftLength(SpeculationConfig.parse("auto"))
    steep.record(0, 0, 0.050)
    for k in range(1, 9):
        steep.record(k, 0, 0.050 * (1 + k))
    chosen = [steep.choose(8) for _ in range(16)]
    assert chosen.count(0) >= 14 and any(chosen)  # off, but probing now and then
    assert DraftLength(SpeculationConfig.parse(4)).choose(8) == 4
    assert DraftLength(SpeculationConfig.parse("off")).choose(8) == 0
