"""Fuzz campaign against live daemons: 100,000+ random and mutated frames at a `beed serve`, and
100,000+ random and mutated datagrams at a `beed bootstrap` and the server's DHT port.

Afterwards both daemons are alive, the server's RSS stayed within its idle size + 1 GiB, it
still answers GetInfo, a real client still generates the text it generated before, and neither
daemon logged a traceback. Frames go out without waiting for answers (a reader per connection
drains them); every connection carries a burst of well-formed frames whose fields hold odd but
well-typed values ("soft": the connection must stay up, checked with a Ping), then at most one
broken frame ("hard": flipped bytes, truncations, lying lengths, bogus codecs/dtypes/shapes,
ill-typed fields, bombs) and a half-close, and the next connection starts.

Run: `.venv/bin/python -m pytest -m slow tests/fuzz -o log_cli=true --log-cli-level=INFO`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import pytest
import torch
import zstandard

from beectl.local_swarm import Daemon, LocalSwarm
from protocol import ALL_CODECS, CodecPolicy, FrameDecoder, encode_message_bytes
from protocol.frames import MAGIC, PREFIX, PREFIX_SIZE, EncodedFrame
from protocol.limits import Limits
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
from tests.conftest import STORY, peers_of
from tests.protocol.test_fuzz import ODD_VALUES, mutate_bytes, mutate_header
from tests.swarm.test_sessions import info

log = logging.getLogger(__name__)

FRAMES = 100_000
DATAGRAMS_PER_TARGET = 55_000
DATAGRAMS_PER_S = 2_500  # per target: a little over the DHT's global request budget (2,000/s)
WORKERS = 24  # connections at once
SOURCES = [f"127.0.0.{i}" for i in range(2, 255)]  # loopback peers (per-address caps)
HIDDEN = 576
GiB = 1 << 30
MARK = 0xF0F0  # Ping nonce after a connection's soft frames
OPENERS = {GetInfo.TYPE, OpenSession.TYPE, Forward.TYPE, Backward.TYPE}
ON_SESSION = {Step.TYPE, Truncate.TYPE, Close.TYPE}
TENSOR_KEYS = {"hidden", "attention_mask", "position_ids", "grad_output", "grad_input"}
READ_LIMITS = Limits(max_frame_bytes=1 << 30, max_decompressed_bytes=1 << 30)
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


# --- the TCP campaign ------------------------------------------------------------------------------


@dataclass
class Findings:
    """What the campaign saw; `examples` keeps the frames behind anything worth a look."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))

    def example(self, what: str, frames: list[bytes]) -> None:
        if len(self.examples[what]) < 5:
            self.examples[what].append(" | ".join(f.hex() for f in frames))


async def drain(reader: asyncio.StreamReader, findings: Findings) -> list[EncodedFrame]:
    """Everything the server sends until it closes the connection."""
    decoder = FrameDecoder(READ_LIMITS)
    got = []
    try:
        while data := await reader.read(1 << 20):
            decoder.feed(data)
            while (enc := decoder.next_encoded()) is not None:
                got.append(enc)
    except ConnectionResetError:
        findings.counts["reset"] += 1
    except Exception as exc:  # a frame from the server our decoder refuses
        findings.counts[f"bad answer {type(exc).__name__}"] += 1
    return got


