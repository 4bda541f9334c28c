"""Hostile-peer benchmark: an honest client's decode speed and the server's memory under attacks.

    python bench/hostile.py                                  # every attack, 15 s each
    python bench/hostile.py --attacks bomb,udp --seconds 10 --json /tmp/hostile.json

One bootstrap and one server holding all 30 blocks of smollm2-135m run on 127.0.0.1. The honest
client (beectl's Python API, greedy, a 10-token prompt, --new-tokens new tokens, one session per
generation) connects from 127.0.0.1 and generates again and again. Each attack runs in its own
subprocess, niced (on a real network the attacker's CPU is not the server's), from its own range
of source addresses in 127.0.0.2-254 (the server sees as many peers), while the honest client
generates for --seconds:

  bomb      compression bombs: Step/Forward/Backward frames whose zstd, lz4, shuffle-zstd or
            planes-zstd payload of zeros is a few KB but decodes to 2 x max_request_tokens rows,
            and lies (a zstd frame declaring another size, a corrupt one, lz4 past its ratio, a
            frame over the decode limit), sent back to back on 8 connections
  forward   Forward requests of max_request_tokens rows x tokens (1024 x 16 and 16 x 1024), two
            in flight on each of 2 connections; one of max_request_tokens + 1 (expect 209)
  backward  Backward requests of max_backward_tokens (1 x 2048 and 64 x 32), two in flight on
            each of 2 connections; one over the limit (expect 209)
  sessions  one address opens sessions of --max-session-length tokens on 2 connections as fast
            as they are answered (expect 208), and steps each once so it keeps its cache
  idle      --idle-connections connections from 20 addresses: half a Hello, a Hello trickled a
            byte a second, a Hello and nothing, or a Hello then a frame prefix announcing a
            37 MB Forward whose payload trickles; each is reopened when the server closes it
  udp       a datagram flood at the server's DHT port from 16 addresses: random ping, store,
            find_node and find_value requests (valid framing, random ids and entries) and garbage
  slowloris 8 connections with a 4 KB receive buffer open a session, then pipeline one-token
            steps, Pings and GetInfos and never read an answer

Per row: the honest decode tok/s (tokens after each generation's first, over their time), its
ratio to the baseline (the mean of two rows without an attack, first and last, in the same run:
the machine is shared and its speed drifts), whether its tokens equal the first generation's,
the server's RSS just before the attack (idle) and its peak during it and until the server is
idle again (VmRSS every 50 ms), the attack's own counters (frames sent, answers by error code)
and the server's (GetInfo). Target: tok/s >= 0.5x baseline and RSS peak <= idle + 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import numpy as np
import zstandard

from protocol.frames import MAGIC, PREFIX, EncodedFrame, FrameDecoder, encode_message_bytes
from protocol.limits import Limits
from protocol.messages import (
    MESSAGE_TYPES,
    Backward,
    Error,
    Forward,
    GetInfo,
    Hello,
    Info,
    OpenSession,
    Ping,
    SessionOpened,
    Step,
)

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
HIDDEN = 576  # smollm2-135m
ATTACKS = ["bomb", "forward", "backward", "sessions", "idle", "udp", "slowloris"]
SOURCES_PER_ATTACK = 30  # attack i uses 127.0.0.(2 + 30 i) ... (31 + 30 i)
MiB = 1 << 20
RSS_TARGET_BYTES = 1 << 30
RATIO_TARGET = 0.5
HELLO = encode_message_bytes(Hello(software_version="hostile/1", peer_id=""))
TYPE_NAMES = {t: cls.__name__ for t, cls in MESSAGE_TYPES.items()}
SCRIPT = Path(__file__).resolve()
READ_LIMITS = Limits(max_frame_bytes=1 << 30, max_decompressed_bytes=1 << 30)


def pack(value: Any) -> bytes:
    """msgpack bytes of value (bin for bytes, str for str)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# --- the attacker side (runs in `--worker NAME` subprocesses) ------------------------------------


@dataclass
class Ctx:
    """What an attack knows of its target, and its counters."""

    host: str
    port: int
    dht_port: int
    fingerprint: str
    span: tuple[int, int]
    sources: list[str]
    max_request_tokens: int
    max_backward_tokens: int
    max_session_length: int
    idle_connections: int
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    notes: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def source(self, i: int) -> str:
        return self.sources[i % len(self.sources)]

    def ready(self) -> None:
        print("READY", flush=True)


