"""Codec round trips are bit-exact for every dtype; the codec choice follows the cost model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    ALL_CODECS,
    BadTensorError,
    Codec,
    CodecPolicy,
    DecompressionError,
    ForwardResult,
    FrameDecoder,
    UnknownCodecError,
    choose_codec,
    codec_for_id,
    encode_message_bytes,
)
from protocol.codecs import (
    LOSSY_CODECS,
    decode_payload,
    encode_payload,
    shuffle,
    unshuffle_into,
)
from protocol.dtypes import ITEMSIZE, wire_name
from protocol.tensors import raw_bytes
from tests.protocol.helpers import assert_bit_exact, tensors


def roundtrip(t: torch.Tensor, policy: CodecPolicy | None) -> torch.Tensor:
    dec = FrameDecoder()
    dec.feed(encode_message_bytes(ForwardResult(1, t), policy))
    msg = dec.next_message()
    assert isinstance(msg, ForwardResult)
    return msg.hidden


@settings(max_examples=150, deadline=None)
@given(t=tensors(), codec=st.sampled_from(ALL_CODECS))
def test_frame_roundtrip_any_dtype_shape_codec(t: torch.Tensor, codec: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = roundtrip(t, CodecPolicy(force=codec))
        got.add_(0) if got.dtype != torch.bool else got.logical_not_()  # writable
        got = roundtrip(t, CodecPolicy(force=codec))
    assert_bit_exact(got, t)


@settings(max_examples=150, deadline=None)
@given(t=tensors(), codec=st.sampled_from([c for c in Codec if c not in LOSSY_CODECS]))
def test_payload_roundtrip_without_fallback(t: torch.Tensor, codec: Codec) -> None:
    _, name, raw = raw_bytes(t)
    itemsize = ITEMSIZE[name]
    for float_planes in (True, False):
        enc = encode_payload(codec, raw, itemsize, 1, float_planes)
        out = decode_payload(codec, memoryview(bytes(enc)), len(raw), itemsize)
        assert bytes(out) == raw.tobytes()


SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-40, 65504.0, 3.4e38]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_special_floats_and_nan_payloads_are_bit_exact(dtype: torch.dtype, codec: str) -> None:
    t = torch.tensor(SPECIAL * 50, dtype=torch.float64).to(dtype)
    bits = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    bits[0] = bits[4] | 1  # NaN with a payload
    bits[1] = bits[4] ^ (1 << (8 * t.element_size() - 1))  # negative NaN
    got = roundtrip(t, CodecPolicy(force=codec))
    assert_bit_exact(got, t)
    assert torch.signbit(got[3]) == torch.signbit(t[3])


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_real_compressible_bf16_really_compresses(codec: str) -> None:
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(64, 576, generator=gen) * 3).to(torch.bfloat16)
    frame = encode_message_bytes(ForwardResult(1, t), CodecPolicy(force=codec))
    if codec in ("zstd", "shuffle-zstd", "planes-zstd"):
        assert len(frame) < t.nbytes * 0.9
    assert_bit_exact(roundtrip(t, CodecPolicy(force=codec)), t)


def test_shuffle_definition() -> None:
    raw = bytes(range(12))  # 3 elements of 4 bytes
    planes = shuffle(memoryview(raw), 4)
    assert planes.tobytes() == bytes([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
    out = bytearray(12)
    unshuffle_into(planes, out, 4)
    assert bytes(out) == raw


def test_codec_ids_and_names_are_stable() -> None:
    assert [(int(c), c.wire_name) for c in Codec] == [
        (0, "none"),
        (1, "lz4"),
        (2, "zstd"),
        (3, "shuffle-lz4"),
        (4, "shuffle-zstd"),
        (5, "planes-zstd"),
        (6, "q8"),
    ]
    assert Codec.from_name("planes-zstd") is Codec.PLANES_ZSTD
    assert "q8" not in ALL_CODECS  # never offered in Hello or records: lossless by default
    with pytest.raises(UnknownCodecError):
        codec_for_id(7)
    with pytest.raises(UnknownCodecError):
        Codec.from_name("brotli")


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    t = torch.arange(10, dtype=torch.int64)
    got = roundtrip(t, None)
    got[0] = 99
    assert t[0] == 0
    assert isinstance(got.numpy(), np.ndarray)


# --- codec choice ---------------------------------------------------------------------------------

BIG_BF16 = torch.zeros(512, 576, dtype=torch.bfloat16)


def test_default_policy_never_compresses() -> None:
    assert choose_codec(BIG_BF16, CodecPolicy()) is Codec.NONE


def test_small_tensors_are_sent_raw_even_on_slow_links() -> None:
    small = torch.zeros(1, 576, dtype=torch.bfloat16)
    assert choose_codec(small, CodecPolicy(link_bytes_per_s=1e6)) is Codec.NONE


def test_slow_link_compresses_bf16_and_fast_link_does_not() -> None:
    assert choose_codec(BIG_BF16, CodecPolicy(link_bytes_per_s=12.5e6)) is Codec.PLANES_ZSTD
    assert choose_codec(BIG_BF16, CodecPolicy(link_bytes_per_s=10e9)) is Codec.NONE


def test_choice_respects_negotiated_codecs_and_dtype() -> None:
    slow = CodecPolicy(link_bytes_per_s=1e6, allowed=frozenset({"none", "lz4"}))
    assert choose_codec(BIG_BF16, slow) is Codec.NONE
    ints = torch.zeros(512, 576, dtype=torch.int64)
    assert choose_codec(ints, CodecPolicy(link_bytes_per_s=1e6)) is Codec.NONE


def test_dtype_table_is_complete() -> None:
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.bool,
        torch.uint8,
    ):
        assert wire_name(dtype) is not None


def test_decompression_error_on_garbage() -> None:
    with pytest.raises(DecompressionError):
        decode_payload(Codec.ZSTD, memoryview(b"\x28\xb5\x2f\xfd" + b"\xff" * 20), 100, 1)
    with pytest.raises(DecompressionError):
        decode_payload(Codec.LZ4, memoryview(b"\xff" * 20), 100, 1)


def test_one_token_step_framing_stays_fast() -> None:
    """Regression guard for the < 30 µs target (docs/performance.md); generous for loaded CI."""
    import statistics
    import time

    from protocol import Step

    msg = Step(3, 7, 12, torch.randn(1, 1, 576))
    dec = FrameDecoder()
    times = []
    for _ in range(3000):
        t0 = time.perf_counter()
        dec.feed(encode_message_bytes(msg))
        dec.next_message()
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 100e-6


# --- q8, the lossy codec (only with the receiver's consent) -----------------------------------


def q8_roundtrip(t: torch.Tensor) -> torch.Tensor:
    from protocol import Limits

    dec = FrameDecoder(Limits(accept_lossy=1))
    dec.feed(encode_message_bytes(ForwardResult(1, t), CodecPolicy(force="q8")))
    msg = dec.next_message()
    assert isinstance(msg, ForwardResult)
    return msg.hidden


@settings(max_examples=100, deadline=None)
@given(
    numel=st.integers(0, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    scale=st.sampled_from([1e-3, 1.0, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_q8_values_come_back_within_half_a_step_of_their_block(numel, dtype, scale, seed) -> None:
    """Each value within half its block's step (largest magnitude / 127) of what was sent,
    plus the rounding of the result to its dtype; zeros stay zeros; shape and dtype kept."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(numel, generator=gen) * scale).to(dtype)
    t[::7] = 0
    got = q8_roundtrip(t.reshape(-1, 1) if numel else t)
    got = got.reshape(-1)
    assert got.dtype == dtype and got.numel() == numel
    if not numel:
        return
    sent = t.float()
    padded = torch.zeros(-(-numel // 32) * 32)
    padded[:numel] = sent
    # The float16 scale is the step rounded up: by 2^-10 relative, or 2^-24 when subnormal.
    step = padded.reshape(-1, 32).abs().amax(1) / 127 * (1 + 2**-10) + 2**-24
    bound = step.repeat_interleave(32)[:numel] / 2
    rounding = (
        got.float().abs() * {torch.float32: 0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    )
    assert bool(((got.float() - sent).abs() <= bound + rounding + 1e-30).all())
    assert bool((got[sent == 0] == 0).all())


def test_q8_is_refused_without_consent_and_never_chosen() -> None:
    t = torch.randn(4, 64)
    frame = encode_message_bytes(ForwardResult(1, t), CodecPolicy(force="q8"))
    assert len(frame) < t.nbytes / 3 + 100  # 34 bytes per 32 float32 values, and the header
    dec = FrameDecoder()  # the default: lossless only
    dec.feed(frame)
    with pytest.raises(BadTensorError, match="lossy codec q8 refused"):
        dec.next_message()
    # The cost model never picks it, on any link.
    for bw in (1e3, 1e6, 1e9):
        assert (
            choose_codec(t, CodecPolicy(link_bytes_per_s=bw, min_compress_bytes=0)) is not Codec.Q8
        )
    with pytest.raises(BadTensorError, match="float tensors only"):
        encode_message_bytes(
            ForwardResult(1, torch.ones(3, dtype=torch.int64)), CodecPolicy(force="q8")
        )
    with pytest.raises(UnknownCodecError, match="inf or nan"):
        encode_message_bytes(
            ForwardResult(1, torch.tensor([1.0, math.inf])), CodecPolicy(force="q8")
        )


def test_a_q8_descriptor_must_match_its_values() -> None:
    from protocol import Limits
    from protocol.tensors import parse_descriptor

    lossy = Limits(accept_lossy=1)
    assert parse_descriptor(["float32", [40], 6, 160, 44], lossy).codec is Codec.Q8
    with pytest.raises(BadTensorError, match="q8 tensor is a float tensor of 44"):
        parse_descriptor(["float32", [40], 6, 160, 45], lossy)
    with pytest.raises(BadTensorError, match="q8 tensor is a float tensor"):
        parse_descriptor(["int32", [40], 6, 160, 44], lossy)
