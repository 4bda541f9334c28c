"""The LM head of many concurrent generations as one product.

Each generation that needs logits hands its hidden rows in and waits; once every running
generation waits (or a few milliseconds after the first asked), their rows go through the final
norm and the LM head as one matrix product: the output matrix is read once per round instead of
once per generation. A lone generation goes through alone, unchanged and without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import torch

from beectl.head import LocalHead


class HeadBatcher:
    """`await batcher.logits(hidden)`: LocalHead.logits, batched across callers."""

    def __init__(self, head: LocalHead, *, max_wait_s: float = 0.005) -> None:
        self.head = head
        self.max_wait_s = max_wait_s
        self.active = 0  # generations using this batcher now (see member())
        self._waiting: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.flushes = 0
        self.rows = 0

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """Around one generation: while it runs, a flush waits (up to max_wait_s) for it."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self._waiting and len(self._waiting) >= self.active:
                self._schedule(0.0)

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, tokens, hidden_size] -> float32 logits, like LocalHead.logits.

        The product runs once every active generation waits for it, or max_wait_s after the
        first one asked (a generation whose servers answer later joins the next one)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        first = not self._waiting
        self._waiting.append((hidden, future))
        if len(self._waiting) >= self.active:
            self._schedule(0.0)
        elif first:
            self._schedule(self.max_wait_s)
        return await future

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if delay > 0:
                return  # a flush is due already
            self._timer.cancel()
        self._timer = (
            loop.call_soon(self._flush) if delay <= 0 else loop.call_later(delay, self._flush)
        )

    def _flush(self) -> None:
        batch = [(h, f) for h, f in self._waiting if not f.done()]  # a cancelled caller left
        self._waiting = []
        self._timer = None
        if not batch:
            return
        self.flushes += 1
        try:
            if len(batch) == 1:
                outs = [self.head.logits(batch[0][0])]
            else:
                shapes = {h.shape[1:] for h, _ in batch}
                if len(shapes) != 1:  # different token counts: one product each
                    outs = [self.head.logits(h) for h, _ in batch]
                else:
                    merged = self.head.logits(torch.cat([h for h, _ in batch], dim=0))
                    outs = list(merged.split([h.shape[0] for h, _ in batch], dim=0))
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        for (hidden, future), out in zip(batch, outs, strict=True):
            self.rows += hidden.shape[0]
            future.set_result(out)
