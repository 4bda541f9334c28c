"""Framed message streams over asyncio TCP: the one place where sockets meet `protocol/`.

Foreign exceptions (OSError, IncompleteReadError, timeouts) become BeeErrors here, so callers
handle one error tree.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from beed.net.dial import DialPolicy
from beed.net.link import PROBE_BYTES, LinkStats, policy_for
from beed.net.relay import RelayAddress, dial_relayed
from beed.net.swarm_key import SwarmKey
from beed.net.tls import client_context
from beed.net.traffic import TensorTraffic
from protocol.codecs import CodecPolicy
from protocol.errors import (
    AddressRefusedError,
    ConnectionClosed,
    PeerUnreachableError,
    PhaseTimeoutError,
    RelayRefusedError,
    UnknownMessageTypeError,
)
from protocol.frames import (
    EncodedFrame,
    FrameDecoder,
    decode_frame,
    encode_message,
    message_from_frame,
)
from protocol.limits import Limits
from protocol.messages import Hello, Message, Ping, Pong

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (<netinet/tcp.h>); FIN or RST from the peer ends it
SIOCOUTQNSD = 0x894B  # Linux: a TCP socket's bytes not yet sent (<linux/sockios.h>)
# Frames whose tensors are compressed or larger than this are decoded on a worker thread, so a
# frame that is slow to decompress never stalls the event loop (other peers' requests).
INLINE_DECODE_BYTES = 256 * 1024
_decode_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _decoder_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _decode_pool
    if _decode_pool is None:
        _decode_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="beed-decode")
    return _decode_pool


async def decode_message(encoded: EncodedFrame) -> Message:
    """The typed message of a complete frame; decompression runs off the event loop when it
    costs more than a copy. ProtocolError subclasses are fatal to the connection."""
    if encoded.segments and (encoded.compressed or encoded.raw_bytes > INLINE_DECODE_BYTES):
        loop = asyncio.get_running_loop()
        frame = await loop.run_in_executor(_decoder_pool(), decode_frame, encoded)
    else:
        frame = decode_frame(encoded)
    try:
        return message_from_frame(frame)
    except UnknownMessageTypeError as exc:
        exc.stream_id = frame.stream_id  # type: ignore[attr-defined]  # to answer on
        raise


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
        self.traffic: TensorTraffic | None = None  # tensor bytes by codec, where counted
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # One-token steps are tiny frames: never wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peername = writer.get_extra_info("peername")
        self.ssl_object = writer.get_extra_info("ssl_object")  # None on a plain connection

    async def read(self, timeout_s: float | None = None) -> Message:
        """The next message; ConnectionClosed at EOF, PhaseTimeoutError when the whole message
        has not arrived within timeout_s (a peer trickling bytes does not reset it)."""
        return self.accounted(await decode_message(await self.read_encoded(timeout_s)))

    def accounted(self, msg: Message) -> Message:
        """Let the link statistics see a received message (Pongs time the link)."""
        if isinstance(msg, Pong) and self.link.pong(msg.nonce):
            self._update_policy()
        return msg

    async def read_encoded(self, timeout_s: float | None = None) -> EncodedFrame:
        """The next complete frame, tensors not yet decoded (see decode_message)."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    encoded = self.decoder.next_encoded()
                    if encoded is not None:
                        if self.traffic is not None and encoded.segments:
                            self.traffic.add(
                                "received",
                                ((i.codec, i.raw_len, i.enc_len) for i, _ in encoded.segments),
                            )
                        return encoded
                    try:
                        data = await self.reader.read(READ_CHUNK_BYTES)
                    except OSError as exc:
                        raise ConnectionClosed(
                            f"connection to {self.peername} broke: {exc}"
                        ) from exc
                    if not data:
                        self.decoder.feed_eof()
                        raise ConnectionClosed(f"{self.peername} closed the connection")
                    self.decoder.feed(data)
        except TimeoutError as exc:
            raise PhaseTimeoutError(
                f"no complete message from {self.peername} within {timeout_s} s"
            ) from exc

    def send_nowait(self, msg: Message) -> None:
        """Queue a message for writing (the caller drains when it wants backpressure).

        A large frame is followed by a Ping that measures the link's throughput; a connection in
        use re-measures its round trip now and then (beed/net/link.py)."""
        if self.writer.is_closing():
            raise ConnectionClosed(f"connection to {self.peername} is closed")
        descs: list[list[Any]] | None = [] if self.traffic is not None else None
        buffers = encode_message(msg, self.codec_policy, descs)
        if self.traffic is not None and descs:
            self.traffic.add("sent", ((d[2], d[3], d[4]) for d in descs))
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

    def unsent_bytes(self) -> int:
        """Bytes written to this connection that have not gone out yet: the transport's buffer
        plus what the kernel holds unsent (Linux SIOCOUTQNSD: not the bytes in flight, which
        a fast long link has many of, but those held back because the peer's window is shut).
        A peer that stops reading makes this grow without bound. Elsewhere: the transport's
        buffer only."""
        transport = self.writer.transport
        pending = transport.get_write_buffer_size() if not transport.is_closing() else 0
        sock = self.writer.get_extra_info("socket")
        if sock is None or not sys.platform.startswith("linux"):
            return pending
        try:
            raw = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
        except (OSError, ValueError):
            return pending
        return pending + int(struct.unpack("i", raw)[0])

    def peer_gone(self) -> bool:
        """Whether the peer has closed or reset the connection, asked of the kernel (Linux
        TCP_INFO state), for a connection this side is not reading: asyncio learns of a close
        only by reading or writing."""
        if self.writer.is_closing():
            return True
        sock = self.writer.get_extra_info("socket")
        tcp_info = getattr(socket, "TCP_INFO", None)
        if sock is None or tcp_info is None:
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
        except (OSError, ValueError, IndexError):
            return True
        return state != TCP_ESTABLISHED

    async def aclose(self) -> None:
        """Close after flushing what is written, for at most a second; then abort (a peer
        that does not read would otherwise keep the socket, and our unsent bytes, forever)."""
        if not self.writer.is_closing():
            self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except OSError:
            pass


