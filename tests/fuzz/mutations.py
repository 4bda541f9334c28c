"""What the fuzz campaign sends: a corpus of frames and datagrams, and the mutations of them.

`corpus` encodes one `Template` per message type (the tensor-carrying ones in every codec);
`Mutator` turns a template into a "soft" frame (well-formed, odd but well-typed field values and
tensors from `tensor_pool`) or a "hard" one (flipped bytes, lying lengths, bogus descriptors,
ill-typed headers, compression bombs, noise). `dht_corpus` and `dht_mutation` do the same for
DHT datagrams. Their randomness comes from the `random.Random` passed in (and fixed seeds).
"""

from __future__ import annotations

import collections
import random
import struct
from dataclasses import dataclass
from typing import Any

import lz4.block
import msgpack
import torch
import zstandard

from protocol import ALL_CODECS, CodecPolicy, encode_message_bytes
from protocol.frames import MAGIC, PREFIX, PREFIX_SIZE
from protocol.messages import (
    Ack,
    Backward,
    BackwardResult,
    Close,
    Error,
    Forward,
    ForwardResult,
    GetInfo,
    Hello,
    Info,
    Message,
    OpenSession,
    Ping,
    Pong,
    Push,
    SessionOpened,
    Step,
    StepResult,
    Truncate,
)
from tests.protocol.test_fuzz import ODD_VALUES, mutate_bytes, mutate_header

HIDDEN = 576
TENSOR_KEYS = {"hidden", "attention_mask", "position_ids", "grad_output", "grad_input"}
SOFT_INTS = [0, 1, 2, 3, 15, 16, 17, 29, 30, 31, -1, -(2**31), 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]  # fmt: skip
SOFT_FLOATS = [0.0, -0.0, 1e-300, 1e308, float("inf"), float("-inf"), float("nan"), -5.0, 3]
SOFT_STRS = ["", "x" * 4000, "\x00", "ünï\u202e", "ab" * 16, "0" * 32, "sha256:" + "0" * 64]
SOFT_STR_LISTS = [[], ["none"], ["zstd", "zstd"], ["x"] * 300, ["push"], [""]]
SOFT_DICT_LISTS = [
    [],
    [{}],
    [{"host": "", "port": 0, "peer_id": "", "token": ""}],
    [{"host": "127.0.0.1", "port": 1, "peer_id": "p", "token": "ab" * 16}] * 65,
    [{"host": "h" * 300, "port": 2**40, "peer_id": 5, "token": None}],
    [{"host": "127.0.0.1", "port": 9, "peer_id": "p" * 32, "token": "zz" * 16, "extra": [1]}],
]


def pack(value: Any) -> bytes:
    """msgpack bytes of value (bin for bytes, str for str)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# --- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One golden-ish frame, split so that its header can be changed and packed again."""

    name: str
    type: int
    header: bytes  # msgpack
    payload: bytes

    def frame(self, header: dict[str, Any] | None = None) -> bytes:
        packed = self.header if header is None else pack(header)
        return PREFIX.pack(MAGIC, 1, 0, len(packed), len(self.payload)) + packed + self.payload


def template(msg: Message, policy: CodecPolicy | None = None, name: str = "") -> Template:
    data = encode_message_bytes(msg, policy)
    _, _, _, header_len, _ = PREFIX.unpack_from(data)
    header = data[PREFIX_SIZE : PREFIX_SIZE + header_len]
    return Template(name or type(msg).__name__, msg.TYPE, header, data[PREFIX_SIZE + header_len :])


