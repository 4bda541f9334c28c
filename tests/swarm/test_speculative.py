"""Speculative decoding through real daemons: the same tokens as plain greedy generation (and
as local transformers), the same distribution when sampling, and failover mid-verification."""

from __future__ import annotations

import asyncio
import signal

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.config import ClientConfig
from beectl.generation import SamplingConfig
from beectl.generation import generate as run_generation
from beectl.local_swarm import LocalSwarm
from beectl.model import RemoteModel
from beectl.speculative.adaptive import SpeculationConfig
from beectl.speculative.tree import flatten, pad_rows
from beed.dht.peers import parse_initial_peers
from tests.conftest import STORY, peers_of
from tests.swarm.test_batch import PROMPTS
from tests.swarm.test_exactness import reference
from tests.swarm.test_failover import Trigger, assert_same, server_on_route
from tests.unit.test_speculative import chi_square

NEW_TOKENS = 48
# Greedy SmolLM2 soon repeats itself after this, which prompt lookup drafts well.
REPEATS = "Roses are red, violets are blue. Roses are red, violets are blue. Roses are"


@pytest.fixture(scope="module")
def model(swarm2):
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm2)
    ) as m:
        yield m


def generate(model, ids, **kw):
    return model.generate(
        ids,
        max_new_tokens=kw.pop("max_new_tokens", NEW_TOKENS),
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )


@pytest.mark.parametrize(
    ("speculate", "text"), [(4, REPEATS), ("auto", STORY), ("4x3", REPEATS), ("3x2", STORY)]
)
def test_prompt_lookup_equals_plain_greedy_and_local(
    model, local_model, tokenizer, speculate, text
):
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = generate(model, ids, speculate=speculate)
    assert_same(out, reference(local_model, ids, NEW_TOKENS))
    if speculate in (4, "4x3"):
        stats = out.speculation
        assert stats.proposed > 0 and stats.accepted > 0, stats


def test_the_model_drafting_trees_for_itself_keeps_every_main_branch(model, local_model, tokenizer):
    """Depth 4, width 2: the model's own chain and its second choice at each depth as leaves;
    the chain is always kept, so every round keeps half of what it proposed."""
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    out = generate(model, ids, speculate="4x2", draft_model="smollm2-135m", max_new_tokens=24)
    assert_same(out, reference(local_model, ids, 24))
    stats = out.speculation
    assert stats.proposed >= 24 and 2 * stats.accepted == stats.proposed, stats


class OffMainBranch:
    """A drafter whose main branch is right only at its first token and whose second branch is
    the true greedy continuation: every round keeps a branch that leaves the main one, so the
    kept tokens after the first go out again in the next step."""

    def __init__(self, truth: torch.Tensor, vocab: int) -> None:
        self.truth, self.vocab = truth, vocab

    def drafter(self, *_args, **_kw):
        return self

    def propose(self, *_args):
        return None

    def propose_tree(self, sequences, mask, active, k, width):
        true = self.truth[:, sequences.shape[1] : sequences.shape[1] + k]
        if true.shape[1] < 2:
            return None
        wrong = torch.cat([true[:, :1], (true[:, 1:] + 1) % self.vocab], dim=1)
        rows = [flatten([wrong[r].tolist(), true[r].tolist()]) for r in range(true.shape[0])]
        return pad_rows(rows, 0)

    def commit(self, length: int) -> None:
        return None


