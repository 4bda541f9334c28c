"""Truncated, oversized, corrupted and bomb frames raise the right error without over-allocating."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import lz4.block
import msgpack
import pytest
import torch
import zstandard

from protocol import (
    PROTOCOL_VERSION,
    BadMagicError,
    BadTensorError,
    CodecPolicy,
    DecompressionError,
    ForwardResult,
    FrameDecoder,
    FrameTooLargeError,
    HeaderTooLargeError,
    Limits,
    MalformedHeaderError,
    ProtocolError,
    StreamStateError,
    StreamTable,
    TensorTooLargeError,
    TooManyStreamsError,
    TooManyTensorsError,
    TruncatedFrameError,
    UnknownCodecError,
    UnsupportedVersionError,
    encode_message_bytes,
)
from protocol.frames import MAGIC, PREFIX

MiB = 1 << 20


def frame(
    header: dict[str, object],
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
) -> bytes:
    packed = msgpack.packb(header)
    return PREFIX.pack(magic, version, flags, len(packed), len(payload)) + packed + payload


def tensor_frame(desc: list[object], payload: bytes) -> bytes:
    return frame({"type": 21, "stream_id": 1, "hidden": 0, "tensors": [desc]}, payload)


def decode(data: bytes, limits: Limits | None = None) -> object:
    dec = FrameDecoder(limits)
    dec.feed(data)
    return dec.next_message()


def peak_alloc(fn: Callable[[], object]) -> int:
    """Peak bytes the Python allocator handed out while fn ran (fn's exception is swallowed)."""
    tracemalloc.start()
    try:
        fn()
    except ProtocolError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_bad_magic_is_caught_at_the_first_wrong_byte() -> None:
    dec = FrameDecoder()
    dec.feed(b"BE")
    with pytest.raises(BadMagicError, match=r"expected magic b'BEED'"):
        dec.feed(b"X")


def test_http_request_is_bad_magic() -> None:
    with pytest.raises(BadMagicError):
        decode(b"GET / HTTP/1.1\r\n\r\n")


def test_unsupported_version() -> None:
    with pytest.raises(UnsupportedVersionError, match="frame has protocol version 9"):
        decode(frame({"type": 7, "stream_id": 1}, version=9))


def test_reserved_flags() -> None:
    with pytest.raises(MalformedHeaderError, match="reserved flag bits"):
        decode(frame({"type": 7, "stream_id": 1}, flags=1))


def test_errors_are_sticky() -> None:
    dec = FrameDecoder()
    with pytest.raises(BadMagicError):
        dec.feed(b"NOPE")
    with pytest.raises(BadMagicError):
        dec.next_frame()
    with pytest.raises(BadMagicError):
        dec.feed(encode_message_bytes(ForwardResult(1, torch.zeros(1))))


def test_oversized_frame_is_refused_from_its_prefix_alone() -> None:
    prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 10, 3 * 1024 * MiB)
    dec = FrameDecoder()
    dec.feed(prefix)
    with pytest.raises(FrameTooLargeError, match=r"exceeds max_frame_bytes=268435456"):
        dec.next_frame()


def test_oversized_header_is_refused_from_its_prefix_alone() -> None:
    dec = FrameDecoder(Limits(max_header_bytes=100))
    dec.feed(PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 101, 0))
    with pytest.raises(HeaderTooLargeError, match="header of 101 bytes exceeds"):
        dec.next_frame()


def test_truncated_frame_waits_then_fails_at_eof() -> None:
    data = encode_message_bytes(ForwardResult(1, torch.zeros(100)))
    dec = FrameDecoder()
    dec.feed(data[:-1])
    assert dec.next_frame() is None
    with pytest.raises(TruncatedFrameError, match="connection closed inside a frame"):
        dec.feed_eof()


def test_clean_eof_is_fine() -> None:
    dec = FrameDecoder()
    dec.feed(encode_message_bytes(ForwardResult(1, torch.zeros(3))))
    assert dec.next_frame() is not None
    dec.feed_eof()


