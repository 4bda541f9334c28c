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
import time
from collections.abc import Awaitable
from typing import TypeVar

from beed.net.stream import FramedStream, decode_message
from beed.net.tasks import TaskOwner
from beed.server.admission import peer_of
from beed.server.service import ServerState, SessionService, too_many_tokens
from beed.server.sessions import SessionRegistry
from protocol.codecs import CodecPolicy
from protocol.errors import (
    BadRequestError,
    BeeError,
    ConnectionClosed,
    InternalServerError,
    PhaseTimeoutError,
    ProtocolError,
    PushRefusedError,
    ServerBusyError,
    StreamStateError,
    TooManyStreamsError,
    UnauthorizedError,
    UnknownMessageTypeError,
    UnknownSessionError,
)
from protocol.frames import EncodedFrame
from protocol.limits import Limits, StreamTable
from protocol.messages import (
    MESSAGE_TYPES,
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

UNREAD_POLL_S = 0.02  # how soon a connection waiting for its peer to read looks again
UNREAD_POLL_MAX_S = 0.32  # ... at most, backing off while the peer reads nothing
# Compressed activations shrink ~1.2-2x; a segment claiming more than this is refused (109).
MAX_COMPRESSION_RATIO = 32
# Until its Hello, a peer may send one small frame without tensors.
HANDSHAKE_LIMITS = Limits(
    max_frame_bytes=64 * 1024, max_header_bytes=16 * 1024, max_decompressed_bytes=0
)


class ServerConnection:
    """Serves one TCP connection until it closes; its sessions close with it."""

    def __init__(self, state: ServerState, stream: FramedStream, connection_id: int) -> None:
        self.state = state
        self.service = SessionService(state)
        self.stream = stream
        self.id = connection_id
        self.peer = peer_of(stream.peername)
        self._tasks = TaskOwner(f"conn-{connection_id}", isolate=True)  # one per request
        self._streams = StreamTable(state.config.max_streams_per_connection)
        self._slots = asyncio.Semaphore(state.config.max_inflight_per_connection)
        self._inflight = 0
        self._stepping: dict[int, asyncio.Event] = {}  # stream id -> its running Step's end
        self._last_active = time.monotonic()
        self.remote_hello: Hello | None = None

    @property
    def idle_since(self) -> float | None:
        """Since when this connection has had no open stream and no request running."""
        return None if self._inflight or len(self._streams) else self._last_active

    def abort(self, reason: str) -> None:
        log.info("conn.abort id=%d peer=%s reason=%s", self.id, self.stream.peername, reason)
        self.stream.writer.close()

    async def run(self) -> None:
        prefix = SessionRegistry.key(self.id, 0)[:-1]  # "c{id}/s"
        try:
            await self._handshake()
            await self._serve()
        except ConnectionClosed:
            pass
        except PhaseTimeoutError as exc:
            log.info("conn.timeout id=%d peer=%s error=%s", self.id, self.stream.peername, exc)
        except ProtocolError as exc:
            log.warning(
                "conn.protocol_error id=%d peer=%s error=%s", self.id, self.stream.peername, exc
            )
            try:
                await self._answer(Error.from_exception(0, exc), timeout_s=1.0)
            except BeeError:
                pass
        except UnauthorizedError as exc:
            log.info("conn.unauthorized id=%d peer=%s", self.id, self.stream.peername)
            self.state.errors_sent[exc.code] += 1
            with contextlib.suppress(BeeError):
                await self._answer(Error.from_exception(0, exc), timeout_s=1.0)
        finally:
            await self._tasks.aclose()
            self.state.memory.release_connection(self.id)  # requests cancelled unstarted
            # A forward may still be writing these sessions' caches: their memory is given
            # back only once it is done.
            await self.state.scheduler.settle(prefix)
            closed = self.state.sessions.close_prefix(prefix, "disconnect")
            await self.stream.aclose()
            log.debug("conn.closed id=%d sessions=%d", self.id, closed)

    async def _serve(self) -> None:
        """Read frames until the peer leaves, breaks the spec, or stays idle too long.

        Each frame's decoded size is reserved against this connection's and the server's
        memory budget before it is decompressed (off the event loop); the reservation ends with
        the request. Waiting for room stops reading this connection (backpressure)."""
        limits = self.state.config.limits
        memory = self.state.memory
        while True:
            try:
                encoded = await self.stream.read_encoded(timeout_s=limits.idle_timeout_s)
            except PhaseTimeoutError:
                if self.idle_since is not None:
                    raise PhaseTimeoutError(
                        f"idle for {limits.idle_timeout_s} s with no session"
                    ) from None
                continue  # busy: a session or request is open; keep the partial frame
            self._last_active = time.monotonic()
            if encoded.type not in MESSAGE_TYPES:
                # A newer peer's message: refused on its stream, the connection stays (spec §8).
                error = UnknownMessageTypeError(f"unknown message type {encoded.type}")
                await self._answer(Error.from_exception(encoded.stream_id, error))
                continue
            refusal = self._precheck(encoded)
            if refusal is not None:
                await self._refuse(encoded, refusal)
                continue
            if MESSAGE_TYPES[encoded.type] is Step:
                await self._previous_step(encoded.stream_id)
            if MESSAGE_TYPES[encoded.type] in (Step, Forward, Backward):
                await self._wait_for_reader()
            nbytes = encoded.raw_bytes
            if nbytes:
                try:
                    await memory.acquire(self.id, nbytes, limits.buffer_wait_s)
                except BeeError as exc:
                    await self._refuse(encoded, exc)
                    continue
            try:
                msg = self.stream.accounted(await decode_message(encoded))
            except BaseException:
                memory.release(self.id, nbytes)
                raise
            await self._dispatch(msg, nbytes)

    async def _previous_step(self, stream_id: int) -> None:
        """Wait until the session's previous Step has finished. A client sends a session's next
        step only once it has the previous answer (its input depends on it), so this costs an
        honest client nothing; a peer that pipelines steps stops this connection's reads
        instead of queueing up to max_inflight_per_connection of them for compute."""
        running = self._stepping.get(stream_id)
        if running is not None:
            await running.wait()

    async def _wait_for_reader(self) -> None:
        """Before computing more for this peer, wait until it has read its earlier answers (to
        within --max-unread-kib): a peer that pipelines steps and never reads would otherwise
        get compute whose answers only pile up. Not reading stops this connection's reads; a
        peer whose unread answers do not shrink for write_timeout_s is closed. An honest client
        loses nothing: its answers queue behind the unread ones on the same socket anyway."""
        limit = self.state.config.limits.max_unread_kib * 1024
        unsent = self.stream.unsent_bytes()
        if unsent <= limit:
            return
        self.state.admission.reader_waits += 1
        timeout_s = self.state.config.write_timeout_s
        deadline = time.monotonic() + timeout_s
        poll_s = UNREAD_POLL_S
        while unsent > limit:
            if self.stream.peer_gone():
                raise ConnectionClosed(f"{self.stream.peername} closed the connection")
            if time.monotonic() > deadline:
                self.state.admission.reader_closed += 1
                raise PhaseTimeoutError(
                    f"left {unsent} bytes of answers unread for {timeout_s:.0f} s"
                )
            await asyncio.sleep(poll_s)
            now = self.stream.unsent_bytes()
            if now < unsent:  # it reads, however slowly: keep waiting, and look again soon
                deadline = time.monotonic() + timeout_s
                poll_s = UNREAD_POLL_S
            else:  # a thousand stalled connections must not cost a core in polling
                poll_s = min(2 * poll_s, UNREAD_POLL_MAX_S)
            unsent = now

    def _precheck(self, encoded: EncodedFrame) -> BeeError | None:
        """Why a frame will be refused, known from its header alone (before anything is
        decompressed): a session request on a stream with no session, a Push no session here
        accepts, or more rows x tokens than this server takes in one request."""
        cls = MESSAGE_TYPES[encoded.type]
        header = encoded.header
        if cls in (Step, Truncate, Close) and encoded.stream_id not in self._streams:
            return UnknownSessionError(
                f"no open session on this stream ({encoded.stream_id}): closed or timed out "
                "(or never opened)"
            )
        if cls is Push:
            token = header.get("token")
            if not isinstance(token, str) or self.state.sessions.by_token(token) is None:
                self.state.push_stats.pushes_refused += 1
                return PushRefusedError("no session here accepts this push token")
        if cls in (Step, Push, Forward, Backward):
            limits = self.state.config.limits
            limit = limits.max_backward_tokens if cls is Backward else limits.max_request_tokens
            index = header.get("hidden")
            if type(index) is int and 0 <= index < len(encoded.segments):
                return too_many_tokens(cls.__name__, encoded.segments[index][0].shape, limit)
        return None

    async def _refuse(self, encoded: EncodedFrame, exc: BeeError) -> None:
        """Answer a frame that is not taken (undecoded); a session it was for is gone (spec §8)."""
        log.debug("request.refused id=%d peer=%s error=%s", self.id, self.peer, exc)
        sid = encoded.stream_id
        if isinstance(exc, ServerBusyError):  # after 205 the session is gone (spec §8)
            self.state.sessions.close(SessionRegistry.key(self.id, sid), "refused")
        if SessionRegistry.key(self.id, sid) not in self.state.sessions:
            self._streams.close(sid)
        await self._answer(Error.from_exception(sid, exc))

    async def _handshake(self) -> None:
        limits = self.state.config.limits
        decoder = self.stream.decoder
        decoder.limits = HANDSHAKE_LIMITS
        try:
            msg = await self.stream.read(timeout_s=limits.hello_timeout_s)
        except UnknownMessageTypeError as exc:
            raise StreamStateError(f"the first frame must be Hello ({exc})") from exc
        except PhaseTimeoutError:
            raise PhaseTimeoutError(f"no Hello within {limits.hello_timeout_s} s") from None
        if not isinstance(msg, Hello):
            raise StreamStateError(f"the first frame must be Hello, got {type(msg).__name__}")
        _version, codecs = negotiate(self.state.hello, msg)
        key = self.state.swarm_key
        if key is not None and not (
            self.stream.ssl_object is not None
            and key.check("client", self.state.public_key, msg.swarm_proof)
        ):
            raise UnauthorizedError(
                "this server belongs to a private swarm: connect with its --swarm-key"
            )
        self.remote_hello = msg
        per_request = self.state.memory.per_connection_bytes
        decoder.limits = Limits(
            max_frame_bytes=per_request + (1 << 20),
            max_decompressed_bytes=per_request,
            max_compression_ratio=MAX_COMPRESSION_RATIO,
        )
        self.stream.codec_policy = CodecPolicy(allowed=frozenset(codecs))
        reply = Hello(
            stream_id=0,
            protocol_version=self.state.hello.protocol_version,
            software_version=self.state.hello.software_version,
            codecs=codecs,
            peer_id=self.state.hello.peer_id,
            max_streams=self.state.config.max_streams_per_connection,
            max_frame_bytes=decoder.limits.max_frame_bytes,
            features=self.state.hello.features,
            swarm_proof="" if key is None else key.proof("server", self.state.public_key),
        )
        await self.stream.send(reply, timeout_s=self.state.config.write_timeout_s)
        self.stream.ping_rtt()  # this side's round trip to the peer (for its codec policy)

    async def _dispatch(self, msg: Message, nbytes: int = 0) -> None:
        """Answer cheap requests inline; run compute requests as owned tasks.

        Requests that open a stream (OpenSession, GetInfo, Forward, Backward) count against the
        connection's stream limit; one too many is refused on its stream (115, retryable), a
        stream id reused while open is a protocol violation (116) that closes the connection.
        At most `max_inflight_per_connection` requests run at once: past that the connection
        is not read until one finishes (backpressure), and inline answers wait for the peer to
        read them, so a client that never reads cannot grow the server's buffers.
        `nbytes` of the memory budget are held by msg's tensors until its request ends.
        """
        spawned = False
        try:
            spawned = await self._dispatch_one(msg, nbytes)
        finally:
            if not spawned:
                self.state.memory.release(self.id, nbytes)

    async def _dispatch_one(self, msg: Message, nbytes: int) -> bool:
        sid = msg.stream_id
        if isinstance(msg, Error | Pong):
            log.debug("conn.ignored id=%d type=%s", self.id, type(msg).__name__)
            return False  # answers are never answered (two peers would bounce errors forever)
        if isinstance(msg, Ping):
            await self._answer(Pong(sid, msg.nonce))
            return False
        if isinstance(msg, GetInfo | OpenSession | Forward | Backward):
            try:
                self._streams.open(sid)
            except TooManyStreamsError as exc:
                await self._answer(Error.from_exception(sid, exc))
                return False
        if isinstance(msg, GetInfo):
            self._streams.close(sid)
            await self._answer(Info(sid, self.state.info()))
        elif isinstance(msg, Step | Truncate | Close | OpenSession | Forward | Backward | Push):
            await self._slots.acquire()
            self._inflight += 1
            work = (
                self._push(msg) if isinstance(msg, Push) else self._guarded(sid, self._handle(msg))
            )
            if isinstance(msg, Step):  # registered now: the next frame is read before it runs
                done = self._stepping[sid] = asyncio.Event()
                work = self._one_step(sid, done, work)
            if self._tasks.spawn(self._request(work, nbytes), name=f"s{sid}") is None:
                work.close()  # a coroutine, never started
                self._stepping.pop(sid, None)
                self._finished(nbytes)
            return True
        else:
            error = BadRequestError(f"unexpected {type(msg).__name__} from a client")
            await self._answer(Error.from_exception(sid, error))
        return False

    async def _one_step(self, sid: int, done: asyncio.Event, work: Awaitable[None]) -> None:
        try:
            await work
        finally:
            done.set()
            if self._stepping.get(sid) is done:
                del self._stepping[sid]

    async def _request(self, work: Awaitable[None], nbytes: int) -> None:
        try:
            await work
        finally:
            self._finished(nbytes)

    def _finished(self, nbytes: int) -> None:
        self.state.memory.release(self.id, nbytes)
        self._inflight -= 1
        self._last_active = time.monotonic()
        self._slots.release()

    async def _answer(self, msg: Message, timeout_s: float | None = None) -> None:
        """Every answer of this connection goes out here (Errors are counted by code)."""
        if isinstance(msg, Error):
            self.state.errors_sent[msg.code] += 1
        timeout = self.state.config.write_timeout_s if timeout_s is None else timeout_s
        await self.stream.send(msg, timeout_s=timeout)

    async def _guarded(self, sid: int, work: Awaitable[Message]) -> None:
        """Run one request; any failure becomes an Error frame on its stream, never a crash."""
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
            await self._answer(reply)

    async def _push(self, msg: Push) -> None:
        """Accept (Ack) or refuse (Error) a Push at once, then run it; its result goes to the
        owner of the session it names, not to the pushing server."""
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
                peer=self.peer,
            )
        if isinstance(msg, Step):
            return await service.step(key, msg)
        if isinstance(msg, Truncate):
            return await service.truncate(key, msg)
        if isinstance(msg, Close):
            return await service.close(key, msg.stream_id)
        if isinstance(msg, Forward):
            return await service.forward(msg, self.peer)
        if isinstance(msg, Backward):
            return await service.backward(msg)
        raise BadRequestError(f"unexpected {type(msg).__name__}")  # pragma: no cover
