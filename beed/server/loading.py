"""Loading a span as the server's config asks, and sizing its KV budget."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from beed.server.backend import BlockBackend
from beed.server.config import ServerConfig


def load_backend(cfg: ServerConfig, model_dir: Path, span: tuple[int, int]) -> BlockBackend:
    """The blocks `span` of the model, with the config's dtype, device, cache, graphs and
    offload (blocking: run it on the compute thread)."""
    return BlockBackend(
        model_dir,
        span[0],
        span[1],
        dtype=cfg.dtype,
        device=cfg.device,
        batch_matmul=cfg.scheduler.batch_matmul,
        kv_cache=cfg.kv_cache,
        decode_graphs=None if cfg.cuda_graphs else False,
        offload_weights=cfg.offload_weights,
        compile_step=cfg.torch_compile,
        quant=cfg.quant,
    )


def kv_budget_tokens(cfg: ServerConfig, backend: BlockBackend) -> int:
    """--kv-budget-tokens, else kv_memory_fraction of the memory free once the weights are in."""
    if cfg.kv_budget_tokens is not None:
        return cfg.kv_budget_tokens
    if backend.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(backend.device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * cfg.kv_memory_fraction) // backend.info.kv_bytes_per_token