async def open_stream(
    host: str,
    port: int,
    *,
    timeout_s: float,
    limits: Limits | None = None,
    compression: str = "auto",
    policy: DialPolicy | None = None,
    tls: bool = False,
    relays: Sequence[RelayAddress] = (),
    peer_id: str = "",
    swarm_key: SwarmKey | None = None,
) -> FramedStream:
    """Connect to host:port (with `tls`, a TLS 1.3 handshake too: the caller checks the server's
    identity, beed/net/tls.py); PeerUnreachableError when that fails within timeout_s, and
    AddressRefusedError when `policy` does not allow the address (a name is resolved first and
    only its allowed addresses are tried).

    With `relays` (the server `peer_id` is not reachable itself), connect through the first of
    them that splices to it (beed/net/relay.py); TLS runs end to end with the server."""
    if relays:
        return await _open_relayed(
            relays, peer_id, timeout_s, limits, compression, policy, tls, swarm_key
        )
    try:
        async with asyncio.timeout(timeout_s):
            target = host
            if policy is not None and not policy.allow_private:
                target = await _allowed_address(host, port, policy)
            reader, writer = await asyncio.open_connection(
                target,
                port,
                limit=READ_CHUNK_BYTES,
                ssl=client_context() if tls else None,
                server_hostname="" if tls else None,
            )
    except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
        raise PeerUnreachableError(
            f"cannot connect to {host}:{port}: {exc or 'timed out'}"
        ) from exc
    return FramedStream(reader, writer, limits, compression)


async def _open_relayed(
    relays: Sequence[RelayAddress],
    peer_id: str,
    timeout_s: float,
    limits: Limits | None,
    compression: str,
    policy: DialPolicy | None,
    tls: bool,
    swarm_key: SwarmKey | None,
) -> FramedStream:
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    for relay in relays:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            sock = await dial_relayed(
                relay, peer_id, timeout_s=left, policy=policy, swarm_key=swarm_key
            )
        except (PeerUnreachableError, RelayRefusedError, AddressRefusedError) as exc:
            errors.append(str(exc))
            continue
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    limit=READ_CHUNK_BYTES,
                    ssl=client_context() if tls else None,
                    server_hostname="" if tls else None,
                )
        except (TimeoutError, OSError) as exc:
            sock.close()
            errors.append(f"through relay {relay.host}:{relay.port}: {exc or 'timed out'}")
            continue
        return FramedStream(reader, writer, limits, compression)
    raise PeerUnreachableError(
        f"cannot connect to {peer_id[:16]} through its relays: "
        + ("; ".join(errors) or "timed out")
    )


async def _allowed_address(host: str, port: int, policy: DialPolicy) -> str:
    if not policy.allows(host):
        raise AddressRefusedError(
            f"{host} is not a public address (loopback, private or reserved): not dialled "
            "(beectl/beed --allow-private-addresses dials such addresses)"
        )
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if policy.allows(address):
            return address
    raise AddressRefusedError(f"{host} resolves only to addresses that are not public")
