"""One-token decode steps as CUDA graphs: a span's whole forward replayed with one launch.

A decode step of a 16-block span is ~500 small kernels; launched one by one from Python it
takes ~10x longer than the GPU needs to read the weights. Here the forward of `rows` one-token
sequences over `blocks`, attending to at most `length` positions, is captured once as a CUDA
graph and then replayed: per step only the inputs change, copied into static buffers.

What a graph captures is transformers' own decoder layers (Span.run_layers), with:
- keys and values in the preallocated arena (paged_cache.py): each row's new key/value is
  written to the arena row its session's table names, and the row's positions `0..length-1`
  are gathered back through the table, so one graph serves any sessions (sessions differ only
  in the index tensors);
- the masks computed inside the graph from each row's length and padding mask;
- rows padded up to a bucket (1, 2, 4, ...) with dummy rows that write and read the arena's
  scratch row, and lengths rounded up to a power of two (at least `MIN_LENGTH`).

Without CUDA (`capture=False`) the very same code runs eagerly: the tests exercise it on CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from beed.models.adapters import Span, SpanInput
from beed.models.paged_cache import KVArena, PagedSpanCache
from protocol.errors import InternalServerError

log = logging.getLogger(__name__)

MIN_LENGTH = 128
MAX_ROWS = 256
# Above this many gathered positions (rows x length) a step runs eagerly: the gather's
# temporaries of one block would be too large to keep in a graph's pool.
MAX_GATHER = 1 << 18


def _bucket(n: int, least: int = 1) -> int:
    size = least
    while size < n:
        size *= 2
    return size


@dataclass
class _Graph:
    """Static buffers of one (blocks, rows, length) bucket and, on CUDA, its captured graph."""

    blocks: range
    rows: int
    length: int
    ints: torch.Tensor  # [rows, 3 + 2 * length]: position, write row, length, gather rows, pad
    hidden: torch.Tensor  # [rows, 1, hidden]
    out: torch.Tensor  # [rows, 1, hidden]
    host_ints: torch.Tensor  # pinned mirrors (plain tensors without CUDA)
    host_hidden: torch.Tensor
    host_out: torch.Tensor
    graph: Any = None
    replays: int = 0
    positions: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.positions = torch.arange(self.length, device=self.ints.device)


class _GraphCache:
    """The cache a graph's layers see: writes each row's one new position into the arena and
    reads back each row's `length` positions, all through index tensors of the static buffers."""

    def __init__(self, arena: KVArena, write: torch.Tensor, gather: torch.Tensor) -> None:
        self.arena, self.write, self.gather = arena, write, gather

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.arena.keys[layer_idx], self.arena.values[layer_idx]
        keys.index_copy_(0, self.write, key[:, :, 0])
        values.index_copy_(0, self.write, value[:, :, 0])
        return keys[self.gather].transpose(1, 2), values[self.gather].transpose(1, 2)