def corpus(fingerprint: str) -> list[Template]:
    """Every message type; the tensor-carrying ones in every codec. Spans are one block (0:1),
    so that the frames that do run cost little compute."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randint(-4, 4, (1, 2, HIDDEN), generator=gen).float()  # compressible
    mask = torch.ones(1, 2, dtype=torch.bool)
    pos = torch.arange(2)[None]
    hop = {"host": "127.0.0.1", "port": 9, "peer_id": "p" * 32, "token": "cd" * 16}
    msgs: list[Message] = [
        Hello(peer_id="fuzz", features=("push",)),
        Ping(0, 1),
        Pong(0, 1),
        GetInfo(1),
        Info(1, {"a": [1, None], "b": {"c": 1.5}}),
        Error(1, 205, "busy", True),
        Ack(1),
        OpenSession(1, fingerprint, 0, 1, 16),
        OpenSession(1, fingerprint, 0, 1, 16, batch_size=2, timeout_s=5.0, wait_s=0.2),
        OpenSession(1, fingerprint, 0, 1, 16, push_token="ab" * 16),
        SessionOpened(1, 0, 1, 16),
        Step(1, 1, 0, h, attention_mask=mask, position_ids=pos),
        Step(1, 2, 2, h[:, :1]),
        Step(1, 3, 0, h, next_hops=(hop,)),
        StepResult(1, 1, h, push_error="x"),
        Truncate(1, 1),
        Push(1, "ab" * 16, 1, 0, h, position_ids=pos, next_hops=(hop,)),
        Close(1),
        Forward(1, fingerprint, 0, 1, h),
        Forward(1, fingerprint, 0, 1, h, attention_mask=mask),
        ForwardResult(1, h),
        Backward(1, fingerprint, 0, 1, h, h),
        BackwardResult(1, h),
    ]
    out = []
    for msg in msgs:
        out.append(template(msg))
        if any(isinstance(getattr(msg, k, None), torch.Tensor) for k in TENSOR_KEYS):
            for codec in ALL_CODECS[1:]:
                out.append(template(msg, CodecPolicy(force=codec), f"{type(msg).__name__}/{codec}"))
    return out


def tensor_pool() -> list[tuple[list[Any], bytes]]:
    """Well-formed tensor segments of odd shapes, dtypes and values (for soft frames)."""
    tensors = [
        torch.zeros(1, 2, HIDDEN - 1),
        torch.zeros(2, 2, HIDDEN),
        torch.zeros(1, 0, HIDDEN),
        torch.zeros(0),
        torch.tensor(1.0),
        torch.zeros(1, 1, 1, HIDDEN),
        torch.zeros(1, 64, HIDDEN),
        torch.full((1, 2, HIDDEN), float("nan")),
        torch.full((1, 2, HIDDEN), float("inf")),
        torch.zeros(1, 2, HIDDEN, dtype=torch.float16),
        torch.zeros(1, 2, HIDDEN, dtype=torch.bfloat16),
        torch.zeros(1, 2, HIDDEN, dtype=torch.float64),
        torch.zeros(1, 2, HIDDEN, dtype=torch.int64),
        torch.ones(1, 2, HIDDEN, dtype=torch.bool),
        torch.ones(1, 2, dtype=torch.uint8),
        torch.zeros(1, 5, dtype=torch.bool),
        torch.full((1, 2), 2**62, dtype=torch.int64),
        torch.full((1, 2), -7, dtype=torch.int64),
    ]
    pool = []
    for t in tensors:
        frame = template(ForwardResult(1, t))
        header = msgpack.unpackb(frame.header)
        pool.append((header["tensors"][0], frame.payload))
    return pool


# --- mutations -------------------------------------------------------------------------------------


class Mutator:
    def __init__(self, rng: random.Random, templates: list[Template]) -> None:
        self.rng = rng
        self.templates = templates
        self.by_type = collections.defaultdict(list)
        for t in templates:
            self.by_type[t.type].append(t)
        self.frames = [t.frame() for t in templates]
        self.pool = tensor_pool()
        self.bombs = self._bombs()

    def _bombs(self) -> list[bytes]:
        """Forwards whose payload decodes to far more than it weighs, and lies about it."""
        zc = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=True)
        out = []
        for tokens in (4096, 16384, 32768, 1 << 17):
            raw = bytes(tokens * HIDDEN * 4)
            for codec, payload in (
                (2, zc.compress(raw)),
                (1, lz4.block.compress(raw, store_size=False)),
            ):
                desc = ["float32", [1, tokens, HIDDEN], codec, len(raw), len(payload)]
                out.append(self._forward(desc, payload))
        raw_len = 4096 * HIDDEN * 4
        small = zc.compress(bytes(1 << 16))
        out.append(self._forward(["float32", [1, 4096, HIDDEN], 2, raw_len, len(small)], small))
        out.append(self._forward(["float32", [1, 4096, HIDDEN], 1, raw_len, 64], bytes(64)))
        out.append(self._forward(["float32", [1, 4096, HIDDEN], 5, raw_len, 16], bytes(16)))
        return out

    def _forward(self, desc: list[Any], payload: bytes) -> bytes:
        header = msgpack.unpackb(self.by_type[Forward.TYPE][0].header)
        header["tensors"] = [desc]
        packed = pack(header)
        return PREFIX.pack(MAGIC, 1, 0, len(packed), len(payload)) + packed + payload

    def soft(self, t: Template, sid: int) -> bytes:
        """A well-formed frame of t's type with odd, well-typed field values."""
        rng = self.rng
        header = msgpack.unpackb(t.header)
        header["stream_id"] = sid
        payload = t.payload
        roll = rng.random()
        keys = [
            k for k in header if k not in ("type", "stream_id", "tensors") and k not in TENSOR_KEYS
        ]
        if t.type == Hello.TYPE:
            keys = [k for k in keys if k != "protocol_version"]
        if roll < 0.45 and keys:
            key = rng.choice(keys)
            header[key] = self._same_kind(header[key])
        elif roll < 0.55:
            header[rng.choice(["zz", "future_field", "tensorz"])] = rng.choice(ODD_VALUES)
        elif roll < 0.6:
            header["type"] = rng.choice([0, 8, 9, 17, 24, 99, 1000, 2**32 - 1])
        elif roll < 0.75 and "tensors" in header:
            index = rng.randrange(len(header["tensors"]))
            desc, seg = rng.choice(self.pool)
            segments = _segments(header["tensors"], payload)
            segments[index] = seg
            header["tensors"][index] = desc
            payload = b"".join(segments)
        packed = pack(header)
        return PREFIX.pack(MAGIC, 1, 0, len(packed), len(payload)) + packed + payload

    def _same_kind(self, value: Any) -> Any:
        rng = self.rng
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return rng.choice([*SOFT_INTS, value + 1, value - 1, rng.randrange(64)])
        if isinstance(value, float):
            return rng.choice(SOFT_FLOATS)
        if isinstance(value, str):
            return rng.choice(SOFT_STRS)
        if isinstance(value, list) and (not value or isinstance(value[0], str)):
            return rng.choice(SOFT_STR_LISTS)
        if isinstance(value, list):
            return rng.choice(SOFT_DICT_LISTS)
        if isinstance(value, dict):
            return rng.choice([{}, {"x": [None] * 100}, {"a": {"b": {"c": {}}}}])
        return value

    def hard(self, t: Template) -> bytes:
        """A broken frame: bytes, lengths, descriptors, header types, bombs or plain noise."""
        rng = self.rng
        frame = t.frame()
        kind = rng.randrange(9)
        if kind == 0:
            return mutate_bytes(rng, frame, self.frames)
        if kind == 1:
            return mutate_header(rng, frame)
        if kind == 2:
            header = msgpack.unpackb(t.header)
            if header.get("tensors"):
                desc = rng.choice(header["tensors"])
                i = rng.randrange(5)
                choices: list[list[Any]] = [  # dtype, shape, codec, raw_len, enc_len
                    ["float8", "", 5, None, "FLOAT32", "float32 "],
                    [[-1], [2**40, 2**40], [1] * 9, "x", [1.5], [2**64 - 1], [None]],
                    [6, 255, -1, 2**32, "zstd", None, 1.0],
                    [-1, 2**63, 0, desc[3] + 1, desc[3] - 1, "4"],
                    [-1, 2**63, 0, desc[4] + 1, desc[4] - 1, [1]],
                ]
                bogus = choices[i]
                desc[i] = rng.choice(bogus)
            else:
                header[rng.choice(["type", "stream_id"])] = rng.choice(ODD_VALUES)
            return t.frame(header)
        if kind == 3:  # the prefix lies
            data = bytearray(frame)
            offset, fmt, values = rng.choice(
                [
                    (4, "<H", [0, 2, 0xFFFF]),
                    (6, "<H", [1, 0x8000, 0xFFFF]),
                    (8, "<I", [0, 1, len(t.header) - 1, len(t.header) + 1, 2**16, 2**32 - 1]),
                    (
                        12,
                        "<I",
                        [0, len(t.payload) + 1, max(0, len(t.payload) - 1), 2**28, 2**32 - 1],
                    ),
                ]
            )
            struct.pack_into(fmt, data, offset, rng.choice(values))
            return bytes(data)
        if kind == 4:
            return rng.choice(self.bombs)
        if kind == 5:  # a header that is not a map, or a map of the wrong shape
            value = rng.choice([[12, 1], 7, "Step", None, {1: 2}, {"type": [12]}, {"tensors": 1}])
            packed = pack(value)
            return PREFIX.pack(MAGIC, 1, 0, len(packed), 0) + packed
        if kind == 6:
            return frame[: rng.randrange(PREFIX_SIZE + 1)] + rng.randbytes(rng.randrange(400))
        if kind == 7:
            return rng.randbytes(rng.randrange(1, 3000))
        other = rng.choice(self.templates)  # a frame cut inside, then another frame
        return frame[: rng.randrange(1, len(frame))] + other.frame()