def frame(header: dict[str, Any], payloads: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    """One frame: prefix, msgpack header, the payloads as they are (lies included)."""
    packed = pack(header)
    body = b"".join(payloads)
    return PREFIX.pack(MAGIC, 1, 0, len(packed), len(body)) + packed + body


def desc(shape: tuple[int, ...], codec: int, enc_len: int, dtype: str = "float32") -> list[Any]:
    itemsize = {"float32": 4, "bool": 1, "int64": 8}[dtype]
    return [dtype, list(shape), codec, int(np.prod(shape)) * itemsize, enc_len]


def request(
    msg_type: int, sid: int, fields: dict[str, Any], tensors: list[tuple[list[Any], bytes]]
) -> bytes:
    header: dict[str, Any] = {"type": msg_type, "stream_id": sid, **fields}
    if tensors:
        header["tensors"] = [d for d, _ in tensors]
    return frame(header, [p for _, p in tensors])


def span_fields(ctx: Ctx) -> dict[str, Any]:
    return {
        "model_fingerprint": ctx.fingerprint,
        "span_start": ctx.span[0],
        "span_end": ctx.span[1],
    }


def random_floats(count: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).standard_normal(count, dtype=np.float32).tobytes()


class Conn:
    """One attacker connection from a chosen source address. Unless `read=False`, a reader task
    counts what the server sends (by message type and error code) and calls `on_message`."""

    def __init__(
        self,
        ctx: Ctx,
        source: str,
        on_message: Callable[[EncodedFrame], None] | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.source = source
        self.on_message = on_message
        self.rcvbuf = rcvbuf
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = FrameDecoder(READ_LIMITS)
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self, hello: bool = True, read: bool = True) -> bool:
        counts = self.ctx.counts
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        try:
            sock.bind((self.source, 0))
            async with asyncio.timeout(10):
                await asyncio.get_running_loop().sock_connect(sock, (self.ctx.host, self.ctx.port))
                self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=MiB)
                if hello:
                    self.writer.write(HELLO)
                    first = await self.read_one()
                    if first is None or first.type != Hello.TYPE:
                        counts["hello refused"] += 1
                        self._abort()
                        return False
        except (OSError, TimeoutError):
            counts["connect failed"] += 1
            sock.close()
            return False
        counts["connections opened"] += 1
        if read:
            self._task = asyncio.create_task(self._read_loop())
        return True

    async def read_one(self) -> EncodedFrame | None:
        """The next frame (its header; tensors are not decoded), or None at EOF."""
        assert self.reader is not None
        while True:
            enc = self.decoder.next_encoded()
            if enc is not None:
                self._note(enc)
                return enc
            data = await self.reader.read(MiB)
            if not data:
                return None
            self.decoder.feed(data)

    def _note(self, enc: EncodedFrame) -> None:
        if enc.type == Error.TYPE:
            self.ctx.counts[f"E{enc.header.get('code')}"] += 1
        else:
            self.ctx.counts[TYPE_NAMES.get(enc.type, f"type {enc.type}")] += 1
        if self.on_message is not None:
            self.on_message(enc)

    async def _read_loop(self) -> None:
        try:
            while await self.read_one() is not None:
                pass
        except (OSError, ValueError):
            pass
        except Exception as exc:  # the decoder's errors: the server broke the protocol
            self.ctx.counts[f"bad reply {type(exc).__name__}"] += 1
        finally:
            if not self._closing:
                self.ctx.counts["closed by server"] += 1
            self.closed.set()

    async def send(self, data: bytes) -> bool:
        """Write data and wait until the kernel took it; False once the connection is gone."""
        if self.writer is None or self.closed.is_set():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError):
            if not self.closed.is_set():
                self.ctx.counts["reset by server"] += 1
            self.closed.set()
            return False
        self.ctx.counts["frames sent"] += 1
        self.ctx.counts["bytes sent"] += len(data)
        return True

    def _abort(self) -> None:
        self._closing = True
        if self.writer is not None:
            self.writer.transport.abort()

    async def aclose(self) -> None:
        self._abort()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])


async def reconnecting(
    ctx: Ctx, source: str, body: Callable[[Conn], Any], **conn_args: Any
) -> None:
    """Run body(conn) on a fresh connection again and again (the server closes them)."""
    while True:
        conn = Conn(ctx, source, **conn_args)
        try:
            if await conn.open():
                await body(conn)
        finally:
            await conn.aclose()
        await asyncio.sleep(0.05)


# (a) compression bombs


