"""Stateless forward and backward through the swarm: the client side of training.

A batch is cut into chunks of rows that fit one request (`train_chunk_tokens` rows x tokens,
the servers' Backward limit by default), and into at least `train_pipeline_chunks` chunks;
the chunks run as a pipeline (one request per server at a time), so while one server works on a
chunk the next server works on the one before. Each chunk's forward remembers which hop
got which input (its trace); its backward walks the trace in reverse, sending each hop that
input with the gradient of the hop's output. Servers keep nothing in between: a Backward
recomputes the span's forward itself.

Failover: a hop whose server fails (dies, times out, answers wrong) is banned and its blocks
are routed again, forward and backward alike. In a backward, the new hops' inputs are
recomputed first by Forwards from the failed hop's input, so the gradient is the same.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from beectl.bans import is_server_failure
from beectl.config import ClientConfig
from beectl.replies import checked_backward_result, checked_forward_result
from beectl.routing import Hop
from beectl.session import ModelRef
from beectl.swarm import Swarm
from protocol.errors import BeeError, InvalidReplyError, NoRouteError, RequestTooLargeError
from protocol.messages import Backward, Forward

log = logging.getLogger(__name__)

_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Trace:
    """One chunk's forward: the rows it holds and each hop with the input it was sent."""

    rows: slice
    hops: list[tuple[Hop, torch.Tensor]] = field(default_factory=list)


@dataclass
class Traces:
    """A whole forward, for its backward: the chunks' traces, mask and prompts as sent."""

    chunks: list[Trace]
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    dtype: torch.dtype  # of the caller's hidden states (gradients come back in it)
    recoveries: int = 0  # hops replaced during the forward and the backward


