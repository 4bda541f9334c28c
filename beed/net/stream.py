"""Framed message streams over asyncio TCP: the one place where sockets meet `protocol/`.

Foreign exceptions (OSError, IncompleteReadError, timeouts) become BeeErrors here, so callers
handle one error tree.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from protocol.codecs import CodecPolicy
from protocol.errors import (
    ConnectionClosed,
    PeerUnreachableError,
    PhaseTimeoutError,
    UnknownMessageTypeError,
)
from protocol.frames import FrameDecoder, encode_message, message_from_frame
from protocol.limits import Limits
from protocol.messages import Message

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20


class FramedStream:
    """Messages in and out of one TCP connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: Limits | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(limits or Limits())
        self.codec_policy: CodecPolicy | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # One-token steps are tiny frames: never wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peername = writer.get_extra_info("peername")

    async def read(self, timeout_s: float | None = None) -> Message:
        """The next message; ConnectionClosed at EOF, PhaseTimeoutError after timeout_s."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                try:
                    return message_from_frame(frame)
                except UnknownMessageTypeError as exc:
                    exc.stream_id = frame.stream_id  # type: ignore[attr-defined]  # to answer on
                    raise
            try:
                async with asyncio.timeout(timeout_s):
                    data = await self.reader.read(READ_CHUNK_BYTES)
            except TimeoutError as exc:
                raise PhaseTimeoutError(
                    f"no message from {self.peername} within {timeout_s} s"
                ) from exc
            except OSError as exc:
                raise ConnectionClosed(f"connection to {self.peername} broke: {exc}") from exc
            if not data:
                self.decoder.feed_eof()
                raise ConnectionClosed(f"{self.peername} closed the connection")
            self.decoder.feed(data)

    def send_nowait(self, msg: Message) -> None:
        """Queue a message for writing (the caller drains when it wants backpressure)."""
        if self.writer.is_closing():
            raise ConnectionClosed(f"connection to {self.peername} is closed")
        self.writer.writelines(encode_message(msg, self.codec_policy))

    async def send(self, msg: Message, timeout_s: float | None = None) -> None:
        self.send_nowait(msg)
        try:
            async with asyncio.timeout(timeout_s):
                await self.writer.drain()
        except TimeoutError as exc:
            raise PhaseTimeoutError(f"{self.peername} did not read for {timeout_s} s") from exc
        except OSError as exc:
            raise ConnectionClosed(f"connection to {self.peername} broke: {exc}") from exc

    async def aclose(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (TimeoutError, OSError):
            pass


async def open_stream(
    host: str, port: int, *, timeout_s: float, limits: Limits | None = None
) -> FramedStream:
    """Connect to host:port; PeerUnreachableError when that fails within timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK_BYTES)
    except (TimeoutError, OSError) as exc:
        raise PeerUnreachableError(
            f"cannot connect to {host}:{port}: {exc or 'timed out'}"
        ) from exc
    return FramedStream(reader, writer, limits)