class DecodeGraphs:
    """Runs one-token steps of sessions with paged caches through per-bucket graphs."""

    def __init__(
        self, span: Span, arena: KVArena, *, capture: bool, compile_step: bool = False
    ) -> None:
        self.span = span
        self.arena = arena
        self.capture = capture
        self.device = arena.device
        self.dtype = next(span.parameters()).dtype
        self.hidden_size = int(span.config.hidden_size)
        self._graphs: dict[tuple[int, int, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = threading.Lock()  # one replay at a time: the buffers are shared
        # With `compile_step`, what a graph holds is the forward as torch.compile (inductor)
        # fuses it: a norm, the rotary embedding, the MLP's activation become one kernel each
        # instead of ~6 (at batch 1 a small kernel costs as much as a large one's launch).
        self._step_fn: Any = self._compute
        self.compiled = False
        if compile_step:
            _raise_recompile_limits()
            self._step_fn = torch.compile(self._compute, dynamic=None)
            self.compiled = True
        self.captured = 0  # graphs captured (or, without CUDA, buckets built)
        self.replays = 0
        self.capture_seconds = 0.0

    @staticmethod
    def fits(items: Sequence[SpanInput]) -> bool:
        """Whether these steps can take a graph: one new token each, on paged caches."""
        rows = sum(int(item.hidden.shape[0]) for item in items)
        return (
            rows <= MAX_ROWS
            and all(item.hidden.shape[1] == 1 for item in items)
            and all(isinstance(item.cache, PagedSpanCache) for item in items)
        )

    def gather_fits(self, items: Sequence[SpanInput], blocks: range) -> bool:
        rows = _bucket(sum(int(item.hidden.shape[0]) for item in items))
        return rows * self._length_bucket(items, blocks) <= MAX_GATHER

    @staticmethod
    def _length_bucket(items: Sequence[SpanInput], blocks: range) -> int:
        longest = max(_paged(item).lengths[blocks[0]] for item in items) + 1
        return _bucket(longest, MIN_LENGTH)

    def run(self, items: Sequence[SpanInput], blocks: range) -> list[torch.Tensor]:
        """The steps' outputs (host tensors), each session's cache one position longer."""
        rows = sum(int(item.hidden.shape[0]) for item in items)
        key = (blocks.start, blocks.stop, _bucket(rows), self._length_bucket(items, blocks))
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._build(blocks, key[2], key[3])
                self._graphs[key] = graph
            self._fill(graph, items, blocks)
            if graph.graph is not None:
                graph.graph.replay()
            else:
                self._step_fn(graph)
            graph.replays += 1
            self.replays += 1
            graph.host_out.copy_(graph.out, non_blocking=True)
            if self.capture:
                torch.cuda.current_stream(self.device).synchronize()
            outputs, first = [], 0
            for item in items:
                batch = int(item.hidden.shape[0])
                outputs.append(graph.host_out[first : first + batch].clone())
                first += batch
        for item in items:
            cache = _paged(item)
            for i in blocks:
                cache.lengths[i] += 1
        return outputs

    def _fill(self, graph: _Graph, items: Sequence[SpanInput], blocks: range) -> None:
        """Write the steps into the host buffers, padding rows pointing at scratch, and copy
        them to the device (asynchronously from pinned memory on CUDA)."""
        ints, length = graph.host_ints, graph.length
        ints.zero_()
        ints[:, 3 + length] = 1  # padding rows: length 0, may see position 0 (the scratch row)
        first = 0
        for item in items:
            cache = _paged(item)
            batch = int(item.hidden.shape[0])
            rows = slice(first, first + batch)
            past = cache.lengths[blocks[0]]
            table = cache.host_table
            ints[rows, 0] = item.position_ids[:, 0].cpu()
            ints[rows, 1] = table[:, past]
            ints[rows, 2] = past
            seen = min(length, table.shape[1])
            ints[rows, 3 : 3 + seen] = table[:, :seen]
            pad = ints[rows, 3 + length : 3 + length + past + 1]
            if item.mask is None:
                pad.fill_(1)
            else:
                pad.copy_(item.mask[:, : past + 1].cpu())
            graph.host_hidden[rows].copy_(item.hidden)
            first += batch
        graph.host_hidden[first:].zero_()
        graph.ints.copy_(ints, non_blocking=True)
        graph.hidden.copy_(graph.host_hidden, non_blocking=True)

    def _compute(self, graph: _Graph) -> None:
        """The forward a graph holds (captured once on CUDA, run as is without)."""
        length = graph.length
        ints = graph.ints
        position_ids = ints[:, 0:1]
        lengths = ints[:, 2:3]
        visible = (graph.positions[None, :] <= lengths) & (ints[:, 3 + length :] != 0)
        masks: dict[str, torch.Tensor] = {}
        rotaries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kinds = self.span.kinds
        for i in graph.blocks:
            kind = kinds[i]
            if kind in masks:
                continue
            allowed = visible
            window = self.span.window(kind)
            if window is not None:
                allowed = allowed & (graph.positions[None, :] > lengths - window)
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
            masks[kind] = allowed[:, None, None, :]
            rotaries[kind] = self.span.rotary_of(kind, graph.hidden, position_ids)
        cache = _GraphCache(self.arena, ints[:, 1], ints[:, 3 : 3 + length])
        out = self.span.run_layers(
            graph.hidden, graph.blocks, kinds, masks, rotaries, position_ids, cache
        )
        graph.out.copy_(out)

    def _build(self, blocks: range, rows: int, length: int) -> _Graph:
        device, pin = self.device, self.capture
        shape = (rows, 3 + 2 * length)
        host_ints = torch.zeros(shape, dtype=torch.long, pin_memory=pin)
        host_ints[:, 3 + length] = 1
        host_hidden = torch.zeros(rows, 1, self.hidden_size, dtype=self.dtype, pin_memory=pin)
        graph = _Graph(
            blocks=blocks,
            rows=rows,
            length=length,
            ints=host_ints.to(device),
            hidden=torch.zeros(rows, 1, self.hidden_size, dtype=self.dtype, device=device),
            out=torch.zeros(rows, 1, self.hidden_size, dtype=self.dtype, device=device),
            host_ints=host_ints,
            host_hidden=host_hidden,
            host_out=torch.zeros_like(host_hidden, pin_memory=pin),
        )
        if not self.capture:
            self.captured += 1
            return graph
        started = time.perf_counter()
        try:
            graph.graph = self._capture(graph)
        except Exception as exc:
            if not self.compiled:
                raise
            # Inductor could not compile this forward: capture the plain one (it is exact too).
            log.warning("graphs.compile_failed error=%r; capturing without torch.compile", exc)
            self._step_fn, self.compiled = self._compute, False
            graph.graph = self._capture(graph)
        self.captured += 1
        self.capture_seconds += time.perf_counter() - started
        log.info(
            "graphs.captured blocks=%d:%d rows=%d length=%d seconds=%.2f",
            blocks.start,
            blocks.stop,
            rows,
            length,
            time.perf_counter() - started,
        )
        return graph

    def _capture(self, graph: _Graph) -> Any:
        """Warm up on a side stream (compilation, lazy initialisation, cuBLAS workspaces), then
        capture. The buffers hold padding rows only: warm-up and capture write the scratch row."""
        device = self.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_fn(graph)
        torch.cuda.current_stream(device).wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
            self._step_fn(graph)
        return cuda_graph


def _raise_recompile_limits() -> None:
    """One compiled forward per (blocks, rows, length) bucket: more than dynamo's default 8."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))


def _paged(item: SpanInput) -> PagedSpanCache:
    cache = item.cache
    if not isinstance(cache, PagedSpanCache):  # fits() admits paged caches only
        raise InternalServerError("a decode graph was handed a step without a paged cache")
    return cache
