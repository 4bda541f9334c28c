"""The KV cache budget: how many tokens of cache each session may hold, out of a server-wide total."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from protocol.errors import BadRequestError, ServerBusyError

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
        self._freed = asyncio.Event()  # replaced after each release; waiters hold the old one
        self.waiting = 0  # reservations waiting for memory right now

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
        """`reserve`, but while the tokens do not fit yet, wait up to `wait_s` for releases.

        Raises ServerBusyError (retryable) when the wait ends without room; a request larger
        than the whole budget fails at once (BadRequestError)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        began = time.monotonic()
        while True:
            try:
                return self.reserve(owner, tokens)
            except ServerBusyError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if wait_s > 0:
                        raise ServerBusyError(
                            f"{exc} after waiting {time.monotonic() - began:.1f} s"
                        ) from None
                    raise
            freed = self._freed
            self.waiting += 1
            try:
                async with asyncio.timeout(remaining):
                    await freed.wait()
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1

    def release(self, owner: str) -> None:
        """Give a reservation back (waking waiting reservations); releasing twice is harmless."""
        if self._reserved.pop(owner, None) is not None:
            log.debug("kv.release owner=%s free=%d", owner, self.free_tokens)
            self._freed.set()
            self._freed = asyncio.Event()
