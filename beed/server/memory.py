"""The server's budget for request tensors held in memory, and giving freed memory back.

Every frame that carries tensors reserves its decoded size (Σ raw_len, known from the header
before anything is decompressed) against a per-connection and a server-wide budget; the bytes are
released when the request that holds them ends. A connection over its share is not read (its
peer's TCP window fills up) until its earlier requests finish; a frame that cannot get room within
the wait is refused with ServerBusyError on its stream, undecoded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

from beed.server.config import ServerConfig
from protocol.errors import RequestTooLargeError, ServerBusyError

log = logging.getLogger(__name__)

MiB = 1 << 20
# Give freed heap back to the OS after this many bytes were released since the last time
# (glibc keeps freed arenas otherwise: RSS would stay at the attack's peak).
TRIM_AFTER_BYTES = 64 * MiB
SMALL_REQUEST_BYTES = 1 * MiB


def request_memory(config: ServerConfig, hidden_size: int) -> MemoryBudget:
    """The budget of one server: a connection may hold two of its largest requests (a request
    of max_request_tokens rows x tokens in float32 with its mask and position ids), the server
    four connections' worth (or max_buffer_bytes), at least 256 MiB."""
    limits = config.limits
    tokens = max(limits.max_request_tokens, limits.max_backward_tokens * 2)
    per_connection = 2 * tokens * (4 * hidden_size + 16) + MiB
    total = limits.max_buffer_bytes or max(4 * per_connection, 256 * MiB)
    return MemoryBudget(total, per_connection)


@dataclass
class _Waiter:
    connection: int
    nbytes: int
    future: asyncio.Future[None]


class MemoryBudget:
    """Bytes of decoded request tensors held at once, server-wide and per connection."""

    def __init__(self, total_bytes: int, per_connection_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.per_connection_bytes = min(per_connection_bytes, total_bytes)
        self.used_bytes = 0
        self.peak_bytes = 0
        self.refused = 0
        self._by_connection: collections.Counter[int] = collections.Counter()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._released_since_trim = 0

    def _fits(self, connection: int, nbytes: int) -> bool:
        return (
            self.used_bytes + nbytes <= self.total_bytes
            and self._by_connection[connection] + nbytes <= self.per_connection_bytes
        )

    async def acquire(self, connection: int, nbytes: int, wait_s: float) -> None:
        """Reserve nbytes for one request of `connection`, waiting up to wait_s (FIFO) for room.

        RequestTooLargeError if it could never fit; ServerBusyError if no room came in time."""
        if nbytes > self.per_connection_bytes:
            raise RequestTooLargeError(
                f"a request of {nbytes} decoded bytes exceeds this server's per-connection "
                f"budget of {self.per_connection_bytes} bytes"
            )
        # Small requests (decode steps) never queue behind large ones waiting for room: a
        # stranger's big frames must not hold up everyone's next token.
        if (not self._waiters or nbytes <= SMALL_REQUEST_BYTES) and self._fits(connection, nbytes):
            self._take(connection, nbytes)
            return
        waiter = _Waiter(connection, nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(waiter.future)
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                self.refused += 1
                raise ServerBusyError(
                    f"no memory for a request of {nbytes} bytes within {wait_s} s "
                    f"({self.used_bytes} of {self.total_bytes} bytes held by requests)"
                ) from None
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter that gave up: out of the queue, or its grant given back if it came late."""
        if waiter.future.done():
            self.release(waiter.connection, waiter.nbytes)
        else:
            waiter.future.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._wake()

    def _take(self, connection: int, nbytes: int) -> None:
        self.used_bytes += nbytes
        self._by_connection[connection] += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, connection: int, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.used_bytes -= nbytes
        left = self._by_connection[connection] - nbytes
        if left > 0:
            self._by_connection[connection] = left
        else:
            del self._by_connection[connection]
        self._released_since_trim += nbytes
        self._wake()
        if self._released_since_trim >= TRIM_AFTER_BYTES and self.used_bytes == 0:
            self._released_since_trim = 0
            trim_heap()

    def _wake(self) -> None:
        """Grant waiters in order; one that does not fit yet blocks those behind it only when
        it waits for server-wide room (a connection over its own share does not block others)."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            if self._fits(waiter.connection, waiter.nbytes):
                self._waiters.remove(waiter)
                self._take(waiter.connection, waiter.nbytes)
                waiter.future.set_result(None)
            elif self.used_bytes + waiter.nbytes > self.total_bytes:
                break

    def release_connection(self, connection: int) -> None:
        """Give back whatever a closed connection still holds."""
        self.release(connection, self._by_connection.get(connection, 0))

    def held_by(self, connection: int) -> int:
        return self._by_connection.get(connection, 0)


_libc: ctypes.CDLL | bool | None = None
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 4 * MiB


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            if _libc and not (hasattr(_libc, "malloc_trim") and hasattr(_libc, "mallopt")):
                _libc = False
        except OSError:
            _libc = False
    return _libc if isinstance(_libc, ctypes.CDLL) else None


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def return_large_blocks() -> None:
    """Make glibc serve blocks of MMAP_THRESHOLD_BYTES or more with mmap, always.

    By default the threshold grows up to 32 MiB after large frees, and then large tensors come
    from the heap, whose pages are not returned when freed: a server's RSS stayed at an attack's
    peak. Called once at start (a no-op outside glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
