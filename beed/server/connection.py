"""One client (or peer server) connection: handshake, then requests dispatched by stream id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from beed.net.stream import FramedStream
from beed.net.tasks import TaskOwner
from beed.server.backend import BlockBackend, StepRequest
from beed.server.config import ServerConfig
from beed.server.scheduler import Scheduler
from beed.server.sessions import SessionRegistry
from protocol.codecs import CodecPolicy
from protocol.errors import (
    BadRequestError,
    BeeError,
    ConnectionClosed,
    DrainingError,
    InternalServerError,
    ModelMismatchError,
    PhaseTimeoutError,
    ProtocolError,
    SpanNotServedError,
    StreamStateError,
    TooManyStreamsError,
    UnknownMessageTypeError,
    UnknownSessionError,
)
from protocol.limits import StreamTable
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
    SessionOpened,
    Step,
    StepResult,
    Truncate,
    negotiate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServerState:
    """What every connection of a server shares."""

    config: ServerConfig
    backend: BlockBackend
    sessions: SessionRegistry
    fingerprint: str
    hello: Hello
    scheduler: Scheduler  # all compute of steps and stateless requests
    info: Callable[[], dict[str, Any]]
    draining: bool = False


class ServerConnection:
    """Serves one TCP connection until it closes; its sessions close with it."""

    def __init__(self, state: ServerState, stream: FramedStream, connection_id: int) -> None:
        self.state = state
        self.stream = stream
        self.id = connection_id
        self._tasks = TaskOwner(f"conn-{connection_id}", isolate=True)  # one per request
        self._streams = StreamTable(state.config.max_streams_per_connection)
        self._slots = asyncio.Semaphore(state.config.max_inflight_per_connection)

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
        self.stream.codec_policy = CodecPolicy(allowed=frozenset(codecs))
        reply = Hello(
            stream_id=0,
            protocol_version=self.state.hello.protocol_version,
            software_version=self.state.hello.software_version,
            codecs=codecs,
            peer_id=self.state.hello.peer_id,
            max_streams=self.state.config.max_streams_per_connection,
        )
        await self.stream.send(reply, timeout_s=self.state.config.write_timeout_s)

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

    async def _handle(self, msg: Message) -> Message:
        st = self.state
        key = SessionRegistry.key(self.id, msg.stream_id)
        if isinstance(msg, OpenSession):
            return await self._open(key, msg)
        if isinstance(msg, Step):
            session = st.sessions.get(key)
            async with session.lock:
                if session.cache is None:
                    raise UnknownSessionError("the session was closed while this step waited")
                tokens = msg.hidden.shape[1] if msg.hidden.dim() == 3 else 0
                if msg.position + tokens > session.max_length:
                    raise BadRequestError(
                        f"step at {msg.position} with {tokens} tokens exceeds the session's "
                        f"max_length {session.max_length}"
                    )
                if msg.hidden.dim() == 3 and msg.hidden.shape[0] != session.batch_size:
                    raise BadRequestError(
                        f"batch {msg.hidden.shape[0]} != session batch {session.batch_size}"
                    )
                request = StepRequest(
                    session.cache,
                    session.blocks,
                    msg.hidden,
                    msg.position,
                    msg.attention_mask,
                    msg.position_ids,
                )
                began = time.perf_counter()
                out = await st.scheduler.step(session.backend, request, key)
                if session.cache is None:  # closed while its step ran (the server moved)
                    raise UnknownSessionError("the session was closed while this step ran")
                log.debug(
                    "session.step key=%s position=%d tokens=%d compute_ms=%.2f",
                    key,
                    msg.position,
                    tokens,
                    1000 * (time.perf_counter() - began),
                )
                session.length = msg.position + tokens
                session.touch()
            # A drain notice: the server is shutting down, or moved and retires these blocks.
            draining = st.draining or session.backend is not st.backend
            return StepResult(msg.stream_id, msg.step_id, out, draining=draining)
        if isinstance(msg, Truncate):
            session = st.sessions.get(key)
            async with session.lock:
                if session.cache is None:
                    raise UnknownSessionError("the session was closed while this request waited")
                session.backend.truncate(session.cache, session.blocks, msg.position)
                session.length = msg.position
                session.touch()
            return Ack(msg.stream_id)
        if isinstance(msg, Close):
            session = st.sessions.get(key)  # 201 if it is gone already
            async with session.lock:  # after the session's earlier requests: replies stay in order
                st.sessions.close(key, "client")
            return Ack(msg.stream_id)
        if isinstance(msg, Forward):
            blocks = self._check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
            backend = st.backend
            out = await st.scheduler.call(
                lambda: backend.forward(blocks, msg.hidden, msg.attention_mask)
            )
            return ForwardResult(msg.stream_id, out)
        if isinstance(msg, Backward):
            blocks = self._check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
            backend = st.backend
            grad = await st.scheduler.call(
                lambda: backend.backward(blocks, msg.hidden, msg.grad_output, msg.attention_mask)
            )
            return BackwardResult(msg.stream_id, grad)
        raise BadRequestError(f"unexpected {type(msg).__name__}")  # pragma: no cover

    def _check_span(self, fingerprint: str, start: int, end: int) -> range:
        st = self.state
        if fingerprint != st.fingerprint:
            raise ModelMismatchError(
                f"this server holds model {st.fingerprint}, the request is for {fingerprint}"
            )
        info = st.backend.info
        if not info.start <= start < end <= info.end:
            raise SpanNotServedError(
                f"blocks {start}:{end} are not served here (this server has {info.start}:{info.end})"
            )
        return st.backend.blocks(start, end)

    async def _open(self, key: str, msg: OpenSession) -> Message:
        st = self.state
        if st.draining:
            raise DrainingError("this server is shutting down; open the session elsewhere")
        blocks = self._check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
        if not 0 < msg.max_length <= st.config.max_session_length:
            raise BadRequestError(
                f"max_length must be in 1..{st.config.max_session_length}, got {msg.max_length}"
            )
        if not 0 < msg.batch_size <= 1024:
            raise BadRequestError(f"batch_size must be in 1..1024, got {msg.batch_size}")
        if not math.isfinite(msg.timeout_s) or msg.timeout_s <= 0:
            raise BadRequestError(f"timeout_s must be a positive number, got {msg.timeout_s}")
        if not math.isfinite(msg.wait_s) or msg.wait_s < 0:
            raise BadRequestError(f"wait_s must be a number >= 0, got {msg.wait_s}")
        timeout_s = min(max(msg.timeout_s, 1.0), st.config.session_timeout_s)
        backend = st.backend
        await st.sessions.open(
            key,
            wait_s=min(msg.wait_s, st.config.max_kv_wait_s),
            blocks=blocks,
            span=(msg.span_start, msg.span_end),
            max_length=msg.max_length,
            batch_size=msg.batch_size,
            timeout_s=timeout_s,
            cache=backend.new_cache(),
            backend=backend,
            on_close=lambda: self._streams.close(msg.stream_id),
        )
        if st.draining or backend is not st.backend:  # it began to drain (or moved) meanwhile
            st.sessions.close(key, "draining")
            why = "is shutting down" if st.draining else "moved to other blocks"
            raise DrainingError(f"this server {why}; open the session elsewhere")
        return SessionOpened(msg.stream_id, msg.span_start, msg.span_end, msg.max_length)
