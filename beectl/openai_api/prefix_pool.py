"""Sessions kept open between API requests, so that a conversation's next turn sends only its
new tokens (prefix reuse).

A chat client sends the whole conversation with every request; its beginning is what the
previous request's session holds already (the prompt, then the answer). After a request, its
session goes back to the pool with the ids it holds; a new request takes the idle session whose
ids are the longest prefix of its own (at least MIN_REUSE of them), or opens a fresh one. Idle
sessions hold cache on the servers, so the pool is small and the oldest one is closed first.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass

import torch

from beectl.model import RemoteModel
from beectl.session import InferenceSession
from protocol.errors import BeeError

MIN_REUSE = 8  # tokens: less than this is not worth holding a session for


@dataclass
class Pooled:
    session: InferenceSession
    cached: torch.Tensor | None  # [1, position]: the ids the session holds


class PrefixPool:
    def __init__(
        self, remote: RemoteModel, *, max_idle: int = 8, min_length: int = 2048, context: int = 0
    ) -> None:
        self.remote = remote
        self.max_idle = max_idle
        self.min_length = min_length
        self.context = context
        self._idle: collections.OrderedDict[int, Pooled] = collections.OrderedDict()
        self.reused_tokens = 0
        self.hits = 0

    async def take(self, ids: list[int], need: int, *, reuse: bool = True) -> Pooled:
        """A session for a request of `ids` that needs `need` positions in all: the idle one
        holding the longest prefix of `ids`, or a fresh (open) one."""
        best, best_len = None, 0
        for key, entry in self._idle.items() if reuse else ():
            cached = entry.cached
            if cached is None or entry.session.max_length < need:
                continue
            n = int(cached.shape[1])
            if best_len < n < len(ids) and cached[0].tolist() == ids[:n]:
                best, best_len = key, n
        if best is not None and best_len >= MIN_REUSE:
            self.hits += 1
            self.reused_tokens += best_len
            return self._idle.pop(best)
        length = max(need, self.min_length)
        if self.context:
            length = max(need, min(length, self.context))
        session = self.remote.inference_session(max_length=length)
        try:
            await session.open()
        except BeeError:
            if not self._idle:
                raise
            # Full servers, or this client's share of them: the idle sessions make room.
            await self.aclose()
            session = self.remote.inference_session(max_length=length)
            await session.open()
        return Pooled(session, None)

    async def give(self, entry: Pooled) -> None:
        """Back to the pool after a request that ended cleanly (the oldest idle one closes if the
        pool is full)."""
        self._idle[id(entry)] = entry
        while len(self._idle) > self.max_idle:
            _, oldest = self._idle.popitem(last=False)
            await self.discard(oldest)

    async def discard(self, entry: Pooled) -> None:
        with contextlib.suppress(Exception):
            await entry.session.aclose()

    async def aclose(self) -> None:
        while self._idle:
            _, entry = self._idle.popitem(last=False)
            await self.discard(entry)
