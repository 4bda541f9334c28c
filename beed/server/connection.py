"""One client (or peer server) connection: handshake, stream table and dispatch.

The work of each request is the session service's (beed/server/service.py); a connection only
reads frames, keeps the stream limits, runs requests as owned tasks and writes their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable
from typing import TypeVar

from beed.net.stream import FramedStream
from beed.net.tasks import TaskOwner
from beed.server.service import ServerState, SessionService
from beed.server.sessions import SessionRegistry
from protocol.codecs import CodecPolicy
from protocol.errors import (
    BadRequestError,
    BeeError,
    ConnectionClosed,
    InternalServerError,
    PhaseTimeoutError,
    ProtocolError,
    StreamStateError,
    TooManyStreamsError,
    UnknownMessageTypeError,
)
from protocol.limits import StreamTable
from protocol.messages import (
    Ack,
    Backward,
    Close,
    Error,
    Forward,
    GetInfo,
    Hello,
    Info,
    Message,
    OpenSession,
    Ping,
    Pong,
    Push,
    Step,
    Truncate,
    negotiate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class ServerConnection:
    """Serves one TCP connection until it closes; its sessions close with it."""

    def __init__(self, state: ServerState, stream: FramedStream, connection_id: int) -> None:
        self.state = state
        self.service = SessionService(state)
        self.stream = stream
        self.id = connection_id
        self._tasks = TaskOwner(f"conn-{connection_id}", isolate=True)  # one per request
        self._streams = StreamTable(state.config.max_streams_per_connection)
        self._slots = asyncio.Semaphore(state.config.max_inflight_per_connection)
        self.remote_hello: Hello | None = None

    async def run(self) -> None:
        prefix = SessionRegistry.key(self.id, 0)[:-1]  # "c{id}/s"
        try:
            await self._handshake()
            while True:
                try:
                    msg = await self.stream.read()
                except UnknownMessageTypeError as exc:
                    # A newer peer's message: refused on its stream, the connection stays (spec §8).
                    await self._answer(Error.from_exception(getattr(exc, "stream_id", 0), exc))
                    continue
                await self._dispatch(msg)
        except ConnectionClosed:
            pass
        except PhaseTimeoutError as exc:
            log.info("conn.timeout id=%d peer=%s error=%s", self.id, self.stream.peername, exc)
        except ProtocolError as exc:
            log.warning(
                "conn.protocol_error id=%d peer=%s error=%s", self.id, self.stream.peername, exc
            )
            try:
                await self.stream.send(Error.from_exception(0, exc), timeout_s=1.0)
            except BeeError:
                pass
        finally:
            await self._tasks.aclose()
            # A forward may still be writing these sessions' caches: their memory is given
            # back only once it is done.
            await self.state.scheduler.settle(prefix)
            closed = self.state.sessions.close_prefix(prefix, "disconnect")
            await self.stream.aclose()
            log.debug("conn.closed id=%d sessions=%d", self.id, closed)

    async def _handshake(self) -> None:
        try:
            msg = await self.stream.read(timeout_s=self.state.config.hello_timeout_s)
        except UnknownMessageTypeError as exc:
            raise StreamStateError(f"the first frame must be Hello ({exc})") from exc
        if not isinstance(msg, Hello):
            raise StreamStateError(f"the first frame must be Hello, got {type(msg).__name__}")
        _version, codecs = negotiate(self.state.hello, msg)
        self.remote_hello = msg
        self.stream.codec_policy = CodecPolicy(allowed=frozenset(codecs))
        reply = Hello(
            stream_id=0,
            protocol_version=self.state.hello.protocol_version,
            software_version=self.state.hello.software_version,
            codecs=codecs,
            peer_id=self.state.hello.peer_id,
            max_streams=self.state.config.max_streams_per_connection,
            features=self.state.hello.features,
        )
        await self.stream.send(reply, timeout_s=self.state.config.write_timeout_s)
        self.stream.ping_rtt()  # this side's round trip to the peer (for its codec policy)

    async def _dispatch(self, msg: Message) -> None:
        """Answer cheap requests inline; run compute requests as owned tasks.

        Requests that open a stream (OpenSession, GetInfo, Forward, Backward) count against the
        connection's stream limit; one too many is refused on its stream (115, retryable), a
        stream id reused while open is a protocol violation (116) that closes the connection.
        At most `max_inflight_per_connection` requests run at once: past that the connection
        is not read until one finishes (backpressure), and inline answers wait for the peer to
        read them, so a client that never reads cannot grow the server's buffers.
        """
        sid = msg.stream_id
        if isinstance(msg, Error | Pong):
            log.debug("conn.ignored id=%d type=%s", self.id, type(msg).__name__)
            return  # answers are never answered (two peers would bounce errors forever)
        if isinstance(msg, Ping):
            await self._answer(Pong(sid, msg.nonce))
            return
        if isinstance(msg, GetInfo | OpenSession | Forward | Backward):
            try:
                self._streams.open(sid)
            except TooManyStreamsError as exc:
                await self._answer(Error.from_exception(sid, exc))
                return
        if isinstance(msg, GetInfo):
            self._streams.close(sid)
            await self._answer(Info(sid, self.state.info()))
        elif isinstance(msg, Step | Truncate | Close | OpenSession | Forward | Backward):
            await self._slots.acquire()
            self._tasks.spawn(self._guarded(sid, self._handle(msg)), name=f"s{sid}")
        elif isinstance(msg, Push):
            await self._slots.acquire()
            self._tasks.spawn(self._push(msg), name=f"push{sid}")
        else:
            error = BadRequestError(f"unexpected {type(msg).__name__} from a client")
            await self._answer(Error.from_exception(sid, error))

    async def _answer(self, msg: Message) -> None:
        await self.stream.send(msg, timeout_s=self.state.config.write_timeout_s)

    async def _guarded(self, sid: int, work: Awaitable[Message]) -> None:
        """Run one request; any failure becomes an Error frame on its stream, never a crash."""
        try:
            try:
                reply = await work
            except BeeError as exc:
                reply = Error.from_exception(sid, exc)
            except Exception as exc:
                log.exception("request.failed stream=%d", sid)
                reply = Error.from_exception(sid, InternalServerError(f"internal error: {exc!r}"))
                # A bug may have left the session's cache half-updated: drop it (spec §8, 299).
                self.state.sessions.close(SessionRegistry.key(self.id, sid), "internal-error")
            if SessionRegistry.key(self.id, sid) not in self.state.sessions:
                # One-shot answers, Close's Ack, refused opens and gone sessions end the stream.
                self._streams.close(sid)
            with contextlib.suppress(BeeError):
                await self.stream.send(reply, timeout_s=self.state.config.write_timeout_s)
        finally:
            self._slots.release()

    async def _push(self, msg: Push) -> None:
        """Accept (Ack) or refuse (Error) a Push at once, then run it; its result goes to the
        owner of the session it names, not to the pushing server."""
        try:
            sender = self.remote_hello.peer_id if self.remote_hello is not None else ""
            try:
                session, hops = self.service.accept_push(sender, msg)
            except BeeError as exc:
                log.info("push.refused id=%d peer=%s error=%s", self.id, self.stream.peername, exc)
                with contextlib.suppress(BeeError):
                    await self._answer(Error.from_exception(msg.stream_id, exc))
                return
            with contextlib.suppress(BeeError):
                await self._answer(Ack(msg.stream_id))
            await self.service.run_push(session, hops, msg)
        finally:
            self._slots.release()

    async def send_on_stream(self, stream_id: int, msg: Message) -> None:
        """Send msg to this connection's peer on `stream_id` (results of pushed steps)."""
        with contextlib.suppress(BeeError):
            await self._answer(dataclasses.replace(msg, stream_id=stream_id))

    async def _handle(self, msg: Message) -> Message:
        key = SessionRegistry.key(self.id, msg.stream_id)
        service = self.service
        if isinstance(msg, OpenSession):
            return await service.open(
                key,
                msg,
                on_close=lambda: self._streams.close(msg.stream_id),
                send_to_owner=functools.partial(self.send_on_stream, msg.stream_id),
            )
        if isinstance(msg, Step):
            return await service.step(key, msg)
        if isinstance(msg, Truncate):
            return await service.truncate(key, msg)
        if isinstance(msg, Close):
            return await service.close(key, msg.stream_id)
        if isinstance(msg, Forward):
            return await service.forward(msg)
        if isinstance(msg, Backward):
            return await service.backward(msg)
        raise BadRequestError(f"unexpected {type(msg).__name__}")  # pragma: no cover
