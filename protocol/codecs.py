"""Lossless tensor codecs (none, lz4, zstd, byte-shuffled variants) and the per-tensor codec choice."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import lz4.block
import numpy as np
import zstandard

from protocol.dtypes import wire_name
from protocol.errors import DecompressionError, UnknownCodecError

if TYPE_CHECKING:
    import torch


class Codec(IntEnum):
    """Codec ids as they travel in tensor descriptors (docs/protocol.md, "Codecs")."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2
    SHUFFLE_LZ4 = 3
    SHUFFLE_ZSTD = 4
    PLANES_ZSTD = 5
    Q8 = 6  # lossy: blocks of 32 values as int8 with a float16 scale (only with consent)

    @property
    def wire_name(self) -> str:
        return _NAMES[self]

    @classmethod
    def from_name(cls, name: str) -> Codec:
        try:
            return _BY_NAME[name]
        except KeyError:
            raise UnknownCodecError(f"unknown codec name {name!r}") from None


_NAMES: dict[Codec, str] = {
    Codec.NONE: "none",
    Codec.LZ4: "lz4",
    Codec.ZSTD: "zstd",
    Codec.SHUFFLE_LZ4: "shuffle-lz4",
    Codec.SHUFFLE_ZSTD: "shuffle-zstd",
    Codec.PLANES_ZSTD: "planes-zstd",
    Codec.Q8: "q8",
}
_BY_NAME: dict[str, Codec] = {name: codec for codec, name in _NAMES.items()}
_BY_ID: dict[int, Codec] = {int(c): c for c in Codec}
LOSSY_CODECS: frozenset[Codec] = frozenset({Codec.Q8})
# The lossless codecs: what Hellos and records offer and the cost model chooses among.
ALL_CODECS: tuple[str, ...] = tuple(_NAMES[c] for c in Codec if c not in LOSSY_CODECS)
Q8_BLOCK = 32

# An lz4 block cannot expand data more than ~255x; a larger claim is a lie (docs/protocol.md).
_LZ4_MAX_RATIO = 255
_ZSTD_MAGIC = 0xFD2FB528
_local = threading.local()


def codec_for_id(codec_id: int) -> Codec:
    """The Codec for a wire id; raises UnknownCodecError."""
    try:
        return _BY_ID[codec_id]
    except (KeyError, TypeError):
        raise UnknownCodecError(f"unknown codec id {codec_id!r}") from None


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=True
        )
    return comp


def _plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd tuned for byte planes of low entropy (float exponents): long minimum matches and a
    small hash table make it mostly a Huffman coder; about 25% faster than level 1, same ratio."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zp", None)
    if cache is None:
        cache = _local.zp = {}
    comp = cache.get(level)
    if comp is None:
        params = zstandard.ZstdCompressionParameters(
            compression_level=level,
            window_log=17,
            hash_log=12,
            chain_log=6,
            search_log=1,
            min_match=7,
            strategy=zstandard.STRATEGY_FAST,
            write_content_size=1,
            write_checksum=1,
        )
        comp = cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if dec is None:
        dec = _local.zd = zstandard.ZstdDecompressor()
    return dec


# --- byte shuffle ---------------------------------------------------------------------------------


