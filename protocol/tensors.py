"""Tensor segments: a torch tensor to a descriptor plus payload bytes, and back, bit-exact."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from protocol.codecs import (
    LOSSY_CODECS,
    Codec,
    CodecPolicy,
    choose_codec,
    codec_for_id,
    decode_payload,
    decode_q8,
    encode_q8,
    q8_encoded_len,
)
from protocol.codecs import encode_payload as _encode_payload
from protocol.dtypes import FLOAT_DTYPES, ITEMSIZE, NUMPY, torch_dtype, wire_name
from protocol.errors import BadTensorError, DecompressionError, TensorTooLargeError
from protocol.limits import Limits

if TYPE_CHECKING:
    import torch

_EMPTY = memoryview(b"")


class SegmentInfo(NamedTuple):
    """A validated tensor descriptor: everything needed to decode the payload that follows."""

    dtype_name: str
    shape: tuple[int, ...]
    codec: Codec
    raw_len: int
    enc_len: int
    itemsize: int


def raw_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, str, memoryview]:
    """A contiguous CPU view-or-copy of tensor, its wire dtype name and a flat view of its bytes."""
    import torch

    name = wire_name(tensor.dtype)
    if name is None:
        raise BadTensorError(f"cannot send dtype {tensor.dtype}; supported: {sorted(ITEMSIZE)}")
    if tensor.layout != torch.strided:
        raise BadTensorError(f"cannot send a {tensor.layout} tensor; only strided tensors")
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return t, name, _EMPTY
    arr = (t.view(torch.int16) if name == "bfloat16" else t).numpy()
    if not arr.flags.c_contiguous:  # pragma: no cover - torch and numpy disagree on a 1-sized dim
        arr = np.ascontiguousarray(arr)
    return t, name, arr.data.cast("B")


def encode_tensor(
    tensor: torch.Tensor, policy: CodecPolicy | None
) -> tuple[list[Any], bytes | memoryview]:
    """Descriptor [dtype, shape, codec id, raw length, encoded length] and the encoded payload."""
    t, name, raw = raw_bytes(tensor)
    raw_len = len(raw)
    if policy is None or (
        policy.force is None
        and (policy.link_bytes_per_s is None or raw_len < policy.min_compress_bytes)
    ):  # the common case: no compression, no cost model
        return [name, list(t.shape), 0, raw_len, raw_len], raw
    return _encode_with(t, name, raw, choose_codec(t, policy, name), policy.zstd_level)


def encode_tensor_with(
    tensor: torch.Tensor, codec: Codec, zstd_level: int = 1
) -> tuple[list[Any], bytes | memoryview]:
    """Like encode_tensor with a forced codec (tests, benchmarks); still falls back to none."""
    t, name, raw = raw_bytes(tensor)
    return _encode_with(t, name, raw, codec, zstd_level)


def _encode_with(
    t: torch.Tensor, name: str, raw: memoryview, codec: Codec, zstd_level: int
) -> tuple[list[Any], bytes | memoryview]:
    payload: bytes | memoryview = raw
    if codec is Codec.Q8:  # lossy: sent as asked (the sender has the receiver's consent)
        if name not in FLOAT_DTYPES:
            raise BadTensorError(f"q8 encodes float tensors only, not {name}")
        payload = encode_q8(raw, name)
        return [name, list(t.shape), int(codec), len(raw), len(payload)], payload
    if codec is not Codec.NONE:
        payload = _encode_payload(codec, raw, ITEMSIZE[name], zstd_level, name in FLOAT_DTYPES)
        if len(payload) >= len(raw):
            codec, payload = Codec.NONE, raw
    return [name, list(t.shape), int(codec), len(raw), len(payload)], payload


# Segments at most this large are never refused for their compression ratio.
RATIO_CHECK_BYTES = 64 * 1024


def parse_descriptor(desc: object, limits: Limits) -> SegmentInfo:
    """Validate one descriptor from a header against the limits, before any allocation."""
    if not isinstance(desc, list) or len(desc) != 5:
        raise BadTensorError(f"tensor descriptor must be a 5-element array, got {desc!r:.80}")
    name, shape, codec_id, raw_len, enc_len = desc
    if not isinstance(name, str) or name not in ITEMSIZE:
        raise BadTensorError(f"unknown tensor dtype {name!r:.40}")
    if not isinstance(shape, list) or len(shape) > limits.max_tensor_ndim:
        raise BadTensorError(
            f"tensor shape must be an array of at most {limits.max_tensor_ndim} dimensions, "
            f"got {shape!r:.80}"
        )
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise BadTensorError(f"tensor dimensions must be non-negative integers: {shape!r:.80}")
        numel *= dim
    if numel > limits.max_tensor_elements:
        raise TensorTooLargeError(
            f"tensor of shape {shape} has {numel} elements, limit is {limits.max_tensor_elements}"
        )
    codec = codec_for_id(codec_id)
    itemsize = ITEMSIZE[name]
    for label, value in (("raw length", raw_len), ("encoded length", enc_len)):
        if type(value) is not int or value < 0:
            raise BadTensorError(
                f"tensor {label} must be a non-negative integer, got {value!r:.40}"
            )
    if raw_len != numel * itemsize:
        raise BadTensorError(
            f"tensor raw length {raw_len} != {numel} elements x {itemsize} bytes ({name})"
        )
    if codec is Codec.NONE and enc_len != raw_len:
        raise BadTensorError(f"uncompressed tensor has encoded length {enc_len} != raw {raw_len}")
    if codec in LOSSY_CODECS:
        if not limits.accept_lossy:
            raise BadTensorError(
                f"lossy codec {codec.wire_name} refused: this link did not consent to it"
            )
        if name not in FLOAT_DTYPES or enc_len != q8_encoded_len(numel):
            raise BadTensorError(
                f"a q8 tensor is a float tensor of {q8_encoded_len(numel)} encoded bytes for "
                f"{numel} values, got {name} with {enc_len}"
            )
    ratio = limits.max_compression_ratio
    if ratio and raw_len > RATIO_CHECK_BYTES and raw_len > ratio * enc_len:
        raise DecompressionError(
            f"tensor of {raw_len} bytes encoded in {enc_len}: a compression ratio over "
            f"max_compression_ratio={ratio} is a bomb, not activations"
        )
    return SegmentInfo(name, tuple(shape), codec, raw_len, enc_len, itemsize)


def decode_tensor(info: SegmentInfo, payload: memoryview) -> torch.Tensor:
    """A new writable contiguous tensor from one segment payload (len(payload) == enc_len)."""
    name = info.dtype_name
    if info.raw_len == 0:
        if info.codec is Codec.Q8:
            decode_q8(payload, 0, info.itemsize, name)
        else:
            decode_payload(info.codec, payload, 0, info.itemsize)
        import torch

        return torch.empty(info.shape, dtype=torch_dtype(name))
    if info.codec is Codec.Q8:
        buf = decode_q8(payload, info.raw_len, info.itemsize, name)
    else:
        buf = decode_payload(info.codec, payload, info.raw_len, info.itemsize)
    if name == "bool" and np.frombuffer(buf, dtype=np.uint8).max() > 1:
        raise BadTensorError("bool tensor holds bytes other than 0x00 and 0x01")
    import torch

    tensor = torch.from_numpy(np.frombuffer(buf, dtype=NUMPY[name]).reshape(info.shape))
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor
