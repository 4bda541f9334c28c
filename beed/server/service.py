"""The session service: open, step, push, truncate and close sessions; stateless Forward/Backward.

Connections only parse, dispatch and answer; every request that touches a session or the blocks
comes here, is checked once, and runs its torch work on the compute thread (through the
scheduler). Sessions are keyed by the connection and stream that opened them.

Push: a Step may name the rest of the route (`next_hops`). The server then pushes its output to
the next hop's session (named by the token its owner opened it with) and answers the Step with a
copy that says whether the push was accepted. A pushed step runs like a Step of that session,
pushes on, and its result goes to the session's owner on the session's stream. A step that
arrives twice (push and the client's fallback) runs once.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from beed.models.tree_mask import build_tree, check_parents
from beed.net.swarm_key import SwarmKey
from beed.net.tasks import TaskOwner
from beed.net.traffic import TensorTraffic
from beed.server.admission import Admission
from beed.server.backend import BlockBackend, StepRequest
from beed.server.config import ServerConfig
from beed.server.memory import MemoryBudget
from beed.server.push import NextHop, Pusher, check_token, parse_next_hops
from beed.server.scheduler import MIN_CHUNK_POSITIONS, Scheduler
from beed.server.sessions import Session, SessionRegistry
from protocol.errors import (
    BadRequestError,
    BeeError,
    DrainingError,
    InternalServerError,
    ModelMismatchError,
    PushRefusedError,
    RequestTooLargeError,
    SpanNotServedError,
    UnknownSessionError,
)
from protocol.messages import (
    Ack,
    Backward,
    BackwardResult,
    Error,
    Forward,
    ForwardResult,
    Hello,
    Message,
    OpenSession,
    Push,
    SessionOpened,
    Step,
    StepResult,
    Truncate,
)

log = logging.getLogger(__name__)
_forward_ids = itertools.count(1)


@dataclass
class PushStats:
    """Counters of the push path (GetInfo reports them)."""

    pushes_sent: int = 0  # pushes the next hop accepted
    pushes_received: int = 0  # pushes this server accepted and ran (or answered from the cache)
    push_failures: int = 0  # pushes that could not be delivered or were refused by the next hop
    pushes_refused: int = 0  # pushes this server refused (unknown token, no sender id, ...)
    duplicate_steps: int = 0  # steps answered from the last result instead of running again


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
    pusher: Pusher
    tasks: TaskOwner  # background work of requests (push confirmations); per-request, isolated
    memory: MemoryBudget  # decoded request tensors held at once
    admission: Admission  # live connections, by peer
    draining: bool = False
    push_stats: PushStats = field(default_factory=PushStats)
    observe_step: Callable[[float, int], None] | None = None  # metrics: seconds, tokens
    errors_sent: collections.Counter[int] = field(default_factory=collections.Counter)  # by code
    traffic: TensorTraffic = field(default_factory=TensorTraffic)  # tensor bytes by codec
    public_key: bytes = b""  # this server's identity key (the TLS certificate's)
    swarm_key: SwarmKey | None = None  # a private swarm's: every Hello must prove it


class SessionService:
    """The server's one implementation of every session and block request."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def check_span(self, fingerprint: str, start: int, end: int) -> range:
        """Local block indices of [start, end), or why this server cannot run them."""
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

    async def open(
        self,
        key: str,
        msg: OpenSession,
        on_close: Callable[[], object],
        send_to_owner: Callable[[Message], Awaitable[None]],
        peer: str = "local",
    ) -> SessionOpened:
        st = self.state
        if msg.push_token:
            check_token(msg.push_token)
        if st.draining:
            raise DrainingError("this server is shutting down; open the session elsewhere")
        blocks = self.check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
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
            on_close=on_close,
            push_token=msg.push_token,
            send_to_owner=send_to_owner,
            peer=peer,
        )
        if st.draining or backend is not st.backend:  # it began to drain (or moved) meanwhile
            st.sessions.close(key, "draining")
            why = "is shutting down" if st.draining else "moved to other blocks"
            raise DrainingError(f"this server {why}; open the session elsewhere")
        return SessionOpened(msg.stream_id, msg.span_start, msg.span_end, msg.max_length)

    async def step(self, key: str, msg: Step) -> StepResult:
        session = self.state.sessions.get(key)
        hops = parse_next_hops(msg.next_hops)
        out = await self._run(session, msg)
        push_error = ""
        if hops:
            push_error = await self._push_on(session, hops, msg, out)
        return StepResult(
            msg.stream_id, msg.step_id, out, draining=self._draining(session), push_error=push_error
        )

    def accept_push(self, sender_peer_id: str, msg: Push) -> tuple[Session, list[NextHop]]:
        """The session a Push runs on and where to push on, or PushRefusedError (only a server,
        a peer that named its peer id in Hello, holding the token the session's owner opened
        it with may push) or BadRequestError (a malformed route)."""
        stats = self.state.push_stats
        if not sender_peer_id:
            stats.pushes_refused += 1
            raise PushRefusedError("only a server that names its peer id in Hello may push")
        session = self.state.sessions.by_token(msg.token) if msg.token else None
        if session is None or session.cache is None:
            stats.pushes_refused += 1
            raise PushRefusedError(
                "no session here accepts this push token (never opened with it, closed or "
                "timed out)"
            )
        try:
            hops = parse_next_hops(msg.next_hops)
        except BadRequestError:
            stats.pushes_refused += 1
            raise
        return session, hops

    async def run_push(self, session: Session, hops: list[NextHop], msg: Push) -> None:
        """Run an accepted Push as the session's step, push on, tell the owner the result."""
        sid = SessionRegistry.stream_of(session.key)
        reply: Message
        try:
            out = await self._run(session, msg)
            self.state.push_stats.pushes_received += 1
            push_error = ""
            if hops:
                push_error = await self._push_on(session, hops, msg, out)
            reply = StepResult(
                sid, msg.step_id, out, draining=self._draining(session), push_error=push_error
            )
        except BeeError as exc:
            reply = Error.from_exception(sid, exc)
        except Exception as exc:
            log.exception("push.failed key=%s", session.key)
            reply = Error.from_exception(sid, InternalServerError(f"internal error: {exc!r}"))
            self.state.sessions.close(session.key, "internal-error")
        if session.send_to_owner is not None:
            await session.send_to_owner(reply)

    async def _run(self, session: Session, msg: Step | Push) -> torch.Tensor:
        """One step of the session; on a push route, once: a repeat of its last step (same id,
        position and input bits) returns the last output, and an older step is refused."""
        st = self.state
        step_id, position, hidden = msg.step_id, msg.position, msg.hidden
        async with session.lock:
            _check_open(session, "step waited")
            if session.push_token and session.last_step is not None:
                if session.last_step == (step_id, position) and torch.equal(
                    hidden, session.last_input
                ):
                    st.push_stats.duplicate_steps += 1
                    return session.last_output
                if step_id < session.last_step[0]:
                    raise BadRequestError(
                        f"step {step_id} is older than the session's last step "
                        f"{session.last_step[0]}"
                    )
            tokens = hidden.shape[1] if hidden.dim() == 3 else 0
            _check_tokens(hidden, st.config.limits.max_request_tokens, "step")
            if position + tokens > session.max_length:
                raise BadRequestError(
                    f"step at {position} with {tokens} tokens exceeds the session's "
                    f"max_length {session.max_length}"
                )
            if hidden.dim() == 3 and hidden.shape[0] != session.batch_size:
                raise BadRequestError(
                    f"batch {hidden.shape[0]} != session batch {session.batch_size}"
                )
            tree = None
            if msg.tree is not None:
                check_parents(msg.tree, hidden.shape[0], tokens)
                tree = build_tree(msg.tree, position)
            request = StepRequest(
                session.cache,
                session.blocks,
                hidden,
                position,
                msg.attention_mask,
                msg.position_ids,
                tree,
            )
            began = time.perf_counter()
            out = await st.scheduler.step(session.backend, request, session.key, session.peer)
            if st.observe_step is not None:
                st.observe_step(time.perf_counter() - began, tokens)
            _check_open(session, "step ran (the server moved)")
            log.debug(
                "session.step key=%s position=%d tokens=%d compute_ms=%.2f",
                session.key,
                position,
                tokens,
                1000 * (time.perf_counter() - began),
            )
            session.length = position + tokens
            session.stepped = True
            session.touch()
            if session.push_token:  # only sessions on a push route can see a step twice
                session.last_step = (step_id, position)
                session.last_input, session.last_output = hidden, out
        return out

    async def _push_on(
        self,
        session: Session,
        hops: list[NextHop],
        msg: Step | Push,
        out: torch.Tensor,
    ) -> str:
        """Push `out` to the first of `hops` (with the rest of the route): "" once it is written,
        else why it could not be (the client then sends that hop the output itself).

        The next hop's Ack is awaited in the background, not before the answer to the client
        (that would put a round trip between two servers on the path of every copy): if the
        Ack does not come, the session's owner gets a second StepResult for the step with the
        reason in `push_error` (docs/protocol.md, Push)."""
        first, rest = hops[0], hops[1:]
        push = Push(
            0,
            token=first.token,
            step_id=msg.step_id,
            position=msg.position,
            hidden=out,
            attention_mask=msg.attention_mask,
            position_ids=msg.position_ids,
            next_hops=tuple(h.as_dict() for h in rest),
            tree=msg.tree,
        )
        try:
            ack = await self.state.pusher.send(first, push)
        except BeeError as exc:
            return self._push_failed(first, exc)
        self.state.tasks.spawn(
            self._confirm_push(session, first, ack, msg.step_id, out),
            name=f"confirm-{msg.step_id}",
        )
        return ""

    async def _confirm_push(
        self,
        session: Session,
        hop: NextHop,
        ack: Awaitable[None],
        step_id: int,
        out: torch.Tensor,
    ) -> None:
        try:
            await ack
        except BeeError as exc:
            error = self._push_failed(hop, exc)
            if session.send_to_owner is not None and session.cache is not None:
                sid = SessionRegistry.stream_of(session.key)
                await session.send_to_owner(StepResult(sid, step_id, out, push_error=error))
            return
        self.state.push_stats.pushes_sent += 1

    def _push_failed(self, hop: NextHop, exc: BeeError) -> str:
        self.state.push_stats.push_failures += 1
        log.info("push.failed to=%s:%d peer=%s error=%s", hop.host, hop.port, hop.peer_id[:8], exc)
        return f"push to {hop.host}:{hop.port} failed: {exc}"

    def _draining(self, session: Session) -> bool:
        """A drain notice: the server is shutting down, or moved and retires these blocks."""
        return self.state.draining or session.backend is not self.state.backend

    async def truncate(self, key: str, msg: Truncate) -> Ack:
        st = self.state
        session = st.sessions.get(key)
        async with session.lock:
            _check_open(session, "request waited")
            cache, blocks, backend = session.cache, session.blocks, session.backend
            await st.scheduler.control(lambda: backend.truncate(cache, blocks, msg.position))
            session.length = msg.position
            session.touch()
        return Ack(msg.stream_id)

    async def close(self, key: str, stream_id: int) -> Ack:
        st = self.state
        session = st.sessions.get(key)  # 201 if it is gone already
        async with session.lock:  # after the session's earlier requests: replies stay in order
            st.sessions.close(key, "client")
        return Ack(stream_id)

    async def forward(self, msg: Forward, peer: str = "local") -> ForwardResult:
        """A stateless forward, run like a prefill on throwaway caches: in groups of rows, one
        group at a time, each chunked by the scheduler between other sessions' steps, so a long
        or wide Forward cannot hold the compute thread. Each group's cache is reserved in the KV
        budget (under the peer's share) while it runs."""
        st = self.state
        blocks = self.check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
        _check_tokens(msg.hidden, st.config.limits.max_request_tokens, "Forward")
        backend = st.backend
        backend.check_step(msg.hidden, 0, msg.attention_mask, None)
        rows, tokens = msg.hidden.shape[:2]
        if msg.prompts is not None or tokens <= st.config.scheduler.stateless_group_tokens:
            return await self._forward_units(msg, blocks)
        chunk = st.config.scheduler.prefill_chunk_tokens
        # Rows per group: a group's chunk of MIN_CHUNK_POSITIONS fits a prefill chunk, and its
        # throwaway cache is at most a prefill chunk's rows (long rows run one at a time).
        group = max(1, chunk // max(MIN_CHUNK_POSITIONS, min(tokens, chunk)))
        outputs: list[torch.Tensor] = []
        for first in range(0, rows, group):
            hidden = msg.hidden[first : first + group]
            mask = None if msg.attention_mask is None else msg.attention_mask[first : first + group]
            owner = f"forward/{next(_forward_ids)}"
            need = hidden.shape[0] * tokens
            await st.sessions.reserve_scratch(owner, peer, need, st.config.limits.buffer_wait_s)
            try:
                request = StepRequest(backend.new_cache(), blocks, hidden, 0, mask, None)
                outputs.append(
                    await st.scheduler.step(backend, request, owner, peer, always_chunk=True)
                )
            finally:
                st.scheduler.forget(owner)
                st.sessions.release_scratch(owner, peer, need)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)
        return ForwardResult(msg.stream_id, out)

    async def _forward_units(self, msg: Forward, blocks: range) -> ForwardResult:
        """A Forward of rows no longer than a row group (training-shaped), or with deep
        prompts: block by block without a cache (the computation a Backward differentiates),
        in groups of rows, one block per stateless job. Longer rows run as prefills (above):
        without a cache, attention over a whole long row would hold tokens^2 scores at once."""
        backend = self.state.backend
        backend.check_prompts(msg.prompts, blocks, msg.hidden)
        limit = self.state.config.scheduler.stateless_group_tokens
        if msg.hidden.shape[1] > limit:
            raise BadRequestError(
                f"a Forward with deep prompts takes rows of at most {limit} tokens"
            )
        outputs: list[torch.Tensor] = []
        for _, hidden, mask, prompts in self._row_groups(
            msg.hidden, msg.attention_mask, msg.prompts
        ):
            units = backend.forward_units(blocks, hidden, mask, prompts)
            while (out := await self.state.scheduler.call(functools.partial(next, units))) is None:
                pass
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0)
        return ForwardResult(msg.stream_id, out)

    def _row_groups(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Rows of a stateless request in groups of at most stateless_group_tokens rows x
        tokens (one row at least): the autograd graph of one block of one group is held at a
        time."""
        rows, tokens = hidden.shape[:2]
        group = max(1, self.state.config.scheduler.stateless_group_tokens // tokens)
        for first in range(0, rows, group):
            part = slice(first, first + group)
            yield (
                part,
                hidden[part],
                None if mask is None else mask[part],
                None if prompts is None else prompts[:, part],
            )

    async def backward(self, msg: Backward) -> BackwardResult:
        """Gradients of the span, in groups of rows (bounding the autograd graph's memory),
        each one block's forward or backward per stateless job, so that a Backward yields the
        compute thread to decode steps between blocks (a whole group through 30 blocks held it
        for seconds)."""
        blocks = self.check_span(msg.model_fingerprint, msg.span_start, msg.span_end)
        _check_tokens(msg.hidden, self.state.config.limits.max_backward_tokens, "Backward")
        backend = self.state.backend
        backend.check_backward(msg.hidden, msg.grad_output, msg.attention_mask, msg.prompts, blocks)
        grads: list[torch.Tensor] = []
        prompt_grads: list[torch.Tensor] = []
        for part, hidden, mask, prompts in self._row_groups(
            msg.hidden, msg.attention_mask, msg.prompts
        ):
            units = backend.backward_units(
                blocks,
                hidden,
                msg.grad_output[part],
                mask,
                prompts,
                graph_budget_bytes=self.state.config.scheduler.backward_graph_bytes,
            )
            while (out := await self.state.scheduler.call(functools.partial(next, units))) is None:
                pass
            grads.append(out[0])
            if out[1] is not None:
                prompt_grads.append(out[1])
        grad = grads[0] if len(grads) == 1 else torch.cat(grads, 0)
        grad_prompts = None
        if prompt_grads:
            grad_prompts = prompt_grads[0] if len(prompt_grads) == 1 else torch.cat(prompt_grads, 1)
        return BackwardResult(msg.stream_id, grad, grad_prompts)


def too_many_tokens(what: str, shape: Sequence[int], limit: int) -> RequestTooLargeError | None:
    """The refusal of a request whose hidden states of `shape` pass `limit` rows x tokens (the
    connection asks it of a frame's header before decoding; the service of every request)."""
    if len(shape) >= 2 and shape[0] * shape[1] > limit:
        return RequestTooLargeError(
            f"a {what} of {shape[0]} rows x {shape[1]} tokens passes this server's limit of "
            f"{limit} rows x tokens per request; split it"
        )
    return None


def _check_tokens(hidden: torch.Tensor, limit: int, what: str) -> None:
    refusal = too_many_tokens(what, hidden.shape, limit)
    if refusal is not None:
        raise refusal


def _check_open(session: Session, when: str) -> None:
    if session.cache is None:
        raise UnknownSessionError(f"the session was closed while this {when}")
