"""Weight quantization (beed/models/quant.py): reconstruction error, determinism, what gets
replaced, quantized spans against float32, and quantization in records and fingerprints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from beed.dht import Identity, RecordError
from beed.dht.records import decode_record, encode_record
from beed.models.fingerprint import fingerprint_quant, served_fingerprint, served_fingerprints
from beed.models.quant import Int8Linear, NF4Linear, quantize_linears
from beed.server.backend import BlockBackend
from protocol.errors import BadRequestError
from tests.dht.test_records import make
from tests.tiny_models import make_tiny


def normal_linear(out_features: int = 96, in_features: int = 200, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


@pytest.mark.parametrize(("cls", "bound"), [(Int8Linear, 0.01), (NF4Linear, 0.12)])
def test_quantized_weights_reconstruct_within_their_error(cls, bound):
    layer = normal_linear()  # 200 x 96: not a multiple of nf4's block of 64
    quantized = cls(layer)
    weight = quantized.dequantized(torch.float32)
    error = float((weight - layer.weight).norm() / layer.weight.norm())
    assert 0 < error < bound
    x = torch.randn(3, 200)
    assert torch.allclose(quantized(x), nn.functional.linear(x, weight, layer.bias), atol=1e-5)
    # Deterministic: two servers quantizing the same weights hold the same codes.
    again = cls(layer)
    assert all(torch.equal(a, b) for a, b in zip(quantized.buffers(), again.buffers(), strict=True))


def test_only_linear_layers_are_replaced():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 4)))
    assert quantize_linears(model, "int8") == 2
    assert [type(m).__name__ for m in model.modules()][1:] == [
        "Int8Linear",
        "LayerNorm",
        "Sequential",
        "Int8Linear",
    ]
    assert quantize_linears(model, "none") == 0
    with pytest.raises(BadRequestError, match="not one of none, int8, nf4"):
        quantize_linears(model, "int4")


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize(("quant", "ratio", "tolerance"), [("int8", 3.5, 0.05), ("nf4", 5.0, 0.5)])
def test_quantized_spans_are_smaller_and_close_to_float32(
    tmp_path: Path, family, quant, ratio, tolerance
):
    path = make_tiny(family, tmp_path / family)
    plain, small = BlockBackend(path, 0, 4), BlockBackend(path, 0, 4, quant=quant)
    assert small.info.quant == quant
    assert plain.info.weight_bytes > ratio * small.info.weight_bytes or family == "mixtral"
    assert small.info.weight_bytes < plain.info.weight_bytes
    hidden = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(1))
    want = plain.step(plain.new_cache(), range(4), hidden, 0)
    got = small.step(small.new_cache(), range(4), hidden, 0)
    assert 0 < (got - want).abs().max().item() < tolerance * want.abs().max().item()


def test_quant_and_offload_are_refused_together(tmp_path: Path):
    path = make_tiny("llama", tmp_path / "llama")
    with pytest.raises(BadRequestError, match="cannot be combined"):
        BlockBackend(path, 0, 4, quant="int8", offload_weights=0.5)


def test_fingerprints_name_the_quantization():
    base = "f" * 24
    assert served_fingerprint(base, "none") == base
    assert served_fingerprint(base, "int8") == f"{base}-int8"
    assert served_fingerprints(base) == [base, f"{base}-int8", f"{base}-nf4"]
    assert [fingerprint_quant(base, f) for f in served_fingerprints(base)] == [
        "none",
        "int8",
        "nf4",
    ]
    assert fingerprint_quant(base, "g" * 24) is None
    assert fingerprint_quant(base, f"{base}-int4") is None


def test_records_carry_the_quantization():
    identity = Identity.generate()
    plain = make(identity)
    assert decode_record(encode_record(plain), expires_at=plain.expires_at).quant == "none"
    assert b"\xa1q" not in encode_record(plain)  # written only when quantized
    quantized = make(identity, model_fingerprint="a" * 64 + "-int8", quant="int8")
    assert decode_record(encode_record(quantized), expires_at=quantized.expires_at) == quantized
    assert (
        len(encode_record(quantized)) == len(encode_record(plain)) + 5 + 7
    )  # "q": "int8", "-int8"
    with pytest.raises(RecordError, match="quant must be one of"):
        encode_record(dataclasses.replace(quantized, quant="int4"))
    with pytest.raises(RecordError, match="must end in -int8"):
        encode_record(dataclasses.replace(plain, quant="int8"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_spans_on_cuda_equal_the_cpu_ones_and_replay_graphs(tmp_path: Path, quant):
    """On a GPU: quantized on the host, moved to the device (paged cache, decode graphs); a
    prefill and graph-replayed decode steps equal the CPU span's up to float32 rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path = make_tiny("llama", tmp_path / "llama")
    cpu = BlockBackend(path, 0, 4, quant=quant)
    gpu = BlockBackend(path, 0, 4, quant=quant, device="cuda")
    assert gpu.kv_cache == "paged" and gpu.info.weight_bytes == cpu.info.weight_bytes
    gpu.allocate_kv(256)
    gen = torch.Generator().manual_seed(5)
    caches = [cpu.new_cache(), gpu.new_cache()]
    position = 0
    for tokens in (7, 1, 1, 1):
        hidden = torch.randn(1, tokens, 64, generator=gen)
        want = cpu.step(caches[0], range(4), hidden, position)
        got = gpu.step(caches[1], range(4), hidden, position)
        assert (got.cpu() - want).abs().max().item() < 1e-4
        position += tokens
