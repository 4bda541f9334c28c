"""An inference session through a route of servers: open, step, truncate, fail over, close.

Each hop keeps the inputs it was sent (its history). When a hop's server dies, times out, loses
the session or announces that it is draining, the session bans it, finds a replacement route for
exactly that hop's blocks, replays the history there (one step, plus one per tree step), and
carries on: the caller sees a pause, never an error or a different result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import torch

from beectl.bans import is_server_failure
from beectl.chain import (
    ChainBroken,
    OpenHop,
    PushFailedError,
    check_takes_trees,
    push_run,
    send_chain,
    takes_trees,
    tree_depths,
)
from beectl.config import ClientConfig
from beectl.history import History
from beectl.replies import checked_session_opened, checked_step_result
from beectl.routing import Hop
from beectl.swarm import Swarm
from beectl.verify import check_step
from protocol.errors import (
    BadRequestError,
    BeeError,
    InvalidReplyError,
    NoRouteError,
)
from protocol.messages import (
    Close,
    OpenSession,
    Step,
    StepResult,
    Truncate,
)

log = logging.getLogger(__name__)

_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelRef:
    """Which model a session runs: its DHT name, fingerprint and number of blocks."""

    name: str
    fingerprint: str
    num_blocks: int


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
        self._hops: list[OpenHop] = []
        self._step_id = 0
        self._closed = False
        self.recoveries = 0  # hops replaced after a failure or a drain notice
        self.quant: str | None = None  # the route's one quantization (set by open)

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        try:
            self._hops, _ = await self._open_span(0, self.model.num_blocks, replay=None, wait=False)
            quants = {h.hop.server.quant for h in self._hops}
            # Replacements keep the route's quantization (a mixed route: any, --allow-quant).
            self.quant = quants.pop() if len(quants) == 1 else None
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "session.open route=%s max_length=%d",
            " ".join(f"{h.start}:{h.end}@{h.peer_id[:8]}" for h in self.route),
            self.max_length,
        )

    async def _open_span(
        self,
        start: int,
        end: int,
        *,
        replay: History | None,
        wait: bool,
        exclude: frozenset[str] = frozenset(),
        quant: str | None = None,
    ) -> tuple[list[OpenHop], torch.Tensor | None]:
        """Open sessions covering [start, end), moving on to other servers while some fail.

        With `replay`, the new hops are brought to the state of the hop they replace: its history
        runs through them (History.replay: one step, a tree step on its own) and becomes theirs;
        the replay's output is returned. With `wait`, a missing server is waited for (a replica may start, a ban may
        end) until `failover_timeout_s`; without, the last server failure (or the gap) is raised.
        Servers in `exclude` are left out.
        """
        deadline = time.monotonic() + self.config.failover_timeout_s
        delay = self.config.retry_delay_s
        last_failure: BeeError | None = None
        # The first try may use the last DHT read (see Swarm.servers); later tries read again.
        max_age_s = self.config.route_cache_s
        while True:
            opened: list[OpenHop] = []
            try:
                route = await self.swarm.route(
                    self.model.fingerprint,
                    self.model.name,
                    self.model.num_blocks,
                    start=start,
                    end=end,
                    needed_kv_tokens=self.max_length * self.batch_size,
                    max_age_s=max_age_s,
                    exclude=exclude,
                    quant=quant,
                )
                # Counted as this client's load from now, not once open: sessions opening at
                # the same time route around each other (throughput routing).
                for hop in route:
                    self.swarm.session_opened(hop.peer_id)
                try:
                    for hop in route:
                        opened.append(await self._open_hop(hop))
                except BaseException:
                    for hop in route[len(opened) :]:
                        self.swarm.session_closed(hop.peer_id)
                    raise
                output = None
                if replay is not None and replay.chunks:
                    output = await self._replay(opened, replay)
                for h in opened:
                    self.swarm.bans.succeeded(h.hop.peer_id)
                return opened, output
            except BeeError as exc:
                await asyncio.gather(*(self._close_hop(h) for h in opened))
                failed = getattr(exc, "failed_peer", None)
                if failed is not None and is_server_failure(exc):
                    self.swarm.bans.ban(failed)
                    last_failure = exc
                    log.info("session.server_failed peer=%s error=%s", failed[:8], exc)
                    continue  # the next route leaves that server out
                if not isinstance(exc, NoRouteError):
                    raise
                if max_age_s > 0:
                    max_age_s = 0.0  # the cached list had no way through: read the DHT
                    continue
                if not wait or time.monotonic() + delay > deadline:
                    raise (last_failure or exc) from None
                log.info("session.waiting span=%d:%d error=%s", start, end, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _open_hop(self, hop: Hop) -> OpenHop:
        try:
            conn = await self.swarm.connection(hop.server)
            stream_id = conn.new_stream_id()
            token = ""
            hello = conn.remote_hello
            if self.config.push and hello is not None and "push" in hello.features:
                token = secrets.token_hex(16)
            reply = await conn.request(
                OpenSession(
                    stream_id,
                    model_fingerprint=hop.server.model_fingerprint,
                    span_start=hop.start,
                    span_end=hop.end,
                    max_length=self.max_length,
                    batch_size=self.batch_size,
                    timeout_s=self.config.session_timeout_s,
                    wait_s=self.config.kv_wait_s,
                    push_token=token,
                ),
                self.config.open_timeout_s + self.config.kv_wait_s,
            )
            checked_session_opened(reply, hop.start, hop.end, self.max_length)
        except BeeError as exc:
            exc.failed_peer = hop.peer_id  # type: ignore[attr-defined]
            raise
        return OpenHop(hop, conn, stream_id, token)

    async def _send(
        self,
        h: OpenHop,
        position: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        tree: torch.Tensor | None = None,
    ) -> StepResult:
        """One Step on one hop, remembered in its history; failures name the hop's server."""
        h.history.add(position, hidden, mask, position_ids, tree)
        try:
            check_takes_trees(h, tree)
            reply = await h.conn.request(
                Step(h.stream_id, self._step_id, position, hidden, mask, position_ids, tree=tree),
                self.config.step_timeout_s,
            )
        except BeeError as exc:
            exc.failed_peer = h.hop.peer_id  # type: ignore[attr-defined]
            raise
        try:
            return checked_step_result(reply, hidden.shape)
        except InvalidReplyError as exc:
            exc.failed_peer = h.hop.peer_id  # type: ignore[attr-defined]
            raise

    async def _replay(self, hops: list[OpenHop], history: History) -> torch.Tensor:
        steps = history.replay()
        inputs = [s.hidden for s in steps]
        for h in hops:
            outputs = []
            for s, hidden in zip(steps, inputs, strict=True):
                reply = await self._send(h, s.position, hidden, s.mask, s.position_ids, s.tree)
                outputs.append(reply.hidden)
            inputs = outputs
        return torch.cat(inputs, dim=1)

    async def _replace(self, index: int, *, wait: bool) -> tuple[int, torch.Tensor | None]:
        """Swap hop `index` for new hops over the same blocks, replaying its history there.

        Returns how many hops took its place and the replay's output."""
        old = self._hops[index]
        new, output = await self._open_span(
            old.hop.start, old.hop.end, replay=old.history, wait=wait, quant=self.quant
        )
        self._hops[index : index + 1] = new
        self.recoveries += 1
        await self._close_hop(old)
        log.info(
            "session.replaced span=%d:%d old=%s new=%s history=%d",
            old.hop.start,
            old.hop.end,
            old.hop.peer_id[:8],
            ",".join(h.hop.peer_id[:8] for h in new),
            sum(c.hidden.shape[1] for c in old.history.chunks),
        )
        return len(new), output

    async def step(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `hidden` [batch, new_tokens, hidden_size] at the current position through all hops.

        `tree` [batch, new_tokens] makes it a tree step (protocol Step.tree: each token's parent
        in the step, -1 after the cache), which needs `takes_trees`; the step's tokens then sit
        at the position their depth gives unless `position_ids` say otherwise. A hop whose server fails is replaced (history replayed elsewhere) and the step goes on; a
        hop whose server announces it is draining is moved after it answered.
        """
        if self._closed:
            raise BadRequestError("the inference session is closed")
        tokens = hidden.shape[1]
        if self.position + tokens > self.max_length:
            raise BadRequestError(
                f"session max_length {self.max_length} exceeded: {self.position} cached + "
                f"{tokens} new tokens"
            )
        if tree is not None and position_ids is None:
            position_ids = self.position + tree_depths(tree)
        self._step_id += 1
        # The wire carries host memory (a no-op for a CPU head), in the first server's dtype:
        # it computes in that dtype anyway, so a bf16 server is sent bf16, not float32.
        hidden = hidden.cpu()
        if self._hops and hidden.is_floating_point():
            hidden = hidden.to(_WIRE_DTYPES.get(self._hops[0].hop.server.dtype, hidden.dtype))
        draining: list[OpenHop] = []
        index = 0
        relay_next = False  # after a failed push, the client sends that hop its input itself
        while index < len(self._hops):
            count = 1 if relay_next else push_run(self._hops, index)
            relay_next = False
            try:
                done = await send_chain(
                    self._hops[index : index + count],
                    self._step_id,
                    hidden,
                    attention_mask,
                    position_ids,
                    self.position,
                    self.config,
                    tree,
                    self._after_hop,
                )
                error: BeeError | None = None
            except ChainBroken as broken:
                done, error = broken.done, broken.error
            for reply in done:
                hidden = reply.hidden
                if reply.draining:
                    draining.append(self._hops[index])
                index += 1
            if error is None:
                continue
            if isinstance(error, PushFailedError):
                relay_next = True  # the hop may be fine: only the push to it failed
                continue
            h = self._hops[index]
            if not is_server_failure(error):
                raise error
            log.warning(
                "session.failover span=%d:%d peer=%s error=%s",
                h.hop.start,
                h.hop.end,
                h.hop.peer_id[:8],
                error,
            )
            self.swarm.bans.ban(h.hop.peer_id)
            replaced, output = await self._replace(index, wait=True)
            if output is None:  # pragma: no cover - the history holds at least this step
                raise error
            hidden = output[:, -tokens:]
            index += replaced
            # The hops after the replaced one get this step again, from another server's output:
            # under a new step id, so that a late answer to the old one (computed from what the
            # failed server pushed) can never be taken for it, and the server runs it again.
            self._step_id += 1
        for h in draining:
            await self._move_draining(h)
        self.position += tokens
        return hidden

    async def _after_hop(
        self, h: OpenHop, reply: StepResult, rows_x_tokens: int, compute_s: float
    ) -> None:
        """Each hop's reply before it counts: its speed is noted, and a sampled step is
        re-run on other servers of its blocks (InvalidReplyError when it was wrong)."""
        self.swarm.speeds.observe(h.hop.peer_id, h.hop.end - h.hop.start, rows_x_tokens, compute_s)
        if self.swarm.verifier.wants(h.hop.peer_id):
            await self._verify(h, reply)

    async def _rerun(
        self, h: OpenHop, exclude: frozenset[str]
    ) -> tuple[torch.Tensor, list[str]] | None:
        """Hop h's output for its history's last step, from other servers of its blocks (its
        whole history replayed there, then closed); None when there are none."""
        try:
            hops, output = await self._open_span(  # servers of its quantization only
                h.hop.start,
                h.hop.end,
                replay=h.history,
                wait=False,
                exclude=exclude,
                quant=h.hop.server.quant,
            )
        except BeeError as exc:
            log.info("verify.unavailable span=%d:%d error=%s", h.hop.start, h.hop.end, exc)
            return None
        await asyncio.gather(*(self._close_hop(o) for o in hops))
        if output is None:  # pragma: no cover - the history holds at least this step
            return None
        return output, [o.hop.peer_id for o in hops]

    async def _verify(self, h: OpenHop, reply: StepResult) -> None:
        tokens = reply.hidden.shape[1]
        mask = h.history.attention_mask
        await check_step(
            self.swarm.verifier,
            self.swarm.bans,
            h.hop,
            h.history.chunks[-1].position,
            reply.hidden,
            None if mask is None else mask[:, -tokens:],  # left padding is not compared
            lambda exclude: self._rerun(h, exclude),
        )

    async def _move_draining(self, h: OpenHop) -> None:
        """The server is shutting down: move this hop now, while it still answers. The new
        hops replay the history, this step included (their output is not needed)."""
        if h not in self._hops:
            return
        index = self._hops.index(h)
        log.info("session.drain span=%d:%d peer=%s", h.hop.start, h.hop.end, h.hop.peer_id[:8])
        self.swarm.bans.ban(h.hop.peer_id, seconds=self.config.failover_timeout_s)
        try:
            await self._replace(index, wait=False)
        except BeeError as exc:  # nowhere to go yet: stay until it closes
            log.info("session.drain_stay span=%d:%d error=%s", h.hop.start, h.hop.end, exc)

    @property
    def takes_trees(self) -> bool:
        """Whether every hop's server runs tree steps (its Hello lists "tree")."""
        return bool(self._hops) and all(takes_trees(h) for h in self._hops)

    def rewind(self, position: int) -> None:
        """Make `position` the current position without a round trip: the next step starts
        there, and each server drops its cached tokens from it on as part of that step (a
        speculative round's refused drafts). The hops' histories are cut now."""
        if not 0 <= position <= self.position:
            raise BadRequestError(f"cannot rewind to {position}: {self.position} tokens cached")
        if position == self.position:
            return
        for h in self._hops:
            h.history.truncate(position)
        self.position = position

    async def truncate(self, position: int) -> None:
        """Forget cached tokens from `position` on, on every hop (rollback)."""
        if not 0 <= position <= self.position:
            raise BadRequestError(f"cannot truncate to {position}: {self.position} tokens cached")
        index = 0
        while index < len(self._hops):
            h = self._hops[index]
            h.history.truncate(position)
            try:
                await h.conn.request(Truncate(h.stream_id, position), self.config.step_timeout_s)
            except BeeError as exc:
                if not is_server_failure(exc):
                    raise
                self.swarm.bans.ban(h.hop.peer_id)
                count, _ = await self._replace(index, wait=True)
                index += count
                continue
            index += 1
        self.position = position

    async def _close_hop(self, h: OpenHop) -> None:
        self.swarm.session_closed(h.hop.peer_id)
        with contextlib.suppress(BeeError, TimeoutError):
            await h.conn.request(Close(h.stream_id), self.config.close_timeout_s)

    async def aclose(self) -> None:
        """Close every hop's server session (bounded wait); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        hops, self._hops = self._hops, []
        await asyncio.gather(*(self._close_hop(h) for h in hops))
