"""The KV cache budget: how many tokens of cache each session may hold, out of a server-wide total."""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import time
from dataclasses import dataclass

from protocol.errors import BadRequestError, BeeError, ServerBusyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    owner: str
    tokens: int


class KVBudget:
    """Reserve-before-use accounting of KV cache tokens (one token = one position of one sequence
    in every block of the span). A session reserves `batch * max_length` at open; steps can never
    grow its cache past that, so the sum of caches never exceeds the budget."""

    def __init__(self, capacity_tokens: int, bytes_per_token: int) -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.capacity_tokens = capacity_tokens
        self.bytes_per_token = bytes_per_token
        self._reserved: dict[str, int] = {}
        self._freed = asyncio.Event()  # replaced after each wake-up; waiters hold the old one
        self._queue: collections.deque[object] = collections.deque()  # waiting, in order
        self._refusal: BeeError | None = None

    @property
    def used_tokens(self) -> int:
        return sum(self._reserved.values())

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_token

    def __len__(self) -> int:
        return len(self._reserved)

    def reserve(self, owner: str, tokens: int) -> Reservation:
        """Reserve `tokens` for `owner`; ServerBusyError (retryable) if they do not fit now."""
        if tokens <= 0:
            raise BadRequestError(f"a session must reserve at least one token, asked {tokens}")
        if owner in self._reserved:
            raise BadRequestError(f"{owner} already holds a reservation")
        if tokens > self.capacity_tokens:
            raise BadRequestError(
                f"session needs {tokens} cache tokens but this server's whole budget is "
                f"{self.capacity_tokens}; use a shorter max_length or another server"
            )
        if tokens > self.free_tokens:
            raise ServerBusyError(
                f"server full: session needs {tokens} cache tokens, {self.free_tokens} of "
                f"{self.capacity_tokens} free"
            )
        self._reserved[owner] = tokens
        log.debug("kv.reserve owner=%s tokens=%d free=%d", owner, tokens, self.free_tokens)
        return Reservation(owner, tokens)

    async def reserve_waiting(self, owner: str, tokens: int, wait_s: float) -> Reservation:
        """`reserve`, but while the tokens do not fit, wait up to `wait_s` for releases.

        Waiting reservations are served first come, first served: a newcomer does not take room
        that an earlier waiter needs. Raises ServerBusyError (retryable) when the wait ends
        without room, BadRequestError at once for more than the whole budget, and the refusal
        given to `refuse_waiters` (a drain) if that comes first."""
        if not self._queue:
            try:
                return self.reserve(owner, tokens)
            except ServerBusyError:
                if wait_s <= 0:
                    raise
        elif wait_s <= 0:
            raise ServerBusyError(
                f"server full: session needs {tokens} cache tokens, {self.free_tokens} of "
                f"{self.capacity_tokens} free, {len(self._queue)} sessions waiting before it"
            )
        began = time.monotonic()
        ticket = object()
        self._queue.append(ticket)
        try:
            while True:
                if self._refusal is not None:
                    raise copy.copy(self._refusal)
                if self._queue[0] is ticket:
                    try:
                        return self.reserve(owner, tokens)
                    except ServerBusyError:
                        pass
                remaining = began + wait_s - time.monotonic()
                if remaining <= 0:
                    ahead = self._queue.index(ticket)
                    raise ServerBusyError(
                        f"server full: session needs {tokens} cache tokens, {self.free_tokens} "
                        f"of {self.capacity_tokens} free"
                        + (f", {ahead} sessions waiting before it" if ahead else "")
                        + f" (waited {time.monotonic() - began:.1f} s)"
                    )
                freed = self._freed
                try:
                    async with asyncio.timeout(remaining):
                        await freed.wait()
                except TimeoutError:
                    pass
        finally:
            self._queue.remove(ticket)
            self._wake()  # the next in line may fit now

    @property
    def waiting(self) -> int:
        """Reservations waiting for room right now."""
        return len(self._queue)

    def refuse_waiters(self, refusal: BeeError) -> None:
        """Fail every waiting (and every later waiting) reservation with `refusal` (a drain)."""
        self._refusal = refusal
        self._wake()

    def _wake(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    def release(self, owner: str) -> None:
        """Give a reservation back (waking waiting reservations); releasing twice is harmless."""
        if self._reserved.pop(owner, None) is not None:
            log.debug("kv.release owner=%s free=%d", owner, self.free_tokens)
            self._wake()