@pytest.mark.parametrize(
    ("header_bytes", "match"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"type": 7, "stream_id": 1}) + b"\x00", "not valid msgpack"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
        (msgpack.packb({"type": 7}), "'stream_id' must be an integer"),
        (msgpack.packb({"type": 7, "stream_id": 1, "tensors": 5}), "'tensors' must be an array"),
    ],
)
def test_malformed_headers(header_bytes: bytes, match: str) -> None:
    data = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header_bytes), 0) + header_bytes
    with pytest.raises(MalformedHeaderError, match=match):
        decode(data)


@pytest.mark.parametrize(
    ("desc", "payload", "error", "match"),
    [
        (["float8", [1], 0, 1, 1], b"\0", BadTensorError, "unknown tensor dtype"),
        (["float32", [2], 0, 4, 4], b"\0" * 4, BadTensorError, "raw length 4 != 2 elements"),
        (["float32", [-1], 0, 0, 0], b"", BadTensorError, "non-negative integers"),
        (["float32", [1.5], 0, 4, 4], b"\0" * 4, BadTensorError, "non-negative integers"),
        (["float32", [1], 0, 4, 4], b"\0" * 5, BadTensorError, "add up to 4"),
        (["float32", [1], 0, 4, 3], b"\0" * 3, BadTensorError, "encoded length 3 != raw 4"),
        (["float32", [1], 0, 4], b"\0" * 4, BadTensorError, "5-element array"),
        (["bool", [2], 0, 2, 2], b"\x01\x02", BadTensorError, "other than 0x00 and 0x01"),
        (["uint8", [1] * 9, 0, 1, 1], b"\0", BadTensorError, "at most 8 dimensions"),
        (["uint8", [4], 9, 4, 4], b"\0" * 4, UnknownCodecError, "unknown codec id 9"),
        (["uint8", [1 << 40], 0, 1 << 40, 1], b"\0", TensorTooLargeError, "elements, limit"),
    ],
)
def test_bad_tensor_descriptors(
    desc: list[object], payload: bytes, error: type[ProtocolError], match: str
) -> None:
    with pytest.raises(error, match=match):
        decode(tensor_frame(desc, payload))


def test_too_many_tensors() -> None:
    descs = [["uint8", [0], 0, 0, 0]] * 17
    data = frame({"type": 21, "stream_id": 1, "hidden": 0, "tensors": descs})
    with pytest.raises(TooManyTensorsError, match="17 tensor segments"):
        decode(data)


def test_decompressed_total_is_limited_before_payload_arrives() -> None:
    limits = Limits(max_decompressed_bytes=1000)
    desc = ["uint8", [1001], 2, 1001, 10]
    data = tensor_frame(desc, b"\0" * 10)
    dec = FrameDecoder(limits)
    dec.feed(data[:-10])  # header only: the payload is not even here yet
    with pytest.raises(TensorTooLargeError, match="decompress to 1001 bytes"):
        dec.next_frame()


# --- decompression bombs and lying raw lengths ----------------------------------------------------

BOMB_RAW = 200 * MiB
ZSTD_BOMB = zstandard.ZstdCompressor(level=3).compress(bytes(BOMB_RAW))
ZSTD_BOMB_NO_SIZE = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(
    bytes(8 * MiB)
)


@pytest.mark.parametrize("codec", [2, 4])
def test_zstd_bomb_with_declared_size_is_refused_before_allocating(codec: int) -> None:
    data = tensor_frame(["uint8", [1000], codec, 1000, len(ZSTD_BOMB)], ZSTD_BOMB)
    with pytest.raises(DecompressionError, match="declares content size 209715200"):
        decode(data)
    assert peak_alloc(lambda: decode(data)) < 2 * len(data) + 1 * MiB


def test_zstd_bomb_without_declared_size_is_refused() -> None:
    payload = ZSTD_BOMB_NO_SIZE
    data = tensor_frame(["uint8", [1000], 2, 1000, len(payload)], payload)
    with pytest.raises(DecompressionError, match="declares content size -1"):
        decode(data)
    assert peak_alloc(lambda: decode(data)) < 2 * len(data) + 1 * MiB


