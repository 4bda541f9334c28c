"""The attacker's wire: raw frames built byte by byte (lies included) and its connections.

`frame`, `request` and `desc` pack a msgpack header and payloads behind a frame prefix without
checking them, so that an attack can send what no honest encoder would; `Ctx` is what an attack
knows of its target and the counters it fills; `Conn` is one connection from a chosen source
address whose reader counts the server's answers by message type and error code, and
`reconnecting` opens one again each time the server closes it. Used by bench/hostile.py's
attacks, and by its measuring side for `HELLO` and `pack`.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from protocol.frames import MAGIC, PREFIX, EncodedFrame, FrameDecoder, encode_message_bytes
from protocol.limits import Limits
from protocol.messages import MESSAGE_TYPES, Error, Hello

MiB = 1 << 20
HELLO = encode_message_bytes(Hello(software_version="hostile/1", peer_id=""))
TYPE_NAMES = {t: cls.__name__ for t, cls in MESSAGE_TYPES.items()}
READ_LIMITS = Limits(max_frame_bytes=1 << 30, max_decompressed_bytes=1 << 30)


def pack(value: Any) -> bytes:
    """msgpack bytes of value (bin for bytes, str for str)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


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
