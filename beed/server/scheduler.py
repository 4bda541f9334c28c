"""The compute scheduler: continuous batching of inference steps, then stateless work.

Every step a connection receives becomes a job in one queue. Whenever the compute thread is free,
the scheduler takes every queued step over the same blocks (oldest first) and runs them as one
batched forward (`BlockBackend.step_many`): sessions whose steps arrive while a batch runs join the
next one, so a server with many clients runs one forward for all of their decode steps.

- A long prefill is cut into chunks of `prefill_chunk_tokens` while other sessions are active, so
  their decode steps run between its chunks; a lone session's prefill runs whole (and its results
  stay bit-identical to transformers').
- Inference goes first: stateless Forward/Backward work runs when no step is waiting, or when it
  has waited `stateless_max_wait_s` (so training is slowed, never starved).
- A job whose requester went away (disconnect, cancel) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from beed.net.tasks import TaskOwner
from beed.server.backend import BlockBackend, StepRequest
from beed.server.config import SchedulerConfig
from protocol.errors import InternalServerError, UnknownSessionError

log = logging.getLogger(__name__)

# While sessions step, stateless work waits this many times its last job's duration.
STATELESS_YIELD = 2.0
MIN_CHUNK_POSITIONS = 16  # a wide batch's prefill chunk still covers this many positions
DECODE_STEP_TOKENS = 8  # a forward of at most this many rows x tokens runs on decode_threads


def with_threads(threads: int, fn: Callable[[], Any]) -> Any:
    """Run fn (on the compute thread) with `threads` torch intra-op threads (0: as set)."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn()


@dataclass
class _StepJob:
    backend: BlockBackend
    request: StepRequest
    owner: str  # session key
    future: asyncio.Future[torch.Tensor]
    peer: str = "local"  # whose work it is (an address): peers get fair shares of a forward
    always_chunk: bool = False  # cut into prefill chunks even alone (stateless Forwards)
    done_tokens: int = 0  # positions already run (chunked prefill)
    outputs: list[torch.Tensor] = field(default_factory=list)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(self.request.hidden.shape[0])

    @property
    def group(self) -> tuple[int, int, int]:
        """Jobs of one group can share a forward: same backend, same blocks."""
        return (id(self.backend), self.request.blocks.start, self.request.blocks.stop)

    @property
    def remaining(self) -> int:
        return int(self.request.hidden.shape[1]) - self.done_tokens

    def chunk(self, tokens: int) -> StepRequest:
        """The request for the next `tokens` positions of this job."""
        r = self.request
        begin, end = self.done_tokens, self.done_tokens + tokens
        if begin == 0 and end == r.hidden.shape[1]:
            return r
        mask = None if r.attention_mask is None else r.attention_mask[:, : r.position + end]
        ids = None if r.position_ids is None else r.position_ids[:, begin:end]
        tree = None if r.tree is None else r.tree.chunk(r.tree.begin + begin)
        return StepRequest(
            r.cache, r.blocks, r.hidden[:, begin:end], r.position + begin, mask, ids, tree
        )


