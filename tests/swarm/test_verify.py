"""Verified results through real daemons: a server that pushes its outputs is caught by spot
checks and routed around with the text unchanged; one that overclaims its speed loses the routes
the claim bought."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from tests.conftest import STORY, peers_of
from tests.swarm.test_exactness import check_same, reference

HOSTILE = "tests.hostile_server"


@pytest.fixture(scope="module")
def noisy() -> Iterator[LocalSwarm]:
    """Blocks 0:15 twice (one server adds noise to every output and claims 1000x its speed, so
    routes choose it), 15:30 once."""
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as swarm:
        liar = swarm.add_server(
            "0:15",
            name="noisy",
            module=HOSTILE,
            extra_args=["--noise", "0.01", "--claim-speed", "1000"],
        )
        liar.wait_ready(120)
        yield swarm


def test_a_noisy_server_is_caught_at_its_first_step_and_the_text_is_the_models(
    noisy, local_model, tokenizer
):
    peers = peers_of(noisy)
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    # Without checks the noise reaches the text (this is what the checks are for).
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers, verify_rate=0.0, verify_first_steps=0
    ) as model:
        unchecked = model.generate(ids, max_new_tokens=24, eos_token_id=None, speculate="off")
        assert model.verification.checked == 0
    ref = reference(local_model, ids, 24)
    assert not torch.equal(unchecked, ref.sequences)
    # With the default checks: caught, banned, recomputed; exact tokens and logits.
    check_same(local_model, tokenizer, peers, speculate="off", verify_rate=0.0)
    log = noisy.servers[-1].log_path.read_text()
    assert "Traceback" not in log


def test_the_catch_is_counted_and_logged_with_evidence(noisy, tokenizer, caplog):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    with caplog.at_level("WARNING", logger="beectl.verify"):
        with AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(noisy), verify_rate=0.0
        ) as model:
            with model.inference_session(max_length=64) as session:
                model.generate(
                    ids, max_new_tokens=4, eos_token_id=None, speculate="off", session=session
                )
                route = [h.peer_id for h in session.inner.route]
            stats = model.verification
            assert stats.mismatches == 1 and stats.checked >= 1
    noisy_peer = noisy.servers[-1].peer_id
    assert noisy_peer not in route
    lines = [r.getMessage() for r in caplog.records if "verify.mismatch" in r.getMessage()]
    assert len(lines) == 1 and noisy_peer[:8] in lines[0]
    assert float(re.search(r"diff=(\S+)", lines[0]).group(1)) > 1e-3


def test_an_overclaiming_server_stops_getting_every_route(tokenizer):
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as swarm:
        liar = swarm.add_server(
            "0:15", name="liar", module=HOSTILE, extra_args=["--claim-speed", "1000"]
        )
        liar.wait_ready(120)
        ids = tokenizer(STORY, return_tensors="pt").input_ids
        with AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(swarm), verify_rate=0.0
        ) as model:
            firsts = []
            for _ in range(3):
                with model.inference_session(max_length=64) as session:
                    firsts.append(session.inner.route[0].peer_id)
                    model.generate(
                        ids, max_new_tokens=12, eos_token_id=None, speculate="off", session=session
                    )
        assert firsts[0] == liar.peer_id  # the claim bought the first route
        assert liar.peer_id not in firsts[1:]  # measured: slower than claimed, routed by that
