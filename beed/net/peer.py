"""A connection to one server, from a client or from a server pushing to the next: requests
multiplexed by stream id after the Hello handshake."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

import torch

import beed
from beed.net.dial import DialPolicy
from beed.net.link import LinkStats
from beed.net.relay import RelayAddress
from beed.net.stream import FramedStream, open_stream
from beed.net.swarm_key import SwarmKey
from beed.net.tasks import TaskOwner
from beed.net.tls import check_server
from beed.net.traffic import TensorTraffic
from protocol.codecs import CodecPolicy
from protocol.errors import (
    BeeError,
    ConnectionClosed,
    InvalidReplyError,
    PeerUnreachableError,
    PhaseTimeoutError,
)
from protocol.limits import Limits
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Step,
    StepResult,
    negotiate,
)

log = logging.getLogger(__name__)

# What a server may send before we asked for anything large: replies to steps raise it to fit
# (allow_reply_bytes), so a server cannot make this side buffer or decompress gigabytes.
REPLY_LIMITS = Limits(
    max_frame_bytes=4 << 20, max_decompressed_bytes=4 << 20, max_compression_ratio=32
)


class PeerConnection:
    """One connection to one server.

    Replies on a stream come back in request order, so each stream keeps a FIFO of waiting
    futures. StepResults are matched by (stream, step id) instead: with push, results of one
    step arrive on several streams without a request on each, and a step that reached a server
    twice (push and fallback) may be answered twice; a result nobody waits for is dropped. An
    Error on a stream fails its oldest FIFO waiter, or else its step waiters; an Error on
    stream 0 fails every waiter.

    `peer_id`: the peer id the server must name in its Hello ("" = any) and, with `tls`, prove
    by its certificate (beed/net/tls.py); `local_peer_id`: the one this side names in its own
    Hello (servers pushing to the next hop).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        peer_id: str = "",
        tls: bool = False,
        swarm_key: SwarmKey | None = None,
        local_peer_id: str = "",
        compression: str = "auto",
        policy: DialPolicy | None = None,
        traffic: TensorTraffic | None = None,
        relays: Sequence[RelayAddress] = (),
    ) -> None:
        self.host, self.port, self.peer_id, self.tls = host, port, peer_id, tls
        self.relays = tuple(relays)  # dial these instead of host:port (a server behind NAT)
        self.swarm_key = swarm_key  # a private swarm's: proven in the Hello, both ways
        self.traffic = traffic  # where tensor bytes of this connection are counted (or None)
        self.local_peer_id = local_peer_id
        self.compression = compression  # "auto": codecs follow the measured link; "off": raw
        self.policy = policy  # which addresses may be dialled (None: any)
        self._stream: FramedStream | None = None
        self._waiters: dict[int, collections.deque[asyncio.Future[Message]]] = {}
        # (stream, step id) -> futures served in order: a step's result, then any later notice
        # for the same step (a push that failed after the result was sent).
        self._step_waiters: dict[tuple[int, int], collections.deque[asyncio.Future[Message]]] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}  # nonce -> round trip
        self._stream_ids = itertools.count(1)
        self._tasks = TaskOwner(f"peer-{host}:{port}")
        self._closed: BeeError | None = None
        self.remote_hello: Hello | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def link(self) -> LinkStats | None:
        """Round trip and throughput measured on this connection (None before connect)."""
        return self._stream.link if self._stream is not None else None

    async def connect(self, timeout_s: float) -> None:
        key = self.swarm_key
        where = f"{self.host}:{self.port}"
        if key is not None and not self.tls:
            raise PeerUnreachableError(
                f"{where} does not speak TLS: not a server of this private swarm"
            )
        stream = await open_stream(
            self.host,
            self.port,
            timeout_s=timeout_s,
            compression=self.compression,
            policy=self.policy,
            limits=REPLY_LIMITS,
            tls=self.tls,
            relays=self.relays,
            peer_id=self.peer_id,
            swarm_key=key,
        )
        try:
            server_key = b""
            if self.tls:
                server_key = check_server(stream.ssl_object, self.peer_id, where)
            hello = Hello(
                protocol_version=PROTOCOL_VERSION,
                software_version=beed.__version__,
                peer_id=self.local_peer_id,
                swarm_proof="" if key is None else key.proof("client", server_key),
            )
            began = time.monotonic()
            await stream.send(hello, timeout_s=timeout_s)
            reply = await stream.read(timeout_s=timeout_s)
            stream.link.add_rtt(time.monotonic() - began)
            stream.link.last_rtt_probe = began
            if isinstance(reply, Error):
                raise reply.to_exception()
            if not isinstance(reply, Hello):
                raise InvalidReplyError(f"server answered Hello with {type(reply).__name__}")
            _version, codecs = negotiate(hello, reply)
            if key is not None and not key.check("server", server_key, reply.swarm_proof):
                raise PeerUnreachableError(f"{where} cannot prove this private swarm's key")
            if self.peer_id and reply.peer_id != self.peer_id:
                raise PeerUnreachableError(
                    f"{self.host}:{self.port} is peer {reply.peer_id[:16] or '(none)'}, "
                    f"not the expected {self.peer_id[:16]}"
                )
        except BaseException:
            await stream.aclose()
            raise
        stream.codec_policy = CodecPolicy(allowed=frozenset(codecs))
        self.remote_hello = reply
        stream.traffic = self.traffic
        self._stream = stream
        self._tasks.spawn(self._read_loop(), "read")

    def new_stream_id(self) -> int:
        return next(self._stream_ids)

    def _check_open(self) -> FramedStream:
        if self._stream is None or self._closed is not None:
            raise self._closed or ConnectionClosed(f"not connected to {self.host}:{self.port}")
        return self._stream

    def expect_step(
        self, stream_id: int, step_id: int, reply_bytes: int = 0
    ) -> asyncio.Future[Message]:
        """A future for the next StepResult of `step_id` on `stream_id` (or the Error that fails
        it), whether that step is sent on this connection or pushed to the server by another.
        Called twice, the second future gets the second such frame (a late push failure).
        `reply_bytes`: the size of the expected answer's tensors (see allow_reply_bytes)."""
        self._check_open()
        self.allow_reply_bytes(reply_bytes)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._step_waiters.setdefault((stream_id, step_id), collections.deque()).append(future)
        return future

    def allow_reply_bytes(self, nbytes: int) -> None:
        """Let this server's frames carry up to nbytes of tensors (twice the largest reply
        expected: a float32 answer to a bfloat16 step); never less than REPLY_LIMITS."""
        stream = self._check_open()
        limits = stream.decoder.limits
        want = 2 * nbytes + (1 << 20)
        if want > limits.max_decompressed_bytes:
            stream.decoder.limits = dataclasses.replace(
                limits, max_decompressed_bytes=want, max_frame_bytes=want + (1 << 20)
            )

    def forget_step(self, stream_id: int, step_id: int) -> None:
        """Stop waiting for that step's results (done, or its hop was replaced)."""
        for future in self._step_waiters.pop((stream_id, step_id), ()):
            if not future.done():
                future.cancel()

    async def ping(self, timeout_s: float) -> float:
        """One measured round trip to the server, in seconds (also kept in `link`)."""
        stream = self._check_open()
        nonce = stream.link.probe(0)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        began = time.monotonic()
        try:
            await stream.send(Ping(0, nonce), timeout_s=timeout_s)
            async with asyncio.timeout(timeout_s):
                answered = await future
        except TimeoutError as exc:
            raise PhaseTimeoutError(
                f"server {self.host}:{self.port} did not answer Ping within {timeout_s} s"
            ) from exc
        finally:
            self._pings.pop(nonce, None)
        return answered - began

    async def send(self, msg: Message, timeout_s: float) -> None:
        """Write msg without waiting for an answer (pair it with expect_step)."""
        try:
            await self._check_open().send(msg, timeout_s=timeout_s)
        except PhaseTimeoutError as exc:
            await self._fail(exc)
            raise

    async def wait(self, future: asyncio.Future[Message], what: str, timeout_s: float) -> Message:
        """The reply in `future`; an Error reply is raised, and after timeout_s the connection
        fails (a server that does not answer within a step's timeout is treated as dead)."""
        try:
            async with asyncio.timeout(timeout_s):
                reply = await asyncio.shield(future)
        except TimeoutError as exc:
            error = PhaseTimeoutError(
                f"server {self.host}:{self.port} did not answer {what} within {timeout_s} s"
            )
            await self._fail(error)
            raise error from exc
        if isinstance(reply, Error):
            raise reply.to_exception()
        return reply

    async def submit(self, msg: Message, timeout_s: float) -> asyncio.Future[Message]:
        """Send msg (not a Step) and return the future of its reply, for wait()."""
        stream = self._check_open()
        self.allow_reply_bytes(_tensor_bytes(msg))
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(msg.stream_id, collections.deque()).append(future)
        try:
            await stream.send(msg, timeout_s=timeout_s)
        except PhaseTimeoutError as exc:
            await self._fail(exc)
            raise
        return future

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send msg and wait for the reply on its stream; an Error reply is raised."""
        stream = self._check_open()
        if isinstance(msg, Step):
            future = self.expect_step(msg.stream_id, msg.step_id, 4 * msg.hidden.numel())
            await self.send(msg, timeout_s)
            try:
                return await self.wait(future, "Step", timeout_s)
            finally:
                self.forget_step(msg.stream_id, msg.step_id)
        self.allow_reply_bytes(_tensor_bytes(msg))
        future = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(msg.stream_id, collections.deque())
        queue.append(future)
        # The future stays queued even if this call is cancelled: the read loop then takes the
        # late reply off with it, so it can never be handed to the next request on the stream.
        try:
            await stream.send(msg, timeout_s=timeout_s)
        except PhaseTimeoutError as exc:
            await self._fail(exc)
            raise
        # Which reply belongs to which request is lost after a timeout: wait() fails the
        # connection then.
        return await self.wait(future, type(msg).__name__, timeout_s)

    async def _read_loop(self) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            while True:
                msg = await stream.read()
                if msg.stream_id == 0 and isinstance(msg, Error):
                    raise msg.to_exception()
                if isinstance(msg, Ping):
                    stream.send_nowait(Pong(msg.stream_id, msg.nonce))
                    continue
                if isinstance(msg, Pong):  # a link probe's answer (the stream accounted for it)
                    ping = self._pings.pop(msg.nonce, None)
                    if ping is not None and not ping.done():
                        ping.set_result(time.monotonic())
                    continue
                if isinstance(msg, StepResult):
                    key = (msg.stream_id, msg.step_id)
                    waiters = self._step_waiters.get(key)
                    while waiters and waiters[0].done():  # cancelled by a caller
                        waiters.popleft()
                    if not waiters:
                        self._step_waiters.pop(key, None)
                        log.debug("peer.late_step stream=%d step=%d", msg.stream_id, msg.step_id)
                        continue
                    waiters.popleft().set_result(msg)
                    if not waiters:
                        del self._step_waiters[key]
                    continue
                queue = self._waiters.get(msg.stream_id)
                if not queue and isinstance(msg, Error):
                    for key in [k for k in self._step_waiters if k[0] == msg.stream_id]:
                        for waiter in self._step_waiters.pop(key):
                            if not waiter.done():
                                waiter.set_result(msg)
                    continue
                if not queue:
                    log.debug(
                        "peer.unexpected stream=%d type=%s", msg.stream_id, type(msg).__name__
                    )
                    continue
                future = queue.popleft()
                if not queue:
                    del self._waiters[msg.stream_id]
                if not future.done():
                    future.set_result(msg)
        except BeeError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug must not leave every waiter hanging until its timeout
            log.exception("peer.read_failed host=%s port=%d", self.host, self.port)
            await self._fail(
                ConnectionClosed(f"reading from {self.host}:{self.port} failed: {exc!r}")
            )

    async def _fail(self, exc: BeeError) -> None:
        if self._closed is None:
            self._closed = exc
            log.debug("peer.closed host=%s port=%d reason=%s", self.host, self.port, exc)
        for futures in [*self._waiters.values(), *self._step_waiters.values()]:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
                    # Waiters still get it; one nobody awaits any more (a step whose result
                    # was given up, a Close that timed out) is not logged as never retrieved.
                    future.exception()
        self._waiters.clear()
        self._step_waiters.clear()
        if self._stream is not None:
            await self._stream.aclose()

    async def aclose(self) -> None:
        await self._fail(ConnectionClosed(f"connection to {self.host}:{self.port} closed"))
        await self._tasks.aclose()


def _tensor_bytes(msg: Message) -> int:
    """Bytes of msg's tensors in float32: what an answer of the same shapes may take."""
    total = 0
    for field in dataclasses.fields(msg):
        value = getattr(msg, field.name)
        if isinstance(value, torch.Tensor):
            total += 4 * value.numel()
    return total