class RemoteBlocks:
    """Forward and backward of blocks [0, num_blocks) of `model`, through `swarm`."""

    def __init__(self, swarm: Swarm, model: ModelRef, config: ClientConfig) -> None:
        self.swarm = swarm
        self.model = model
        self.config = config
        self.recoveries = 0  # hops replaced so far, all calls together
        self.last_route: list[Hop] = []  # the route the last forward started on
        self._turns: dict[str, asyncio.Lock] = {}

    def chunks(self, rows: int, tokens: int) -> list[slice]:
        """Rows of each request: at most train_chunk_tokens rows x tokens each (one row at
        least), and at least train_pipeline_chunks requests where there are rows enough, of
        equal size: one chunk per server at a time makes them a pipeline."""
        limit = max(1, self.config.train_chunk_tokens // max(1, tokens))
        count = max(math.ceil(rows / limit), min(rows, self.config.train_pipeline_chunks))
        per = math.ceil(rows / max(1, count))
        return [slice(first, min(rows, first + per)) for first in range(0, rows, per)]

    def _turn(self, peer_id: str) -> asyncio.Lock:
        """One request per server at a time, in the order the chunks asked: chunk i reaches
        server k after chunk i-1 left it, so the servers work on different chunks at once
        (a server given every chunk together interleaves them, and all finish at the end)."""
        lock = self._turns.get(peer_id)
        if lock is None:
            lock = self._turns[peer_id] = asyncio.Lock()
        return lock

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Traces]:
        """hidden [batch, tokens, hidden] (host) through every block; `prompts`: deep prompts
        [num_blocks, batch, prefix, hidden]. Returns the output and the traces of the forward."""
        batch, tokens = hidden.shape[:2]
        if prompts is not None and (
            prompts.dim() != 4
            or prompts.shape[0] != self.model.num_blocks
            or prompts.shape[1] != batch
        ):
            raise ValueError(
                f"deep prompts must be [{self.model.num_blocks}, {batch}, prefix, hidden], "
                f"got {list(prompts.shape)}"
            )
        route = await self._route(0, self.model.num_blocks)
        self.last_route = route
        traces = Traces(
            [Trace(rows) for rows in self.chunks(batch, tokens)],
            attention_mask,
            prompts,
            hidden.dtype,
        )
        outputs = await asyncio.gather(
            *(self._forward_chunk(route, t, hidden[t.rows], traces) for t in traces.chunks)
        )
        return torch.cat(outputs, 0).to(hidden.dtype), traces

    async def backward(
        self, traces: Traces, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of a forward's inputs (hidden states, deep prompts) given its output's."""
        results = await asyncio.gather(
            *(self._backward_chunk(t, grad_output[t.rows], traces) for t in traces.chunks)
        )
        grad = torch.cat([g for g, _ in results], 0).to(traces.dtype)
        grad_prompts = None
        if traces.prompts is not None:
            grad_prompts = torch.cat([p for _, p in results if p is not None], 1)
            grad_prompts = grad_prompts.to(traces.prompts.dtype)
        return grad, grad_prompts

    # --- one chunk ------------------------------------------------------------------------------

    async def _forward_chunk(
        self, route: list[Hop], trace: Trace, x: torch.Tensor, traces: Traces
    ) -> torch.Tensor:
        hops = list(route)
        index = 0
        while index < len(hops):
            hop = hops[index]
            try:
                out = await self._call_forward(hop, x, trace.rows, traces)
            except BeeError as exc:
                hops[index : index + 1] = await self._replace(hop, exc, traces)
                continue
            trace.hops.append((hop, x))
            x = out
            index += 1
        return x

    async def _backward_chunk(
        self, trace: Trace, grad: torch.Tensor, traces: Traces
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_prompts = None
        if traces.prompts is not None:
            shape = traces.prompts[:, trace.rows].shape
            grad_prompts = torch.zeros(shape, dtype=torch.float32)
        todo = list(trace.hops)
        while todo:
            hop, x = todo.pop()
            try:
                grad_in, grad_p = await self._call_backward(hop, x, grad, trace.rows, traces)
            except BeeError as exc:
                todo.extend(await self._replacement(hop, x, exc, trace.rows, traces))
                continue
            grad = grad_in
            if grad_prompts is not None and grad_p is not None:
                grad_prompts[hop.start : hop.end] = grad_p.float()
        return grad, grad_prompts

    async def _replacement(
        self, hop: Hop, x: torch.Tensor, exc: BeeError, rows: slice, traces: Traces
    ) -> list[tuple[Hop, torch.Tensor]]:
        """The hops (with their inputs) that take a failed hop's place in a backward: its
        blocks routed again, each new hop's input recomputed by Forwards from the failed hop's
        input (a new hop that fails meanwhile is replaced in turn)."""
        new = await self._replace(hop, exc, traces)
        while True:
            entries = []
            y = x
            try:
                for i, h in enumerate(new):
                    entries.append((h, y))
                    if i + 1 < len(new):
                        y = await self._call_forward(h, y, rows, traces)
                return entries
            except BeeError as again:
                failed = len(entries) - 1  # its input is good: redo the chain from x anyway
                new[failed : failed + 1] = await self._replace(new[failed], again, traces)

    # --- requests -------------------------------------------------------------------------------

    def _prompts_of(self, hop: Hop, rows: slice, traces: Traces) -> torch.Tensor | None:
        if traces.prompts is None:
            return None
        return traces.prompts[hop.start : hop.end, rows]

    async def _call_forward(
        self, hop: Hop, x: torch.Tensor, rows: slice, traces: Traces
    ) -> torch.Tensor:
        wire = _WIRE_DTYPES.get(hop.server.dtype, x.dtype)
        mask = None if traces.mask is None else traces.mask[rows]
        prompts = self._prompts_of(hop, rows, traces)
        try:
            conn = await self.swarm.connection(hop.server)
            _check_features(conn.remote_hello, prompts)
            async with self._turn(hop.peer_id):
                reply = await conn.request(
                    Forward(
                        conn.new_stream_id(),
                        model_fingerprint=hop.server.model_fingerprint,
                        span_start=hop.start,
                        span_end=hop.end,
                        hidden=x.detach().to(wire).contiguous(),
                        attention_mask=mask,
                        prompts=None if prompts is None else prompts.detach().to(wire).contiguous(),
                    ),
                    self.config.step_timeout_s,
                )
            return checked_forward_result(reply, x.shape).hidden
        except BeeError as exc:
            exc.failed_peer = hop.peer_id  # type: ignore[attr-defined]
            raise

    async def _call_backward(
        self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, rows: slice, traces: Traces
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        wire = _WIRE_DTYPES.get(hop.server.dtype, x.dtype)
        mask = None if traces.mask is None else traces.mask[rows]
        prompts = self._prompts_of(hop, rows, traces)
        try:
            conn = await self.swarm.connection(hop.server)
            _check_features(conn.remote_hello, prompts)
            async with self._turn(hop.peer_id):
                reply = await conn.request(
                    Backward(
                        conn.new_stream_id(),
                        model_fingerprint=hop.server.model_fingerprint,
                        span_start=hop.start,
                        span_end=hop.end,
                        hidden=x.detach().to(wire).contiguous(),
                        grad_output=grad.detach().to(wire).contiguous(),
                        attention_mask=mask,
                        prompts=None if prompts is None else prompts.detach().to(wire).contiguous(),
                    ),
                    self.config.step_timeout_s,
                )
            result = checked_backward_result(
                reply, x.shape, None if prompts is None else prompts.shape
            )
            return result.grad_input, result.grad_prompts
        except BeeError as exc:
            exc.failed_peer = hop.peer_id  # type: ignore[attr-defined]
            raise

    # --- routes ---------------------------------------------------------------------------------

    async def _replace(self, hop: Hop, exc: BeeError, traces: Traces) -> list[Hop]:
        """After `hop` failed with `exc`: ban its server and route its blocks again (waiting
        for a replica up to failover_timeout_s); errors that are not the server's are raised."""
        if isinstance(exc, RequestTooLargeError):
            raise RequestTooLargeError(
                f"{exc}; lower train_chunk_tokens (now {self.config.train_chunk_tokens})"
            ) from None
        if not is_server_failure(exc):
            raise exc
        log.warning(
            "train.failover span=%d:%d peer=%s error=%s", hop.start, hop.end, hop.peer_id[:8], exc
        )
        self.swarm.bans.ban(hop.peer_id)
        self.recoveries += 1
        traces.recoveries += 1
        # The replacement computes what the failed hop did: of its quantization (any, when
        # the client mixes them).
        quant = None if self.config.allow_quant else hop.server.quant
        return await self._route(hop.start, hop.end, wait=True, quant=quant)

    async def _route(
        self, start: int, end: int, *, wait: bool = False, quant: str | None = None
    ) -> list[Hop]:
        deadline = time.monotonic() + self.config.failover_timeout_s
        delay = self.config.retry_delay_s
        max_age_s = self.config.route_cache_s
        while True:
            try:
                return await self.swarm.route(
                    self.model.fingerprint,
                    self.model.name,
                    self.model.num_blocks,
                    start=start,
                    end=end,
                    max_age_s=max_age_s,
                    quant=quant,
                )
            except NoRouteError:
                if max_age_s > 0:
                    max_age_s = 0.0  # the cached list had no way through: read the DHT
                    continue
                if not wait or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _check_features(hello: object, prompts: torch.Tensor | None) -> None:
    features = getattr(hello, "features", ())
    if prompts is not None and "prompts" not in features:
        raise InvalidReplyError("the server does not take deep prompts (no 'prompts' feature)")