def test_a_kept_branch_off_the_main_one_is_resent_exactly(swarm2, local_model, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = reference(local_model, ids, NEW_TOKENS)

    async def run():
        config = ClientConfig(initial_peers=tuple(parse_initial_peers(peers_of(swarm2))))
        remote = await RemoteModel.load("smollm2-135m", config)
        try:
            async with remote.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                return await run_generation(
                    remote.head,
                    session,
                    ids,
                    SamplingConfig(max_new_tokens=NEW_TOKENS),
                    output_logits=True,
                    speculation=SpeculationConfig.parse("4x2"),
                    draft_model=OffMainBranch(ref.sequences, local_model.config.vocab_size),  # type: ignore[arg-type]
                )
        finally:
            await remote.aclose()

    out = asyncio.run(run())
    assert_same(out, ref)
    stats = out.speculation
    # Every round keeps its 4-token true branch (3 at the end, where fewer remain).
    assert stats.rounds >= 8 and stats.accepted >= 4 * (stats.rounds - 1), stats


def test_the_model_drafting_for_itself_accepts_every_draft(model, local_model, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    out = generate(model, ids, speculate=4, draft_model="smollm2-135m", max_new_tokens=24)
    assert_same(out, reference(local_model, ids, 24))
    stats = out.speculation
    assert stats.proposed >= 12 and stats.accepted == stats.proposed, stats


@pytest.mark.parametrize("speculate", [3, "3x2"])
def test_a_batch_of_different_lengths_equals_local_batched_generate(
    model, local_model, tokenizer, speculate
):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = local_model.generate(
        **enc,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        enc.input_ids,
        enc.attention_mask,
        max_new_tokens=12,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
        speculate=speculate,
        draft_model="smollm2-135m",
    )
    assert_same(out, ref)
    assert out.speculation.accepted > 0


def two_sample_chi_square(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom of "a and b are draws of one distribution"."""
    tokens = torch.cat([a, b]).unique()
    ca = torch.stack([(a == t).sum() for t in tokens]).float()
    cb = torch.stack([(b == t).sum() for t in tokens]).float()
    keep = ca + cb >= 10
    ca, cb = ca[keep], cb[keep]
    pooled = (ca + cb) / (ca + cb).sum()
    return chi_square(ca, pooled) + chi_square(cb, pooled), int(keep.sum()) - 1


async def sample_many(peers, ids, speculate: str, *, sessions: int, rows: int, runs: int):
    """(new tokens [sessions * rows * runs, 4], proposed, accepted): `sessions` concurrent
    generations of `rows` rows at a time, each with its own seed."""
    config = ClientConfig(initial_peers=tuple(parse_initial_peers(peers)))
    remote = await RemoteModel.load("smollm2-135m", config)
    spec = SpeculationConfig.parse(speculate)
    outs = []
    try:

        async def one(seed: int):
            sampling = SamplingConfig(
                max_new_tokens=4, do_sample=True, temperature=0.6, top_k=3, seed=seed
            )
            batch = ids.repeat(rows, 1)
            async with remote.inference_session(
                max_length=batch.shape[1] + 4, batch_size=rows
            ) as session:
                return await run_generation(remote.head, session, batch, sampling, speculation=spec)

        for run in range(runs):
            outs += await asyncio.gather(*(one(run * sessions + i) for i in range(sessions)))
    finally:
        await remote.aclose()
    tokens = torch.cat([o.sequences[:, ids.shape[1] :] for o in outs])
    return (
        tokens,
        sum(o.speculation.proposed for o in outs),
        sum(o.speculation.accepted for o in outs),
    )


@pytest.mark.slow
def test_speculative_sampling_draws_from_the_same_distribution(swarm2, tokenizer):
    """2048 draws each, plain and speculative, from concurrent sessions of two rows (a batch
    keeps as many drafts as its least lucky row: few rows, a peaked distribution)."""
    ids = tokenizer(REPEATS, return_tensors="pt").input_ids
    shape = dict(sessions=16, rows=2, runs=64)
    plain, _, _ = asyncio.run(sample_many(peers_of(swarm2), ids, "off", **shape))
    for speculate in ("4", "3x3"):  # linear drafts, then trees of 3 branches
        spec, proposed, accepted = asyncio.run(
            sample_many(peers_of(swarm2), ids, speculate, **shape)
        )
        assert plain.shape == spec.shape == (2048, 4)
        assert proposed > 0 and 0 < accepted < proposed, (speculate, proposed, accepted)
        # Tokens 2-4 come from verification rounds (the first from the prefill).
        for position in (1, 2, 3):
            stat, df = two_sample_chi_square(plain[:, position], spec[:, position])
            assert df >= 1
            # chi-square 0.999 quantiles for df 1..6
            limit = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46][min(df, 6) - 1]
            assert stat < limit, (speculate, position, stat, df)


@pytest.mark.parametrize("speculate", [4, "4x3"])
def test_a_server_killed_mid_verification_costs_nothing(local_model, tokenizer, speculate):
    ids = tokenizer(REPEATS, return_tensors="pt").input_ids
    ref = reference(local_model, ids, NEW_TOKENS)
    with LocalSwarm(spans=[(0, 15), (15, 30), (15, 30)]) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(swarm), failover_timeout_s=120.0
        ) as model:

            def kill(route) -> None:
                server_on_route(swarm, route, 15).signal(signal.SIGKILL)

            trigger = Trigger(12, kill)
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                trigger.session = session
                out = generate(model, ids, session=session, streamer=trigger, speculate=speculate)
                assert session.inner.recoveries >= 1
    assert_same(out, ref)
    assert out.speculation.accepted > 0
