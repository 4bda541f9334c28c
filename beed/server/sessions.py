"""Inference sessions held by a server: their caches, reservations and idle deadlines."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from beed.server.config import PeerLimits
from beed.server.kv_budget import KVBudget
from protocol.errors import BadRequestError, QuotaExceededError, UnknownSessionError

log = logging.getLogger(__name__)


@dataclass
class Session:
    """One client's inference session on this server's blocks."""

    key: str  # registry key: connection id and stream id
    blocks: range  # local block indices of the span's blocks this session runs
    span: tuple[int, int]  # the same as global [start, end)
    max_length: int  # positions the session may fill
    batch_size: int
    timeout_s: float  # idle lifetime
    cache: Any  # the backend's cache object
    backend: Any  # the BlockBackend the session runs on (an old one after the server moved)
    on_close: Callable[[], object] | None = None  # frees the connection's stream slot
    push_token: str = ""  # Pushes carrying this token run as this session's steps ("" = none)
    # Sends a message to the client that opened the session, on its connection (pushed steps'
    # results go there).
    send_to_owner: Callable[[Any], Awaitable[None]] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    length: int = 0  # positions filled
    peer: str = "local"  # the address (IPv4, or IPv6 /64) of the connection that opened it
    # Until its first step a session keeps its cache only this long (an idle grab is cheap).
    first_step_timeout_s: float = float("inf")
    stepped: bool = False
    # The last step run, (step_id, position), and its output: a step that arrives again (by push
    # and by the client's fallback) is answered from here instead of running twice.
    last_step: tuple[int, int] | None = None
    last_input: Any = None
    last_output: Any = None

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def expired(self, now: float) -> bool:
        timeout = self.timeout_s if self.stepped else min(self.timeout_s, self.first_step_timeout_s)
        return now - self.last_used > timeout and not self.lock.locked()


class SessionRegistry:
    """All open sessions of a server; each holds a KV reservation until it is closed."""

    def __init__(
        self,
        budget: KVBudget,
        on_close: Callable[[str], object] | None = None,
        limits: PeerLimits | None = None,
    ) -> None:
        self.budget = budget
        self.limits = limits or PeerLimits()
        self._peer_sessions: collections.Counter[str] = collections.Counter()
        self._peer_tokens: collections.Counter[str] = collections.Counter()
        self._on_close = on_close  # told the key of every session that closes
        self._sessions: dict[str, Session] = {}
        self._by_token: dict[str, str] = {}  # push token -> key
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    @staticmethod
    def key(connection_id: int, stream_id: int) -> str:
        return f"c{connection_id}/s{stream_id}"

    @staticmethod
    def stream_of(key: str) -> int:
        """The stream id a key was made from."""
        return int(key.rsplit("/s", 1)[1])

    @property
    def waiting(self) -> int:
        """Sessions waiting for cache memory to open."""
        return self.budget.waiting

    async def open(
        self,
        key: str,
        *,
        wait_s: float = 0.0,
        blocks: range,
        span: tuple[int, int],
        max_length: int,
        batch_size: int,
        timeout_s: float,
        cache: Any,
        backend: Any,
        on_close: Callable[[], object] | None = None,
        push_token: str = "",
        send_to_owner: Callable[[Any], Awaitable[None]] | None = None,
        peer: str = "local",
    ) -> Session:
        """Reserve the session's cache (waiting up to `wait_s` for room) and register it.

        QuotaExceededError when the peer already holds max_sessions_per_peer sessions or would
        reserve more than max_kv_share_per_peer of the budget."""
        if key in self._sessions:
            raise BadRequestError(f"a session is already open on this stream ({key})")
        if push_token and push_token in self._by_token:
            raise BadRequestError("another session already uses this push token")
        tokens = max_length * batch_size
        self._check_quota(peer, tokens)
        await self.budget.reserve_waiting(key, tokens, wait_s)
        if push_token and push_token in self._by_token:  # taken while we waited for memory
            self.budget.release(key)
            raise BadRequestError("another session already uses this push token")
        try:
            self._check_quota(peer, tokens)  # the peer's other sessions may have opened meanwhile
        except QuotaExceededError:
            self.budget.release(key)
            raise
        session = Session(
            key,
            blocks,
            span,
            max_length,
            batch_size,
            timeout_s,
            cache,
            backend,
            on_close,
            push_token=push_token,
            send_to_owner=send_to_owner,
            peer=peer,
            first_step_timeout_s=self.limits.first_step_timeout_s,
        )
        self._sessions[key] = session
        self._peer_sessions[peer] += 1
        self._peer_tokens[peer] += tokens
        if push_token:
            self._by_token[push_token] = key
        self._empty.clear()
        log.info(
            "session.open key=%s span=%d:%d max_length=%d batch=%d",
            key,
            span[0],
            span[1],
            max_length,
            batch_size,
        )
        return session

    def _check_quota(self, peer: str, tokens: int) -> None:
        limits = self.limits
        if self._peer_sessions[peer] >= limits.max_sessions_per_peer:
            raise QuotaExceededError(
                f"peer {peer} already has {self._peer_sessions[peer]} open sessions here "
                f"(max_sessions_per_peer={limits.max_sessions_per_peer})"
            )
        share = int(limits.max_kv_share_per_peer * self.budget.capacity_tokens)
        if limits.max_kv_share_per_peer < 1.0 and self._peer_tokens[peer] + tokens > share:
            raise QuotaExceededError(
                f"peer {peer} holds {self._peer_tokens[peer]} cache tokens here; {tokens} more "
                f"would pass its share of {share} (max_kv_share_per_peer="
                f"{limits.max_kv_share_per_peer})"
            )

    async def reserve_scratch(self, owner: str, peer: str, tokens: int, wait_s: float) -> None:
        """Reserve cache tokens for work that is not a session (a Forward's throwaway cache),
        under the same budget and per-peer share as sessions; release_scratch gives them back."""
        self._check_quota(peer, tokens)
        await self.budget.reserve_waiting(owner, tokens, wait_s)
        self._peer_tokens[peer] += tokens

    def release_scratch(self, owner: str, peer: str, tokens: int) -> None:
        self.budget.release(owner)
        left = self._peer_tokens[peer] - tokens
        if left > 0:
            self._peer_tokens[peer] = left
        else:
            self._peer_tokens.pop(peer, None)

    def peer_usage(self, peer: str) -> tuple[int, int]:
        """Open sessions and reserved cache tokens of one peer."""
        return self._peer_sessions.get(peer, 0), self._peer_tokens.get(peer, 0)

    def get(self, key: str) -> Session:
        session = self._sessions.get(key)
        if session is None:
            raise UnknownSessionError(
                f"no open session on this stream ({key}): closed or timed out"
            )
        return session

    def by_token(self, token: str) -> Session | None:
        """The open session that accepts Pushes with this token, if any."""
        key = self._by_token.get(token)
        return None if key is None else self._sessions.get(key)

    def close(self, key: str, reason: str) -> bool:
        session = self._sessions.pop(key, None)
        if session is None:
            return False
        self.budget.release(key)
        for counter, amount in (
            (self._peer_sessions, 1),
            (self._peer_tokens, session.max_length * session.batch_size),
        ):
            left = counter[session.peer] - amount
            if left > 0:
                counter[session.peer] = left
            else:
                counter.pop(session.peer, None)
        if session.push_token:
            self._by_token.pop(session.push_token, None)
        session.cache = None
        session.last_input = session.last_output = None
        if session.on_close is not None:
            session.on_close()
        if self._on_close is not None:
            self._on_close(key)
        if not self._sessions:
            self._empty.set()
        log.info("session.close key=%s reason=%s length=%d", key, reason, session.length)
        return True

    def on_backend(self, backend: Any) -> list[str]:
        """Keys of the sessions running on `backend`."""
        return [k for k, s in self._sessions.items() if s.backend is backend]

    def close_prefix(self, prefix: str, reason: str) -> int:
        """Close every session whose key starts with `prefix` (all of one connection)."""
        keys = [k for k in self._sessions if k.startswith(prefix)]
        for k in keys:
            self.close(k, reason)
        return len(keys)

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no session is open; False if some are still open after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        keys = [k for k, s in self._sessions.items() if s.expired(now)]
        for k in keys:
            self.close(k, "timeout")
        return len(keys)
