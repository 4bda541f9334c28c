"""TaskOwner: the parent of a component's background tasks; a crashed child stops its owner.

Components with a start()/aclose() lifetime (a DHT node, a server, a peer connection) cannot hold
their children in one `async with asyncio.TaskGroup()` block, so their tasks hang off an owner:
every task is tracked, `aclose()` cancels and awaits them all, and nothing is fire-and-forget.

A child that raises (anything but cancellation) is a bug or a dead component. By default the owner
then fails like a TaskGroup: it logs the error, cancels the other children, refuses new ones,
keeps the exception in `failure` and calls `on_crash(exc)`, so the component that owns it stops
and reports it (a server exits non-zero). `isolate=True` is for owners of independent per-request
tasks (one per connection, one per datagram): a crash there is logged and ends only that child.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskOwner:
    """Tracks the background tasks of one component; see the module docstring for crashes."""

    def __init__(
        self,
        name: str,
        *,
        on_crash: Callable[[BaseException], object] | None = None,
        isolate: bool = False,
    ) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._on_crash = on_crash
        self._isolate = isolate
        self.failure: BaseException | None = None  # the first child crash (not isolated)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        """Run `coro` as a child task, or close it unstarted if the owner is closed or failed."""
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
        if exc is None:
            return
        log.error("task.failed name=%s error=%r", task.get_name(), exc, exc_info=exc)
        if self._isolate or self._closed:
            return
        self.failure = exc
        self._closed = True
        for sibling in list(self._tasks):
            sibling.cancel()
        if self._on_crash is not None:
            try:
                self._on_crash(exc)
            except Exception:  # the crash handler must not hide the crash
                log.exception("task.on_crash_failed owner=%s", self._name)

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
