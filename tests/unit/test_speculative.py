"""Speculative decoding's parts on their own: prompt lookup, the acceptance rules, the draft
length controller (beectl/speculative/)."""

from __future__ import annotations

import itertools

import pytest
import torch

from beectl.history import History
from beectl.speculative.accept import greedy, rejection
from beectl.speculative.adaptive import DraftLength, SpeculationConfig
from beectl.speculative.drafts import PromptLookup
from beectl.speculative.tree import (
    DraftTree,
    flatten,
    pad_rows,
    step_parents,
    walk_greedy,
    walk_rejection,
)
from protocol.errors import BadRequestError


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


def test_a_batch_drafts_only_once_it_pays_and_probes_ever_less_often():
    # Eight rows keep a draft only where all of them accept it: before anything is measured,
    # drafting does not look worth a round even where extra tokens cost little.
    batch = DraftLength(SpeculationConfig.parse("auto"), rows=8)
    batch.record(0, 0, 0.050)
    chosen = []
    for _ in range(120):
        k, w = batch.plan(8, trees=True)
        chosen.append(k)
        batch.record(k * w, 0, 0.050 + 0.03 * k * w, w, k)  # compute-bound: drafts cost
    probes = [i for i, k in enumerate(chosen) if k]
    assert chosen[:7] == [0] * 7 and len(probes) <= 4
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] > 2 * gaps[0]  # the interval grows
    # One row with the same history before it: a = 1/2 makes drafts worth trying at once.
    single = DraftLength(SpeculationConfig.parse("auto"))
    single.record(0, 0, 0.050)
    assert single.plan(8, trees=True)[0] > 0
    # When drafts pay again, probing goes back to its first interval.
    batch.record(4, 4, 0.051)
    batch.record(4, 4, 0.051)
    assert batch.plan(8, trees=False)[0] > 0


def test_a_trie_of_branches_is_depth_first_with_the_main_branch_first():
    tokens, parents = flatten([[5, 6, 7], [5, 8], [9], [5, 6, 4]])
    # 5-6-7 first (contiguous), then 6's other child 4, 5's other child 8, then the root's 9.
    assert tokens == [5, 6, 7, 4, 8, 9]
    assert parents == [-1, 0, 1, 1, 0, -1]
    tree = pad_rows([(tokens, parents), flatten([[1, 2]])], filler=0)
    assert tree.tokens.tolist()[1] == [1, 2, 0, 0, 0, 0]
    assert tree.parents.tolist()[1] == [-1, 0, -1, -1, -1, -1]  # padding: leaves at the root
    assert step_parents(2, tree).tolist()[0] == [-1, 0, 1, 2, 3, 3, 2, 1]
    lookup = PromptLookup()
    seq = torch.tensor([7, 1, 2, 7, 3, 4, 7, 1, 5, 7])
    # After "7": most recent first ("1 5"), then "3 4", then "1 2" (merged under "1").
    assert lookup.branches(seq, 2, 3) == [[1, 5], [3, 4], [1, 2]]


def test_the_tree_walks_keep_the_models_choices():
    # Nodes: 0:a=3 (root), 1:b=4 (child of 0), 2:c=6 (root), 3:d=5 (child of 0).
    tree = DraftTree(torch.tensor([[3, 4, 6, 5]]), torch.tensor([[-1, 0, -1, 0]]))
    scores = torch.zeros(1, 5, 10)
    scores[0, 0, 3] = 1  # after the pending token: 3 (node 0)
    scores[0, 1, 5] = 1  # after node 0: 5 (node 3, not the main child 4)
    scores[0, 4, 8] = 1  # after node 3: 8, not drafted
    assert walk_greedy(scores, tree) == [([0, 3], 8)]


def test_the_tree_rejection_walk_draws_the_models_distribution():
    """Two point-mass children at the root (tokens 1 and 2) and one under the first: the first
    token follows p, and so does the second after token 1."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.tensor([0.3, 0.4, 0.2, 0.1])
    p1 = torch.tensor([0.1, 0.1, 0.2, 0.6])
    tree = DraftTree(torch.tensor([[1, 3, 2]]), torch.tensor([[-1, 0, -1]]))
    probs = torch.stack([p0, p1, p0, p0])[None]  # positions: pending, node 0, node 1, node 2
    firsts, seconds = [], []
    for _ in range(12000):
        path, bonus = walk_rejection(probs, tree, g)[0]
        emitted = [int(tree.tokens[0, c]) for c in path] + [bonus]
        firsts.append(emitted[0])
        if emitted[0] == 1 and len(emitted) > 1:
            seconds.append(emitted[1])
    assert chi_square(torch.bincount(torch.tensor(firsts), minlength=4).float(), p0) < 16.3
    assert chi_square(torch.bincount(torch.tensor(seconds), minlength=4).float(), p1) < 16.3


def test_a_failover_replays_a_tree_step_on_its_own():
    history = History()
    x = torch.randn(1, 5, 4)
    history.add(0, x[:, :3], None, None)
    history.add(3, x[:, 3:], None, None, torch.tensor([[-1, -1]]))  # two siblings
    steps = history.replay()
    assert [(s.position, s.hidden.shape[1]) for s in steps] == [(0, 3), (3, 2)]
    assert steps[0].tree is None and steps[1].tree.tolist() == [[-1, -1]]
    # Keeping a chain of a tree step makes it a plain chunk again: one replay step.
    history.add(3, x[:, 3:], None, None, torch.tensor([[-1, 0]]))
    history.truncate(4)
    assert [(s.position, s.hidden.shape[1], s.tree) for s in history.replay()] == [(0, 4, None)]


def test_speculate_takes_trees_and_auto_tries_them_only_where_the_servers_can():
    assert SpeculationConfig.parse("4x3") == SpeculationConfig("fixed", 4, 3)
    for bad in ("4x0", "4x", "x3", "9x40"):
        with pytest.raises(BadRequestError):
            SpeculationConfig.parse(bad)
    lengths = DraftLength(SpeculationConfig.parse("auto"))
    lengths.record(0, 0, 0.100)
    assert lengths.plan(8, trees=False)[1] == 1
    # Slow round trips, cheap tokens, drafts that miss half the time: wider trees look better.
    for _ in range(3):
        k, w = lengths.plan(8, trees=False)
        lengths.record(k, k // 2, 0.101)
    k, w = lengths.plan(8, trees=True)
    assert w > 1 and k * w <= 32
    # Measured: the wide trees keep no more than a chain: back to width 1.
    for _ in range(40):
        k, w = lengths.plan(8, trees=True)
        lengths.record(k * w, k // 2 if w == 1 else 0, 0.101 + 0.001 * k * w, w, k)
    assert lengths.plan(8, trees=True)[1] == 1