def shuffle(raw: memoryview, itemsize: int) -> np.ndarray:
    """Byte planes of `raw`: out[p * n + i] = raw[i * itemsize + p], n = len(raw) // itemsize."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if itemsize == 1:
        return a
    n = a.size // itemsize
    if itemsize == 2:  # shifts beat a transposed copy for 2-byte elements (bf16, fp16)
        words = a.view(np.uint16)
        out = np.empty(a.size, dtype=np.uint8)
        out[:n] = words  # low bytes (assignment truncates)
        out[n:] = words >> 8
        return out
    return np.ascontiguousarray(a.reshape(n, itemsize).T).reshape(-1)


def _interleave(planes: list[np.ndarray], out: bytearray, itemsize: int) -> None:
    """Write byte planes back as elements: out[i * itemsize + p] = planes[p][i]."""
    if itemsize == 1:
        np.frombuffer(out, dtype=np.uint8)[:] = planes[0]
    elif itemsize == 2:
        words = np.frombuffer(out, dtype=np.uint16)
        np.copyto(words, planes[0], casting="unsafe")
        high = planes[1].astype(np.uint16)
        high <<= 8
        words |= high
    else:
        columns = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
        for p, plane in enumerate(planes):
            columns[:, p] = plane


def unshuffle_into(planes: memoryview | bytes | np.ndarray, out: bytearray, itemsize: int) -> None:
    """Inverse of shuffle, written into `out` (len(out) == len(planes))."""
    src = np.frombuffer(planes, dtype=np.uint8)
    _interleave(list(src.reshape(itemsize, -1)), out, itemsize)


# --- zstd frame checks ----------------------------------------------------------------------------


def _zstd_frame_length(buf: memoryview) -> int:
    """Bytes taken by the one zstd frame at the start of buf; raises DecompressionError."""
    if len(buf) < 6 or int.from_bytes(buf[:4], "little") != _ZSTD_MAGIC:
        raise DecompressionError("zstd payload does not start with a zstd frame magic number")
    try:
        pos = zstandard.frame_header_size(buf)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"bad zstd frame header: {exc}") from None
    checksum = (buf[4] >> 2) & 1
    while True:
        if pos + 3 > len(buf):
            raise DecompressionError("zstd frame truncated inside a block header")
        bh = int.from_bytes(buf[pos : pos + 3], "little")
        pos += 3
        block_type = (bh >> 1) & 3
        if block_type == 3:
            raise DecompressionError("zstd frame uses the reserved block type")
        pos += 1 if block_type == 1 else bh >> 3
        if bh & 1:
            break
    pos += 4 * checksum
    if pos > len(buf):
        raise DecompressionError("zstd frame truncated inside a block")
    return pos


def _zstd_decompress(buf: memoryview, raw_len: int) -> bytes:
    if _zstd_frame_length(buf) != len(buf):
        raise DecompressionError("zstd payload has bytes after its frame")
    try:
        size = zstandard.frame_content_size(buf)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"bad zstd frame header: {exc}") from None
    if size != raw_len:
        raise DecompressionError(
            f"zstd frame declares content size {size}, descriptor says raw length {raw_len}"
        )
    try:
        out = _decompressor().decompress(buf)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"corrupt zstd payload: {exc}") from None
    if len(out) != raw_len:
        raise DecompressionError(f"zstd payload decompressed to {len(out)} bytes, not {raw_len}")
    return out


def _lz4_decompress(buf: memoryview, raw_len: int) -> bytes:
    if raw_len > _LZ4_MAX_RATIO * len(buf) + 16:
        raise DecompressionError(
            f"lz4 payload of {len(buf)} bytes cannot expand to raw length {raw_len}"
        )
    if raw_len == 0:
        if len(buf) != 0:
            raise DecompressionError("lz4 payload for an empty tensor must be empty")
        return b""
    try:
        out: bytes = lz4.block.decompress(buf, uncompressed_size=raw_len)
    except lz4.block.LZ4BlockError as exc:
        raise DecompressionError(f"corrupt lz4 payload or wrong raw length: {exc}") from None
    if len(out) != raw_len:
        raise DecompressionError(f"lz4 payload decompressed to {len(out)} bytes, not {raw_len}")
    return out


# --- encode / decode ------------------------------------------------------------------------------


def encode_payload(
    codec: Codec, raw: memoryview, itemsize: int, zstd_level: int = 1, float_planes: bool = True
) -> bytes | memoryview:
    """Encode raw element bytes with codec; the caller falls back to NONE if it is not smaller.

    For PLANES_ZSTD, float_planes=True compresses only the top byte plane (sign and exponent of
    floats) and stores the others raw; False tries every plane. Decoders accept any mix.
    """
    if codec is Codec.NONE:
        return raw
    if codec is Codec.LZ4:
        return bytes(lz4.block.compress(raw, store_size=False)) if len(raw) else b""
    if codec is Codec.ZSTD:
        return bytes(_compressor(zstd_level).compress(raw))
    planes = shuffle(raw, itemsize)
    if codec is Codec.SHUFFLE_LZ4:
        return bytes(lz4.block.compress(planes, store_size=False)) if len(raw) else b""
    if codec is Codec.SHUFFLE_ZSTD:
        return bytes(_compressor(zstd_level).compress(planes.data))
    if codec is Codec.PLANES_ZSTD:
        return _encode_planes(planes, itemsize, zstd_level, float_planes)
    raise UnknownCodecError(f"codec {codec!r} has no encoder")  # pragma: no cover


# --- q8 (lossy) -----------------------------------------------------------------------------------
# distributed-llama's Q80 layout: the values in blocks of Q8_BLOCK, each block one float16 scale
# (its largest magnitude / 127, rounded up so no value passes 127) and one int8 per value. The
# payload is all scales (little-endian float16), then all int8 values: 2 * ceil(n / 32) + n bytes.
# Each value comes back within scale / 2 of what was sent, before rounding to its dtype; the
# scale exceeds largest / 127 by at most 2^-10 of it, or by 2^-24 where float16 is subnormal.


def q8_encoded_len(numel: int) -> int:
    return 2 * -(-numel // Q8_BLOCK) + numel


def _as_float32(raw: memoryview | bytes | bytearray, dtype_name: str) -> np.ndarray:
    if dtype_name == "float32":
        return np.frombuffer(raw, dtype="<f4")
    if dtype_name == "float16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype_name == "bfloat16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    raise UnknownCodecError(f"q8 encodes float tensors only, not {dtype_name}")


def _from_float32(values: np.ndarray, dtype_name: str) -> bytes:
    if dtype_name == "float32":
        return values.astype("<f4").tobytes()
    if dtype_name == "float16":
        return values.astype("<f2").tobytes()
    bits = values.astype(np.float32).view(np.uint32)  # bfloat16: round to nearest even
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def encode_q8(raw: memoryview | bytes, dtype_name: str) -> bytes:
    values = _as_float32(raw, dtype_name)
    if not np.isfinite(values).all():
        raise UnknownCodecError("q8 cannot encode inf or nan")
    n = values.size
    flat = np.zeros(-(-n // Q8_BLOCK) * Q8_BLOCK, dtype=np.float32)
    flat[:n] = values
    blocks = flat.reshape(-1, Q8_BLOCK)
    wanted = np.abs(blocks).max(axis=1) / 127.0
    scales = wanted.astype(np.float16)
    low = scales.astype(np.float32) < wanted
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    safe = np.where(scales > 0, scales.astype(np.float32), 1.0)
    codes = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return bytes(scales.astype("<f2").tobytes() + codes.reshape(-1)[:n].tobytes())


def decode_q8(buf: memoryview, raw_len: int, itemsize: int, dtype_name: str) -> bytearray:
    n = raw_len // itemsize
    count = -(-n // Q8_BLOCK)
    if len(buf) != q8_encoded_len(n):
        raise DecompressionError(
            f"q8 payload is {len(buf)} bytes, {n} values need {q8_encoded_len(n)}"
        )
    scales = np.frombuffer(buf[: 2 * count], dtype="<f2").astype(np.float32)
    if not np.isfinite(scales).all():
        raise DecompressionError("q8 scales must be finite")
    codes = np.zeros(count * Q8_BLOCK, dtype=np.float32)
    codes[:n] = np.frombuffer(buf[2 * count :], dtype=np.int8)
    values = (codes.reshape(count, Q8_BLOCK) * scales[:, None]).reshape(-1)[:n]
    return bytearray(_from_float32(values, dtype_name))


def _encode_planes(planes: np.ndarray, itemsize: int, level: int, top_only: bool) -> bytes:
    n = planes.size // itemsize
    rows = planes.reshape(itemsize, n)
    parts: list[bytes | memoryview] = []
    lengths: list[int] = []
    comp = _plane_compressor(level)
    for p in range(itemsize):
        row = rows[p].data
        if n and (not top_only or p == itemsize - 1):
            packed = comp.compress(row)
            if len(packed) < n:
                parts.append(packed)
                lengths.append(len(packed))
                continue
        parts.append(row)
        lengths.append(n)
    table = b"".join(x.to_bytes(4, "little") for x in lengths)
    return b"".join([table, *parts])


def decode_payload(codec: Codec, buf: memoryview, raw_len: int, itemsize: int) -> bytearray:
    """Decode one segment payload into a new writable buffer of exactly raw_len bytes."""
    if codec is Codec.NONE:
        if len(buf) != raw_len:
            raise DecompressionError(
                f"uncompressed payload is {len(buf)} bytes, descriptor says {raw_len}"
            )
        return bytearray(buf)
    if codec is Codec.LZ4:
        return bytearray(_lz4_decompress(buf, raw_len))
    if codec is Codec.ZSTD:
        return bytearray(_zstd_decompress(buf, raw_len))
    out = bytearray(raw_len)
    if codec is Codec.SHUFFLE_LZ4:
        unshuffle_into(_lz4_decompress(buf, raw_len), out, itemsize)
    elif codec is Codec.SHUFFLE_ZSTD:
        unshuffle_into(_zstd_decompress(buf, raw_len), out, itemsize)
    elif codec is Codec.PLANES_ZSTD:
        _decode_planes_into(buf, out, itemsize)
    else:  # pragma: no cover
        raise UnknownCodecError(f"codec {codec!r} has no decoder")
    return out


def _decode_planes_into(buf: memoryview, out: bytearray, itemsize: int) -> None:
    n = len(out) // itemsize
    table_len = 4 * itemsize
    if len(buf) < table_len:
        raise DecompressionError("planes-zstd payload shorter than its plane table")
    lengths = [int.from_bytes(buf[4 * p : 4 * p + 4], "little") for p in range(itemsize)]
    if table_len + sum(lengths) != len(buf):
        raise DecompressionError(
            f"planes-zstd plane lengths {lengths} do not add up to the payload ({len(buf)} bytes)"
        )
    planes: list[np.ndarray] = []
    pos = table_len
    for p, length in enumerate(lengths):
        chunk = buf[pos : pos + length]
        pos += length
        if length > n:
            raise DecompressionError(f"planes-zstd plane {p} is {length} bytes, more than {n}")
        plane = chunk if length == n else _zstd_decompress(chunk, n)
        planes.append(np.frombuffer(plane, dtype=np.uint8))
    _interleave(planes, out, itemsize)


# --- codec choice ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodecEstimate:
    """What a codec does to one dtype on the reference machine (docs/performance.md)."""

    ratio: float  # raw bytes / encoded bytes
    encode_bytes_per_s: float  # raw bytes encoded per second
    decode_bytes_per_s: float  # raw bytes decoded per second


# Measured by bench/codecs.py on SmolLM2-135M activations (docs/performance.md, "Codecs"): the
# worse of the 32- and 512-token prefills, rounded down. Other (dtype, codec) pairs are never chosen.
ESTIMATES: dict[tuple[str, Codec], CodecEstimate] = {
    ("bfloat16", Codec.PLANES_ZSTD): CodecEstimate(1.44, 500e6, 600e6),
    ("float16", Codec.PLANES_ZSTD): CodecEstimate(1.15, 740e6, 660e6),
    ("float32", Codec.PLANES_ZSTD): CodecEstimate(1.18, 870e6, 1060e6),
    ("bfloat16", Codec.SHUFFLE_ZSTD): CodecEstimate(1.25, 520e6, 370e6),
    ("bfloat16", Codec.ZSTD): CodecEstimate(1.25, 720e6, 540e6),
    ("float16", Codec.ZSTD): CodecEstimate(1.07, 710e6, 670e6),
    ("float32", Codec.ZSTD): CodecEstimate(1.07, 890e6, 890e6),
}


@dataclass(frozen=True, slots=True)
class CodecPolicy:
    """How a sender picks codecs for one link; the default never compresses (loopback-safe)."""

    # Codec names both peers accept (the negotiated intersection from Hello).
    allowed: frozenset[str] = frozenset(ALL_CODECS)
    # Measured bandwidth of the link in bytes per second; None = unknown or fast: send raw.
    link_bytes_per_s: float | None = None
    # Tensors smaller than this are always sent raw (per-call overhead beats any gain).
    min_compress_bytes: int = 16 * 1024
    # Codec CPU time is assumed this much slower than the estimates (load, slower machines).
    cpu_margin: float = 0.5
    # A codec must save at least this fraction of the raw end-to-end time to be chosen.
    min_gain: float = 0.05
    # zstd level for the zstd-based codecs (encoder-side only; decoders accept any level).
    zstd_level: int = 1
    # Use this codec for every tensor regardless of cost (tests, benchmarks); None = cost model.
    force: str | None = None
    # Per-(dtype, codec) estimates used by the cost model.
    estimates: dict[tuple[str, Codec], CodecEstimate] = field(
        default_factory=lambda: dict(ESTIMATES), hash=False, compare=False
    )
    # Memo of the choice per dtype: both costs are linear in the size, so above
    # min_compress_bytes the best codec depends only on the dtype and this policy.
    _choices: dict[str, Codec] = field(default_factory=dict, hash=False, compare=False, repr=False)


def estimated_seconds(
    nbytes: int, est: CodecEstimate | None, link_bytes_per_s: float, cpu_margin: float = 0.0
) -> float:
    """End-to-end time of one tensor: encode + transfer + decode (raw when est is None)."""
    if est is None:
        return nbytes / link_bytes_per_s
    cpu = nbytes / est.encode_bytes_per_s + nbytes / est.decode_bytes_per_s
    return cpu * (1.0 + cpu_margin) + nbytes / est.ratio / link_bytes_per_s


def choose_codec(tensor: torch.Tensor, policy: CodecPolicy, dtype_name: str | None = None) -> Codec:
    """The codec with the least estimated end-to-end time for this tensor on this link.

    NONE unless the link speed is known, the tensor has at least min_compress_bytes, and a
    negotiated codec is estimated to save at least min_gain of the raw time.
    """
    if policy.force is not None:
        return Codec.from_name(policy.force)
    bw = policy.link_bytes_per_s
    if bw is None or bw <= 0:
        return Codec.NONE
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < policy.min_compress_bytes:
        return Codec.NONE
    if dtype_name is None:
        dtype_name = wire_name(tensor.dtype)
        if dtype_name is None:
            return Codec.NONE
    choice = policy._choices.get(dtype_name)
    if choice is None:
        choice = policy._choices[dtype_name] = _best_codec(dtype_name, policy, bw)
    return choice


def _best_codec(dtype_name: str, policy: CodecPolicy, bw: float) -> Codec:
    best = Codec.NONE
    best_s = estimated_seconds(1, None, bw) * (1.0 - policy.min_gain)
    for name in sorted(policy.allowed):
        codec = _BY_NAME.get(name)
        est = policy.estimates.get((dtype_name, codec)) if codec is not None else None
        if codec is None or est is None:
            continue
        seconds = estimated_seconds(1, est, bw, policy.cpu_margin)
        if seconds < best_s:
            best, best_s = codec, seconds
    return best
