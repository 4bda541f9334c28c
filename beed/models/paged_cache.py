"""A preallocated KV cache: one arena of key/value rows per block, handed to sessions in pages.

Every block of a span owns two tensors allocated once at start-up, `keys[b]` and `values[b]` of
shape `[rows, kv_heads, head_dim]` (one row = one position of one sequence). A session's cache is
a list of pages (`PAGE_TOKENS` rows each) per sequence, and a table mapping each of its positions
to an arena row. Appending writes rows in place (`index_copy_`); attention reads a session's
positions back with one gather (`index_select`) in the layout transformers' attention expects.

Nothing is ever reallocated while the server runs, so the addresses are fixed: the CUDA graphs of
decode steps (decode_graphs.py) capture the arena itself and only the small index tensors change
between replays. Row 0 is scratch (padding rows of a graph write there, and positions past a
session's table read it): it is never given to a session.

Unlike transformers' sliding-window caches, every position is kept, also in sliding-window
blocks (the mask applies the window), so a session can always roll back.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from protocol.errors import BadRequestError, InternalServerError, ServerBusyError

PAGE_TOKENS = 16


class KVArena:
    """The keys and values of every session of a span, preallocated (see the module's doc)."""

    def __init__(
        self,
        blocks: int,
        kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        pages = -(-max(capacity_tokens, 1) // PAGE_TOKENS) + 1  # + the scratch page
        rows = pages * PAGE_TOKENS
        # Zeros, not empty: attention multiplies masked positions by a weight of 0, and 0 * NaN
        # of uninitialised memory would be NaN.
        self.keys = [
            torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(blocks)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.device = device
        self.pages = pages
        self._free = list(range(pages - 1, 0, -1))  # page 0 is scratch
        self._lock = threading.Lock()  # pages are taken on compute threads, given back anywhere

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def take(self, count: int) -> list[int]:
        with self._lock:
            if count > len(self._free):
                raise ServerBusyError(
                    f"the KV cache has {len(self._free)} free pages of {PAGE_TOKENS} tokens, "
                    f"{count} are needed"
                )
            taken = self._free[-count:] if count else []
            del self._free[len(self._free) - count :]
            return taken

    def give(self, pages: list[int]) -> None:
        with self._lock:
            self._free.extend(pages)
            pages.clear()


class PagedSpanCache:
    """One session's keys and values in a KVArena (the SpanCache contract)."""

    def __init__(self, arena: KVArena, blocks: int) -> None:
        self.arena = arena
        self.lengths = [0] * blocks
        self.rows = 0  # sequences (the session's batch), fixed by its first step
        self._pages: list[int] = []  # every page held, for release
        self._row_pages: list[list[int]] = []
        # Arena row of each (sequence, position), on the device and (for decode graphs) the host.
        self.host_table = torch.zeros(0, 0, dtype=torch.long)
        self.table = self.host_table.to(arena.device)
        # The pages go back when the last reference goes: a step still running on the cache of a
        # session that was just closed keeps them until it ends (no other session gets them).
        weakref.finalize(self, arena.give, self._pages)

    @property
    def capacity(self) -> int:
        return int(self.table.shape[1])

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `length` positions of each of `rows` sequences (before a step runs, so
        that a full arena refuses the step before anything is written)."""
        if self.rows == 0:
            self.rows = rows
            self._row_pages = [[] for _ in range(rows)]
        elif rows != self.rows:
            raise BadRequestError(f"this session has {self.rows} sequences, the step has {rows}")
        need = -(-length // PAGE_TOKENS) - len(self._row_pages[0])
        if need <= 0:
            return
        taken = self.arena.take(need * rows)
        self._pages.extend(taken)
        for i, row in enumerate(self._row_pages):
            row.extend(taken[i * need : (i + 1) * need])
        pages = torch.tensor(self._row_pages, dtype=torch.long)
        offsets = torch.arange(PAGE_TOKENS, dtype=torch.long)
        self.host_table = (pages[:, :, None] * PAGE_TOKENS + offsets).reshape(rows, -1)
        self.table = self.host_table.to(self.arena.device)

    # -- transformers' side: the attention modules store and read keys and values through this

    @property
    def update(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return self._update

    def _update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, tokens, dim = key.shape
        start = self.lengths[layer_idx]
        end = start + tokens
        if batch != self.rows or end > self.capacity:
            raise InternalServerError(f"cache of {self.rows}x{self.capacity} cannot take this step")
        rows = self.table[:, start:end].reshape(-1)
        keys, values = self.arena.keys[layer_idx], self.arena.values[layer_idx]
        keys.index_copy_(0, rows, key.transpose(1, 2).reshape(-1, heads, dim))
        values.index_copy_(0, rows, value.transpose(1, 2).reshape(-1, heads, dim))
        self.lengths[layer_idx] = end
        read = self.table[:, :end].reshape(-1)
        return (
            keys.index_select(0, read).view(batch, end, heads, dim).transpose(1, 2),
            values.index_select(0, read).view(batch, end, heads, dim).transpose(1, 2),
        )

    def mask(
        self, block: int, tokens: int, attention_mask: torch.Tensor | None, window: int | None
    ) -> torch.Tensor:
        """The boolean attention mask `[batch, 1, tokens, past + tokens]` of the next `tokens`
        positions (causal, the client's padding mask, and a sliding `window` if given), as
        transformers builds it for sdpa."""
        past = self.lengths[block]
        return causal_mask(
            torch.full((self.rows,), past, dtype=torch.long, device=self.arena.device),
            tokens,
            past + tokens,
            attention_mask,
            window,
        )

    # -- the server's side (SpanCache)

    def tokens(self, block: int) -> int:
        return self.lengths[block]

    def rollback(self, blocks: range, position: int, first_block: int = 0) -> None:
        length = self.tokens(blocks[0])
        if position < 0 or position > length:
            raise BadRequestError(
                f"cannot truncate to {position}: the session holds {length} tokens"
            )
        for i in blocks:
            self.lengths[i] = min(self.lengths[i], position)

    def snapshot(self) -> list[int]:
        return list(self.lengths)

    def restore(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)


def causal_mask(
    past: torch.Tensor,
    tokens: int,
    length: int,
    attention_mask: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor:
    """`[batch, 1, tokens, length]` booleans: query `i` of sequence `b` sits at position
    `past[b] + i` and may see key `j` if `j <= past[b] + i`, the padding mask allows `j`, and
    `j > past[b] + i - window`. A query that may see nothing (a padded position) sees every key
    instead, as transformers does for sdpa, so that no row is all -inf (NaN)."""
    device = past.device
    query = past[:, None] + torch.arange(tokens, device=device)[None, :]  # [batch, tokens]
    key = torch.arange(length, device=device)
    allowed = key[None, None, :] <= query[:, :, None]
    if window is not None:
        allowed &= key[None, None, :] > query[:, :, None] - window
    if attention_mask is not None:
        allowed &= attention_mask[:, None, :length].to(torch.bool)
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]