async def one_connection(
    host: str, port: int, source: str, mutator: Mutator, findings: Findings
) -> int:
    """Open, send a burst, half-close, read to the end; returns the fuzz frames it carried."""
    rng = mutator.rng
    soft: list[tuple[int, bytes]] = []  # (stream id, frame)
    sid, sessions = 0, []
    hard: bytes | None = None
    first_hard = rng.random() < 0.08
    if first_hard:
        hard = mutator.hard(rng.choice(mutator.by_type[Hello.TYPE] + mutator.templates[:8]))
    else:
        for _ in range(rng.randrange(50)):
            t = rng.choice(mutator.templates)
            if t.type in OPENERS:
                sid += 1
                use = sid
                if t.type == OpenSession.TYPE:
                    sessions.append(sid)
            elif t.type in ON_SESSION and sessions and rng.random() < 0.7:
                use = rng.choice(sessions)
            else:
                use = rng.randrange(1, 2**32)
            soft.append((use, mutator.soft(t, use)))
        if rng.random() < 0.9:
            hard = mutator.hard(rng.choice(mutator.templates))
    frames = [f for _, f in soft] + ([hard] if hard is not None else [])
    head = [] if first_hard else [encode_message_bytes(Hello(peer_id="fuzz"))]
    marker = [] if first_hard else [encode_message_bytes(Ping(0, MARK))]
    data = b"".join([*head, *frames[: len(soft)], *marker, *([hard] if hard else [])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        findings.counts["connect failed"] += 1
        return 0
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        reading = asyncio.ensure_future(drain(reader, findings))
        try:
            if rng.random() < 0.03:  # trickled: the server reads the frames in small pieces
                cut = min(len(data), 3000)
                for i in range(0, cut, 7):
                    writer.write(data[i : min(i + 7, cut)])
                    await writer.drain()
                data = data[cut:]
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        except OSError:
            findings.counts["write failed (closed early)"] += 1
        try:
            got = await asyncio.wait_for(reading, 20)
        except TimeoutError:
            findings.counts["stalled (no close within 20 s of our EOF)"] += 1
            findings.example("stalled", frames)
            return len(frames)
    finally:
        writer.transport.abort()
    findings.counts["connections"] += 1
    by_stream = {s: f for s, f in soft}
    for enc in got:
        if enc.type == Error.TYPE:
            code = enc.header.get("code")
            findings.counts[f"E{code}"] += 1
            if code == 299:
                culprit = by_stream.get(enc.stream_id)
                findings.example("299 InternalServerError", [culprit] if culprit else frames)
        elif enc.type == Pong.TYPE and enc.header.get("nonce") == MARK:
            findings.counts["soft bursts answered"] += 1
    if not first_hard and not any(
        e.type == Pong.TYPE and e.header.get("nonce") == MARK for e in got
    ):
        codes = [e.header.get("code") for e in got if e.type == Error.TYPE and e.stream_id == 0]
        if codes == [101] and hard is not None and not hard.startswith(MAGIC):
            # protocol/frames.py checks the magic of the bytes after a complete frame before
            # returning that frame: the Ping just before the broken frame is dropped with it.
            findings.counts["Ping dropped with the bad-magic frame after it"] += 1
            findings.example("Ping dropped (101 raised early)", [*frames[len(soft) :]])
        else:
            findings.counts["soft burst not answered"] += 1
            findings.example(f"soft burst not answered (stream-0 errors {codes})", frames)
    return len(frames)


async def tcp_campaign(host: str, port: int, server: Daemon, findings: Findings, fp: str) -> int:
    mutator = Mutator(random.Random(20250601), corpus(fp))
    sent = 0
    index = 0

    async def worker() -> None:
        nonlocal sent, index
        while sent < FRAMES and server.process is not None and server.process.poll() is None:
            index += 1
            n = await one_connection(host, port, SOURCES[index % len(SOURCES)], mutator, findings)
            sent += n

    async with asyncio.TaskGroup() as tg:
        for _ in range(WORKERS):
            tg.create_task(worker())
    return sent


# --- the DHT campaign ------------------------------------------------------------------------------


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


async def dht_campaign(targets: list[tuple[str, int]], findings: Findings) -> int:
    rng = random.Random(77)
    corpus_ = dht_corpus(rng)
    socks = []
    for src in SOURCES:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    sent = 0
    try:
        began = time.monotonic()
        while sent < DATAGRAMS_PER_TARGET * len(targets):
            for _ in range(100):
                data = dht_mutation(rng, corpus_) if rng.random() < 0.8 else rng.choice(corpus_)
                s = socks[sent % len(socks)]
                for target in targets:
                    try:
                        s.sendto(data[:65507], target)
                    except BlockingIOError:
                        findings.counts["udp send blocked"] += 1
                    sent += 1
            for s in socks[: len(socks) // 8]:
                while True:
                    try:
                        s.recv(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    findings.counts["udp replies (some sources)"] += 1
            ahead = sent / (DATAGRAMS_PER_S * len(targets)) - (time.monotonic() - began)
            await asyncio.sleep(max(0.0, ahead))
    finally:
        for s in socks:
            s.close()
    return sent


def dht_answers(target: tuple[str, int]) -> bool:
    """Whether the DHT node at target answers a ping (from 127.0.0.1, client mode)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        for _ in range(3):  # the node may be shedding load: a few tries
            s.sendto(b"\x00" + random.randbytes(20) + pack(["ping", [b""]]), target)
            try:
                if s.recv(4096)[:1] == b"\x01":
                    return True
            except TimeoutError:
                continue
    return False


# --- health -----------------------------------------------------------------------------------------


class RssPeak:
    """Peak VmRSS of some processes, sampled every 50 ms on a thread."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.pids = {d.name: d.process.pid for d in daemons if d.process is not None}
        self.idle = {name: rss(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss(pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss(pid: int) -> int:
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def generate_text(swarm: LocalSwarm, tokenizer: Any) -> list[int]:
    from beectl import AutoDistributedModelForCausalLM

    ids = tokenizer(STORY, return_tensors="pt").input_ids
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm)
    ) as model:
        out = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    return [int(x) for x in out[0, ids.shape[1] :].tolist()]


def tracebacks(daemons: list[Daemon]) -> dict[str, str]:
    found = {}
    for d in daemons:
        text = d.log_path.read_text(errors="replace")
        if "Traceback" in text:
            at = text.index("Traceback")
            found[d.name] = text[max(0, at - 600) : at + 3000]
    return found


def assert_healthy(swarm: LocalSwarm, peaks: RssPeak, reference: list[int], tokenizer: Any) -> None:
    daemons = [*swarm.servers, *([swarm.bootstrap] if swarm.bootstrap else [])]
    for d in daemons:
        assert d.process is not None and d.process.poll() is None, f"{d.name} died:\n{d.tail(40)}"
    for name, peak in peaks.peak.items():
        assert peak <= peaks.idle[name] + GiB, (name, peaks.idle[name], peak)
    current = asyncio.run(info(swarm.servers[0]))
    assert current["span_start"] == 0 and current["span_end"] == 30, current
    assert generate_text(swarm, tokenizer) == reference
    assert not tracebacks(daemons), tracebacks(daemons)


@pytest.fixture(scope="module")
def campaign_swarm() -> Iterator[LocalSwarm]:
    with LocalSwarm(num_servers=1) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def reference(campaign_swarm: LocalSwarm, tokenizer: Any) -> list[int]:
    return generate_text(campaign_swarm, tokenizer)


def log_events(daemons: list[Daemon]) -> dict[str, collections.Counter[str]]:
    """WARNING/ERROR lines of each daemon's log, by event name."""
    found = {}
    for d in daemons:
        text = d.log_path.read_text(errors="replace")
        found[d.name] = collections.Counter(
            m.group(1) for m in re.finditer(r" (?:WARNING|ERROR|CRITICAL) [\w.]+: (\S+)", text)
        )
    return found


def report(what: str, sent: int, seconds: float, findings: Findings, peaks: RssPeak) -> None:
    log.info("%s: %d sent in %.0f s; %s", what, sent, seconds, dict(findings.counts))
    log.info("rss idle %s peak %s", peaks.idle, peaks.peak)
    for kind, frames in findings.examples.items():
        for hexes in frames:
            log.info("example %s: %s", kind, hexes[:600])


@pytest.mark.slow
def test_frames_campaign(campaign_swarm: LocalSwarm, reference: list[int], tokenizer: Any) -> None:
    server = campaign_swarm.servers[0]
    host, port = server.address
    fingerprint = server.ready_line.split()[server.ready_line.split().index("fingerprint") + 1]
    findings = Findings()
    with RssPeak([server]) as peaks:
        began = time.monotonic()
        sent = asyncio.run(tcp_campaign(host, port, server, findings, fingerprint))
        seconds = time.monotonic() - began
    report("frames", sent, seconds, findings, peaks)
    log.info("daemon log warnings: %s", log_events(campaign_swarm.servers))
    assert sent >= FRAMES
    assert not findings.examples.get("299 InternalServerError"), findings.examples
    # Well-formed frames (odd values, right kinds) are answered and the connection stays.
    assert not findings.counts["soft burst not answered"], findings.examples
    assert_healthy(campaign_swarm, peaks, reference, tokenizer)


@pytest.mark.slow
def test_datagrams_campaign(
    campaign_swarm: LocalSwarm, reference: list[int], tokenizer: Any
) -> None:
    server, bootstrap = campaign_swarm.servers[0], campaign_swarm.bootstrap
    assert bootstrap is not None
    targets = [campaign_swarm.initial_peers[0], server.address]  # the server's DHT: its TCP port
    for target in targets:
        assert dht_answers(target), f"no DHT node answers at UDP {target}"
    findings = Findings()
    with RssPeak([server, bootstrap]) as peaks:
        began = time.monotonic()
        sent = asyncio.run(dht_campaign(targets, findings))
        seconds = time.monotonic() - began
    report("datagrams", sent, seconds, findings, peaks)
    log.info("daemon log warnings: %s", log_events([server, bootstrap]))
    assert sent >= 100_000
    for target in targets:
        assert dht_answers(target), f"the DHT node at UDP {target} stopped answering"
    assert_healthy(campaign_swarm, peaks, reference, tokenizer)
