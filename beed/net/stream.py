"""Framed message streams over asyncio TCP: the one place where sockets meet `protocol/`.

Foreign exceptions (OSError, IncompleteReadError, timeouts) become BeeErrors here, so callers
handle one error tree.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from beed.net.link import PROBE_BYTES, LinkStats, policy_for
from protocol.codecs import CodecPolicy
from protocol.errors import (
    ConnectionClosed,
    PeerUnreachableError,
    PhaseTimeoutError,
    UnknownMessageTypeError,
)
from protocol.frames import FrameDecoder, encode_message, message_from_frame
from protocol.limits import Limits
from protocol.messages import Hello, Message, Ping, Pong

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20


class FramedStream:
    """Messages in and out of one TCP connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: Limits | None = None,
        compression: str = "auto",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(limits or Limits())
        self.codec_policy: CodecPolicy | None = None
        # "auto": the codec policy follows the measured link (beed/net/link.py); "off": raw.
        self.compression = compression
        self.link = LinkStats()
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
                    msg = message_from_frame(frame)
                except UnknownMessageTypeError as exc:
                    exc.stream_id = frame.stream_id  # type: ignore[attr-defined]  # to answer on
                    raise
                if isinstance(msg, Pong) and self.link.pong(msg.nonce):
                    self._update_policy()
                return msg
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
        """Queue a message for writing (the caller drains when it wants backpressure).

        A large frame is followed by a Ping that measures the link's throughput; a connection in
        use re-measures its round trip now and then (beed/net/link.py)."""
        if self.writer.is_closing():
            raise ConnectionClosed(f"connection to {self.peername} is closed")
        buffers = encode_message(msg, self.codec_policy)
        now = time.monotonic()
        self.writer.writelines(buffers)
        if self.compression == "off" or isinstance(msg, Ping | Pong | Hello):
            return
        nbytes = sum(len(b) for b in buffers)
        if nbytes >= PROBE_BYTES:
            self.writer.writelines(encode_message(Ping(0, self.link.probe(nbytes, now))))
        elif self.link.rtt_probe_due(now):
            self.ping_rtt(now)

    def ping_rtt(self, now: float | None = None) -> None:
        """Send a Ping that measures the round trip (its Pong is accounted for by read)."""
        if not self.writer.is_closing():
            self.writer.writelines(encode_message(Ping(0, self.link.probe(0, now))))

    def _update_policy(self) -> None:
        if self.codec_policy is not None:
            self.codec_policy = policy_for(self.codec_policy, self.link, self.compression)

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
    host: str,
    port: int,
    *,
    timeout_s: float,
    limits: Limits | None = None,
    compression: str = "auto",
) -> FramedStream:
    """Connect to host:port; PeerUnreachableError when that fails within timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_CHUNK_BYTES)
    except (TimeoutError, OSError) as exc:
        raise PeerUnreachableError(
            f"cannot connect to {host}:{port}: {exc or 'timed out'}"
        ) from exc
    return FramedStream(reader, writer, limits, compression)