def bomb_variants(ctx: Ctx) -> list[tuple[str, int, Callable[[int], bytes]]]:
    """(name, weight, frame for a stream id): valid bombs, and lies that close the connection."""
    tokens = 2 * ctx.max_request_tokens  # refused (209) after decoding, never computed
    shape = (1, tokens, HIDDEN)
    raw = bytes(tokens * HIDDEN * 4)
    zc = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
    z = zc.compress(raw)
    lz = lz4.block.compress(raw, store_size=False)
    n = tokens * HIDDEN
    plane = zc.compress(bytes(n))
    planes = struct.pack("<4I", *[len(plane)] * 4) + plane * 4
    half = (1, ctx.max_request_tokens, HIDDEN)
    zhalf = zc.compress(bytes(ctx.max_request_tokens * HIDDEN * 4))
    wrong_size = zc.compress(bytes(MiB))  # declares 1 MiB for a 75 MB tensor
    corrupt = bytearray(z)
    corrupt[len(z) // 2] ^= 0xFF
    del raw
    fp = span_fields(ctx)

    def step(codec: int, payload: bytes) -> Callable[[int], bytes]:
        fields = {"step_id": 1, "position": 0, "hidden": 0}
        # No session on stream 1: decoded, then 201.
        return lambda sid: request(
            Step.TYPE, 1, fields, [(desc(shape, codec, len(payload)), payload)]
        )

    def forward(codec: int, payload: bytes, shp: tuple[int, ...] = shape) -> Callable[[int], bytes]:
        return lambda sid: request(
            Forward.TYPE, sid, {**fp, "hidden": 0}, [(desc(shp, codec, len(payload)), payload)]
        )

    def backward(sid: int) -> bytes:
        tensors = [(desc(half, 2, len(zhalf)), zhalf)] * 2
        return request(Backward.TYPE, sid, {**fp, "hidden": 0, "grad_output": 1}, tensors)

    over = (1, 4 * tokens, HIDDEN)  # past the connection's decode limit: 113, closed
    return [
        ("step zstd", 4, step(2, z)),
        ("step planes-zstd", 4, step(5, planes)),
        ("forward zstd", 4, forward(2, z)),
        ("forward lz4", 4, forward(1, lz)),
        ("forward shuffle-zstd", 4, forward(4, z)),
        ("backward zstd", 4, backward),
        ("lie: zstd declares 1 MiB", 1, forward(2, wrong_size)),
        ("lie: zstd corrupt", 1, forward(2, bytes(corrupt))),
        ("lie: lz4 past 255x", 1, forward(1, lz[: len(lz) // 4])),
        ("lie: over decode limit", 1, forward(2, z, over)),
    ]


async def attack_bomb(ctx: Ctx) -> None:
    variants = bomb_variants(ctx)
    weights = [w for _, w, _ in variants]

    async def body(conn: Conn) -> None:
        sid = 0
        while True:
            name, _, build = ctx.rng.choices(variants, weights)[0]
            sid = sid % (1 << 30) + 1
            if not await conn.send(build(sid)):
                return
            ctx.counts[f"sent {name}"] += 1

    ctx.ready()
    async with asyncio.TaskGroup() as tg:
        for i in range(8):
            tg.create_task(reconnecting(ctx, ctx.source(i), body))


# (b) huge Forward, (c) Backward flood


async def windowed(
    ctx: Ctx, source: str, frames: Callable[[int], bytes], first: bytes | None, window: int
) -> None:
    """Keep `window` requests in flight on one connection (answers open the window again)."""
    slots = asyncio.Semaphore(window)

    def on_message(enc: EncodedFrame) -> None:
        if enc.stream_id != 0 and enc.type != SessionOpened.TYPE:
            slots.release()

    async def body(conn: Conn) -> None:
        nonlocal slots
        slots = asyncio.Semaphore(window)
        sid = 1
        if first is not None and await conn.send(first):  # the over-limit one: expect 209
            await asyncio.sleep(1.0)
        while not conn.closed.is_set():
            await slots.acquire()
            sid = sid % (1 << 30) + 1
            if not await conn.send(frames(sid)):
                return

    await reconnecting(ctx, source, body, on_message=on_message)


async def attack_forward(ctx: Ctx) -> None:
    n = ctx.max_request_tokens
    fp = span_fields(ctx)
    shapes = [(n // 16, 16, HIDDEN), (16, n // 16, HIDDEN)]
    payload = random_floats(n * HIDDEN)

    def make(shape: tuple[int, ...]) -> Callable[[int], bytes]:
        d = desc(shape, 0, len(payload))
        return lambda sid: request(Forward.TYPE, sid, {**fp, "hidden": 0}, [(d, payload)])

    over_shape = (1, n + 1, HIDDEN)
    over_payload = bytes((n + 1) * HIDDEN * 4)
    over = request(
        Forward.TYPE,
        1,
        {**fp, "hidden": 0},
        [(desc(over_shape, 0, len(over_payload)), over_payload)],
    )
    ctx.ready()
    async with asyncio.TaskGroup() as tg:
        for i, shape in enumerate(shapes):
            tg.create_task(windowed(ctx, ctx.source(i), make(shape), over if i == 0 else None, 2))


async def attack_backward(ctx: Ctx) -> None:
    n = ctx.max_backward_tokens
    fp = span_fields(ctx)
    shapes = [(1, n, HIDDEN), (max(1, n // 32), 32, HIDDEN)]
    hidden = random_floats(n * HIDDEN, 1)
    grad = random_floats(n * HIDDEN, 2)

    def make(shape: tuple[int, ...], h: bytes, g: bytes) -> Callable[[int], bytes]:
        fields = {**fp, "hidden": 0, "grad_output": 1}
        tensors = [(desc(shape, 0, len(h)), h), (desc(shape, 0, len(g)), g)]
        return lambda sid: request(Backward.TYPE, sid, fields, tensors)

    over_shape = (1, n + 1, HIDDEN)
    big = bytes((n + 1) * HIDDEN * 4)
    over = make(over_shape, big, big)(1)
    ctx.ready()
    async with asyncio.TaskGroup() as tg:
        for i, shape in enumerate(shapes):
            count = int(np.prod(shape))
            frames = make(shape, hidden[: count * 4], grad[: count * 4])
            tg.create_task(windowed(ctx, ctx.source(i), frames, over if i == 0 else None, 2))


# (d) session grabbing


async def attack_sessions(ctx: Ctx) -> None:
    source = ctx.sources[0]  # one address: its quota is what is tested
    one = bytes(HIDDEN * 4)

    async def connection(index: int) -> None:
        retry: asyncio.Queue[int] = asyncio.Queue()
        conn: Conn | None = None

        def on_message(enc: EncodedFrame) -> None:
            sid = enc.stream_id
            if enc.type == SessionOpened.TYPE and conn is not None and conn.writer is not None:
                step = {"step_id": 1, "position": 0, "hidden": 0}
                conn.writer.write(
                    request(Step.TYPE, sid, step, [(desc((1, 1, HIDDEN), 0, len(one)), one)])
                )
                ctx.counts["frames sent"] += 1
            elif enc.type == Error.TYPE and sid != 0:
                retry.put_nowait(sid)

        async def body(c: Conn) -> None:
            nonlocal conn
            conn = c
            while not retry.empty():
                retry.get_nowait()
            for sid in range(1, 129):
                retry.put_nowait(sid)
            while not c.closed.is_set():
                sid = await retry.get()
                msg = OpenSession(
                    sid, ctx.fingerprint, ctx.span[0], ctx.span[1], ctx.max_session_length
                )
                if not await c.send(encode_message_bytes(msg)):
                    return
                if ctx.counts["E208"] + ctx.counts["E205"] > 0:
                    await asyncio.sleep(0.05)  # past the quota: keep knocking, not spinning

        await reconnecting(ctx, source, body, on_message=on_message)

    ctx.ready()
    async with asyncio.TaskGroup() as tg:
        for i in range(2):
            tg.create_task(connection(i))


# (e) idle and half-sent connections


async def attack_idle(ctx: Ctx) -> None:
    modes = ["half hello", "hello trickle", "hello then nothing", "frame trickle"]
    fp = span_fields(ctx)
    shape = (1, ctx.max_request_tokens, HIDDEN)
    n = int(np.prod(shape)) * 4
    header = {
        "type": Forward.TYPE,
        "stream_id": 1,
        **fp,
        "hidden": 0,
        "tensors": [desc(shape, 0, n)],
    }
    prefix = bytearray(frame(header))
    struct.pack_into("<I", prefix, 12, n)  # the prefix announces the 37 MB payload
    opened = asyncio.Event()

    async def one(i: int) -> None:
        mode = modes[i % len(modes)]
        source = ctx.source(i % 20)
        await asyncio.sleep(i * 0.004)
        while True:
            conn = Conn(ctx, source)
            began = time.monotonic()
            try:
                if await conn.open(hello=mode in ("hello then nothing", "frame trickle")):
                    if ctx.counts["connections opened"] >= ctx.idle_connections:
                        opened.set()
                    if mode == "half hello":
                        await conn.send(HELLO[: len(HELLO) // 2])
                    elif mode == "frame trickle":
                        await conn.send(bytes(prefix))
                    data = HELLO if mode == "hello trickle" else bytes(64)
                    pos = 0
                    while not conn.closed.is_set():
                        if mode in ("hello trickle", "frame trickle") and pos < len(data):
                            await conn.send(data[pos : pos + 1])
                            pos += 1
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(conn.closed.wait(), 1.0)
                    ctx.notes[f"{mode}: s until closed"].append(time.monotonic() - began)
            finally:
                await conn.aclose()
            await asyncio.sleep(0.1)

    async with asyncio.TaskGroup() as tg:
        for i in range(ctx.idle_connections):
            tg.create_task(one(i))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), 20)
        ctx.ready()


# (f) UDP flood at the DHT port


def dht_datagram(rng: random.Random) -> bytes:
    """One request datagram as beed/dht/protocol.py reads them: kind, msg id, msgpack body."""
    node = rng.choice([b"", rng.randbytes(20)])
    key = rng.randbytes(20)
    roll = rng.random()
    if roll < 0.25:
        body: Any = ["ping", [node]]
    elif roll < 0.45:
        body = ["find_node", [node, key]]
    elif roll < 0.65:
        body = [
            "find_value",
            [node, key, *([rng.choice(["", "m" * 32])] if rng.random() < 0.3 else [])],
        ]
    elif roll < 0.9:
        entry = ["a" * 32, rng.randbytes(rng.randrange(2048)), time.time() + 60, rng.randbytes(64)]
        body = ["store", [node, key, entry]]
    elif roll < 0.95:
        body = [rng.choice(["ping", "store", "nope", 7]), [rng.randbytes(rng.randrange(40))]]
    else:
        return rng.choice([b"\x00", b"\x01", b"\x02"]) + rng.randbytes(rng.randrange(1, 600))
    return b"\x00" + rng.randbytes(20) + pack(body)


async def attack_udp(ctx: Ctx) -> None:
    pool = [dht_datagram(ctx.rng) for _ in range(4096)]
    socks = []
    for src in ctx.sources[:16]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    target = (ctx.host, ctx.dht_port)
    ctx.ready()
    i = 0
    counts = ctx.counts
    try:
        while True:
            for s in socks:
                for _ in range(8):
                    try:
                        s.sendto(pool[i % len(pool)], target)
                        counts["datagrams sent"] += 1
                    except BlockingIOError:
                        counts["send blocked"] += 1
                    i += 1
                while True:
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    counts["replies"] += 1
                    counts["reply bytes"] += len(data)
            await asyncio.sleep(0)
    finally:
        for s in socks:
            s.close()


# (g) a reader that never reads


async def attack_slowloris(ctx: Ctx) -> None:
    tokens = 1  # replies, not compute: 2.3 KB each
    payload = random_floats(tokens * HIDDEN, 3)
    d = desc((1, tokens, HIDDEN), 0, len(payload))

    async def one(i: int) -> None:
        while True:
            conn = Conn(ctx, ctx.source(i), rcvbuf=4096)
            try:
                if not await conn.open(read=False):
                    await asyncio.sleep(0.5)
                    continue
                msg = OpenSession(
                    1, ctx.fingerprint, ctx.span[0], ctx.span[1], ctx.max_session_length
                )
                await conn.send(encode_message_bytes(msg))
                answer = await conn.read_one()
                while answer is not None and answer.type == Ping.TYPE:  # the server's RTT probe
                    answer = await conn.read_one()
                if answer is None or answer.type != SessionOpened.TYPE:
                    await asyncio.sleep(0.5)
                    continue
                position, sid, step_id = 0, 1, 1
                # From here on nothing is read: not even by asyncio's transport, which would
                # otherwise take up to 2 MiB off the socket into the StreamReader's buffer.
                assert conn.writer is not None
                conn.writer.transport.pause_reading()
                while True:
                    if position + tokens <= ctx.max_session_length:
                        fields = {"step_id": step_id, "position": position, "hidden": 0}
                        if not await conn.send(request(Step.TYPE, 1, fields, [(d, payload)])):
                            break
                        position += tokens
                        step_id += 1
                    sid += 1
                    if not await conn.send(encode_message_bytes(GetInfo(sid))):
                        break
                    if not await conn.send(encode_message_bytes(Ping(0, sid))):
                        break
            except OSError:
                ctx.counts["reset by server"] += 1
            finally:
                await conn.aclose()
            await asyncio.sleep(0.1)

    ctx.ready()
    async with asyncio.TaskGroup() as tg:
        for i in range(8):
            tg.create_task(one(i))


ATTACK_FUNCS: dict[str, Callable[[Ctx], Any]] = {
    "bomb": attack_bomb,
    "forward": attack_forward,
    "backward": attack_backward,
    "sessions": attack_sessions,
    "idle": attack_idle,
    "udp": attack_udp,
    "slowloris": attack_slowloris,
}


async def worker_main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    start, end = (int(x) for x in args.span.split(":"))
    first = int(args.sources.split(":")[0])
    ctx = Ctx(
        host=host,
        port=int(port),
        dht_port=args.dht_port,
        fingerprint=args.fingerprint,
        span=(start, end),
        sources=[f"127.0.0.{first + i}" for i in range(int(args.sources.split(":")[1]))],
        max_request_tokens=args.max_request_tokens,
        max_backward_tokens=args.max_backward_tokens,
        max_session_length=args.max_session_length,
        idle_connections=args.idle_connections,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    began = time.monotonic()
    error = None
    try:
        attack = asyncio.ensure_future(ATTACK_FUNCS[args.worker](ctx))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait(
            {attack, stopper}, timeout=args.max_seconds, return_when="FIRST_COMPLETED"
        )
        for task in (attack, stopper):
            task.cancel()
        await asyncio.wait({attack, stopper})
        if not attack.cancelled() and attack.exception() is not None:
            exc = attack.exception()
            error = f"{type(exc).__name__}: {exc}"
    finally:
        counts: dict[str, Any] = dict(ctx.counts)
        if "bytes sent" in counts:
            counts["MB sent"] = round(counts.pop("bytes sent") / MiB, 1)
        notes = {k: round(sum(v) / len(v), 1) for k, v in ctx.notes.items() if v}
        result = {
            "counts": counts,
            "mean": notes,
            "seconds": time.monotonic() - began,
            "error": error,
        }
        print("RESULT " + json.dumps(result), flush=True)


# --- the measuring side ---------------------------------------------------------------------------


class RssSampler:
    """VmRSS of one process every period_s on a thread; `reset_peak()` starts a new window."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid = pid
        self.period_s = period_s
        self.current = self._read()
        self.peak = self.current
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _read(self) -> int:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else 0

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.current = self._read()
            self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.current = self._read()
        self.peak = self.current

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Honest:
    """What the honest client did during one measurement."""

    tok_s: float | None = None
    runs: int = 0
    decoded_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)  # wall time of each generation


async def measure_honest(
    model: Any, ids: Any, new_tokens: int, seconds: float, grace_s: float
) -> Honest:
    """Generate again and again for `seconds` (a run then in progress may take `grace_s` more)."""
    from beectl.generation import SamplingConfig, generate
    from protocol.errors import BeeError

    out = Honest()
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + seconds + grace_s
    decode_s = 0.0
    while loop.time() - began < seconds:
        stamps: list[float] = []
        toks: list[int] = []

        def on_tokens(t: Any, stamps: list[float] = stamps, toks: list[int] = toks) -> None:
            stamps.append(time.perf_counter())
            toks.append(int(t[0]))

        t0 = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                async with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                    await generate(
                        model.head, session, ids, SamplingConfig(max_new_tokens=new_tokens),
                        on_tokens=on_tokens,
                    )  # fmt: skip
        except TimeoutError:
            out.errors.append(f"cut at the deadline after {len(toks)} tokens")
        except (BeeError, OSError) as exc:
            out.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
            await asyncio.sleep(0.5)
        out.run_s.append(time.perf_counter() - t0)
        if toks:
            out.tokens.append(toks)
            out.runs += 1
        if len(stamps) >= 2:
            out.decoded_tokens += len(stamps) - 1
            decode_s += stamps[-1] - stamps[0]
        if loop.time() >= deadline:
            break
    out.tok_s = out.decoded_tokens / decode_s if decode_s > 0 else 0.0
    return out


async def get_info(host: str, port: int, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The server's Info dict over a fresh connection from 127.0.0.1, or None."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(HELLO + encode_message_bytes(GetInfo(1)))
                decoder = FrameDecoder()
                while True:
                    data = await reader.read(MiB)
                    if not data:
                        return None
                    decoder.feed(data)
                    while (msg := decoder.next_message()) is not None:
                        if isinstance(msg, Info):
                            return msg.info
            finally:
                writer.transport.abort()
    except (OSError, TimeoutError):
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_quiet(pid: int, max_s: float, busy_cores: float = 0.15) -> float:
    """Seconds until the process uses less than `busy_cores` over a second (at most max_s): work
    an attacker left queued or running (a Forward that runs as one piece) ends first."""
    began = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - began < max_s:
        await asyncio.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < busy_cores:
            return time.monotonic() - began - 1.0
        last = now
    return time.monotonic() - began


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def dht_answers(host: str, port: int) -> bool:
    """Whether a DHT node answers a ping at host:port (UDP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(b"\x00" + os.urandom(20) + pack(["ping", [b""]]), (host, port))
        try:
            return s.recv(4096)[:1] == b"\x01"
        except (TimeoutError, OSError):
            return False


@dataclass
class Row:
    attack: str
    honest: Honest
    ratio: float | None = None
    same_tokens: bool | None = None
    rss_idle: int = 0
    rss_peak: int = 0
    counts: dict[str, Any] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    busy_after_s: float = 0.0  # the server kept computing this long after the attacker left

    @property
    def rss_ok(self) -> bool:
        return self.rss_peak <= self.rss_idle + RSS_TARGET_BYTES

    @property
    def passed(self) -> bool:
        return self.ratio is not None and self.ratio >= RATIO_TARGET and self.rss_ok


SERVER_DELTAS = [
    "connections_refused",
    "connections_evicted",
    "requests_refused_for_memory",
    "reader_waits",
    "reader_closed",
    "batches",
    "batched_steps",
]


def server_counters(before: dict[str, Any] | None, during: dict[str, Any] | None) -> dict[str, Any]:
    if not during:
        return {"GetInfo": "no answer during the attack"}
    out: dict[str, Any] = {
        "connections": during.get("connections"),
        "sessions": during.get("sessions"),
        "request_MiB_held": round(during.get("request_bytes_held", 0) / MiB, 1),
        "request_MiB_peak": round(during.get("request_bytes_peak", 0) / MiB, 1),
    }
    for key in SERVER_DELTAS:
        if before and key in during:
            out[key] = during[key] - before.get(key, 0)
    return out


def log_file(path: Path) -> Any:
    return open(path, "w")


class Bench:
    def __init__(self, args: argparse.Namespace, swarm: Any, model: Any, ids: Any) -> None:
        self.args = args
        self.swarm = swarm
        self.server = swarm.servers[0]
        self.model = model
        self.ids = ids
        words = self.server.ready_line.split()
        self.host, self.port = self.server.address
        self.fingerprint = words[words.index("fingerprint") + 1]
        self.span = words[words.index("blocks") + 1]
        self.dht_port = args.dht_port or self.port
        self.log_dir = args.log_dir

    async def honest(self) -> Honest:
        a = self.args
        return await measure_honest(self.model, self.ids, a.new_tokens, a.seconds, a.grace)

    @staticmethod
    def finish(rows: list[Row]) -> float | None:
        """Ratios against the baseline: the mean tok/s of the rows without an attack (before and
        after: the machine is shared, its speed drifts); tokens against the first generation."""
        quiet = [r.honest for r in rows if r.attack.startswith("none") and r.honest.tok_s]
        base = sum(h.tok_s or 0.0 for h in quiet) / len(quiet) if quiet else None
        ref = quiet[0].tokens[0] if quiet and quiet[0].tokens else None
        for row in rows:
            if base and row.honest.tok_s is not None:
                row.ratio = row.honest.tok_s / base
            if ref is not None and row.honest.tokens:
                row.same_tokens = all(t == ref[: len(t)] for t in row.honest.tokens)
        return base

    async def quiet_row(self, name: str, seconds: float) -> Row:
        await asyncio.sleep(2.0)
        rss = self.rss
        rss.reset_peak()
        idle = rss.current
        t0 = time.perf_counter()
        a = self.args
        honest = await measure_honest(self.model, self.ids, a.new_tokens, seconds, a.grace)
        return Row(name, honest, rss_idle=idle, rss_peak=rss.peak, seconds=time.perf_counter() - t0)

    async def attack_row(self, index: int, name: str) -> Row:
        a = self.args
        assert self.server.process is not None
        await asyncio.sleep(a.settle)
        rss = self.rss
        rss.reset_peak()
        idle = rss.current
        before = await get_info(self.host, self.port)
        t0 = time.perf_counter()
        first = 2 + SOURCES_PER_ATTACK * index
        cmd = [
            sys.executable, str(SCRIPT), "--worker", name,
            "--target", f"{self.host}:{self.port}", "--dht-port", str(self.dht_port),
            "--fingerprint", self.fingerprint, "--span", self.span,
            "--sources", f"{first}:{SOURCES_PER_ATTACK}",
            "--max-request-tokens", str(a.max_request_tokens),
            "--max-backward-tokens", str(a.max_backward_tokens),
            "--max-session-length", str(a.max_session_length),
            "--idle-connections", str(a.idle_connections),
            "--max-seconds", str(3 * a.seconds + a.grace + 60), "--nice", str(a.nice),
        ]  # fmt: skip
        with log_file(self.log_dir / f"worker-{name}.log") as log:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
            )
        assert proc.stdout is not None
        row = Row(name, Honest(), rss_idle=idle)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if line.strip() != b"READY":
                raise RuntimeError(f"the {name} worker did not start: {line!r}")
            await asyncio.sleep(a.ramp)
            row.honest = await self.honest()
            row.server = server_counters(before, await get_info(self.host, self.port))
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                rest = await asyncio.wait_for(proc.stdout.read(), 30)
            except TimeoutError:
                proc.kill()
                rest = b""
            await proc.wait()
        row.busy_after_s = await wait_quiet(self.server.process.pid, a.max_quiet_wait)
        row.rss_peak = rss.peak
        row.seconds = time.perf_counter() - t0
        results = [x for x in rest.decode(errors="replace").splitlines() if x.startswith("RESULT ")]
        if results:
            data = json.loads(results[-1][len("RESULT ") :])
            row.counts, row.means = data["counts"], data["mean"]
            if data["error"] and row.error is None:
                row.error = f"worker: {data['error']}"
        elif row.error is None:
            row.error = f"the worker printed no result (exit {proc.returncode})"
        if self.server.process is not None and self.server.process.poll() is not None:
            row.error = f"THE SERVER DIED (exit {self.server.process.returncode})"
        return row

    async def run(self) -> list[Row]:
        a = self.args
        rows: list[Row] = []
        assert self.server.process is not None
        with RssSampler(self.server.process.pid) as self.rss:
            from beectl.generation import SamplingConfig, generate

            async with self.model.inference_session(max_length=self.ids.shape[1] + 4) as s:
                await generate(self.model.head, s, self.ids, SamplingConfig(max_new_tokens=4))
            rows.append(await self.quiet_row("none (before)", a.baseline_seconds))
            report(rows[-1])
            for name in a.attacks:
                rows.append(await self.attack_row(ATTACKS.index(name), name))
                report(rows[-1])
                if rows[-1].error and "SERVER DIED" in rows[-1].error:
                    break
            else:
                rows.append(await self.quiet_row("none (after)", a.baseline_seconds))
                report(rows[-1])
        self.finish(rows)
        return rows


def mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def report(row: Row) -> None:
    h = row.honest
    tok = "-" if h.tok_s is None else f"{h.tok_s:.2f}"
    print(
        f"  {row.attack}: {tok} tok/s over {h.runs} runs, RSS {mib(row.rss_idle)} -> "
        f"{mib(row.rss_peak)} MiB ({row.seconds:.0f} s)"
        + (f" ERROR {row.error}" if row.error else "")
        + (f"; honest errors: {h.errors[:3]}" if h.errors else ""),
        flush=True,
    )


def print_table(rows: list[Row]) -> None:
    head = (
        f"| {'attack':<15} | {'honest tok/s':>12} | {'vs base':>7} | {'same tokens':<11} | "
        f"{'runs':>4} | {'RSS idle MiB':>12} | {'RSS peak MiB':>12} | {'peak-idle':>9} | "
        f"{'busy after s':>12} | result |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head[1:-1].split("|")) + "|")
    for r in rows:
        h = r.honest
        same = "-" if r.same_tokens is None else "yes" if r.same_tokens else "NO"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        tok = "-" if h.tok_s is None else f"{h.tok_s:.2f}"
        result = "-" if r.attack.startswith("none") else "PASS" if r.passed else "MISS"
        if r.error:
            result += " (error)"
        print(
            f"| {r.attack:<15} | {tok:>12} | {ratio:>7} | {same:<11} | {h.runs:>4} | "
            f"{mib(r.rss_idle):>12} | {mib(r.rss_peak):>12} | "
            f"{mib(r.rss_peak - r.rss_idle):>9} | {r.busy_after_s:>12.0f} | {result} |"
        )
    print(
        f"honest tok/s: decode tokens after each generation's first, over their time; baseline "
        f"{Bench.finish(rows) or 0:.2f} tok/s, the mean of the rows without an attack; target "
        f">= {RATIO_TARGET}x the baseline and RSS peak <= idle + {RSS_TARGET_BYTES // MiB} MiB; "
        "busy after: how long the server kept computing once the attacker had gone (RSS peak "
        "includes it)"
    )
    print("\nattack counters (the attacker's: frames sent, server answers by type and error code)")
    for r in rows:
        if r.attack.startswith("none"):
            continue
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items(), key=lambda kv: kv[0]))
        print(f"  {r.attack}: {counts or '-'}")
        if r.means:
            print(f"    means: {', '.join(f'{k} {v}' for k, v in r.means.items())}")
        print(f"    server: {', '.join(f'{k} {v}' for k, v in r.server.items()) or '-'}")
        if r.honest.errors:
            errors = collections.Counter(e.split(":")[0] for e in r.honest.errors)
            print(f"    honest client errors: {dict(errors)}; first: {r.honest.errors[0]}")
        if r.error:
            print(f"    ERROR: {r.error}")


def scan_logs(daemons: list[Any]) -> dict[str, collections.Counter[str]]:
    """Per daemon log: tracebacks, and WARNING/ERROR lines by event name."""
    found = {}
    for d in daemons:
        try:
            text = d.log_path.read_text(errors="replace")
        except OSError:
            continue
        events = collections.Counter[str]()
        events["Traceback"] = text.count("Traceback")
        for m in re.finditer(r" (WARNING|ERROR|CRITICAL) [\w.]+: (\S+)", text):
            events[f"{m.group(1)} {m.group(2)}"] += 1
        found[d.name] = +events
    return found


def parse_args() -> argparse.Namespace:
    from beed.server.config import PeerLimits, ServerConfig

    limits = PeerLimits()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--attacks", default=",".join(ATTACKS), help=f"comma list of {','.join(ATTACKS)}"
    )
    p.add_argument(
        "--seconds", type=float, default=15.0, help="honest generation under each attack"
    )
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", metavar="PATH", help="write all results here")
    p.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="each no-attack row (first, last)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="a generation running at the end may take this long",
    )
    p.add_argument("--ramp", type=float, default=2.0, help="seconds of attack before measuring")
    p.add_argument("--settle", type=float, default=2.0, help="pause between attacks")
    p.add_argument(
        "--max-quiet-wait",
        type=float,
        default=45.0,
        help="after an attack, wait at most this long for the server to stop computing",
    )
    p.add_argument("--idle-connections", type=int, default=500)
    p.add_argument("--nice", type=int, default=19, help="niceness of the attacker processes")
    p.add_argument("--server-args", default="", help="extra `beed serve` arguments")
    p.add_argument("--dht-port", type=int, default=0, help="the server's DHT port [its TCP port]")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--max-request-tokens", type=int, default=limits.max_request_tokens)
    p.add_argument("--max-backward-tokens", type=int, default=limits.max_backward_tokens)
    p.add_argument("--max-session-length", type=int, default=ServerConfig.max_session_length)
    args = p.parse_args()
    args.attacks = [x for x in args.attacks.split(",") if x]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    # The server's limits follow --server-args where it sets them.
    flags = args.server_args.split()
    for flag, name in [
        ("--max-request-tokens", "max_request_tokens"),
        ("--max-backward-tokens", "max_backward_tokens"),
        ("--max-session-length", "max_session_length"),
    ]:
        if flag in flags:
            setattr(args, name, int(flags[flags.index(flag) + 1]))
    return args


def worker_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=ATTACKS)
    for name in ("--target", "--fingerprint", "--span", "--sources"):
        p.add_argument(name, required=True)
    for name in (
        "--dht-port", "--max-request-tokens", "--max-backward-tokens", "--max-session-length",
        "--idle-connections", "--nice",
    ):  # fmt: skip
        p.add_argument(name, type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    return p.parse_args()


async def amain(args: argparse.Namespace) -> list[Row]:
    from transformers import AutoTokenizer

    from beectl.config import ClientConfig
    from beectl.local_swarm import LocalSwarm
    from beectl.model import RemoteModel
    from beed.dht.peers import parse_initial_peers
    from beed.models.registry import resolve_model

    unretrieved = collections.Counter[str]()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        unretrieved[f"{context.get('message')}: {type(exc).__name__}: {exc}"[:160]] += 1

    asyncio.get_running_loop().set_exception_handler(on_loop_error)
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m").path))
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :10]
    t0 = time.perf_counter()
    swarm = LocalSwarm(num_servers=1, extra_args=args.server_args.split())
    await asyncio.to_thread(swarm.start)
    try:
        print(
            f"# swarm up in {time.perf_counter() - t0:.0f} s: {'; '.join(swarm.describe())}",
            flush=True,
        )
        host, port = swarm.servers[0].address
        if not dht_answers(host, args.dht_port or port):
            print(
                f"# WARNING: no DHT answer at UDP {host}:{args.dht_port or port}; give --dht-port"
            )
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        config = ClientConfig(initial_peers=tuple(parse_initial_peers(peers)))
        model = await RemoteModel.load("smollm2-135m", config)
        try:
            rows = await Bench(args, swarm, model, ids).run()
        finally:
            await model.aclose()
        if unretrieved:
            print("# the client's event loop reported (asyncio's exception handler):")
            for text, count in unretrieved.items():
                print(f"#   {count} x {text}")
        daemons = [*swarm.servers, *([swarm.bootstrap] if swarm.bootstrap else [])]
        found = scan_logs(daemons)
        for name, events in found.items():
            print(f"# {name} log: {dict(events) or 'no traceback, warning or error'}")
        if any(found.values()) or args.keep_logs:
            for d in daemons:
                shutil.copy(d.log_path, args.log_dir / d.log_path.name)
    finally:
        await asyncio.to_thread(swarm.stop)
    return rows


def main() -> None:
    if "--worker" in sys.argv:
        wargs = worker_args()
        os.nice(wargs.nice)
        asyncio.run(worker_main(wargs))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args()
    args.log_dir = Path(tempfile.mkdtemp(prefix="beed-hostile-"))
    import torch

    torch.set_num_threads(1)  # the client's head: one core of two stays the server's
    print(
        f"# {machine()}, torch "
        f"{torch.__version__}; smollm2-135m float32, 1 server 0:30; honest client: prompt 10 "
        f"tokens, {args.new_tokens} new, greedy, for {args.seconds:g} s under each attack "
        f"(after {args.ramp:g} s of it); attackers niced {args.nice}; server args "
        f"'{args.server_args}'",
        flush=True,
    )
    began = time.perf_counter()
    rows = asyncio.run(amain(args))
    print(f"\n# {len(rows)} rows in {time.perf_counter() - began:.0f} s")
    print_table(rows)
    if any(r.same_tokens is False for r in rows):
        print("\nWARNING: the honest client generated other tokens than the baseline in some rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "cores": os.cpu_count(),
                    "rows": [dataclasses.asdict(r) | {"passed": r.passed} for r in rows],
                },
                f,
                indent=1,
            )
        print(f"results written to {args.json}")
    print(f"logs in {args.log_dir}")


if __name__ == "__main__":
    main()
