"""The throughput probe: tokens per second per block of one-token steps on this device."""

from __future__ import annotations

import math
import time

import torch

from beed.server.backend import BlockBackend


def measure_block_throughput(backend: BlockBackend, repeats: int = 5) -> float:
    """Tokens per second per block of one-token steps, measured on this device."""
    info = backend.info
    blocks = backend.blocks(info.start, info.end)
    cache = backend.new_cache()
    hidden = torch.zeros(1, 1, info.hidden_size)
    backend.step(cache, blocks, hidden, 0)
    seconds = math.inf
    for i in range(repeats):  # the fastest step: the others were slowed by someone else
        began = time.perf_counter()
        backend.step(cache, blocks, hidden, i + 1)
        seconds = min(seconds, time.perf_counter() - began)
    return (info.end - info.start) / seconds if 0 < seconds < math.inf else 0.0
