"""An inference session through a route of servers: open, step, truncate, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import torch

from beectl.config import ClientConfig
from beectl.connection import PeerConnection
from beectl.routing import Hop
from beectl.swarm import Swarm
from protocol.errors import BadRequestError, BeeError
from protocol.messages import Close, OpenSession, SessionOpened, Step, StepResult, Truncate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """Which model a session runs: its DHT name, fingerprint and number of blocks."""

    name: str
    fingerprint: str
    num_blocks: int


@dataclass
class _OpenHop:
    hop: Hop
    conn: PeerConnection
    stream_id: int


class InferenceSession:
    """Holds one server-side session per hop of the route, each with its KV cache.

    `step(hidden)` runs new tokens at the current position through every hop in order and returns
    the last hop's hidden states; `position` counts the tokens the servers have cached.
    Use as `async with InferenceSession(...) as session:`; leaving the block closes every hop.
    """

    def __init__(
        self,
        swarm: Swarm,
        model: ModelRef,
        config: ClientConfig,
        *,
        max_length: int,
        batch_size: int = 1,
    ) -> None:
        self.swarm = swarm
        self.model = model
        self.config = config
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self._hops: list[_OpenHop] = []
        self._step_id = 0
        self._closed = False

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        route = await self.swarm.route(
            self.model.fingerprint,
            self.model.name,
            self.model.num_blocks,
            needed_kv_tokens=self.max_length * self.batch_size,
        )
        try:
            for hop in route:
                self._hops.append(await self._open_hop(hop))
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "session.open route=%s max_length=%d",
            " ".join(f"{h.start}:{h.end}@{h.peer_id[:8]}" for h in route),
            self.max_length,
        )

    async def _open_hop(self, hop: Hop) -> _OpenHop:
        conn = await self.swarm.connection(hop.server)
        stream_id = conn.new_stream_id()
        reply = await conn.request(
            OpenSession(
                stream_id,
                model_fingerprint=self.model.fingerprint,
                span_start=hop.start,
                span_end=hop.end,
                max_length=self.max_length,
                batch_size=self.batch_size,
                timeout_s=self.config.session_timeout_s,
            ),
            self.config.open_timeout_s,
        )
        if not isinstance(reply, SessionOpened):
            raise BadRequestError(f"server answered OpenSession with {type(reply).__name__}")
        return _OpenHop(hop, conn, stream_id)

    async def step(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `hidden` [batch, new_tokens, hidden_size] at the current position through all hops."""
        if self._closed:
            raise BadRequestError("the inference session is closed")
        tokens = hidden.shape[1]
        if self.position + tokens > self.max_length:
            raise BadRequestError(
                f"session max_length {self.max_length} exceeded: {self.position} cached + "
                f"{tokens} new tokens"
            )
        self._step_id += 1
        hidden = hidden.cpu()  # the wire carries host memory (no-op for a CPU head)
        for open_hop in self._hops:
            reply = await open_hop.conn.request(
                Step(
                    open_hop.stream_id,
                    step_id=self._step_id,
                    position=self.position,
                    hidden=hidden,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                ),
                self.config.step_timeout_s,
            )
            if not isinstance(reply, StepResult):
                raise BadRequestError(f"server answered Step with {type(reply).__name__}")
            hidden = reply.hidden
        self.position += tokens
        return hidden

    async def truncate(self, position: int) -> None:
        """Forget cached tokens from `position` on, on every hop (rollback)."""
        if not 0 <= position <= self.position:
            raise BadRequestError(f"cannot truncate to {position}: {self.position} tokens cached")
        for open_hop in self._hops:
            await open_hop.conn.request(
                Truncate(open_hop.stream_id, position), self.config.step_timeout_s
            )
        self.position = position

    async def aclose(self) -> None:
        """Close every hop's server session (bounded wait); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        hops, self._hops = self._hops, []

        async def close_one(h: _OpenHop) -> None:
            with contextlib.suppress(BeeError, TimeoutError):
                await h.conn.request(Close(h.stream_id), self.config.close_timeout_s)

        await asyncio.gather(*(close_one(h) for h in hops))
