"""Shared fixtures: the embedded model, the local transformers reference, local swarms."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Daemons started by the tests log at INFO into their own files; keep this process quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STORY = "The quick brown fox jumps over the lazy dog. Once upon a time"


@pytest.fixture(scope="session")
def model_path() -> Path:
    from beed.models.registry import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def local_model(model_path: Path):
    """The reference: the whole model run by transformers in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model.eval()


@pytest.fixture(scope="module")
def swarm2() -> Iterator:
    from beectl.local_swarm import LocalSwarm

    with LocalSwarm(num_servers=2) as swarm:
        yield swarm


def peers_of(swarm) -> list[str]:
    return [f"{h}:{p}" for h, p in swarm.initial_peers]
