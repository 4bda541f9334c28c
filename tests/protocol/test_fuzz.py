"""Fuzz: random and mutated frames make the decoder raise only ProtocolError subclasses."""

from __future__ import annotations

import random
import struct
import time

import msgpack
import torch

from protocol import (
    ALL_CODECS,
    CodecPolicy,
    ForwardResult,
    FrameDecoder,
    Limits,
    ProtocolError,
    encode_message_bytes,
)
from protocol.frames import MAGIC, PREFIX, PREFIX_SIZE
from tests.protocol.test_messages import EXAMPLES

CASES = 24_000
LIMITS = Limits(
    max_frame_bytes=1 << 20, max_decompressed_bytes=1 << 20, max_tensor_elements=1 << 18
)
ODD_VALUES: list[object] = [
    None, -1, 0, 1, 2**32, 2**64 - 1, -(2**63), 1.5, float("nan"), True, "", "x" * 300,
    b"\x00\xff", [], [0], [[0]], {}, {"a": 1}, ["float32", [1], 0, 4, 4],
]  # fmt: skip


def corpus() -> list[bytes]:
    frames = [encode_message_bytes(m) for m in EXAMPLES]
    gen = torch.Generator().manual_seed(1)
    for codec in ALL_CODECS:
        for dtype in (torch.bfloat16, torch.float32, torch.int64, torch.bool):
            t = (torch.randn(4, 40, generator=gen) * 4).to(dtype)
            frames.append(encode_message_bytes(ForwardResult(1, t), CodecPolicy(force=codec)))
    return frames


def mutate_header(rng: random.Random, frame: bytes) -> bytes:
    _, version, flags, header_len, payload_len = PREFIX.unpack_from(frame)
    header = msgpack.unpackb(frame[PREFIX_SIZE : PREFIX_SIZE + header_len])
    payload = frame[PREFIX_SIZE + header_len :]
    key = rng.choice([*header.keys(), "tensors", "new_key"])
    roll = rng.random()
    if roll < 0.2:
        header.pop(key, None)
    elif key == "tensors" and header.get("tensors") and roll < 0.7:
        desc = rng.choice(header["tensors"])
        i = rng.randrange(5)
        desc[i] = rng.choice([*ODD_VALUES, desc[i] + 1 if isinstance(desc[i], int) else 0])
    else:
        header[key] = rng.choice(ODD_VALUES)
    packed = msgpack.packb(header)
    return PREFIX.pack(MAGIC, version, flags, len(packed), payload_len) + packed + payload


def mutate_bytes(rng: random.Random, frame: bytes, frames: list[bytes]) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # bit flip
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # random byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:  # delete a run
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 5:  # overwrite a prefix length field
            field = rng.choice([8, 12])
            if len(data) >= field + 4:
                value = rng.choice([0, 1, len(data), 2**31, 2**32 - 1, rng.randrange(2**16)])
                struct.pack_into("<I", data, field, value)
        else:  # splice with another frame
            other = rng.choice(frames)
            data[pos:] = other[rng.randrange(len(other) + 1) :]
    return bytes(data)


def run_decoder(rng: random.Random, data: bytes) -> None:
    dec = FrameDecoder(LIMITS)
    try:
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 64, 4096, len(data)])
            dec.feed(data[pos : pos + step])
            pos += step
            while dec.next_message() is not None:
                pass
        dec.feed_eof()
    except ProtocolError:
        pass


def test_fuzz_decoder_raises_only_protocol_errors() -> None:
    rng = random.Random(20240601)
    frames = corpus()
    started = time.monotonic()
    for case in range(CASES):
        kind = case % 4
        frame = rng.choice(frames)
        if kind == 0:
            data = mutate_bytes(rng, frame, frames)
        elif kind == 1:
            data = mutate_header(rng, frame)
        elif kind == 2:  # valid prefix, random rest
            data = frame[: rng.randrange(PREFIX_SIZE + 1)] + rng.randbytes(rng.randrange(200))
        else:  # several frames back to back, one of them mutated
            data = b"".join(rng.sample(frames, 3)) + mutate_bytes(rng, frame, frames)
        try:
            run_decoder(rng, data)
        except Exception as exc:
            msg = f"case {case}: {type(exc).__name__}: {exc}\ndata={data.hex()}"
            raise AssertionError(msg) from exc
    assert time.monotonic() - started < 60
