"""Quantized servers (beed serve --quant) through real daemons: they announce it, serve close to
float32 in a documented tolerance, and a client never mixes quantizations in one route unless
it asks (--allow-quant)."""

from __future__ import annotations

import json

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from protocol.errors import NoRouteError
from tests.conftest import STORY, peers_of
from tests.swarm.test_faults import server_info
from tests.swarm.test_user_errors import assert_user_error, beectl

# SmolLM2-135M, int8 blocks against float32 (docs/performance.md, "Model families"): the
# largest logit of a prefill moves by at most this share of the largest logit.
INT8_LOGIT_TOLERANCE = 0.05
NEW_TOKENS = 12


def start(swarm: LocalSwarm, spans: list[tuple[str, str]]) -> None:
    for span, quant in spans:
        swarm.add_server(span, extra_args=["--quant", quant])
    for server in swarm.servers:
        server.wait_ready(120.0)


def generate(peers, ids, **config):
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers, **config
    ) as model:
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                session=session,
                return_dict_in_generate=True,
                output_logits=True,
            )
            return out, [h.server.quant for h in session.inner.route]


def test_int8_servers_announce_it_and_stay_within_the_tolerance(local_model, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = local_model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with LocalSwarm(spans=[]) as swarm:
        start(swarm, [("0:15", "int8"), ("15:30", "int8")])
        info = server_info(swarm.servers[0].address)
        assert info["quant"] == "int8" and info["model_fingerprint"].endswith("-int8")
        # 15 blocks of SmolLM2 hold 203 MB in float32: int8 keeps about a quarter.
        assert info["weight_bytes"] < 60e6
        out, quants = generate(peers_of(swarm), ids)
        listing = beectl("swarm", "--json", "--initial-peers", ",".join(peers_of(swarm)))
    assert quants == ["int8", "int8"]
    first = (out.logits[0] - ref.logits[0]).abs().max().item()
    assert 0 < first <= INT8_LOGIT_TOLERANCE * ref.logits[0].abs().max().item()
    # Greedy tokens follow float32 while the top two logits stay apart: the first ones agree.
    assert torch.equal(out.sequences[0, : ids.shape[1] + 4], ref.sequences[0, : ids.shape[1] + 4])
    servers = [s for m in json.loads(listing.stdout) for s in m["servers"]]
    assert {s["quant"] for s in servers} == {"int8"}


def test_a_route_is_of_one_quantization_unless_the_client_allows_mixing(tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with LocalSwarm(spans=[]) as swarm:
        start(swarm, [("0:15", "none"), ("15:30", "int8")])
        peers = peers_of(swarm)
        with pytest.raises(NoRouteError, match=r"no route of one quantization.*--allow-quant"):
            generate(peers, ids)
        result = beectl(
            "generate", "Hi", "--max-new-tokens", "2", "--initial-peers", ",".join(peers)
        )
        assert_user_error(result, "no route of one quantization", "none: 0:15", "int8: 15:30")
        _, quants = generate(peers, ids, allow_quant=True)
        assert quants == ["none", "int8"]
        result = beectl(
            "generate",
            "Hi",
            "--raw",
            "--max-new-tokens",
            "2",
            "--allow-quant",
            "--initial-peers",
            ",".join(peers),
        )
        assert result.returncode == 0, result.stderr
        # With an unquantized route available, that is the one a client takes.
        start(swarm, [("15:30", "none")])
        _, quants = generate(peers, ids)
        assert quants == ["none", "none"]
