"""The attacks of bench/hostile.py, one coroutine each, run in `--worker NAME` subprocesses.

Each `attack_*` takes a `Ctx` (its target, its source addresses, the server's limits), prints
READY through `ctx.ready()` once it is under way, then attacks until it is cancelled, counting
what it sent and what the server answered in `ctx.counts`: (a) compression bombs, (b) huge
Forwards, (c) a Backward flood, (d) session grabbing, (e) idle and half-sent connections, (f) a
UDP flood at the DHT port, (g) a reader that never reads. `ATTACKS` names them in the order
they run by default; `ATTACK_FUNCS` maps each name to its coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import lz4.block
import numpy as np
import zstandard
from hostile_wire import (
    HELLO,
    Conn,
    Ctx,
    MiB,
    desc,
    frame,
    pack,
    random_floats,
    reconnecting,
    request,
    span_fields,
)

from protocol.frames import EncodedFrame, encode_message_bytes
from protocol.messages import (
    Backward,
    Error,
    Forward,
    GetInfo,
    OpenSession,
    Ping,
    SessionOpened,
    Step,
)

HIDDEN = 576  # smollm2-135m
ATTACKS = ["bomb", "forward", "backward", "sessions", "idle", "udp", "slowloris"]


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