def _segments(descs: list[list[Any]], payload: bytes) -> list[bytes]:
    out, pos = [], 0
    for d in descs:
        out.append(payload[pos : pos + d[4]])
        pos += d[4]
    return out


# --- DHT datagrams ---------------------------------------------------------------------------------


def dht_corpus(rng: random.Random) -> list[bytes]:
    """Valid-looking requests of every RPC (a signed entry among them) and replies."""
    from tests.dht.golden import ENTRY, KEY

    entry = ENTRY.to_wire()
    bodies: list[Any] = []
    for node in (b"", rng.randbytes(20)):
        bodies += [
            ["ping", [node]],
            ["find_node", [node, rng.randbytes(20)]],
            ["find_value", [node, KEY]],
            ["find_value", [node, KEY, "m" * 32]],
            ["store", [node, KEY, entry]],
            ["store", [node, rng.randbytes(20), entry]],
        ]
    out = [b"\x00" + rng.randbytes(20) + pack(b) for b in bodies]
    out.append(b"\x01" + rng.randbytes(20) + pack([b"x" * 20]))
    return out


def dht_mutation(rng: random.Random, corpus_: list[bytes]) -> bytes:
    base = rng.choice(corpus_)
    roll = rng.random()
    if roll < 0.4:
        return mutate_bytes(rng, base, corpus_)
    if roll < 0.7:
        body = msgpack.unpackb(base[21:], raw=False)
        if isinstance(body, list) and len(body) == 2 and isinstance(body[1], list):
            args = body[1]
            if args and rng.random() < 0.7:
                args[rng.randrange(len(args))] = rng.choice([*ODD_VALUES, b"", b"\x00" * 21])
            else:
                body[1] = rng.choice([[], args * 3, "x", None, [args]])
            if rng.random() < 0.2:
                body[0] = rng.choice(["PING", "", "store ", "rpc_ping", 1, None])
        return base[:21] + pack(body)
    if roll < 0.8:  # deep nesting and big containers
        depth = rng.choice([10, 100, 1000, 5000])
        nested = b"\x91" * depth + b"\xc0"
        return b"\x00" + rng.randbytes(20) + rng.choice([nested, b"\xdc\xff\xff" + b"\x00" * 65535])
    if roll < 0.9:
        return rng.choice([b"", b"\x00", b"\x01", b"\x02"]) + rng.randbytes(rng.randrange(600))
    return b"\x00" + rng.randbytes(20) + rng.randbytes(rng.randrange(1, 1400))
