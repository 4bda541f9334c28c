"""A connection to one server, from a client or from a server pushing to the next: requests
multiplexed by stream id after the Hello handshake."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging

import beed
from beed.net.stream import FramedStream, open_stream
from beed.net.tasks import TaskOwner
from protocol.codecs import CodecPolicy
from protocol.errors import BadRequestError, BeeError, ConnectionClosed, PhaseTimeoutError
from protocol.messages import PROTOCOL_VERSION, Error, Hello, Message, negotiate

log = logging.getLogger(__name__)


class PeerConnection:
    """One connection to one server. Replies on a stream come back in request order, so each
    stream keeps a FIFO of waiting futures; an Error on stream 0 fails every waiter."""

    def __init__(self, host: str, port: int, *, peer_id: str = "") -> None:
        self.host, self.port, self.peer_id = host, port, peer_id
        self._stream: FramedStream | None = None
        self._waiters: dict[int, collections.deque[asyncio.Future[Message]]] = {}
        self._stream_ids = itertools.count(1)
        self._tasks = TaskOwner(f"peer-{host}:{port}")
        self._closed: BeeError | None = None
        self.remote_hello: Hello | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def connect(self, timeout_s: float) -> None:
        stream = await open_stream(self.host, self.port, timeout_s=timeout_s)
        try:
            hello = Hello(protocol_version=PROTOCOL_VERSION, software_version=beed.__version__)
            await stream.send(hello, timeout_s=timeout_s)
            reply = await stream.read(timeout_s=timeout_s)
            if isinstance(reply, Error):
                raise reply.to_exception()
            if not isinstance(reply, Hello):
                raise BadRequestError(f"server answered Hello with {type(reply).__name__}")
            _version, codecs = negotiate(hello, reply)
        except BaseException:
            await stream.aclose()
            raise
        stream.codec_policy = CodecPolicy(allowed=frozenset(codecs))
        self.remote_hello = reply
        self._stream = stream
        self._tasks.spawn(self._read_loop(), "read")

    def new_stream_id(self) -> int:
        return next(self._stream_ids)

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send msg and wait for the reply on its stream; an Error reply is raised."""
        if self._stream is None or self._closed is not None:
            raise self._closed or ConnectionClosed(f"not connected to {self.host}:{self.port}")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(msg.stream_id, collections.deque())
        queue.append(future)
        # The future stays queued even if this call is cancelled: the read loop then takes the
        # late reply off with it, so it can never be handed to the next request on the stream.
        try:
            await self._stream.send(msg, timeout_s=timeout_s)
            async with asyncio.timeout(timeout_s):
                reply = await future
        except (TimeoutError, PhaseTimeoutError) as exc:
            # Which reply belongs to which request is lost: this connection is done.
            error = PhaseTimeoutError(
                f"server {self.host}:{self.port} did not answer {type(msg).__name__} "
                f"within {timeout_s} s"
            )
            await self._fail(error)
            raise error from exc
        if isinstance(reply, Error):
            raise reply.to_exception()
        return reply

    async def _read_loop(self) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            while True:
                msg = await stream.read()
                if msg.stream_id == 0 and isinstance(msg, Error):
                    raise msg.to_exception()
                queue = self._waiters.get(msg.stream_id)
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
        for queue in self._waiters.values():
            for future in queue:
                if not future.done():
                    future.set_exception(exc)
        self._waiters.clear()
        if self._stream is not None:
            await self._stream.aclose()

    async def aclose(self) -> None:
        await self._fail(ConnectionClosed(f"connection to {self.host}:{self.port} closed"))
        await self._tasks.aclose()