def test_zstd_trailing_bytes_are_refused() -> None:
    payload = zstandard.ZstdCompressor().compress(b"abcd") + b"junk"
    with pytest.raises(DecompressionError, match="bytes after its frame"):
        decode(tensor_frame(["uint8", [4], 2, 4, len(payload)], payload))


def test_lz4_lying_raw_length_is_refused() -> None:
    payload = lz4.block.compress(bytes(4096), store_size=False)
    for raw_len in (100, 8192):
        with pytest.raises(DecompressionError):
            decode(tensor_frame(["uint8", [raw_len], 1, raw_len, len(payload)], payload))
    huge = 50 * MiB
    data = tensor_frame(["uint8", [huge], 1, huge, len(payload)], payload)
    with pytest.raises(DecompressionError, match="cannot expand to raw length"):
        decode(data)
    assert peak_alloc(lambda: decode(data)) < 1 * MiB


def test_planes_lying_lengths_are_refused() -> None:
    plane = zstandard.ZstdCompressor().compress(bytes(64))
    table = (64).to_bytes(4, "little") + len(plane).to_bytes(4, "little")
    good = table + bytes(64) + plane
    assert decode(tensor_frame(["int16", [64], 5, 128, len(good)], good)) is not None
    bad_sum = (64).to_bytes(4, "little") + (99).to_bytes(4, "little") + bytes(64) + plane
    with pytest.raises(DecompressionError, match="do not add up"):
        decode(tensor_frame(["int16", [64], 5, 128, len(bad_sum)], bad_sum))
    with pytest.raises(DecompressionError, match="plane 0 is 64 bytes, more than 32"):
        decode(tensor_frame(["int16", [32], 5, 64, len(good)], good))


def test_corrupted_compressed_payload() -> None:
    t = torch.arange(4096, dtype=torch.int32)
    data = bytearray(encode_message_bytes(ForwardResult(1, t), CodecPolicy(force="zstd")))
    data[-20] ^= 0xFF  # inside the compressed blocks: the zstd content checksum catches it
    with pytest.raises(DecompressionError):
        decode(bytes(data))


def test_no_allocation_beyond_frame_limit_for_a_huge_announcement() -> None:
    limits = Limits(max_frame_bytes=1 * MiB)
    prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 10, 0xFFFFFFFF)
    assert peak_alloc(lambda: decode(prefix + b"\0" * 100, limits)) < 64 * 1024


# --- streams ----------------------------------------------------------------------------------------


def test_stream_table() -> None:
    table = StreamTable(max_streams=2)
    table.open(1)
    table.open(3)
    with pytest.raises(StreamStateError, match="already open"):
        table.open(1)
    with pytest.raises(TooManyStreamsError, match="max_streams_per_connection=2") as info:
        table.open(5)
    assert info.value.retryable and info.value.code == 115
    assert table.close(1) and not table.close(1)
    table.open(5)
    assert table.ids() == {3, 5} and len(table) == 2
    with pytest.raises(StreamStateError):
        table.open(0)


def test_limits_reject_negative_values() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Limits(max_frame_bytes=-1)


# --- sans-I/O ---------------------------------------------------------------------------------------


def test_import_protocol_pulls_in_no_asyncio_and_no_socket() -> None:
    code = (
        "import sys, protocol\n"
        "bad = sorted(m for m in ('asyncio', 'socket', 'selectors', 'ssl') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_frame_followed_by_garbage_in_one_read_is_returned_before_the_error() -> None:
    from protocol import FrameDecoder, encode_message_bytes
    from protocol.errors import BadMagicError
    from protocol.messages import Ping

    decoder = FrameDecoder()
    decoder.feed(encode_message_bytes(Ping(0, 7)) + b"GET ")
    msg = decoder.next_message()
    assert isinstance(msg, Ping) and msg.nonce == 7
    with pytest.raises(BadMagicError):
        decoder.next_message()
