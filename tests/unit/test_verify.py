"""Spot-check sampling, result comparison and the speed check (pure: no sockets)."""

from __future__ import annotations

import random

import torch

from beectl.routing import find_route
from beectl.speeds import LIE_FACTOR, MIN_SAMPLES, SpeedCheck
from beectl.verify import Verifier, difference, tolerance
from tests.unit.test_routing import rec


def test_a_new_server_is_checked_at_its_first_steps_then_at_the_rate():
    verifier = Verifier(rate=0.1, first_steps=2, rng=random.Random(0))
    assert verifier.wants("a") and verifier.wants("a")
    later = [verifier.wants("a") for _ in range(5000)]
    assert 400 < sum(later) < 600  # 10%, give or take
    assert verifier.wants("b")  # another server is new again
    off = Verifier(rate=0.0, first_steps=0)
    assert not any(off.wants("a") for _ in range(10))


def test_outputs_compare_relative_to_their_scale_at_kept_positions_only():
    theirs = torch.randn(2, 3, 8) * 1000
    assert difference(theirs.clone(), theirs) == 0.0
    summed_otherwise = theirs * (1 + 1e-7)  # what another thread count or split gives
    assert difference(summed_otherwise, theirs) <= tolerance(torch.float32)
    pushed = theirs + 0.001 * theirs.abs().max() * torch.randn_like(theirs)
    assert difference(pushed, theirs) > tolerance(torch.float32)
    # Left padding (mask 0) is not compared; non-finite output never passes.
    padded = theirs.clone()
    padded[1, 0] = 12345.0
    keep = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert difference(padded, theirs, keep) == 0.0 and difference(padded, theirs) > 0.01
    broken = theirs.clone()
    broken[0, 0, 0] = float("nan")
    assert difference(broken, theirs) == float("inf")
    assert tolerance(torch.bfloat16) > tolerance(torch.float32)


def test_a_claim_the_measurements_contradict_is_replaced_for_routing():
    honest, liar = rec("honest", 0, 15, tps=1000.0), rec("liar", 0, 15, tps=1e6)
    rest = rec("rest", 15, 30, tps=1000.0)
    speeds = SpeedCheck()
    assert find_route([honest, liar, rest], 0, 30)[0].peer_id == "liar"  # the claim wins
    for _ in range(MIN_SAMPLES):
        speeds.observe("liar", 15, 1, 15 * 0.0011)  # about the honest server's real speed
        speeds.observe("honest", 15, 1, 15 * 0.0011)
        speeds.observe("liar", 15, 200, 1.0)  # prefills do not count
    overrides = speeds.overrides([honest, liar, rest])
    assert set(overrides) == {"liar"}  # the honest claim stands: within LIE_FACTOR
    assert overrides["liar"] > LIE_FACTOR / liar.compute_tokens_per_s
    route = find_route([honest, liar, rest], 0, 30, measured_block_s=overrides)
    assert route[0].peer_id == "honest"


def test_a_caught_liar_is_behind_every_honest_server_even_when_it_measures_faster():
    # The honest claim was measured under load (5 ms a block); the liar's best step was 1 ms.
    honest, liar = rec("honest", 0, 15, tps=200.0), rec("liar", 0, 15, tps=1e6)
    rest = rec("rest", 15, 30, tps=1000.0)
    speeds = SpeedCheck()
    for _ in range(MIN_SAMPLES):
        speeds.observe("liar", 15, 1, 15 * 0.001)
    overrides = speeds.overrides([honest, liar, rest])
    assert find_route([honest, liar, rest], 0, 30, measured_block_s=overrides)[0].peer_id == (
        "honest"
    )
    # Where nobody else serves its blocks, the liar still serves them.
    assert find_route([liar, rest], 0, 30, measured_block_s=overrides)[0].peer_id == "liar"