@dataclass
class _StatelessJob:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns the order of all compute work; `run_compute` executes on the one compute thread."""

    def __init__(
        self,
        run_compute: Callable[[Callable[[], Any]], Awaitable[Any]],
        config: SchedulerConfig | None = None,
        on_crash: Callable[[BaseException], object] | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self._run_compute = run_compute
        self._steps: deque[_StepJob] = deque()
        self._stateless: deque[_StatelessJob] = deque()
        self._control: deque[_StatelessJob] = deque()  # small session work: first in line
        self._wakeup = asyncio.Event()
        # session key -> (monotonic time of its last step, its group)
        self._last_step: dict[str, tuple[float, tuple[int, int, int]]] = {}
        self._running: set[str] = set()  # owners of the jobs in the forward now running
        self._batch_done = asyncio.Event()
        self._tasks = TaskOwner("scheduler", on_crash=self._crashed)
        self._on_crash = on_crash
        self._background: set[str] = set()  # owners of queued stateless Forward chunks
        self._stateless_ended = float("-inf")  # when the last stateless job ended
        self._stateless_took = 0.0  # and how long it ran
        self.batches = 0  # forwards run (for Info and tests)
        self.batched_steps = 0  # step jobs (or chunks) they carried

    def _crashed(self, exc: BaseException) -> None:
        """The scheduler loop died (a bug): fail every waiting job, then tell the owner."""
        self._fail_all(InternalServerError(f"the compute scheduler crashed: {exc!r}"))
        if self._on_crash is not None:
            self._on_crash(exc)

    def _fail_all(self, error: BaseException) -> None:
        futures: list[asyncio.Future[Any]] = [j.future for j in self._steps]
        futures += [j.future for j in (*self._stateless, *self._control)]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._steps.clear()
        self._stateless.clear()
        self._control.clear()

    def start(self) -> None:
        self._tasks.spawn(self._loop(), name="scheduler")

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self._fail_all(InternalServerError("the server is shutting down"))

    @property
    def queued_steps(self) -> int:
        return len(self._steps)

    async def step(
        self,
        backend: BlockBackend,
        request: StepRequest,
        owner: str,
        peer: str = "local",
        always_chunk: bool = False,
    ) -> torch.Tensor:
        """Run one session's step (batched with others); its output on the CPU."""
        self._check_running()
        backend.check_step(
            request.hidden, request.position, request.attention_mask, request.position_ids
        )
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        if always_chunk:
            self._background.add(owner)
        self._steps.append(_StepJob(backend, request, owner, future, peer, always_chunk))
        self._wakeup.set()
        return await future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run stateless work (Forward, Backward) when no inference step is waiting."""
        self._check_running()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stateless.append(_StatelessJob(fn, future))
        self._wakeup.set()
        return await future

    async def control(self, fn: Callable[[], Any]) -> Any:
        """Run a short piece of session work (a cache truncation) on the compute thread before
        any waiting step: the caller holds the session's lock, so none of its steps is queued."""
        self._check_running()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._control.append(_StatelessJob(fn, future))
        self._wakeup.set()
        return await future

    def _check_running(self) -> None:
        if self._tasks.failure is not None:
            raise InternalServerError(f"the compute scheduler crashed: {self._tasks.failure!r}")

    def forget(self, owner: str) -> None:
        """A session closed: its queued steps fail (201) and it no longer counts as active."""
        self._last_step.pop(owner, None)
        self._background.discard(owner)
        for job in [j for j in self._steps if j.owner == owner]:
            self._remove(job)
            if not job.future.done():
                job.future.set_exception(UnknownSessionError("the session was closed"))

    async def settle(self, prefix: str) -> None:
        """Wait until no forward that is running uses a session whose key starts with `prefix`
        (its cache is still being written: its memory may not be handed out yet)."""
        while any(owner.startswith(prefix) for owner in self._running):
            self._batch_done.clear()
            await self._batch_done.wait()

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while True:
                self._drop_abandoned()
                if self._control:
                    await self._run_stateless(self._control.popleft(), timed=False)
                    continue
                stateless = self._stateless_due()
                if stateless is not None:
                    await self._run_stateless(stateless)
                    continue
                await self._wait_for_stragglers()
                self._drop_abandoned()
                batch = self._take_batch()
                if batch:
                    await self._run_batch(batch)
                    continue
                if self._stateless or self._steps:  # held back by the time share
                    self._wakeup.clear()
                    delay = max(0.001, self._stateless_wait(time.monotonic()))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(delay, self.config.active_window_s)):
                            await self._wakeup.wait()
                    continue
                break

    async def _wait_for_stragglers(self) -> None:
        """Give the other active sessions' next steps up to `batch_wait_s` (counted from the
        oldest queued step) to arrive, so that a round of decode steps runs as one forward
        rather than as several small ones that each read all the weights."""
        wait_s = self.config.batch_wait_s
        if not self._steps or not self.config.continuous_batching or wait_s <= 0:
            return
        first = self._steps[0]
        deadline = first.enqueued + wait_s
        while True:
            queued = {job.owner for job in self._steps if job.group == first.group}
            self._prune_quiet()
            expected = queued | {k for k, (_, g) in self._last_step.items() if g == first.group}
            remaining = deadline - time.monotonic()
            if len(queued) >= len(expected) or remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _drop_abandoned(self) -> None:
        if any(j.future.done() for j in self._steps):
            self._steps = deque(j for j in self._steps if not j.future.done())
        if any(j.future.done() for j in self._stateless):
            self._stateless = deque(j for j in self._stateless if not j.future.done())

    def _stateless_due(self) -> _StatelessJob | None:
        """The next Forward/Backward-style job if it may run now. With no session active it
        runs at once. While sessions are stepping, stateless work gets at most a third of the
        compute thread (after a job of d seconds, steps have the thread for 2d), and a step
        that is waiting goes first unless the job has waited stateless_max_wait_s."""
        if not self._stateless:
            return None
        if not self._steps and not self._any_active():
            return self._stateless.popleft()
        now = time.monotonic()
        if self._stateless_wait(now) > 0:
            return None
        if self._steps and now - self._stateless[0].enqueued <= self.config.stateless_max_wait_s:
            return None
        return self._stateless.popleft()

    def _stateless_wait(self, now: float) -> float:
        """Seconds until the time share lets the next stateless job run."""
        return self._stateless_ended + STATELESS_YIELD * self._stateless_took - now

    def _any_active(self) -> bool:
        """Whether a session (not a stateless Forward) stepped within active_window_s."""
        self._prune_quiet()
        return any(key not in self._background for key in self._last_step)

    def _take_batch(self) -> list[tuple[_StepJob, int]]:
        """Jobs (and how many positions of each) for the next forward: the oldest job's group."""
        if not self._steps:
            return []
        cfg = self.config
        # Stateless Forwards' chunks share the time of stateless work (at most a third of the
        # compute while sessions step): held back, they do not join a session's forward.
        background_ok = not self._any_active() or self._stateless_wait(time.monotonic()) <= 0
        eligible = [j for j in self._steps if background_ok or not j.always_chunk]
        if not eligible:
            return []
        first = eligible[0]
        if not cfg.continuous_batching:
            return [(first, first.remaining)]
        group = [j for j in eligible if j.group == first.group]
        contended = len(group) > 1 or self._others_active(first.owner)
        several_peers = len({j.peer for j in group}) > 1
        batch: list[tuple[_StepJob, int]] = []
        total = 0
        # With several peers' work queued, one peer's jobs together get at most
        # prefill_chunk_tokens of a forward (beyond a first chunk), so that many sessions of
        # one peer cannot make every forward long.
        peer_tokens: dict[str, int] = {}
        for job in group:
            positions = job.remaining
            # Alone, a step still runs at most max_batch_tokens per forward (one long prompt
            # must not hold the compute thread for a minute against later arrivals).
            chunk = (
                cfg.prefill_chunk_tokens if contended or job.always_chunk else cfg.max_batch_tokens
            )
            if job.rows * positions > chunk:
                positions = max(MIN_CHUNK_POSITIONS, chunk // job.rows)
                positions = min(positions, job.remaining)
            used = peer_tokens.get(job.peer, 0)
            if several_peers and used:
                allowance = (cfg.prefill_chunk_tokens - used) // job.rows
                if allowance < 1:
                    continue
                positions = min(positions, allowance)
            size = job.rows * positions
            if batch and total + size > cfg.max_batch_tokens:
                continue  # a later, smaller job may still fit
            batch.append((job, positions))
            total += size
            peer_tokens[job.peer] = used + size
        return batch

    def _prune_quiet(self) -> None:
        horizon = time.monotonic() - self.config.active_window_s
        for key in [k for k, (t, _) in self._last_step.items() if t < horizon]:
            del self._last_step[key]

    def _others_active(self, owner: str) -> bool:
        self._prune_quiet()
        return any(key != owner for key in self._last_step)

    async def _run_batch(self, batch: list[tuple[_StepJob, int]]) -> None:
        backend = batch[0][0].backend
        requests = [job.chunk(positions) for job, positions in batch]
        began = time.monotonic()
        self._running = {job.owner for job, _ in batch}
        try:
            tokens = sum(job.rows * positions for job, positions in batch)
            threads = (
                self.config.decode_threads
                if tokens <= DECODE_STEP_TOKENS
                else self.config.compute_threads
            )
            results: list[Any] = await self._run_compute(
                lambda: with_threads(threads, lambda: backend.step_many(requests))
            )
        except Exception as exc:  # a bug: fail these jobs, keep serving the others
            log.exception("scheduler.batch_failed jobs=%d", len(batch))
            results = [exc] * len(batch)
        finally:
            self._running = set()
            self._batch_done.set()
            if any(job.always_chunk for job, _ in batch):
                self._stateless_ended = time.monotonic()
                self._stateless_took = self._stateless_ended - began
        self.batches += 1
        self.batched_steps += len(batch)
        now = time.monotonic()
        for (job, positions), result in zip(batch, results, strict=True):
            if job.future.done():  # abandoned (or its session closed) while it ran
                self._remove(job)
                continue
            self._last_step[job.owner] = (now, job.group)
            if isinstance(result, BaseException):
                self._remove(job)
                job.future.set_exception(result)
                continue
            job.done_tokens += positions
            job.outputs.append(result)
            if job.remaining == 0:
                self._remove(job)
                out = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, 1)
                job.future.set_result(out)
            else:  # a chunk is done: other groups' steps go before its next chunk
                self._remove(job)
                self._steps.append(job)
        if len(batch) > 1:
            log.debug(
                "scheduler.batch jobs=%d tokens=%d",
                len(batch),
                sum(job.rows * positions for job, positions in batch),
            )

    def _remove(self, job: _StepJob) -> None:
        try:
            self._steps.remove(job)
        except ValueError:
            pass

    async def _run_stateless(self, job: _StatelessJob, timed: bool = True) -> None:
        began = time.monotonic()
        try:
            threads = self.config.compute_threads
            result = await self._run_compute(lambda: with_threads(threads, job.fn))
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
            return
        finally:
            if timed:
                self._stateless_ended = time.monotonic()
                self._stateless_took = self._stateless_ended - began
        if not job.future.done():
            job.future.set_result(result)
