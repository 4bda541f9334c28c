"""Weights offloading: some of a span's blocks live in pinned host memory and stream in per use.

An offloaded block's parameters are views into one of two GPU staging slots (offloaded blocks
alternate between them); its weights themselves sit in one pinned host buffer. Just before the
block runs, a forward pre-hook makes sure its weights are in its slot (waiting for the copy),
and starts copying the next offloaded block into the other slot on a side stream, so that the
transfer of block k+1 overlaps the compute of block k. A copy into a slot waits for everything
the compute stream had queued when it was issued (an event), so a slot is never overwritten
while a block, or its backward, still reads it.

Only blocks beyond the two slots save memory: offloading n >= 3 blocks keeps 2 on the GPU.
Without CUDA (tests) the same bookkeeping runs with synchronous copies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from protocol.errors import BadRequestError

log = logging.getLogger(__name__)

SLOTS = 2
ALIGN = 64  # bytes
# Share of free memory the weights may not take at start-up (activations, workspaces, KV).
MEMORY_HEADROOM = 0.1


def offload_count(fraction: float, blocks: int) -> int:
    """Blocks to offload for a fraction of the span (rounded up: 0.5 of 5 blocks is 3)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"an offload fraction is between 0 and 1, got {fraction}")
    return min(blocks, int(-(-fraction * blocks // 1)))


def auto_offload_count(block_bytes: Sequence[int], free_bytes: int) -> int | None:
    """The fewest blocks to offload so that the resident ones and the staging slots fit in
    `free_bytes`; None if even offloading every block does not fit."""
    total = sum(block_bytes)
    largest = max(block_bytes)
    if total <= free_bytes:
        return 0
    for count in range(SLOTS + 1, len(block_bytes) + 1):
        # The largest blocks are not always the offloaded ones, so count the worst case.
        resident = total - sum(sorted(block_bytes)[:count])
        if resident + SLOTS * largest <= free_bytes:
            return count
    return None


def plan_offload(
    block_bytes: list[int], offload: float | str | None, device: torch.device
) -> list[int]:
    """Local indices of the blocks to keep in host memory; BadRequestError (a clear
    message at start-up) if the span cannot fit on the device, even with offload."""
    total = sum(block_bytes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"{device} has {free / 2**30:.1f} GiB free"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        where = f"this machine has {free / 2**30:.1f} GiB of memory available"
    # Room left for activations, workspaces and at least some KV cache.
    usable = int(free * (1 - MEMORY_HEADROOM))
    need = f"the span's weights take {total / 2**30:.1f} GiB"
    if offload is None or offload == 0:
        if total > usable:
            hint = " (try --offload-weights auto)" if device.type == "cuda" else ""
            raise BadRequestError(f"{need} and {where}: serve fewer blocks{hint}")
        return []
    if offload == "auto":
        count = auto_offload_count(block_bytes, usable)
        if count is None:
            raise BadRequestError(
                f"{need} and {where}: even with every block offloaded, two blocks must fit "
                "on the device; serve fewer blocks"
            )
    else:
        count = offload_count(float(offload), len(block_bytes))
    chosen = spread(count, len(block_bytes))
    resident = sum(b for i, b in enumerate(block_bytes) if i not in chosen)
    slots = SLOTS * max(block_bytes) if len(chosen) > 0 else 0
    if resident + slots > usable:
        raise BadRequestError(
            f"{need} and {where}: offloading {len(chosen)} of {len(block_bytes)} blocks "
            f"still needs {(resident + slots) / 2**30:.1f} GiB; offload more "
            "(--offload-weights auto) or serve fewer blocks"
        )
    host = sum(block_bytes[i] for i in chosen)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda" and host > available * (1 - MEMORY_HEADROOM):
        raise BadRequestError(
            f"offloading {len(chosen)} blocks needs {host / 2**30:.1f} GiB of host memory, "
            f"{available / 2**30:.1f} GiB are available"
        )
    if chosen:
        log.info("backend.offload blocks=%d/%d host_bytes=%d", len(chosen), len(block_bytes), host)
    return chosen


def spread(count: int, blocks: int) -> list[int]:
    """`count` of `blocks` local indices, evenly spaced (resident blocks' compute then sits
    between offloaded ones, and hides more of each transfer)."""
    if count <= 0:
        return []
    return sorted({int(i * blocks / count) for i in range(count)})


@dataclass
class _Block:
    index: int
    slot: int
    host: torch.Tensor  # flat pinned weights
    loaded: Any = None  # event: the copy into the slot is done
    params: list[tuple[nn.Parameter, int, torch.Size]] = field(default_factory=list)


class WeightStreamer:
    """Streams offloaded blocks of `layers` through two device slots (see the module's doc)."""

    def __init__(self, layers: nn.ModuleList, offloaded: Sequence[int], device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = list(offloaded)
        self.blocks: dict[int, _Block] = {}
        self.in_slot: list[int | None] = [None] * SLOTS
        self.loads = 0
        self.bytes_loaded = 0
        sizes = []
        dtype = None
        for k, index in enumerate(self.order):
            layer = layers[index]
            params = list(layer.parameters())
            dtype = dtype or params[0].dtype
            if any(p.dtype != dtype for p in params):
                raise ValueError("an offloaded block's parameters must share one dtype")
            # Each weight keeps the address alignment (mod 64 bytes) it would have resident:
            # CPU kernels pick their code path by alignment, and the results must be the same
            # bit for bit. (CUDA allocations are aligned; so is each weight in a slot there.)
            places, offset = [], 0
            for p in params:
                want = 0 if self.cuda else (p.data_ptr() % ALIGN) // p.element_size()
                offset += (want - offset) % (ALIGN // p.element_size())
                places.append(offset)
                offset += p.numel()
            numel = offset
            sizes.append(numel)
            host = torch.zeros(numel, dtype=dtype, pin_memory=self.cuda)
            block = _Block(index, k % SLOTS, host)
            for p, at in zip(params, places, strict=True):
                host[at : at + p.numel()].copy_(p.data.reshape(-1))
                block.params.append((p, at, p.shape))
            self.blocks[index] = block
        largest = max(sizes, default=0)
        self.slots = [torch.empty(largest, dtype=dtype, device=device) for _ in range(SLOTS)]
        for block in self.blocks.values():
            slot = self.slots[block.slot]
            for p, offset, shape in block.params:
                p.data = slot[offset : offset + shape.numel()].view(shape)
            layers[block.index].register_forward_pre_hook(self._before(block.index))
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slot_bytes = largest * (dtype.itemsize if dtype else 0) * SLOTS
        self.host_bytes = sum(sizes) * (dtype.itemsize if dtype else 0)

    def _before(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._ensure(index)
            block = self.blocks[index]
            if self.cuda and block.loaded is not None:
                torch.cuda.current_stream(self.device).wait_event(block.loaded)
            following = self._next(index)
            if following is not None and self.blocks[following].slot != block.slot:
                self._ensure(following)  # prefetch into the other slot, behind this compute

        return hook

    def _next(self, index: int) -> int | None:
        k = self.order.index(index)
        return self.order[(k + 1) % len(self.order)] if len(self.order) > 1 else None

    def _ensure(self, index: int) -> None:
        """Start copying block `index` into its slot unless it is there (or on its way)."""
        block = self.blocks[index]
        if self.in_slot[block.slot] == index:
            return
        slot = self.slots[block.slot][: block.host.numel()]
        if self.stream is not None:  # CUDA
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))  # all compute queued so far
            self.stream.wait_event(free)
            with torch.cuda.stream(self.stream):
                slot.copy_(block.host, non_blocking=True)
                block.loaded = torch.cuda.Event()
                block.loaded.record(self.stream)
        else:
            slot.copy_(block.host)
        self.in_slot[block.slot] = index
        self.loads += 1
        self.bytes_loaded += block.host.numel() * block.host.element_size()
