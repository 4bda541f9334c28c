"""TaskOwner: the parent of a DHT node's background tasks; every task is tracked and cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskOwner:
    """Tracks background tasks of one node; failures are logged, `aclose` cancels and awaits all.

    DHTNode has a start()/aclose() lifetime rather than one `async with` block, so its tasks
    hang off this owner instead of an asyncio.TaskGroup; nothing is fire-and-forget.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Run `coro` as a child task, or close it unstarted if the owner is closed."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task.failed name=%s error=%r", task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Cancel every child and wait (bounded) until they have all finished."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("task.stuck name=%s", task.get_name())
